"""O(numel) kernels behind the tiling and hashing generators (DESIGN.md section 7).

The floor for a generated weight is one write of its size in forward and one read in backward.
Both kernels here reach it without integer index tensors over the weight:

* :func:`skew_tile` (``repeat``, ``mask``): copy ``c`` of the bank rotated by ``c`` places. Copy
  ``c`` is the window ``bb[c mod P : c mod P + P]`` of the doubled bank ``bb = [bank, bank]``, so
  the rows are strided views of ``bb`` (``unfold``: a ``P x P`` circulant, repeated when there are
  more copies than ``P``) copied once into the output. Backward sums the gradient's rows that read
  the same circulant row (a reshape and a sum) and un-skews the ``P x P`` (or smaller) remainder
  with ``unfold_backward``, then folds the doubled bank back onto the bank.
* :func:`hashed_blocks` (``hash``): ROAST-style chunks. Block ``b`` of ``chunk`` contiguous weights
  reads the bank range starting at a hashed position, times a hashed sign: one row of the
  ``unfold`` of the signed, wrapped bank ``[ext, -ext]``, gathered with ``index_select`` by one
  index per block. Backward scatter-adds the gradient into that table (one ``index_add_``) and
  folds it back onto the bank. ``chunk=1`` is per-element HashedNets hashing.

Example:
    >>> import torch
    >>> skew_tile(torch.tensor([1.0, 2.0, 3.0]), 7, 0).tolist()
    [1.0, 2.0, 3.0, 2.0, 3.0, 1.0, 3.0]
    >>> rows = torch.tensor([2, 4])  # block 0: bank[2:4]; block 1: -bank[0:2] (4 = L + 0, L = 4)
    >>> hashed_blocks(torch.tensor([1.0, 2.0, 3.0]), rows, 4, 2).tolist()
    [3.0, 1.0, -1.0, -2.0]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["skew_tile", "hashed_blocks", "wrapped_length"]


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
    pad = -length % size
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    return values.view(-1, size).sum(0)


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


class _SkewTile(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, bank: Tensor, numel: int, offset: int) -> Tensor:
        lay = _tile_layout(bank.numel(), numel, offset)
        ctx.layout = lay
        doubled = _extend(bank, lay.length)  # doubled[i] = bank[i mod P]
        out = bank.new_empty(numel)
        out.narrow(0, 0, lay.head).copy_(doubled.narrow(0, offset, lay.head))
        size, start = lay.size, lay.head
        if lay.rows:
            circulant = _circulant(doubled, size)  # (R, P) strided view, R = min(rows, P)
            if lay.blocks:  # more copies than P: the circulant repeats
                whole = out.narrow(0, start, lay.blocks * size * size).view(lay.blocks, size, size)
                whole.copy_(circulant.expand(lay.blocks, size, size))
                start += lay.blocks * size * size
            if lay.extra:
                out.narrow(0, start, lay.extra * size).view(lay.extra, size).copy_(circulant[: lay.extra])
                start += lay.extra * size
        if lay.tail:
            out.narrow(0, start, lay.tail).copy_(doubled.narrow(0, lay.tail_start, lay.tail))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        lay = ctx.layout
        size, start = lay.size, lay.head
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
            count = rows.shape[0]
            # Un-skew: row r read doubled[r + 1 : r + 1 + P]; unfold's adjoint sums the overlaps.
            unskewed = torch.ops.aten.unfold_backward(rows, [count + size - 1], 0, size, 1)
            doubled.narrow(0, 1, count + size - 1).add_(unskewed)
        if lay.tail:
            doubled.narrow(0, lay.tail_start, lay.tail).add_(grad.narrow(0, start, lay.tail))
        return _fold(doubled, size), None, None


def skew_tile(bank: Tensor, numel: int, offset: int) -> Tensor:
    """``numel`` values of the bank's rotated copies from ``offset`` (``0 <= offset < P``).

    ``t[j] = bank[(k + c) mod P]`` for ``j + offset = c * P + k``: copy ``c`` rotated by ``c`` places.
    One write of ``numel`` values forward, one read backward. Without a wrap it is a view.

    Example:
        >>> skew_tile(torch.arange(4.0), 6, 3).tolist()
        [3.0, 1.0, 2.0, 3.0, 0.0, 2.0]
    """
    size = bank.numel()
    if not 0 <= offset < size:
        raise ValueError(f"`offset` should be in [0, {size}) for a bank of {size} values, got {offset}.")
    if offset + numel <= size:
        return bank.narrow(0, offset, numel)
    return _SkewTile.apply(bank, numel, offset)


# ---- chunked hashing ----------------------------------------------------------------------------
def wrapped_length(size: int, chunk: int) -> int:
    """Values in the wrapped bank a block may read: ``P + chunk - 1`` (the signed table holds two)."""
    return size + chunk - 1


class _HashBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, bank: Tensor, rows: Tensor, numel: int, chunk: int) -> Tensor:
        size = bank.numel()
        length = wrapped_length(size, chunk)
        extended = _extend(bank, length)
        table = torch.cat([extended, -extended])  # (2L,): row r < L reads +bank, row L + r reads -bank
        windows = table.unfold(0, chunk, 1)  # (2L - chunk + 1, chunk) strided view, no copy
        ctx.save_for_backward(rows)
        ctx.shape = (size, chunk, numel)
        full = numel // chunk
        out = bank.new_empty(numel)
        if full:
            torch.index_select(windows, 0, rows[:full], out=out.narrow(0, 0, full * chunk).view(full, chunk))
        if numel > full * chunk:  # last, partial block
            out.narrow(0, full * chunk, numel - full * chunk).copy_(windows[rows[full]][: numel - full * chunk])
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (rows,) = ctx.saved_tensors
        size, chunk, numel = ctx.shape
        length = wrapped_length(size, chunk)
        if chunk == 1:
            index = rows
        else:  # the element index lives only during this backward
            steps = torch.arange(chunk, device=rows.device, dtype=rows.dtype)
            index = (rows.unsqueeze(1) + steps).view(-1).narrow(0, 0, numel)
        table = grad.new_zeros(2 * length).index_add_(0, index, grad)
        return _fold(table[:length] - table[length:], size), None, None, None


def hashed_blocks(bank: Tensor, rows: Tensor, numel: int, chunk: int) -> Tensor:
    """``numel`` values in blocks of ``chunk``; block ``b`` is row ``rows[b]`` of the signed table.

    With ``L = P + chunk - 1`` (:func:`wrapped_length`): row ``r < L`` is ``bank[(r + i) mod P]``
    for ``i < chunk``, row ``L + r`` its negation. ``rows`` holds ``ceil(numel / chunk)`` indices.

    Example:
        >>> hashed_blocks(torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 0]), 3, 1).tolist()
        [2.0, -1.0, 1.0]
    """
    blocks = math.ceil(numel / chunk)
    if rows.shape != (blocks,):
        raise ValueError(f"`rows` should hold {blocks} block indices for {numel} values in chunks of {chunk}.")
    return _HashBlocks.apply(bank, rows, numel, chunk)
