"""O(numel) kernels behind the tiling and hashing generators (DESIGN.md section 7).

The floor for a generated weight is one write of its size in forward and one read in backward.
Both kernels here reach it without integer index tensors over the weight:

* :func:`skew_tile` (``repeat``): copy ``c`` of the bank rotated by ``c`` places. Copy ``c`` is
  the window ``bb[c mod P : c mod P + P]`` of the doubled bank ``bb = [bank, bank]``, so the rows
  are strided views of ``bb`` (``unfold``: a ``P x P`` circulant, repeated when there are more
  copies than ``P``) copied once into the output. Backward sums the gradient's rows that read the
  same circulant row (a reshape and a sum), un-skews the ``P x P`` (or smaller) remainder (shifted
  adds), then folds the doubled bank back onto the bank. :func:`masked_tile` (``mask``) scales
  the rows in place and recomputes the tiles in backward.
* :func:`hashed_blocks` (``hash``): ROAST-style chunks. Block ``b`` of ``chunk`` contiguous weights
  reads one slot (``chunk`` contiguous values) of the bank times a sign: one row of the signed slot
  table ``[ext, -ext]`` (the bank wrapped to whole slots), gathered with ``index_select`` by one
  index per block. Backward scatter-adds whole rows of the gradient into that table (one
  ``index_add_``, one index per block) and folds it back onto the bank. With ``chunk=1`` a slot
  is one value: per-element HashedNets hashing.
* :func:`window_mix` (``superweight``): each SuperWeight mixes ``K`` templates of one bank window.
  The gathered windows (``K`` times the weight's size) are recomputed in backward, not kept.
* :func:`template_mix` (``wavg``, ``emb``): one ``(1, K) @ (K, n)`` product; backward writes the
  bank's gradient once (a broadcast multiply) and reads the templates once (the coefficients').
* :func:`bilinear` (``interpolate``): a separable stretch, each axis a sparse matrix of two entries
  per row (:func:`lerp_plan`, precomputed) applied with ``F.embedding_bag``, its transpose likewise.

Example:
    >>> import torch
    >>> skew_tile(torch.tensor([1.0, 2.0, 3.0]), 7, 0).tolist()
    [1.0, 2.0, 3.0, 2.0, 3.0, 1.0, 3.0]
    >>> rows = torch.tensor([1, 2])  # 2 slots [1, 2], [3, 1]: block 0 reads slot 1, block 1 -slot 0
    >>> hashed_blocks(torch.tensor([1.0, 2.0, 3.0]), rows, 4, 2).tolist()
    [3.0, 1.0, -1.0, -2.0]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "skew_tile",
    "masked_tile",
    "row_signs",
    "hashed_blocks",
    "hash_rows",
    "slot_count",
    "window_mix",
    "template_mix",
    "lerp_plan",
    "bilinear",
    "LerpPlan",
]

# Constants of a 32-bit integer hash (lowbias32, a bijection on 32-bit integers); every product
# stays below 2**63 because the state is masked to 32 bits before each multiplication.
_MASK32 = 0xFFFFFFFF
_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = 0x846CA68B
_SALT_MUL = 0x9E3779B1
_SIGN_SALT = 0x68E31DA4


def _mix32_(x: Tensor, scratch: Tensor) -> Tensor:
    """lowbias32, in place, of int64 ``x``'s low 32 bits (int64 result) or of int32 ``x``'s bits (int32 bits).

    ``scratch``: a tensor like ``x``. No temporaries: hashing ``n`` positions is a few passes over
    ``n`` integers (a layer hashes a whole round of its bank's slots, see :func:`hash_rows`; fresh
    tensors cost page faults). int32 halves the traffic: its right shifts are masked to be logical,
    and its products wrap modulo ``2**32`` as the int64 ones do past ``2**63`` (``_HASH_MUL_2``).
    """
    if x.dtype == torch.int32:
        for shift, multiplier in ((16, _HASH_MUL_1), (15, _HASH_MUL_2)):
            x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=scratch).bitwise_and_((1 << (32 - shift)) - 1))
            x.mul_(_int32(multiplier))
        return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch).bitwise_and_(0xFFFF))
    x.bitwise_and_(_MASK32)
    for shift, multiplier in ((16, _HASH_MUL_1), (15, _HASH_MUL_2)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=scratch))
        x.mul_(multiplier).bitwise_and_(_MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch))


def _int32(value: int) -> int:
    """The int32 with the same low 32 bits as ``value``."""
    value &= _MASK32
    return value - 2**32 if value >= 2**31 else value


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 of the low 32 bits of ``x`` (int64), in a new tensor."""
    x = x.clone()
    return _mix32_(x, torch.empty_like(x))


def _extend(bank: Tensor, length: int) -> Tensor:
    """``bank`` tiled to ``length`` values: ``x[i] = bank[i mod P]`` (a view when no wrap is needed)."""
    size = bank.numel()
    if length <= size:
        return bank.narrow(0, 0, length)
    copies, rest = divmod(length, size)
    parts = [bank] * copies + ([bank.narrow(0, 0, rest)] if rest else [])
    return torch.cat(parts)


def _fold(values: Tensor, size: int) -> Tensor:
    """Adjoint of :func:`_extend`: ``out[p] = sum of values[i] over i = p mod size``."""
    length = values.numel()
    if length == size:
        return values
    if length > 4 * size:  # a tiny bank: pad to whole copies and sum them
        pad = -length % size
        if pad:
            values = torch.cat([values, values.new_zeros(pad)])
        return values.view(-1, size).sum(0)
    out = values.narrow(0, 0, size).clone()  # the usual wrap: add the (at most 3) further copies
    for start in range(size, length, size):
        count = min(size, length - start)
        out.narrow(0, 0, count).add_(values.narrow(0, start, count))
    return out


