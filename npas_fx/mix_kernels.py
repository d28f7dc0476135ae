"""Template mixing and bilinear stretching kernels behind ``superweight``, ``wavg``/``emb`` and ``interpolate``.

* :func:`window_mix` (``superweight``): each SuperWeight mixes ``K`` templates of one bank window.
  The gathered windows (``K`` times the weight's size) are recomputed in backward, not kept.
* :func:`template_mix` (``wavg``, ``emb``): one ``(1, K) @ (K, n)`` product; backward writes the
  bank's gradient once (a broadcast multiply) and reads the templates once (the coefficients').
* :func:`bilinear` (``interpolate``): a separable stretch, each axis a sparse matrix of two entries
  per row (:func:`lerp_plan`, precomputed) applied with ``F.embedding_bag``, its transpose likewise.

Example:
    >>> import torch
    >>> template_mix(torch.arange(6.0), torch.tensor([1.0, 2.0]), 0, 3).tolist()
    [6.0, 9.0, 12.0]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["window_mix", "template_mix", "lerp_plan", "bilinear", "LerpPlan"]


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
