"""SuperWeights (SWN; Teterwak et al. 2023): a layer's weight is a grid of blocks shared across layers.

Layers are *binned* by everything but their first two dimensions (a convolution's kernel size, the
rank of a matrix); a group of layers lives inside one bin. The group's *base block*
``b = (min out, min in, *kernel)`` is its smallest layer, and a layer of shape ``(O, I, *kernel)``
is the ``ceil(O / b[0]) x ceil(I / b[1])`` grid of blocks, cropped to its shape. Block position
``(r, c)`` is one *SuperWeight*, used by every layer of the group that is large enough to have
it, so layers of different sizes share their top-left parts with no warping (search and training
see the same weights).

Each SuperWeight ``p`` mixes ``K`` templates read from the group's flat bank:
``S_p = sum_k a_pk T_pk`` with ``T_pk`` consecutive ``b``-sized slices of a window starting at
``p * stride`` (windows overlap when the bank is small, and the bank is tiled when it holds less
than one block). Layers of the group in one *coefficient set* use the same coefficients ``a``
(hard sharing: identical SuperWeights); layers in different sets mix the same templates their own
way (soft sharing). The coefficients live in the group (``coefficients_<set>``, one row per
SuperWeight the set uses); with ``K = 1`` there are none.

Budget: ``B = kept + sum_g bank_g + sum_g K_g * (SuperWeights of each coefficient set of g)``,
exact, solved like :func:`npas_fx.budget.allocate` (templates raised one at a time while every
bank still holds them); the smallest feasible budget is one bank value per group.

Example:
    >>> import torch
    >>> a = allocate_superweights([(8, 4), (4, 4)], [[0, 1]], [0, 0], kept=0, budget=100, max_templates=4)
    >>> a.geometries[0].block, a.templates, a.bank_sizes, a.coefficients, a.total
    ((4, 4), (4,), (92,), (8,), 100)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import budget as _budget
from .budget import GeneratorConfig
from .generators import WeightGenerator
from .mix_kernels import window_mix
from .plan import GroupPlan, LayerPlan
from .strategies import Grouping, StrategyContext, register_strategy

__all__ = [
    "bin_key",
    "bins_of",
    "block_grid",
    "GroupGeometry",
    "group_geometry",
    "window_layout",
    "SuperWeightAllocation",
    "allocate_superweights",
    "minimum_superweight_budget",
    "SuperWeightMix",
    "SuperWeightLayout",
    "superweight_layouts",
    "plan_superweights",
]


# ---- geometry -----------------------------------------------------------------------------------
def bin_key(shape: Sequence[int]) -> tuple[int, ...]:
    """Layers with equal keys can be built from one set of SuperWeights: ``(ndim, *shape[2:])``.

    Example:
        >>> bin_key((64, 32, 3, 3)), bin_key((10, 128))
        ((4, 3, 3), (2,))
    """
    return (len(shape), *(int(s) for s in shape[2:]))


def bins_of(shapes: Sequence[Sequence[int]]) -> list[list[int]]:
    """Layer indices grouped by :func:`bin_key`, bins ordered by their first layer.

    Example:
        >>> bins_of([(4, 4, 3, 3), (8, 2), (8, 4, 3, 3)])
        [[0, 2], [1]]
    """
    bins: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        bins.setdefault(bin_key(shape), []).append(i)
    return list(bins.values())


def block_grid(shape: Sequence[int], block: Sequence[int]) -> tuple[int, int]:
    """``(rows, cols)`` of blocks that cover ``shape`` (the last ones cropped).

    Example:
        >>> block_grid((10, 6, 3, 3), (4, 6, 3, 3))
        (3, 1)
    """
    return -(-int(shape[0]) // int(block[0])), -(-int(shape[1]) // int(block[1]))


def _row_widths(grids: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Columns per block row of a union of top-left anchored grids (a staircase, row-major)."""
    rows = max(r for r, _ in grids)
    return tuple(max(c for r, c in grids if r > row) for row in range(rows))


