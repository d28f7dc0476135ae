"""Strategies decide which generated layers share a bank (the *mapping* half of NPAS).

A strategy is a function ``(StrategyContext) -> Grouping`` registered under a name with
:func:`register_strategy`; ``npas_fx.compile(..., strategy=name)`` looks it up. Data-free ones
live here; learned ones (``ssn``, ``swn``) register themselves from their own modules.

Example:
    >>> ctx = StrategyContext(shapes=[(4, 4), (4, 4), (2, 4)], names=["a", "b", "c"], seed=0)
    >>> STRATEGIES["shape"](ctx).groups
    ((0, 1), (2,))
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StrategyContext", "Grouping", "STRATEGIES", "register_strategy", "DATA_FREE", "resolve_auto"]


@dataclass
class StrategyContext:
    """What a strategy may look at.

    ``shapes``/``names`` describe the generated layers in graph order. Learned strategies also get
    the traced ``graph_module`` (and the whole ``trace`` result it came from), the ``budget``, user ``data``/``loss_fn`` and their ``options``,
    ``search_steps`` (length of their short pre-training), the ``kept`` count (trainable values
    left dense) and the ``generator_config`` the final model is built with.
    """

    shapes: Sequence[tuple[int, ...]]
    names: Sequence[str]
    seed: int = 0
    budget: int = 0
    num_groups: int | None = None
    graph_module: Any = None
    data: Any = None
    loss_fn: Any = None
    options: dict = field(default_factory=dict)
    search_steps: int | None = None
    kept: int = 0
    generator_config: Any = None
    trace: Any = None


@dataclass(frozen=True)
class Grouping:
    """Groups of layer indices; ``force`` fixes one generator for all (``"hash"``, ``"superweight"``).

    ``shares`` (``"superweight"`` only): per layer, its coefficient set inside its group; layers of
    one group with the same set share coefficients (hard sharing). Empty: every layer its own.
    """

    groups: tuple[tuple[int, ...], ...]
    force: str | None = None
    provenance: dict = field(default_factory=dict)
    shares: tuple[int, ...] = ()


Strategy = Callable[[StrategyContext], Grouping]
STRATEGIES: dict[str, Strategy] = {}
DATA_FREE = ("auto", "shape", "single", "random", "hash")


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    """Decorator that makes a strategy available to ``compile(strategy=name)``."""

    def decorate(function: Strategy) -> Strategy:
        STRATEGIES[name] = function
        return function

    return decorate


@register_strategy("shape")
def share_identical_shapes(ctx: StrategyContext) -> Grouping:
    """Layers of identical shape share a bank (ALBERT; Savarese & Maire 2019)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(ctx.shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    return Grouping(tuple(tuple(v) for v in by_shape.values()))


@register_strategy("single")
def share_one_bank(ctx: StrategyContext) -> Grouping:
    """Every layer draws from one global bank."""
    return Grouping((tuple(range(len(ctx.shapes))),))


def resolve_auto(budget: int, original: int) -> str:
    """The strategy ``"auto"`` (compile's default) stands for at this budget.

    ``"single"`` below the model's trainable count: it measured best at low budgets on both accuracy
    benchmarks (README, "Which strategy"); ``"shape"`` at or above it, where it keeps the identity
    plan (a budget of 1.0 reproduces the original exactly when no two layers share a shape) and
    measured best at 400 % on digits.

    Example:
        >>> resolve_auto(100, 1000), resolve_auto(1000, 1000)
        ('single', 'shape')
    """
    return "single" if budget < original else "shape"


@register_strategy("auto")
def share_by_budget(ctx: StrategyContext) -> Grouping:
    """``"single"`` below the model's trainable count, ``"shape"`` at or above it (:func:`resolve_auto`)."""
    total = ctx.kept + sum(math.prod(shape) for shape in ctx.shapes)
    return STRATEGIES[resolve_auto(ctx.budget, total)](ctx)


@register_strategy("random")
def share_random_groups(ctx: StrategyContext) -> Grouping:
    """``num_groups`` random non-empty groups (default: about the square root of the layer count)."""
    count = len(ctx.shapes)
    k = ctx.num_groups if ctx.num_groups is not None else max(1, round(count**0.5))
    if not 1 <= k <= count:
        raise ValueError(f"`num_groups` should be between 1 and the {count} generated layers, got {k}.")
    rng = random.Random(ctx.seed)
    order = list(range(count))
    rng.shuffle(order)
    label = {layer: position for position, layer in enumerate(order[:k])}  # every group non-empty
    for layer in order[k:]:
        label[layer] = rng.randrange(k)
    groups = [tuple(i for i in range(count) if label[i] == g) for g in range(k)]
    return Grouping(tuple(groups), provenance={"num_groups": k})


@register_strategy("hash")
def share_hashed_memory(ctx: StrategyContext) -> Grouping:
    """One global memory; every weight is a hashed, signed view of it (HashedNets / ROAST)."""
    return Grouping((tuple(range(len(ctx.shapes))),), force="hash")
