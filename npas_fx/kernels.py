"""O(numel) kernels behind the generators (DESIGN.md section 7): the skewed tiles here, chunked
hashing in :mod:`npas_fx.hash_kernels`, template mixing and stretching in :mod:`npas_fx.mix_kernels`
(re-exported here), their shared helpers in :mod:`npas_fx.kernel_base`.

The floor for a generated weight is one write of its size in forward and one read in backward.
The kernels reach it without integer index tensors over the weight:

* :func:`skew_tile` (``repeat``): copy ``c`` of the bank rotated by ``c`` places. Copy ``c`` is
  the window ``bb[c mod P : c mod P + P]`` of the doubled bank ``bb = [bank, bank]``, so the rows
  are strided views of ``bb`` (``unfold``: a ``P x P`` circulant, repeated when there are more
  copies than ``P``) copied once into the output. Backward sums the gradient's rows that read the
  same circulant row (a reshape and a sum), un-skews the ``P x P`` (or smaller) remainder (shifted
  adds), then folds the doubled bank back onto the bank. :func:`masked_tile` (``mask``) scales
  the rows in place and recomputes the tiles in backward.
* :func:`hashed_blocks` (``hash``): ROAST-style chunks, one hashed slot of the bank per block of
  contiguous weights, gathered by one index per block.
* :func:`window_mix`, :func:`template_mix`, :func:`bilinear`: the mixers and ``interpolate``.

Example:
    >>> import torch
    >>> skew_tile(torch.tensor([1.0, 2.0, 3.0]), 7, 0).tolist()
    [1.0, 2.0, 3.0, 2.0, 3.0, 1.0, 3.0]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .hash_kernels import hash_rows, hashed_blocks, slot_count
from .kernel_base import (
    _MASK32,
    _SALT_MUL,
    _SIGN_SALT,
    _extend,
    _fold,
    _mix32,
    _scale,
    _scaled_bank,
    use_opaque_kernels,
)
from .mix_kernels import LerpPlan, bilinear, lerp_plan, template_mix, window_mix

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
    "use_opaque_kernels",
]


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
