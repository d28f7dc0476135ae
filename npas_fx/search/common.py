"""What both learned strategies need: validated options, the search model, captured gradients.

The search model is built by :func:`npas_fx.compile` itself (on the traced copy the strategy is
given, which it leaves untouched) so that it generates exactly the layers the final model will.

Example:
    >>> SearchOptions.parse({"lr": 0.01}, allowed=("lr",)).lr
    0.01
"""

from __future__ import annotations

import copy
import numbers
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from tqdm.auto import tqdm

from ..budget import GeneratorConfig
from ..build import BuildSettings, build
from ..compiler import plan_of
from ..passes.trace import TraceResult
from ..strategies import StrategyContext
from .pretrain import LossFn, batch_loss, check_finite

__all__ = ["SearchOptions", "compile_search_model", "weight_gradients"]


@dataclass(frozen=True)
class SearchOptions:
    """Options of the learned strategies (``compile(..., options={...})``).

    Attributes:
        lr: Adam learning rate of the short pre-training.
        progress: show the progress bar (``None``: only on an interactive terminal).
        grad_batches: batches whose gradients are summed for a similarity (SWN; not just one).
        threshold: SWN's starting similarity threshold (official 0.1).
        threshold_step: how much SWN lowers it until the groups fit the budget (official 0.05).
        refine_threshold: coefficient-gradient similarity below which SWN gives layers their own
            coefficients (official 0.9).
        refine_steps: pre-training steps of SWN's hard-shared model before refinement (default:
            half of ``search_steps``; 0 skips refinement).
        templates: templates per layer of SSN's search model (official 4).
        concat_weights: SWN compares each layer's normalised gradient concatenated with its
            normalised generated weight (the paper's optional variant) instead of the gradient alone.
    """

    lr: float = 3e-3
    progress: bool | None = None
    grad_batches: int = 8
    threshold: float = 0.1
    threshold_step: float = 0.05
    refine_threshold: float = 0.9
    refine_steps: int | None = None
    templates: int = 4
    concat_weights: bool = False

    @classmethod
    def parse(cls, options: Mapping[str, Any], allowed: tuple[str, ...]) -> SearchOptions:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for this strategy; it takes {sorted(allowed)}.")
        result = cls(**dict(options))
        result._validate()
        return result

    def _validate(self) -> None:
        for name in ("grad_batches", "templates"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Integral)
                or value < (2 if name == "templates" else 1)
            ):
                raise ValueError(
                    f"`options[{name!r}]` should be an int >= {2 if name == 'templates' else 1}, got {value!r}."
                )
        if self.refine_steps is not None and (
            isinstance(self.refine_steps, bool)
            or not isinstance(self.refine_steps, numbers.Integral)
            or self.refine_steps < 0
        ):
            raise ValueError(f"`options['refine_steps']` should be an int >= 0, got {self.refine_steps!r}.")
        if not isinstance(self.concat_weights, bool):
            raise ValueError(f"`options['concat_weights']` should be True or False, got {self.concat_weights!r}.")
        for name in ("lr", "threshold", "threshold_step", "refine_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"`options[{name!r}]` should be a number, got {value!r}.")
        if self.lr <= 0 or self.threshold_step <= 0:
            raise ValueError(
                f"`lr` and `threshold_step` should be positive, got {self.lr!r} and {self.threshold_step!r}."
            )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def compile_search_model(
    ctx: StrategyContext, budget: int, strategy: str, *, generators: GeneratorConfig, options: dict | None = None
) -> tuple[fx.GraphModule, list[int]]:
    """Build the search model from a copy of the strategy's traced module; returns it and, per
    context layer, its generator index.

    The copy is built directly (not traced again), so a root that runs as one leaf, opaque leaves
    and parameter names are exactly the final model's. Every >=2-D parameter the context does not
    generate is kept dense, so the search model generates exactly ``ctx.names`` (a user's ``keep=``
    carries over).
    """
    if ctx.trace is None and ctx.graph_module is None:
        raise ValueError("a learned strategy needs the traced model in its context (`trace`).")
    traced = ctx.trace if ctx.trace is not None else TraceResult(ctx.graph_module)
    wanted = set(ctx.names)
    traced = replace(traced, graph_module=_copy_sharing(traced.graph_module, wanted), root=None)
    gm = traced.graph_module
    others = [n for n, p in gm.named_parameters() if p.requires_grad and p.dim() >= 2 and n not in wanted]
    settings = BuildSettings(
        strategy=strategy,
        seed=ctx.seed,
        config=generators,
        keep="|".join(re.escape(n) for n in others) or None,  # exact names: a suffix list could match more
        copy_weights=False,
        options=options,
    )
    search = build(traced, budget, settings)
    position = {x.name: i for i, x in enumerate(plan_of(search).layers)}
    missing = [n for n in ctx.names if n not in position]
    if missing:
        raise RuntimeError(f"npas_fx bug: the search model does not generate {missing}.")
    return search, [position[n] for n in ctx.names]


def _copy_sharing(gm: fx.GraphModule, generated: set[str]) -> fx.GraphModule:
    """Deep copy of ``gm`` whose ``generated`` parameters share the original's storage.

    The search model replaces those parameters by generators (they are only read, for their
    shapes and scales, before they go), so copying them would only add the model's size to the
    search's peak; everything else (kept parameters the search trains, buffers) is copied.
    """
    memo: dict[int, Any] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if name in generated and id(p) not in memo:  # a tied parameter: one new object for all its names
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return copy.deepcopy(gm, memo)


def weight_gradients(
    gm: fx.GraphModule, batches: Iterator, loss_fn: LossFn | None, num_batches: int, bar: tqdm | None = None
) -> list[Tensor]:
    """Per generator of ``gm``, the gradient of the loss w.r.t. its generated weight, summed over batches.

    Parameters are not updated (the gradients of several batches describe one point), and no
    parameter ``.grad`` is touched: the generated weights are captured by forward hooks and
    differentiated with ``torch.autograd.grad``.
    """
    generators = gm.npas.generators
    count = len(generators)
    # Each generated weight is captured by its gradient edge, not the tensor: holding the tensors
    # kept every weight alive until the end of the backward, beside all the gradients (twice the
    # weights' size at the peak instead of about once).
    edges: list[GradientEdge | None] = [None] * count
    sums: list[Tensor | None] = [None] * count

    def capture(i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Tensor) -> None:
            edges[i] = get_gradient_edge(output) if output.requires_grad else None

        return hook

    handles = [generators[f"l{i}"].register_forward_hook(capture(i)) for i in range(count)]
    try:
        for batch in range(num_batches):
            edges[:] = [None] * count
            loss = batch_loss(gm, next(batches), loss_fn)
            check_finite(float(loss.detach()), f"gradient batch {batch + 1} of {num_batches}")
            present = [i for i in range(count) if edges[i] is not None]
            grads = torch.autograd.grad(loss, [edges[i] for i in present], allow_unused=True)
            del loss
            edges[:] = [None] * count
            for i, grad in zip(present, grads, strict=True):
                if grad is not None:
                    sums[i] = grad.detach() if sums[i] is None else sums[i] + grad.detach()
            del grads
            if bar is not None:
                bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
    for i, total in enumerate(sums):
        if total is not None and not bool(torch.isfinite(total).all()):
            check_finite(float("nan"), f"the gradient of generated layer {i} (summed over {num_batches} batches)")
    shapes = [generators[f"l{i}"].shape for i in range(count)]
    return [s if s is not None else torch.zeros(shape) for s, shape in zip(sums, shapes, strict=True)]