@dataclass(frozen=True)
class GroupGeometry:
    """The SuperWeights of one group.

    Attributes:
        block: base block shape ``(min out, min in, *kernel)``.
        grids: block grid of each member (in member order).
        sets: coefficient set of each member, numbered 0.. in order of first appearance.
        widths: SuperWeights per block row of the group (the union of the member grids).
        set_widths: the same for the union of each coefficient set's grids.
    """

    block: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    sets: tuple[int, ...]
    widths: tuple[int, ...]
    set_widths: tuple[tuple[int, ...], ...]

    @property
    def block_numel(self) -> int:
        return math.prod(self.block)

    @property
    def positions(self) -> int:
        """Number of SuperWeights of the group."""
        return sum(self.widths)

    def coefficient_count(self, templates: int) -> int:
        """Coefficients the group's sets own with ``templates`` per SuperWeight (none for 1)."""
        return templates * sum(sum(w) for w in self.set_widths) if templates >= 2 else 0


def group_geometry(shapes: Sequence[Sequence[int]], sets: Sequence[int]) -> GroupGeometry:
    """Geometry of a group of layers of one bin; ``sets[i]`` labels member ``i``'s coefficient set.

    Example:
        >>> g = group_geometry([(8, 4), (4, 4), (4, 8)], [0, 1, 1])
        >>> g.block, g.grids, g.widths, g.set_widths, g.positions
        ((4, 4), ((2, 1), (1, 1), (1, 2)), (2, 1), ((1, 1), (2,)), 3)
    """
    keys = {bin_key(s) for s in shapes}
    if len(keys) != 1:
        raise ValueError(
            f"layers of shapes {[tuple(s) for s in shapes]} cannot share SuperWeights: a group must lie in one "
            "bin (equal number of dimensions and equal trailing dimensions, e.g. kernel size)."
        )
    block = (min(int(s[0]) for s in shapes), min(int(s[1]) for s in shapes), *(int(d) for d in shapes[0][2:]))
    grids = tuple(block_grid(s, block) for s in shapes)
    numbering: dict[int, int] = {}
    labels = tuple(numbering.setdefault(int(s), len(numbering)) for s in sets)
    set_widths = tuple(
        _row_widths([g for g, label in zip(grids, labels, strict=True) if label == s]) for s in range(len(numbering))
    )
    return GroupGeometry(block, grids, labels, _row_widths(grids), set_widths)


def _position_index(widths: Sequence[int], grid: tuple[int, int]) -> Tensor:
    """Indices (row-major in the union ``widths``) of the SuperWeights of a ``grid``, row-major."""
    starts = torch.tensor([0, *widths[:-1]], dtype=torch.int64).cumsum(0)
    rows, cols = grid
    return (starts[:rows, None] + torch.arange(cols, dtype=torch.int64)[None, :]).reshape(-1)


