"""Chunked hashing (ROAST) behind the ``hash`` generator (DESIGN.md section 7).

Block ``b`` of ``chunk`` contiguous weights reads one slot (``chunk`` contiguous values) of the
bank times a sign: one row of the signed slot table ``[ext, -ext]`` (the bank wrapped to whole
slots), gathered with ``index_select`` by one index per block (:func:`hash_rows`, fixed at
construction). Backward scatter-adds whole rows of the gradient into that table (one
``index_add_``, one index per block) and folds it back onto the bank. From a bank larger than half
the weight (one bank shared by many layers) the table would cost more than the weight: each block
then gathers its slot and takes its sign (:func:`gather_slots`), and backward adds the signed
blocks into the slots. With ``chunk=1`` a slot is one value: per-element HashedNets hashing.

Example:
    >>> import torch
    >>> rows = torch.tensor([1, 2])  # 2 slots [1, 2], [3, 1]: block 0 reads slot 1, block 1 -slot 0
    >>> hashed_blocks(torch.tensor([1.0, 2.0, 3.0]), rows, 4, 2).tolist()
    [3.0, 1.0, -1.0, -2.0]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .kernel_base import (
    _MASK32,
    _SALT_MUL,
    _SIGN_SALT,
    _extend,
    _fold,
    _int32,
    _mix32_,
    _scale,
    _scaled_bank,
    use_opaque_kernels,
)

__all__ = ["hashed_blocks", "hashed_blocks_backward", "signed_gather", "hash_rows", "slot_count", "gather_slots"]


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
            return signed_gather(bank, rows, numel, chunk, gain)
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


def signed_gather(bank: Tensor, rows: Tensor, numel: int, chunk: int, gain: float) -> Tensor:
    """:func:`hashed_blocks`' values (the same bits) without the signed slot table: each block gathers
    its slot straight from the bank, then takes its gain and sign (``numel`` values written, as for a
    copy). Used by the kernel's forward from a bank larger than half the weight, and for every
    forward without autograd.

    Example:
        >>> signed_gather(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 2]), 4, 2, 1.0).tolist()
        [3.0, 1.0, -1.0, -2.0]
    """
    slot, negative = _slots_and_signs(rows, slot_count(bank.numel(), chunk))
    out = torch.index_select(bank, 0, slot).view(-1, 1) if chunk == 1 else gather_slots(bank, slot, chunk)
    _signed_gain_(out, negative, gain)  # the same bits as gathering from the signed table
    out = out.view(-1)
    return out if out.numel() == numel else out.narrow(0, 0, numel)


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
    if chunk > 1 and numel > full * chunk:  # the partial last block, padded
        table.index_add_(
            0, rows.narrow(0, full, 1), _whole_blocks(grad.narrow(0, full * chunk, numel - full * chunk), chunk)
        )
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
