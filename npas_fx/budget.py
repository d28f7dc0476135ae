"""Exact budget accounting: how many values each bank gets, and how each layer is generated.

The budget ``B`` is split as ``B = kept + overhead + sum(bank sizes)``: ``kept`` are the trainable
parameters left dense (biases, norms, anything the user keeps), ``overhead`` the generators' own
parameters (coefficients, embeddings, masks, shared maps). Which generator a layer gets depends on
its bank's size (downsampling with ``K`` templates needs ``K * n`` values, upsampling fewer than
``n``), and the overhead depends on that choice, so the split is solved as a small fixed point in
which layers gain templates one at a time while every bank still holds them (:func:`allocate`).

Example:
    >>> cfg = GeneratorConfig()
    >>> a = allocate([12, 12], [[0, 1]], kept=5, budget=53, config=cfg)
    >>> a.bank_sizes, a.templates, a.total
    ((42,), (3, 3), 53)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "GeneratorConfig",
    "Allocation",
    "parse_budget_text",
    "resolve_budget",
    "allocate",
    "minimum_budget",
    "split_exact",
    "bank_split",
    "BANK_FLOOR",
]

DOWNSAMPLERS = ("wavg", "emb")
UPSAMPLERS = ("signed", "repeat", "interpolate", "mask", "hash")
NORMALIZERS = ("none", "softmax")


@dataclass(frozen=True)
class GeneratorConfig:
    """How layer weights are produced from their group's bank.

    Attributes:
        downsample: ``"wavg"`` (free coefficients) or ``"emb"`` (coefficients from a learned
            layer embedding) when the bank holds at least two layer-sized templates.
        upsample: ``"signed"``, ``"repeat"``, ``"interpolate"``, ``"mask"`` or ``"hash"`` when
            the bank is smaller than the layer. ``signed`` (tiling with a fixed hashed sign per
            output row) is the default: plain ``repeat`` gives every row about the same sum, so a
            layer after a ReLU can start (or end) with every unit dead, which left one seed in
            three at chance on the digits benchmark at 5 % (docs/accuracy.md); bilinear
            interpolation of a small grid lowers the rank of the weight (a 10-class head
            stretched from 3 rows: 54 % on the digits demo at 10 % against 99 % for repeat).
        max_templates: cap on templates mixed per layer (SSN's default is 8). 1 = hard sharing.
        embedding_dim: size of the per-layer embedding of ``"emb"`` (SSN used 24).
        normalize: ``"none"`` or ``"softmax"``: how ``"emb"`` coefficients are normalised
            (SSN's mapping search uses softmax so that layers' coefficients are comparable).
        hash_chunk: contiguous weights per hashed block of ``"hash"`` (ROAST): one hash per
            block, which reads a contiguous bank range. ``1`` is per-element HashedNets. A layer's
            blocks are also at most a quarter of its rows (``build.hash_block``).

    Example:
        >>> GeneratorConfig(upsample="repeat").upsample
        'repeat'
    """

    downsample: str = "wavg"
    upsample: str = "signed"
    max_templates: int = 8
    embedding_dim: int = 24
    normalize: str = "none"
    hash_chunk: int = 64

    def __post_init__(self) -> None:
        if self.downsample not in DOWNSAMPLERS:
            raise ValueError(f"`downsample` should be one of {DOWNSAMPLERS}, got {self.downsample!r}.")
        if self.upsample not in UPSAMPLERS:
            raise ValueError(f"`upsample` should be one of {UPSAMPLERS}, got {self.upsample!r}.")
        if isinstance(self.max_templates, bool) or not isinstance(self.max_templates, int) or self.max_templates < 1:
            raise ValueError(f"`max_templates` should be an integer >= 1, got {self.max_templates!r}.")
        if isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int) or self.embedding_dim < 1:
            raise ValueError(f"`embedding_dim` should be an integer >= 1, got {self.embedding_dim!r}.")
        if self.normalize not in NORMALIZERS:
            raise ValueError(f"`normalize` should be one of {NORMALIZERS}, got {self.normalize!r}.")
        if isinstance(self.hash_chunk, bool) or not isinstance(self.hash_chunk, int) or self.hash_chunk < 1:
            raise ValueError(
                f"`hash_chunk` should be an integer >= 1 (1 = per-element hashing), got {self.hash_chunk!r}."
            )

    def to_dict(self) -> dict:
        return asdict(self)


def parse_budget_text(text: str) -> int | float:
    """``"5000"`` -> 5000 parameters; ``"0.1"`` or ``"10%"`` -> 0.1 (a multiple of the model's count).

    Example:
        >>> parse_budget_text("10%"), parse_budget_text("0.5"), parse_budget_text("1_000")
        (0.1, 0.5, 1000)
    """
    value = text.strip().replace("_", "")
    try:
        if value.endswith("%"):
            return float(value[:-1]) / 100
        return int(value) if value.isdigit() else float(value)
    except ValueError:
        raise ValueError(
            f"`budget` {text!r} is not a budget: give a parameter count (5000), a multiple of the model's "
            "parameters (0.1 = 10 %, 2.0 = twice) or a percentage ('10%')."
        ) from None


def resolve_budget(budget: object, original: int) -> int:
    """Turn a user budget into an exact parameter count.

    An ``int`` is taken as is; a ``float`` is a multiple of ``original`` rounded to the nearest
    integer (``0.1`` = 10 %, ``4.0`` = 4x); a ``str`` is read as the command line reads it
    (``"10%"``, ``"0.1"``, ``"5000"``).

    Example:
        >>> resolve_budget(0.25, 1000), resolve_budget(123, 1000), resolve_budget("10%", 1000)
        (250, 123, 100)
    """
    if isinstance(budget, str):
        budget = parse_budget_text(budget)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"`budget` should be an int (a parameter count) or a float (a multiple of the model's "
            f"{original} trainable parameters), got {type(budget).__name__} {budget!r}."
        )
    if isinstance(budget, numbers.Integral):
        count = int(budget)
    else:
        value = float(budget)
        if not math.isfinite(value):
            raise ValueError(f"`budget` should be a finite number, got {value}.")
        if value <= 0:
            raise ValueError(f"`budget` should be positive, got {value}; e.g. 0.1 for 10 % of the parameters.")
        count = int(round(value * original))
    if count <= 0:
        raise ValueError(f"`budget` should be a positive number of parameters, got {budget!r} (= {count} parameters).")
    return count


@dataclass(frozen=True)
class Allocation:
    """The solved split: bank size per group, templates per layer (0 = upsampled), overheads."""

    bank_sizes: tuple[int, ...]
    templates: tuple[int, ...]
    layer_overheads: tuple[int, ...]
    group_overheads: tuple[int, ...]
    kept: int

    @property
    def total(self) -> int:
        return self.kept + sum(self.bank_sizes) + sum(self.layer_overheads) + sum(self.group_overheads)


def split_exact(total: int, weights: Sequence[int], minimum: int = 1) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total``, each at least ``minimum``.

    Largest-remainder rounding; a share below ``minimum`` is topped up from the largest shares.

    Example:
        >>> split_exact(10, [1, 1, 2])
        [3, 2, 5]
    """
    count = len(weights)
    if total < minimum * count:
        raise ValueError(f"cannot split {total} into {count} parts of at least {minimum}")
    weight_sum = sum(weights)
    quotas = [total * w / weight_sum for w in weights]
    shares = [math.floor(q) for q in quotas]
    order = sorted(range(count), key=lambda i: (shares[i] - quotas[i], i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    for i in range(count):
        while shares[i] < minimum:
            donor = max(range(count), key=lambda j: (shares[j], -j))
            shares[donor] -= 1
            shares[i] += 1
    return shares


# Each bank gets at least min(its layers' size, BANK_FLOOR * an equal share of the bank budget).
# A purely proportional split starves small groups: on the digits benchmark at 5 % a 10x32 head
# alone in its bank got 12-16 values (repeated 20x), and one seed in three stayed at chance.
BANK_FLOOR = 0.5


def bank_split(total: int, sizes: Sequence[int], floor: float = BANK_FLOOR) -> list[int]:
    """Bank sizes summing to ``total``: proportional to ``sizes`` above a per-group floor.

    Group ``g`` gets at least ``min(sizes[g], floor * total / len(sizes))`` (its whole layers when
    they are that small, else a fixed share of an equal split); the rest is proportional to size
    (water-filling: ``max(floor_g, lam * sizes[g])`` with ``lam`` solving the sum). The floor never
    binds once ``total >= sum(sizes)`` (every group then holds its layers once), so large budgets
    split exactly as SSN's proportional rule. Each bank gets at least one value.

    Example:
        >>> bank_split(100, [900, 100]), split_exact(100, [900, 100])
        ([75, 25], [90, 10])
        >>> bank_split(1000, [900, 100])
        [900, 100]
    """
    count = len(sizes)
    if total < count:
        raise ValueError(f"cannot split {total} into {count} banks of at least one value")
    if not 0 <= floor <= 1:
        raise ValueError(f"`floor` should be between 0 and 1, got {floor!r}.")
    floors = [min(float(n), floor * total / count) for n in sizes]
    fixed: set[int] = set()
    lam = 0.0
    while len(fixed) < count:  # the fixed set only grows (lam only falls): at most `count` rounds
        free = [g for g in range(count) if g not in fixed]
        lam = (total - sum(floors[g] for g in fixed)) / sum(sizes[g] for g in free)
        below = {g for g in free if lam * sizes[g] < floors[g]}
        if not below:
            break
        fixed |= below  # all fixed only when the floors fill the total (floor = 1, equal floors)
    quotas = [floors[g] if g in fixed else lam * sizes[g] for g in range(count)]
    return split_exact(total, quotas)


def _templates_for(bank_size: int, numel: int, config: GeneratorConfig) -> int:
    if bank_size < numel:
        return 0
    return min(config.max_templates, bank_size // numel)


def _overheads(
    templates: Sequence[int],
    sizes: Sequence[int],
    rows: Sequence[int],
    groups: Sequence[Sequence[int]],
    config: GeneratorConfig,
    force: str | None,
) -> tuple[list[int], list[int]]:
    layer = [0] * len(sizes)
    group = [0] * len(groups)
    if force == "hash":
        return layer, group
    for g, members in enumerate(groups):
        widest = 0
        for i in members:
            k = templates[i]
            if k == 0:
                layer[i] = rows[i] if config.upsample == "mask" else 0
            elif k >= 2:
                widest = max(widest, k)
                layer[i] = k if config.downsample == "wavg" else config.embedding_dim
        if config.downsample == "emb" and widest >= 2:
            group[g] = widest * (config.embedding_dim + 1)  # shared map W (K, E) and b (K,)
    return layer, group


def _floor_templates(sizes: Sequence[int], config: GeneratorConfig) -> list[int]:
    return [_templates_for(1, n, config) for n in sizes]


def minimum_budget(
    sizes: Sequence[int],
    rows: Sequence[int],
    groups: Sequence[Sequence[int]],
    kept: int,
    config: GeneratorConfig,
    force: str | None = None,
) -> int:
    """Smallest budget :func:`allocate` can meet: one value per bank plus the cheapest generators,
    or one template per layer (every weight once) when that is less (``mask`` on fan-in-1 layers).

    Example:
        >>> minimum_budget([12, 6], [4, 2], [[0], [1]], kept=3, config=GeneratorConfig())
        5
    """
    floor = _floor_templates(sizes, config)
    layer, group = _overheads(floor, sizes, rows, groups, config, force)
    cheapest = kept + len(groups) + sum(layer) + sum(group)
    return cheapest if force == "hash" else min(cheapest, kept + sum(sizes))


def allocate(
    sizes: Sequence[int],
    groups: Sequence[Sequence[int]],
    kept: int,
    budget: int,
    config: GeneratorConfig,
    rows: Sequence[int] | None = None,
    force: str | None = None,
) -> Allocation:
    """Split ``budget`` exactly among ``groups`` of layers with ``sizes`` (numel each).

    Banks are proportional to their group's total layer size (as in SSN) above a per-group floor
    (:func:`bank_split`: a small group is never starved by a large one). ``rows`` is each
    layer's first dimension (the ``mask`` upsampler learns one value per row). ``force="hash"``
    makes every layer a hashed view of its bank. Raises ``ValueError`` naming the minimum when
    ``budget`` is too small.
    """
    rows = list(rows) if rows is not None else [1] * len(sizes)
    minimum = minimum_budget(sizes, rows, groups, kept, config, force)
    if budget < minimum:
        raise ValueError(
            f"budget {budget} is infeasible: the smallest feasible budget for this model and strategy "
            f"is {minimum} ({kept} kept dense + {minimum - kept} for {len(groups)} bank(s) and their "
            f"generators). Ask for at least {minimum}, keep fewer parameters dense, or use fewer groups."
        )
    weights = [sum(sizes[i] for i in members) for members in groups]
    if force == "hash":
        layer, group = _overheads([0] * len(sizes), sizes, rows, groups, config, force)
        banks = bank_split(budget - kept, weights)
        return Allocation(tuple(banks), (0,) * len(sizes), tuple(layer), tuple(group), kept)

    order = [i for members in groups for i in members]

    def solve(templates: list[int]) -> Allocation | None:
        """The split for these template counts, or None when some bank cannot hold its layers."""
        layer, group = _overheads(templates, sizes, rows, groups, config, force)
        remaining = budget - kept - sum(layer) - sum(group)
        if remaining < len(groups):
            return None
        banks = bank_split(remaining, weights)
        for g, members in enumerate(groups):
            if any(templates[i] > _templates_for(banks[g], sizes[i], config) for i in members):
                return None
        return Allocation(tuple(banks), tuple(templates), tuple(layer), tuple(group), kept)

    # Greedy ascent from the cheapest generators (feasible since budget >= minimum): raise every
    # layer one template at a time, round-robin in graph order so no layer starves the others,
    # and keep a raise only if every bank still holds all of its layers' templates after the
    # extra coefficients are paid for. A refused layer is tried again in the next round: a raise
    # can also free budget (a masked layer that becomes a slice drops its mask).
    templates = _floor_templates(sizes, config)
    best = solve(templates)
    # Start from a full template per layer when that fits: upsampling is the fallback, never a
    # choice the ascent can get stuck in (a mask costs a value per row, a slice nothing).
    ones = [max(1, k) for k in templates]
    if (start := solve(ones)) is not None:
        templates, best = ones, start
    assert best is not None, "budget >= minimum implies the cheapest generators or a template each fit"
    raised = True
    while raised:
        raised = False
        for i in order:
            if templates[i] >= config.max_templates:
                continue
            templates[i] += 1
            trial = solve(templates)
            if trial is None:
                templates[i] -= 1
            else:
                best = trial
                raised = True
    return best