def window_layout(bank_size: int, templates: int, block_numel: int, positions: int) -> tuple[int, int]:
    """``(stride, copies)``: SuperWeight ``p`` reads ``templates * block_numel`` values from
    ``p * stride`` of the bank tiled ``copies`` times.

    Windows are spread evenly over the bank (they overlap when it is small, as SSN's sliding
    windows); a bank smaller than one template is tiled (every SuperWeight then repeats it).

    Example:
        >>> window_layout(100, 2, 10, 5), window_layout(7, 1, 10, 3)
        ((20, 1), (2, 2))
    """
    span = templates * block_numel
    if bank_size >= span:
        return ((bank_size - span) // (positions - 1) if positions > 1 else 0), 1
    stride = bank_size // positions
    return stride, -(-(stride * (positions - 1) + span) // bank_size)


# ---- exact budget -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuperWeightAllocation:
    """Bank size, templates per SuperWeight and coefficient count of each group."""

    bank_sizes: tuple[int, ...]
    templates: tuple[int, ...]
    coefficients: tuple[int, ...]
    geometries: tuple[GroupGeometry, ...]
    kept: int

    @property
    def total(self) -> int:
        return self.kept + sum(self.bank_sizes) + sum(self.coefficients)

    @property
    def fits(self) -> bool:
        """Every SuperWeight of every group has at least one template of its own in the bank."""
        return all(p >= g.positions * g.block_numel for p, g in zip(self.bank_sizes, self.geometries, strict=True))


def _member_sets(groups: Sequence[Sequence[int]], shares: Sequence[int] | None) -> list[list[int]]:
    if not shares:
        return [list(members) for members in groups]  # every layer its own set
    return [[int(shares[i]) for i in members] for members in groups]


def minimum_superweight_budget(groups: Sequence[Sequence[int]], kept: int) -> int:
    """One bank value per group (every SuperWeight then tiles it) plus what is kept dense."""
    return kept + len(groups)


def allocate_superweights(
    shapes: Sequence[Sequence[int]],
    groups: Sequence[Sequence[int]],
    shares: Sequence[int] | None,
    kept: int,
    budget: int,
    max_templates: int,
) -> SuperWeightAllocation:
    """Split ``budget`` exactly among the banks and coefficients of SuperWeight groups.

    ``shares[i]`` is layer ``i``'s coefficient set (compared inside its group; ``None`` or empty:
    every layer its own). Banks are split as :func:`npas_fx.budget.bank_split` splits them.
    Raises ``ValueError`` naming the smallest feasible budget when ``budget`` is below it.
    """
    geometries = tuple(
        group_geometry([shapes[i] for i in members], sets)
        for members, sets in zip(groups, _member_sets(groups, shares), strict=True)
    )
    minimum = minimum_superweight_budget(groups, kept)
    if budget < minimum:
        raise ValueError(
            f"budget {budget} is infeasible for SuperWeights: the smallest feasible budget is {minimum} "
            f"({kept} kept dense + one bank value for each of {len(groups)} group(s)). Ask for at least "
            f"{minimum}, keep fewer parameters dense, or use fewer groups."
        )
    weights = [sum(math.prod(shapes[i]) for i in members) for members in groups]

    def solve(templates: list[int]) -> SuperWeightAllocation | None:
        coefficients = [g.coefficient_count(k) for g, k in zip(geometries, templates, strict=True)]
        remaining = budget - kept - sum(coefficients)
        if remaining < len(groups):
            return None
        banks = _budget.bank_split(remaining, weights)
        if any(k > 1 and p < k * g.block_numel for p, k, g in zip(banks, templates, geometries, strict=True)):
            return None
        return SuperWeightAllocation(tuple(banks), tuple(templates), tuple(coefficients), geometries, kept)

    # Greedy ascent as in budget.allocate: raise each group's templates one at a time, round-robin,
    # keeping a raise only while every bank still holds its templates after paying the coefficients.
    templates = [1] * len(groups)
    best = solve(templates)
    if best is None:  # unreachable: budget >= minimum leaves one value per bank at K = 1
        raise RuntimeError("npas_fx bug: the cheapest SuperWeight allocation does not fit its minimum budget.")
    active = list(range(len(groups)))
    while active:
        still = []
        for g in active:
            if templates[g] >= max_templates:
                continue
            templates[g] += 1
            trial = solve(templates)
            if trial is None:
                templates[g] -= 1
            else:
                best = trial
                still.append(g)
        active = still
    return best


# ---- generator ----------------------------------------------------------------------------------
class SuperWeightMix(WeightGenerator):
    """A layer's weight: its grid of SuperWeights (each a template mix), concatenated and cropped.

    ``forward(bank[, coefficients])``: ``coefficients`` is the layer's coefficient set, one row of
    ``K`` per SuperWeight of the set (absent when ``K = 1``). Index tensors are non-persistent
    buffers: they follow the module across devices and are rebuilt from the plan, not saved.

    Example:
        >>> gen = SuperWeightMix((3, 2), block=(2, 2), templates=1, window_index=[0, 1], stride=4)
        >>> gen(torch.arange(8.0)).tolist()
        [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    """

    kind = "superweight"

    def __init__(
        self,
        shape: Sequence[int],
        block: Sequence[int],
        templates: int,
        window_index: Sequence[int] | Tensor,
        stride: int,
        copies: int = 1,
        coefficient_rows: Sequence[int] | Tensor | None = None,
        coefficient_name: str | None = None,
        gain: float = 1.0,
    ) -> None:
        super().__init__(shape, gain)
        self.block = tuple(int(b) for b in block)
        self.grid = block_grid(self.shape, self.block)
        self.templates = int(templates)
        self.stride = int(stride)
        self.copies = int(copies)
        self.register_buffer("window_index", torch.as_tensor(window_index, dtype=torch.int64), persistent=False)
        if self.templates > 1:
            if coefficient_rows is None or coefficient_name is None:
                raise ValueError("a SuperWeight mix of K >= 2 templates needs `coefficient_rows` and its set's name.")
            rows = torch.as_tensor(coefficient_rows, dtype=torch.int64)
            self.register_buffer("coefficient_rows", rows, persistent=False)
        # Names of the group tensors this generator is called on (read by GroupBank.inputs).
        self.group_inputs = ("bank", coefficient_name) if self.templates > 1 else ("bank",)

    def forward(self, bank: Tensor, coefficients: Tensor | None = None) -> Tensor:
        m, k = math.prod(self.block), self.templates
        count = self.window_index.numel()
        span = k * m
        source = bank.repeat(self.copies) if self.copies > 1 else bank
        mix = None if coefficients is None else coefficients.to(bank.dtype).index_select(0, self.coefficient_rows)
        if mix is not None and self.stride > 0:  # the gathered windows are K weights' worth: not kept
            blocks = window_mix(source, mix, self.window_index, span, self.stride)  # (N, m)
        elif mix is not None:  # every SuperWeight reads the same K templates: one (N, K) @ (K, m) product
            blocks = torch.mm(mix, source.narrow(0, 0, span).view(k, m))  # (its backward: two products, no bmm)
        else:
            if self.stride > 0:
                chosen = source.unfold(0, span, self.stride).index_select(0, self.window_index)  # (N, K*m)
            else:
                chosen = source.narrow(0, 0, span).unsqueeze(0).expand(count, span)  # a view: free to keep
            blocks = chosen
        rows, cols = self.grid
        rest = self.block[2:]
        weight = blocks.view(rows, cols, *self.block).transpose(1, 2)  # (R, b0, C, b1, *kernel)
        weight = weight.reshape(rows * self.block[0], cols * self.block[1], *rest)
        if weight.shape[0] != self.shape[0] or weight.shape[1] != self.shape[1]:
            weight = weight[: self.shape[0], : self.shape[1]]
        return self._finish(weight.reshape(-1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}, grid={self.grid}, templates={self.templates}"


class SuperWeightLayout:
    """Builds a group's coefficient tensors and its members' :class:`SuperWeightMix` from a plan."""

    def __init__(self, members: Sequence[LayerPlan], bank_size: int) -> None:
        self.members = list(members)
        self.templates = self.members[0].templates
        self.geometry = group_geometry([x.shape for x in self.members], [x.coefficient_set for x in self.members])
        block = tuple(self.members[0].block)
        if block != self.geometry.block or any(x.templates != self.templates for x in self.members):
            raise ValueError(
                f"plan of SuperWeight group {self.members[0].group} is inconsistent: members should share the "
                f"base block {self.geometry.block} and one template count; re-plan with a budget."
            )
        self.stride, self.copies = window_layout(
            bank_size, self.templates, self.geometry.block_numel, self.geometry.positions
        )

    def coefficient_parameters(self) -> dict[str, nn.Parameter]:
        """``coefficients_<set>`` of shape ``(SuperWeights of the set, K)``; none when ``K = 1``."""
        if self.templates < 2:
            return {}
        k = self.templates
        # Random directions so that soft-shared layers (and SuperWeights reading overlapping
        # windows) start from different mixes; the compile-time gain fixes the overall scale.
        return {
            f"coefficients_{s}": nn.Parameter(torch.randn(sum(widths), k) / math.sqrt(k))
            for s, widths in enumerate(self.geometry.set_widths)
        }

    def generator(self, layer: LayerPlan) -> SuperWeightMix:
        member = next(j for j, x in enumerate(self.members) if x.name == layer.name)
        grid = self.geometry.grids[member]
        label = self.geometry.sets[member]
        return SuperWeightMix(
            layer.shape,
            self.geometry.block,
            self.templates,
            _position_index(self.geometry.widths, grid),
            self.stride,
            self.copies,
            _position_index(self.geometry.set_widths[label], grid) if self.templates > 1 else None,
            f"coefficients_{label}" if self.templates > 1 else None,
            layer.gain,
        )


def superweight_layouts(layers: Sequence[LayerPlan], groups: Sequence[GroupPlan]) -> dict[int, SuperWeightLayout]:
    """A :class:`SuperWeightLayout` for every group whose layers use the ``superweight`` generator."""
    layouts = {}
    for group in groups:
        members = [x for x in layers if x.group == group.index]
        if members and all(x.generator == "superweight" for x in members):
            layouts[group.index] = SuperWeightLayout(members, group.bank_size)
        elif any(x.generator == "superweight" for x in members):
            raise ValueError(f"group {group.index} mixes superweight and other generators; re-plan with a budget.")
    return layouts


# ---- planning -----------------------------------------------------------------------------------
def plan_superweights(
    generated: Sequence[Any], grouping: Grouping, kept: int, budget: int, config: GeneratorConfig
) -> tuple[list[LayerPlan], list[GroupPlan]]:
    """Layer and group plans of a ``force="superweight"`` grouping (``generated``: ParamInfos)."""
    shapes = [tuple(p.shape) for p in generated]
    groups = [list(g) for g in grouping.groups]
    alloc = allocate_superweights(shapes, groups, grouping.shares, kept, budget, config.max_templates)
    layers: list[LayerPlan | None] = [None] * len(generated)
    for g, members in enumerate(groups):
        geometry = alloc.geometries[g]
        for j, i in enumerate(members):
            info = generated[i]
            layers[i] = LayerPlan(
                name=info.name,
                shape=tuple(info.shape),
                module=info.module,
                module_type=info.module_type,
                group=g,
                generator="superweight",
                templates=alloc.templates[g],
                aliases=tuple(info.aliases),
                block=geometry.block,
                coefficient_set=geometry.sets[j],
            )
    plans = [x for x in layers if x is not None]
    group_plans = [
        GroupPlan(g, tuple(generated[i].name for i in members), alloc.bank_sizes[g], alloc.coefficients[g])
        for g, members in enumerate(groups)
    ]
    return plans, group_plans


def _resolve_names(value: Any, names: Sequence[str], what: str) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for item in value:
        if isinstance(item, str):
            if item not in index:
                raise ValueError(
                    f"`options[{what!r}]` names {item!r}, which is no generated layer; layers: {list(names)}."
                )
            out.append(index[item])
        else:
            out.append(int(item))
    return out


@register_strategy("superweight")
def share_superweights(ctx: StrategyContext) -> Grouping:
    """SuperWeight sharing without search: one group per bin, or ``options["groups"]``.

    Options: ``groups`` (lists of layer names or indices), ``hard`` (``True``: the layers of a group
    share coefficients too; default ``False``, every layer its own), ``shares`` (per layer set label).
    """
    count = len(ctx.shapes)
    if "groups" in ctx.options:
        groups = [tuple(_resolve_names(g, ctx.names, "groups")) for g in ctx.options["groups"]]
        seen = sorted(i for g in groups for i in g)
        if seen != list(range(count)) or any(not g for g in groups):
            raise ValueError(f"`options['groups']` should cover each of the {count} generated layers exactly once.")
    else:
        groups = [tuple(b) for b in bins_of(ctx.shapes)]
    for g in groups:
        group_geometry([ctx.shapes[i] for i in g], [0] * len(g))  # raises for a group across bins
    shares: tuple[int, ...] = ()
    if "shares" in ctx.options:
        shares = tuple(int(s) for s in ctx.options["shares"])
        if len(shares) != count:
            raise ValueError(
                f"`options['shares']` should give one label per generated layer ({count}), got {len(shares)}."
            )
    elif ctx.options.get("hard", False):
        shares = (0,) * count
    return Grouping(
        tuple(groups), force="superweight", shares=shares, provenance={"hard": bool(ctx.options.get("hard"))}
    )