# ---- skewed tiling ------------------------------------------------------------------------------
class _TileLayout(NamedTuple):
    """How ``numel`` values from ``offset`` split into copies of a ``P``-value bank.

    ``head`` values of copy 0 (from ``offset``), then ``rows`` full copies 1..rows (``blocks``
    whole circulants of ``P`` rows, then ``extra`` rows), then ``tail`` values of copy ``rows + 1``.
    ``length``: how many values of the doubled bank are read.
    """

    size: int
    offset: int
    head: int
    rows: int
    blocks: int
    extra: int
    tail: int
    tail_start: int
    length: int


def _tile_layout(size: int, numel: int, offset: int) -> _TileLayout:
    head = min(numel, size - offset)
    rows, tail = divmod(numel - head, size)
    blocks, extra = divmod(rows, size)
    tail_start = (rows + 1) % size
    length = max(offset + head, size + min(rows, size) if rows else 0, tail_start + tail)
    return _TileLayout(size, offset, head, rows, blocks, extra, tail, tail_start, length)


def _circulant(doubled: Tensor, size: int) -> Tensor:
    """``(min(rows, P), P)`` view: row ``r`` is copy ``r + 1``, the window ``doubled[r + 1 : r + 1 + P]``."""
    return doubled.narrow(0, 1, doubled.numel() - 1).unfold(0, size, 1)


def _unskew_add(out: Tensor, rows: Tensor, group: int = 64) -> None:
    """``out[r + k] += rows[r, k]`` for the ``(R, P)`` ``rows``: the adjoint of ``unfold(0, P, 1)``.

    A few rows: one add each. Many: groups of ``group`` rows, each shifted by padding every row
    with ``group`` zeros and reading the flat buffer with rows one value shorter (row ``r`` then
    starts ``r`` places later), summed, then added. ``aten.unfold_backward`` measured 5x slower.
    """
    count, size = rows.shape
    if count <= 32:
        for r in range(count):
            out.narrow(0, r, size).add_(rows[r])
        return
    for start in range(0, count, group):
        part = rows.narrow(0, start, min(group, count - start))
        k = part.shape[0]
        padded = torch.cat([part, part.new_zeros(k, k)], dim=1)  # (k, P + k)
        shifted = padded.view(-1).narrow(0, 0, k * (size + k - 1)).view(k, size + k - 1)  # row r moved by r
        out.narrow(0, start, size + k - 1).add_(shifted.sum(0))


def _tile(bank: Tensor, lay: _TileLayout, gain: float = 1.0) -> Tensor:
    """The skewed tiles of ``gain * bank`` (see :func:`skew_tile`), written once into a new tensor."""
    doubled = _extend(bank, lay.length)  # doubled[i] = bank[i mod P]
    if gain != 1.0:  # the bank-sized copy is scaled, not the output (the same values as scaling the bank)
        doubled = doubled.mul_(gain) if lay.length > lay.size else doubled * gain
    size, start = lay.size, lay.head
    out = bank.new_empty(lay.head + lay.rows * size + lay.tail)
    out.narrow(0, 0, lay.head).copy_(doubled.narrow(0, lay.offset, lay.head))
    if lay.rows:
        circulant = _circulant(doubled, size)  # (R, P) strided view, R = min(rows, P)
        if lay.blocks:  # more copies than P: the circulant repeats
            whole = out.narrow(0, start, lay.blocks * size * size).view(lay.blocks, size, size)
            whole.copy_(circulant.expand(lay.blocks, size, size))
            start += lay.blocks * size * size
        if lay.extra == 1:  # copy_ of a (1, P) view with strides (1, 1) ran element by element: 30x slower
            out.narrow(0, start, size).copy_(circulant[0])
            start += size
        elif lay.extra:
            out.narrow(0, start, lay.extra * size).view(lay.extra, size).copy_(circulant[: lay.extra])
            start += lay.extra * size
    if lay.tail:
        out.narrow(0, start, lay.tail).copy_(doubled.narrow(0, lay.tail_start, lay.tail))
    return out


# Below this many values the tiles' backward takes the few-op path (:func:`_unskew_copies`): per-op
# overhead dominates there. Above it the per-copy adds move less memory (one read and one
# read-modify-write per value against a zero fill, a copy and a sum): 2.1x against 2.6x a clone at 1M.
FEW_OPS_BELOW = 1 << 18


def _unskew_copies(grad: Tensor, lay: _TileLayout) -> Tensor:
    """``u[m]``: the sum of ``grad`` over the values that read ``doubled[m]`` (fewer copies than ``P``).

    Copy ``c`` (the head ``c = 0``, full copies, the tail) reads ``doubled[c : c + P]``. Its values are
    written into row ``c`` of a zeroed ``(R, P + R)`` buffer starting at column ``c`` (one strided
    view with row stride ``P + R + 1`` covers every row at once), and the columns are summed: a few
    ops whatever the number of copies (a loop of one add per copy cost more than the adds did).
    """
    size, head, rows, tail = lay.size, lay.head, lay.rows, lay.tail
    count = 1 + rows + (1 if tail else 0)
    width = size + count
    buffer = grad.new_zeros(count * width)
    band = buffer.as_strided((count, size), (width + 1, 1))  # (c, k) at c * width + (c + k)
    band[0].narrow(0, lay.offset, head).copy_(grad.narrow(0, 0, head))
    if rows:
        band.narrow(0, 1, rows).copy_(grad.narrow(0, head, rows * size).view(rows, size))
    if tail:
        band[rows + 1].narrow(0, 0, tail).copy_(grad.narrow(0, head + rows * size, tail))
    return buffer.view(count, width).sum(0)  # (P + R,)


