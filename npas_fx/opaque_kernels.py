"""Kernels that inductor lowers badly, as opaque ``torch.library`` custom ops (``torch.compile`` on CPU).

Inductor's C++ backend lowers the skewed tiles (rows that are overlapping windows of the doubled
bank) to a gather with an integer division and a modulo per value, their backward (shifted adds)
to one kernel of nested masked loads, and the hashed blocks' backward (a row-wise scatter-add) to
a scatter of one value at a time. As custom ops, ``torch.compile`` calls the eager kernels
(contiguous row copies, sums, ``index_add_``) and fuses everything around them: the compiled
training step of the weight-dominated transformer at budget 0.1 (README, "Training-step
overhead") went from 1.4-1.6x the original's to 1.01-1.02x with ``shape`` (all tiles), and from
2.2x to 1.7-2.1x with ``hash`` (then a bank-sized signed table per layer, since removed). On CUDA
the compiled gathers are Triton kernels, which is what a GPU does well, so the ops are used on
CPU only, and never while exporting (an exported graph should hold ATen ops only):
:func:`npas_fx.kernel_base.use_opaque_kernels`.

Example:
    >>> import torch
    >>> torch.ops.npas_fx.skew_tile(torch.tensor([1.0, 2.0, 3.0]), 7, 0, 1.0).tolist()
    [1.0, 2.0, 3.0, 2.0, 3.0, 1.0, 3.0]
    >>> torch.ops.npas_fx.skew_tile_backward(torch.ones(7), 3, 0, 1.0).tolist()
    [2.0, 2.0, 3.0]
    >>> rows = torch.tensor([1, 2], dtype=torch.int32)  # block 0: slot 1; block 1: -slot 0
    >>> torch.ops.npas_fx.hashed_blocks_backward(torch.ones(4), rows, 3, 2, 1.0).tolist()
    [0.0, -1.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .hash_kernels import hashed_blocks_backward
from .kernel_base import _scale
from .kernels import _tile, _tile_backward, _tile_layout

__all__ = ["skew_tile_op", "skew_tile_backward_op", "hashed_blocks_backward_op"]


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


@torch.library.custom_op("npas_fx::hashed_blocks_backward", mutates_args=())
def hashed_blocks_backward_op(grad: Tensor, rows: Tensor, size: int, chunk: int, gain: float) -> Tensor:
    """The ``size``-value bank's gradient from that of :func:`~npas_fx.kernels.hashed_blocks`' output."""
    return hashed_blocks_backward(grad, rows, size, chunk, gain)


@hashed_blocks_backward_op.register_fake
def _(grad: Tensor, rows: Tensor, size: int, chunk: int, gain: float) -> Tensor:
    return grad.new_empty(size)
