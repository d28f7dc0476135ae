"""The skewed tiling as opaque ``torch.library`` custom ops, for ``torch.compile`` on CPU.

Inductor's C++ backend lowers the tiles (rows that are overlapping windows of the doubled bank)
and their backward (shifted adds into one buffer) to a gather with an integer division and a
modulo per value, element by element, with every add nested into one kernel: on a 128x1024 weight
from a 15,543-value bank the compiled backward took 116x a clone of the weight and the forward
24x, against 8x and 3x for the eager kernels (``_tile``'s row copies, ``_unskew_copies``), which
are contiguous copies and sums. Wrapped as custom ops, ``torch.compile`` calls the eager kernels
and fuses everything around them. On CUDA the compiled gathers are one Triton kernel, which is
what a GPU does well, so the ops are used on CPU only (and never while exporting, whose graph
should hold only ATen ops): :func:`npas_fx.kernels.use_opaque_tiles`.

Example:
    >>> import torch
    >>> torch.ops.npas_fx.skew_tile(torch.tensor([1.0, 2.0, 3.0]), 7, 0, 1.0).tolist()
    [1.0, 2.0, 3.0, 2.0, 3.0, 1.0, 3.0]
    >>> torch.ops.npas_fx.skew_tile_backward(torch.ones(7), 3, 0, 1.0).tolist()
    [2.0, 2.0, 3.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .kernels import _scale, _tile, _tile_backward, _tile_layout

__all__ = ["skew_tile_op", "skew_tile_backward_op"]


@torch.library.custom_op("npas_fx::skew_tile", mutates_args=())
def skew_tile_op(bank: Tensor, numel: int, offset: int, gain: float) -> Tensor:
    """``skew_tile(bank, numel, offset, gain)`` for a wrapping ``offset + numel > bank.numel()``."""
    return _tile(bank, _tile_layout(bank.numel(), numel, offset), gain)


@skew_tile_op.register_fake
def _(bank: Tensor, numel: int, offset: int, gain: float) -> Tensor:
    return bank.new_empty(numel)


@torch.library.custom_op("npas_fx::skew_tile_backward", mutates_args=())
def skew_tile_backward_op(grad: Tensor, size: int, offset: int, gain: float) -> Tensor:
    """The gradient of a ``size``-value bank from the gradient of its tiles (the adjoint)."""
    return _scale(_tile_backward(grad, _tile_layout(size, grad.numel(), offset)), gain)  # a fresh tensor


@skew_tile_backward_op.register_fake
def _(grad: Tensor, size: int, offset: int, gain: float) -> Tensor:
    return grad.new_empty(size)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    bank, _, ctx.offset, ctx.gain = inputs
    ctx.size = bank.numel()


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
    return skew_tile_backward_op(grad.contiguous(), ctx.size, ctx.offset, ctx.gain), None, None, None


skew_tile_op.register_autograd(_backward, setup_context=_setup)