def _tile_backward(grad: Tensor, lay: _TileLayout) -> Tensor:
    """The bank's gradient from the tiles' ``grad``: the adjoint of :func:`_tile`."""
    size, start = lay.size, lay.head
    # Fewer copies than P and a small weight: few ops (eager only: compiled, the per-copy adds fuse).
    if not lay.blocks and grad.numel() <= FEW_OPS_BELOW and not torch.compiler.is_compiling():
        summed = _unskew_copies(grad, lay)  # length P + R <= 2P + 1
        extra = summed.numel() - size
        if extra > size:  # R = P + 1: a third partial copy
            return _fold(summed, size)
        summed.narrow(0, 0, extra).add_(summed.narrow(0, size, extra))  # the wrap, in place
        return summed.narrow(0, 0, size)
    doubled = grad.new_zeros(lay.length)
    doubled.narrow(0, lay.offset, lay.head).add_(grad.narrow(0, 0, lay.head))
    if lay.rows:
        rows = None  # (R, P): the gradient of each circulant row, copies that read it summed
        if lay.blocks:
            rows = grad.narrow(0, start, lay.blocks * size * size).view(lay.blocks, size, size).sum(0)
            start += lay.blocks * size * size
        if lay.extra:
            extra = grad.narrow(0, start, lay.extra * size).view(lay.extra, size)
            rows = extra if rows is None else torch.cat([rows[: lay.extra] + extra, rows[lay.extra :]])
            start += lay.extra * size
        _unskew_add(doubled.narrow(0, 1, rows.shape[0] + size - 1), rows)
    if lay.tail:
        doubled.narrow(0, lay.tail_start, lay.tail).add_(grad.narrow(0, start, lay.tail))
    return _fold(doubled, size)


def _scale(grad: Tensor, gain: float) -> Tensor:
    return grad.mul_(gain) if gain != 1.0 else grad  # the bank-sized gradients here are fresh tensors


class _SkewTile(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, bank: Tensor, numel: int, offset: int, gain: float) -> Tensor:
        ctx.layout, ctx.gain = _tile_layout(bank.numel(), numel, offset), gain
        return _tile(bank, ctx.layout, gain)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _scale(_tile_backward(grad, ctx.layout), ctx.gain), None, None, None


class _MaskedTile(torch.autograd.Function):
    """``tile(bank).view(R, -1) * mask[:, None]`` in one tensor: the tiles are multiplied in place and
    recomputed in backward, so the unmasked tiles are never kept (half the memory of two ops)."""

    @staticmethod
    def forward(ctx: Any, bank: Tensor, mask: Tensor, numel: int, offset: int, gain: float) -> Tensor:
        ctx.layout, ctx.gain = _tile_layout(bank.numel(), numel, offset), gain
        ctx.save_for_backward(bank, mask)
        out = _tile(bank, ctx.layout, gain)
        out.view(mask.shape[0], -1).mul_(mask.unsqueeze(1))  # (R, C) *= (R, 1)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        bank, mask = ctx.saved_tensors
        rows = grad.view(mask.shape[0], -1)  # (R, C)
        grad_mask = None
        if ctx.needs_input_grad[1]:  # a learned mask; `signed`'s fixed signs skip the recomputed tiles
            tiles = _tile(bank, ctx.layout, ctx.gain).view_as(rows)  # recomputed: cheaper than keeping them
            grad_mask = torch.linalg.vecdot(tiles, rows)  # row-wise dot products in one pass (bmm: 4x slower)
        grad_bank = _tile_backward((rows * mask.unsqueeze(1)).view(-1), ctx.layout)
        return _scale(grad_bank, ctx.gain), grad_mask, None, None, None


def row_signs(rows: int, salt: int, device: torch.device | None = None) -> Tensor:
    """A fixed ``+1``/``-1`` per row, hashed from the row index and ``salt`` (``signed`` upsampling).

    Example:
        >>> row_signs(6, salt=3).tolist()
        [-1.0, -1.0, -1.0, 1.0, -1.0, 1.0]
    """
    h = _mix32(torch.arange(rows, device=device, dtype=torch.int64) + ((salt * _SALT_MUL) & _MASK32))
    return (_mix32(h + _SIGN_SALT) & 1).to(torch.get_default_dtype()) * 2 - 1


def masked_tile(bank: Tensor, mask: Tensor, numel: int, offset: int, gain: float = 1.0) -> Tensor:
    """:func:`skew_tile` with row ``o`` of its ``(len(mask), -1)`` view multiplied by ``mask[o]``.

    Example:
        >>> masked_tile(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0]), 4, 0).tolist()
        [1.0, 2.0, -3.0, -2.0]
    """
    size = bank.numel()
    if not 0 <= offset < size:
        raise ValueError(f"`offset` should be in [0, {size}) for a bank of {size} values, got {offset}.")
    if numel % mask.numel():
        raise ValueError(f"`mask` of {mask.numel()} rows should divide the {numel} values.")
    if offset + numel <= size:  # no wrap: the tiles are a view, and the product the only write
        return _scaled_bank(bank, gain).narrow(0, offset, numel).view(mask.shape[0], -1).mul(mask.unsqueeze(1)).view(-1)
    if use_opaque_kernels(bank):  # compiled for a CPU: the eager tiles, the product fused by inductor
        tiles = torch.ops.npas_fx.skew_tile(bank, numel, offset, float(gain))
        return tiles.view(mask.shape[0], -1).mul(mask.unsqueeze(1)).view(-1)
    return _MaskedTile.apply(bank, mask, numel, offset, float(gain))


def use_opaque_kernels(bank: Tensor) -> bool:
    """Whether to run the custom ops of :mod:`npas_fx.opaque_kernels`: compiling for a CPU, not exporting."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting() and bank.device.type == "cpu"


def _scaled_bank(bank: Tensor, gain: float) -> Tensor:
    return bank * gain if gain != 1.0 else bank


def skew_tile(bank: Tensor, numel: int, offset: int, gain: float = 1.0) -> Tensor:
    """``numel`` values of the ``gain``-scaled bank's rotated copies from ``offset`` (``0 <= offset < P``).

    ``t[j] = gain * bank[(k + c) mod P]`` for ``j + offset = c * P + k``: copy ``c`` rotated by ``c``
    places. One write of ``numel`` values forward, one read backward. Without a wrap (and a gain of
    1) it is a view. The gain scales the bank-sized values, not the output: the same values as
    tiling ``bank * gain``, one op fewer.

    Example:
        >>> skew_tile(torch.arange(4.0), 6, 3).tolist()
        [3.0, 1.0, 2.0, 3.0, 0.0, 2.0]
    """
    size = bank.numel()
    if not 0 <= offset < size:
        raise ValueError(f"`offset` should be in [0, {size}) for a bank of {size} values, got {offset}.")
    if offset + numel <= size:
        return _scaled_bank(bank.narrow(0, offset, numel), gain)
    if use_opaque_kernels(bank):
        return torch.ops.npas_fx.skew_tile(bank, numel, offset, float(gain))
    return _SkewTile.apply(bank, numel, offset, float(gain))


# ---- chunked hashing ----------------------------------------------------------------------------
def slot_count(size: int, chunk: int) -> int:
    """Slots of ``chunk`` values a ``size``-value bank is cut into (the last one wraps to the start)."""
    return -(-size // chunk)


class _HashBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, bank: Tensor, rows: Tensor, numel: int, chunk: int, gain: float) -> Tensor:
        size = bank.numel()
        slots = slot_count(size, chunk)
        ctx.gain = gain
        ctx.save_for_backward(rows)
        ctx.shape = (size, chunk, numel)
        if _signs_per_block(size, numel, chunk):
            slot, negative = _slots_and_signs(rows, slots)
            out = gather_slots(bank, slot, chunk)
            _signed_gain_(out, negative, gain)  # the same bits as gathering from the signed table
            out = out.view(-1)
            return out if out.numel() == numel else out.narrow(0, 0, numel)
        extended = _scaled_bank(_extend(bank, slots * chunk), gain)  # the last slot wraps to the bank's start
        table = torch.cat([extended, -extended]).view(2 * slots, chunk)  # row s: +slot s; row m + s: -slot s
        if chunk == 1:  # one value per row: the 1-D gather is the fast one
            table = table.view(-1)
        out = torch.index_select(table, 0, rows).view(-1)  # (blocks * chunk,): one row per block
        return out if out.numel() == numel else out.narrow(0, 0, numel)  # the last block may be partial

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (rows,) = ctx.saved_tensors
        size, chunk, _ = ctx.shape
        if use_opaque_kernels(grad):  # inductor's scatter-add runs value by value: the eager one instead
            bank_grad = torch.ops.npas_fx.hashed_blocks_backward(grad.contiguous(), rows, size, chunk, ctx.gain)
            return bank_grad, None, None, None, None
        return hashed_blocks_backward(grad, rows, size, chunk, ctx.gain), None, None, None, None


def _signs_per_block(size: int, numel: int, chunk: int) -> bool:
    """Whether to sign each block rather than build the signed table ``[bank, -bank]``: chunks of more
    than one value, from a bank larger than half the weight (one bank that many layers share). The
    table costs about five bank-sized passes per layer (forward and backward), the per-block signs
    two passes over the weight."""
    return chunk > 1 and 2 * size > numel


def _slots_and_signs(rows: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """Per block: the slot it reads (int64) and whether it is negated (rows ``slots`` and on)."""
    negative = rows >= slots
    return rows.long() - slots * negative, negative  # int64: index_select and index_add_ take it 2x as fast


def _signed_gain_(values: Tensor, negative: Tensor, gain: float) -> None:
    """``values[i] *= gain``, then negate where ``negative[i]`` (rows of ``values``), in place.

    In float32 and float64 one multiply by ``+-gain`` (rounded to the dtype, as a Python scalar is)
    gives the same bits (a sign flip is exact); other dtypes round ``gain`` differently as a tensor
    (half and bfloat16 multiply by the float32 scalar), so they take the two steps.
    """
    shape = (-1,) + (1,) * (values.dim() - 1)
    if values.dtype in (torch.float32, torch.float64):
        factor = torch.where(negative, values.new_tensor(-gain), values.new_tensor(gain))
        values.mul_(factor.view(shape))
        return
    if gain != 1.0:
        values.mul_(gain)  # as ``bank * gain`` rounds: the same product per value
    values.mul_(negative.to(values.dtype).mul_(-2).add_(1).view(shape))  # times -1 or 1: a sign flip is exact


def gather_slots(bank: Tensor, slot: Tensor, chunk: int) -> Tensor:
    """``(len(slot), chunk)``: row ``b`` is slot ``slot[b]`` of the bank cut into ``chunk``-value slots,
    the last (partial) slot wrapping to the bank's start, without copying the bank to wrap it.

    Example:
        >>> gather_slots(torch.arange(5.0), torch.tensor([2, 0]), 2).tolist()
        [[4.0, 0.0], [0.0, 1.0]]
    """
    size = bank.numel()
    whole, slots = size // chunk, slot_count(size, chunk)
    if whole in (0, slots):  # no partial slot (a view), or no whole one (a bank smaller than a chunk)
        return torch.index_select(_extend(bank, slots * chunk).view(slots, chunk), 0, slot)
    out = torch.index_select(bank.narrow(0, 0, whole * chunk).view(whole, chunk), 0, slot.clamp(max=whole - 1))
    tail = torch.cat([bank.narrow(0, whole * chunk, size - whole * chunk), bank.narrow(0, 0, slots * chunk - size)])
    wraps = slot == whole
    if torch.compiler.is_compiling():  # a masked write is data-dependent for torch.compile
        return torch.where(wraps.unsqueeze(1), tail, out)
    out[wraps] = tail
    return out


def _whole_blocks(grad: Tensor, chunk: int) -> Tensor:
    """``grad`` as ``(blocks, chunk)`` rows, the last block padded with zeros."""
    pad = -grad.numel() % chunk
    return (torch.cat([grad, grad.new_zeros(pad)]) if pad else grad).view(-1, chunk)


def hashed_blocks_backward(grad: Tensor, rows: Tensor, size: int, chunk: int, gain: float) -> Tensor:
    """The ``size``-value bank's gradient from the gradient of :func:`hashed_blocks`' output (a fresh tensor)."""
    numel = grad.numel()
    slots = slot_count(size, chunk)
    if _signs_per_block(size, numel, chunk):  # signed blocks added straight into the slots: one bank pass
        slot, negative = _slots_and_signs(rows, slots)
        blocks = _whole_blocks(grad, chunk)
        blocks = blocks.clone() if blocks.data_ptr() == grad.data_ptr() else blocks  # signed in place below
        _signed_gain_(blocks, negative, gain)
        table = grad.new_zeros(slots * chunk)
        table.view(slots, chunk).index_add_(0, slot, blocks)
        extra = slots * chunk - size  # the wrapped slot's values past the bank's end belong at its start
        if extra > size:
            return _fold(table, size)
        table.narrow(0, 0, extra).add_(table.narrow(0, size, extra))
        return table.narrow(0, 0, size)
    table = grad.new_zeros(2 * slots, chunk)
    full = numel // chunk
    rows = rows.long()  # index_add_ takes twice as long with an int32 index (the stored one is int32)
    if chunk == 1:  # one value per row: scatter_add_ measured 1.5x faster than index_add_ here
        table.view(-1).scatter_add_(0, rows, grad)
    elif full:  # scatter-add whole rows: one index per block, no index per weight
        table.index_add_(0, rows.narrow(0, 0, full), grad.narrow(0, 0, full * chunk).view(full, chunk))
    if chunk > 1 and numel > full * chunk:
        last = torch.cat(
            [grad.narrow(0, full * chunk, numel - full * chunk), grad.new_zeros((full + 1) * chunk - numel)]
        )
        table.index_add_(0, rows.narrow(0, full, 1), last.view(1, chunk))
    signed = table.narrow(0, 0, slots) - table.narrow(0, slots, slots)
    return _scale(_fold(signed.view(-1), size), gain)


def hashed_blocks(bank: Tensor, rows: Tensor, numel: int, chunk: int, gain: float = 1.0) -> Tensor:
    """``numel`` values in blocks of ``chunk``; block ``b`` is row ``rows[b]`` of the signed slot table
    (of the bank times ``gain``: the same values as hashing ``bank * gain``).

    The bank, wrapped to ``m * chunk`` values (``m`` = :func:`slot_count`), is cut into ``m`` slots
    of ``chunk`` contiguous values; row ``s < m`` of the table is slot ``s``, row ``m + s`` its
    negation. ``rows`` holds ``ceil(numel / chunk)`` indices. One write of ``numel`` values forward,
    one row-wise scatter-add backward.

    Example:
        >>> hashed_blocks(torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 0]), 3, 1).tolist()
        [2.0, -1.0, 1.0]
    """
    blocks = -(-numel // chunk)
    if rows.shape != (blocks,):
        raise ValueError(f"`rows` should hold {blocks} block indices for {numel} values in chunks of {chunk}.")
    return _HashBlocks.apply(bank, rows, numel, chunk, float(gain))


def _position_hashes(
    start: int, count: int, offset: int, device: torch.device | None, out: Tensor | None = None
) -> Tensor:
    """``mix32(b + offset)`` for positions ``b`` in ``[start, start + count)``: int64, or the bits in
    int32 when written into the int32 ``out`` (``count`` values; a scratch of its size is taken)."""
    # (b + S) & M == (b + (S & M)) & M: the caller masks the salt's product, keeping sums below 2**63.
    if out is None:
        x = torch.arange(start, start + count, device=device, dtype=torch.int64)
    else:
        x = torch.arange(start, start + count, out=out)
    return _mix32_(x.add_(_int32(offset) if x.dtype == torch.int32 else offset), torch.empty_like(x))


_PIECE = 1 << 16  # positions hashed at a time when selecting: the two buffers stay in the L2 cache


def _smallest_hashed(start: int, count: int, offset: int, k: int, device: torch.device | None) -> Tensor:
    """``argsort(_position_hashes(start, count, offset))[:k]`` for ``k < count / 2``, hashing in pieces.

    Hash values are distinct (a bijection of distinct positions) and spread evenly, so about ``k``
    of them lie below ``k / count * 2**32``: keep only those below a threshold a little above it
    (raised until at least ``k`` are in) and sort them, never a tensor of all ``count`` keys.
    """
    piece = min(_PIECE, count)
    # int32 positions when they fit; their keys are the hashes' bits with the top bit flipped, so
    # that int32 order is the order of the unsigned hashes.
    narrow = start + count < 2**31
    part = torch.empty(piece, device=device, dtype=torch.int32 if narrow else torch.int64)
    want = k + 4 * math.isqrt(k) + 64
    while True:
        threshold = min(2**32, -(-want * 2**32 // count))
        found, keys = [], []
        for first in range(0, count, piece):
            size = min(piece, count - first)
            x = _position_hashes(start + first, size, offset, device, out=part.narrow(0, 0, size))
            if narrow:
                x.bitwise_xor_(-(2**31))  # h - 2**31
            if threshold >= 2**32:  # every hash is below it
                index = torch.arange(size, device=x.device)
            else:
                index = torch.nonzero(x < threshold - (2**31 if narrow else 0)).view(-1)
            keys.append(x.index_select(0, index))
            found.append(index.add_(first))
        picked = torch.cat(found)
        if picked.numel() >= k:
            return picked.index_select(0, torch.argsort(torch.cat(keys)).narrow(0, 0, k))
        want *= 2


def hash_rows(numel: int, chunk: int, salt: int, bank_size: int, device: torch.device | None = None) -> Tensor:
    """The row of the signed slot table (:func:`hashed_blocks`) that each block of ``chunk`` reads.

    ``h(b) = mix32(b + salt * 0x9E3779B1)`` for block ``b``; the sign is ``+1`` when bit 0 of
    ``mix32(h(b) + 0x68E31DA4)`` is set. ``chunk=1``: the slot is ``h(b) mod P`` (per-element
    HashedNets, the formula of plans without a chunk). ``chunk > 1``: blocks take the ``m`` slots in
    rounds of ``m`` blocks, round ``t`` in the order of ``argsort(h)`` over its blocks (a hashed
    permutation, ``h`` being a bijection); a partial last block takes the last, shortest slot. So a
    layer with ``numel >= P`` reads every bank value, and bank values are read evenly.

    Example:
        >>> hash_rows(4, 1, salt=7, bank_size=5).tolist()
        [4, 5, 2, 3]
        >>> sorted(hash_rows(8, 2, salt=7, bank_size=8).remainder(4).tolist())  # every slot once
        [0, 1, 2, 3]
    """
    size = bank_size
    slots = slot_count(size, chunk)
    blocks = -(-numel // chunk)
    rounds = -(-blocks // slots)
    offset = (salt * _SALT_MUL) & _MASK32
    h = _position_hashes(0, blocks, offset, device)  # block b's hash: its sign, and its key in its round
    if chunk == 1:
        slot = torch.remainder(h, size)
    else:
        # A round's blocks take its slots in the order of the round's keys: the last round needs every
        # key of the round (``slots`` of them), also when the layer has fewer blocks than that.
        full, k = (rounds - 1) * slots, blocks - (rounds - 1) * slots  # blocks in whole rounds; in the last
        order = [torch.argsort(h.narrow(0, 0, full).view(rounds - 1, slots), dim=1).view(-1)] if rounds > 1 else []
        if 2 * k >= slots or h.is_meta:  # meta tensors (plan checks) have no values to select by
            keys = torch.cat([h.narrow(0, full, k), _position_hashes(blocks, slots - k, offset, device)])
            last = torch.argsort(keys).narrow(0, 0, k)
        else:  # a layer smaller than half the bank: select its keys without sorting the round
            last = _smallest_hashed(full, slots, offset, k, device)
        slot = torch.cat([*order, last])
        if numel % chunk and slots > 1:  # the partial last block swaps slots with the shortest one
            first = (blocks - 1) // slots * slots
            last_round = slot.narrow(0, first, blocks - first)
            swapped = torch.where(last_round == slots - 1, slot.narrow(0, blocks - 1, 1), last_round)
            slot = torch.cat(
                [slot.narrow(0, 0, first), swapped.narrow(0, 0, blocks - first - 1), slot.new_full((1,), slots - 1)]
            )
    # row = slot + slots * negative, negative = 1 - (bit 0 of the sign hash)
    rows = _mix32_(h.add_(_SIGN_SALT), torch.empty_like(h)).bitwise_and_(1).neg_().add_(1).mul_(slots).add_(slot)
    return rows.to(torch.int32) if 2 * slots < 2**31 else rows


# ---- SuperWeight template mixing -----------------------------------------------------------------
# Gathered window values per chunk of SuperWeights (1 MiB of float32). Small on purpose: glibc
# raises its mmap threshold to the size of a freed mapped block, so 16 MiB chunks sent every
# later weight-sized tensor to a heap that keeps its freed blocks (swn on BERT-base: 2.5 GB peak
# above the model with 16 MiB chunks, 1.4 GB with 1 MiB ones; benchmarks/search_memory.py).
WINDOW_CHUNK = 2**18
# On an accelerator (a caching allocator, no glibc heap) chunks are larger: each costs about
# span / stride + 3 kernel launches, and 1 MiB chunks would make a BERT-base embedding thousands.
WINDOW_CHUNK_ACCELERATOR = 2**24


def _windows(source: Tensor, index: Tensor, span: int, stride: int) -> Tensor:
    return source.unfold(0, span, stride).index_select(0, index)  # (N, span)


def _row_chunks(count: int, span: int, device: torch.device) -> list[tuple[int, int]]:
    """``(start, length)`` runs of SuperWeights whose gathered windows hold ``WINDOW_CHUNK`` values at
    most (``WINDOW_CHUNK_ACCELERATOR`` off the CPU)."""
    rows = max(1, (WINDOW_CHUNK if device.type == "cpu" else WINDOW_CHUNK_ACCELERATOR) // span)
    return [(start, min(rows, count - start)) for start in range(0, count, rows)]


def _fold_windows(per_window: Tensor, index: Tensor, stride: int, size: int, out: Tensor | None) -> Tensor:
    """Add row ``n`` of ``per_window`` (``(N, span)``) at ``index[n] * stride`` of a ``size``-long gradient.

    The gradient is viewed as rows of ``stride`` values, so window ``w``'s values ``[c * stride,
    (c + 1) * stride)`` land in row ``w + c``: one ``index_add_`` per ``c`` (about span / stride of
    them), never the ``(windows, span)`` table the generic fold (``unfold_backward``) would fill.
    ``c`` runs downwards, so each value receives its windows in ascending order, as that fold adds them.
    """
    span = per_window.shape[1]
    if out is None:
        out = per_window.new_zeros(-(-size // stride), stride)
    for c in reversed(range(-(-span // stride))):
        width = min(stride, span - c * stride)
        out.narrow(1, 0, width).index_add_(0, index + c, per_window.narrow(1, c * stride, width))
    return out


class _WindowMix(torch.autograd.Function):
    """``out[n] = sum_k mix[n, k] * window(index[n])[k]``; backward gathers the windows again, so
    autograd keeps the bank-sized source and the small mix, never the ``(N, K, m)`` windows.
    Forward and backward gather the windows of ``WINDOW_CHUNK`` values at a time, and the source's
    gradient is folded straight into a bank-sized buffer (:func:`_fold_windows`), so neither pass
    holds more than the bank and one chunk beyond its inputs and outputs: the embedding of
    BERT-base, 15,261 SuperWeights of 4 x 1,536 values, took 1.3 GB in the unchunked backward."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, mix: Tensor, index: Tensor, span: int, stride: int) -> Tensor:
        count, k = mix.shape
        ctx.save_for_backward(source, mix, index)
        ctx.geometry = (span, stride)
        out = source.new_empty(count, 1, span // k)
        for start, rows in _row_chunks(count, span, source.device):
            chosen = _windows(source, index.narrow(0, start, rows), span, stride).view(rows, k, span // k)
            torch.bmm(mix.narrow(0, start, rows).unsqueeze(1), chosen, out=out.narrow(0, start, rows))
        return out.squeeze(1)  # (N, m)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        source, mix, index = ctx.saved_tensors
        span, stride = ctx.geometry
        count, k = mix.shape
        mixes: list[Tensor] = []
        folded = None
        for start, rows in _row_chunks(count, span, source.device):
            part, chunk, g = index.narrow(0, start, rows), mix.narrow(0, start, rows), grad.narrow(0, start, rows)
            if ctx.needs_input_grad[1]:
                chosen = _windows(source, part, span, stride).view(rows, k, span // k)
                mixes.append(torch.bmm(chosen, g.unsqueeze(2)).squeeze(2))  # (n, K, m) @ (n, m, 1) -> (n, K)
                del chosen
            if ctx.needs_input_grad[0]:
                per_window = (chunk.unsqueeze(2) * g.unsqueeze(1)).view(rows, span)  # (n, K, m) -> (n, span)
                folded = _fold_windows(per_window, part, stride, source.numel(), folded)
        grad_mix = torch.cat(mixes) if mixes else None
        grad_source = None
        if folded is not None:
            grad_source = folded.view(-1).narrow(0, 0, source.numel()).view(source.shape)
        return grad_source, grad_mix, None, None, None


def window_mix(source: Tensor, mix: Tensor, index: Tensor, span: int, stride: int) -> Tensor:
    """Row ``n``: the ``K`` templates of window ``index[n]`` (``source[index[n] * stride :][:span]``,
    ``span = K * m``) mixed by ``mix[n]``; returns ``(N, m)`` for ``mix`` of shape ``(N, K)``.

    Example:
        >>> window_mix(torch.arange(6.0), torch.tensor([[1.0, 1.0]]), torch.tensor([1]), 4, 2).tolist()
        [[6.0, 8.0]]
    """
    if span % mix.shape[1] or stride < 1:
        raise ValueError(f"`span` {span} should be a multiple of the {mix.shape[1]} templates and `stride` >= 1.")
    return _WindowMix.apply(source, mix, index, span, stride)


# ---- template mixing (wavg, emb) ----------------------------------------------------------------
class _TemplateMix(torch.autograd.Function):
    """``(gain * coefficients) @ bank[offset : offset + K * n].view(K, n)`` with a hand-written backward:
    the bank's gradient is one broadcast multiply written straight into its ``(K, n)`` window and the
    coefficients' one matrix-vector product (autograd's generic path took an outer-product ``mm``
    and a bank-sized copy: 10x slower)."""

    @staticmethod
    def forward(ctx: Any, bank: Tensor, coefficients: Tensor, offset: int, numel: int, gain: float) -> Tensor:
        k = coefficients.numel()
        scaled = coefficients * gain if gain != 1.0 else coefficients
        block = bank.narrow(0, offset, k * numel).view(k, numel)
        ctx.save_for_backward(bank, scaled)
        ctx.geometry = (offset, numel, gain)
        return torch.mm(scaled.view(1, k), block).view(numel)  # (1, K) @ (K, n): mm beats mv here

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        bank, scaled = ctx.saved_tensors
        offset, numel, gain = ctx.geometry
        k = scaled.numel()
        grad_bank = grad_coefficients = None
        if ctx.needs_input_grad[0]:
            whole = offset == 0 and k * numel == bank.numel()
            grad_bank = bank.new_empty(bank.shape) if whole else bank.new_zeros(bank.shape)
            torch.mul(scaled.view(k, 1), grad.view(1, numel), out=grad_bank.narrow(0, offset, k * numel).view(k, numel))
        if ctx.needs_input_grad[1]:
            block = bank.narrow(0, offset, k * numel).view(k, numel)
            grad_coefficients = torch.mv(block, grad)  # (K, n) @ (n,)
            if gain != 1.0:
                grad_coefficients = grad_coefficients * gain
        return grad_bank, grad_coefficients, None, None, None


def template_mix(bank: Tensor, coefficients: Tensor, offset: int, numel: int, gain: float = 1.0) -> Tensor:
    """``gain * sum_k coefficients[k] * bank[offset + k * numel :][:numel]``: ``K`` consecutive templates mixed.

    One ``(1, K) @ (K, n)`` product forward; backward writes the bank's gradient once and reads the
    templates once (for the coefficients' gradient).

    Example:
        >>> template_mix(torch.arange(6.0), torch.tensor([1.0, 2.0]), 0, 3, gain=0.5).tolist()
        [3.0, 4.5, 6.0]
    """
    k = coefficients.numel()
    if coefficients.dim() != 1 or offset < 0 or offset + k * numel > bank.numel():
        raise ValueError(
            f"{k} templates of {numel} values from `offset` {offset} do not fit a bank of {bank.numel()} values "
            "(`coefficients` should be 1-D)."
        )
    return _TemplateMix.apply(bank, coefficients, offset, numel, float(gain))


# ---- bilinear stretching (interpolate) -----------------------------------------------------------
class LerpPlan(NamedTuple):
    """Rows ``out`` of a linear stretch of ``size`` rows, and its transpose (for the backward).

    Output row ``o`` is ``weight[o, 0] * x[index[o, 0]] + weight[o, 1] * x[index[o, 1]]``; source
    row ``j`` receives ``bag_weight[i] * grad[bag_index[i]]`` for ``i`` in its bag (from
    ``bag_offset[j]``).
    """

    index: Tensor
    weight: Tensor
    bag_index: Tensor
    bag_offset: Tensor
    bag_weight: Tensor


def lerp_plan(out: int, size: int, scale: float = 1.0) -> LerpPlan:
    """The ``align_corners=True`` linear stretch of ``size`` rows to ``out`` (as ``F.interpolate``), times ``scale``.

    Example:
        >>> lerp_plan(3, 2).weight.tolist()
        [[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]]
    """
    step = (size - 1) / (out - 1) if out > 1 else 0.0
    # On the CPU whatever the default device (plans are checked under the meta device, where
    # bincount has no kernel); the buffers follow the module to its device like any other.
    source = torch.arange(out, dtype=torch.float64, device="cpu") * step
    low = source.floor().long().clamp(max=size - 1)
    high = (low + 1).clamp(max=size - 1)
    frac = source - low
    index = torch.stack([low, high], 1)  # (out, 2)
    weight = torch.stack([1 - frac, frac], 1) * scale
    order = torch.argsort(index.reshape(-1), stable=True)  # entries by source row: the transpose's bags
    counts = torch.bincount(index.reshape(-1), minlength=size)
    offset = torch.cumsum(counts, 0) - counts
    return LerpPlan(index, weight.float(), order // 2, offset, weight.reshape(-1)[order].float())


class _RowMix(torch.autograd.Function):
    """``out[o] = sum_i weight[o, i] * x[index[o, i]]`` with ``F.embedding_bag`` (one write of the
    output), and the same for the transpose in backward (one read of the gradient; autograd's
    ``upsample_bilinear2d_backward`` measured 10x slower)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, index: Tensor, weight: Tensor, bag_index: Tensor, bag_offset: Tensor, bag_weight: Tensor
    ) -> Tensor:
        ctx.save_for_backward(bag_index, bag_offset, bag_weight)
        # Detached: with a weight that requires grad, embedding_bag takes its training kernel (10x slower).
        return F.embedding_bag(index, x.detach(), mode="sum", per_sample_weights=weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        bag_index, bag_offset, bag_weight = ctx.saved_tensors
        grad_x = F.embedding_bag(bag_index, grad.contiguous(), bag_offset, mode="sum", per_sample_weights=bag_weight)
        return grad_x, None, None, None, None, None


def _row_mix(x: Tensor, plan: LerpPlan) -> Tensor:
    return _RowMix.apply(
        x, plan.index, plan.weight.to(x.dtype), plan.bag_index, plan.bag_offset, plan.bag_weight.to(x.dtype)
    )


def bilinear(grid: Tensor, rows: LerpPlan, cols: LerpPlan) -> Tensor:
    """The 2-D ``grid`` stretched by ``rows`` (along dim 0) and ``cols`` (dim 1): ``F.interpolate`` bilinear.

    The columns are stretched first (the small ``(r, W)`` intermediate), then the rows: each output
    value is written once.

    Example:
        >>> grid = torch.tensor([[0.0, 2.0], [2.0, 4.0]])
        >>> bilinear(grid, lerp_plan(3, 2), lerp_plan(3, 2)).tolist()
        [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]]
    """
    wide = _row_mix(grid.t().contiguous(), cols).t().contiguous()  # (r, W): the columns stretched
    return _row_mix(wide, rows)  # (H, W)
