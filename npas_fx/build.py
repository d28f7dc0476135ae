"""The post-trace stage of :func:`npas_fx.compile`: plan a traced module and rewrite it.

``build`` takes a :class:`~npas_fx.passes.trace.TraceResult` (the caller's own traced copy) and
turns it into the compiled GraphModule::

    collect_params -> keep / generate -> strategy (groups) or saved plan -> allocate (exact budget)
                   -> banks & generators -> insert_generators (rewrite) -> verify count

:func:`npas_fx.compile` traces a copy of the user's model and calls it; the learned strategies
call it on a copy of the *same* traced module to build their search models, so that a search
model generates exactly the parameters (same names, same leaves) the final model will.

Example:
    >>> import torch
    >>> from npas_fx.passes.trace import trace
    >>> traced = trace(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)))
    >>> gm = build(traced, 100, BuildSettings())
    >>> count_parameters(gm)
    100
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from .budget import Allocation, GeneratorConfig, allocate
from .fit import fit_shared
from .generators import interpolation_grid
from .inference import install_fast_eval
from .passes.collect_params import ParamInfo, collect_params
from .passes.insert_generators import GeneratorCall, insert_generators
from .passes.trace import TraceResult
from .plan import GroupPlan, KeptParam, LayerPlan, OpaqueModule, Plan
from .plan_checks import check_plan_fits
from .recompute import set_recompute
from .runtime import attach_runtime
from .shared_params import SAMPLE, SharedParameters, target_std, wide_std
from .strategies import STRATEGIES, Grouping, StrategyContext
from .superweights import plan_superweights
from .validation import split_mixed_groups

__all__ = ["BuildSettings", "build", "count_parameters", "PLAN_KEY", "SHARED_NAME"]

PLAN_KEY = "npas_plan"
SHARED_NAME = "npas"


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``, a tied parameter counted once.

    Example:
        >>> count_parameters(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@dataclass(frozen=True)
class BuildSettings:
    """Everything :func:`build` needs besides the traced module and the budget (see ``compile``)."""

    strategy: str = "shape"
    seed: int = 0
    plan: Plan | None = None
    config: GeneratorConfig = field(default_factory=GeneratorConfig)
    keep: str | Sequence[str] | None = None
    num_groups: int | None = None
    copy_weights: bool = True
    data: Any = None
    loss_fn: Any = None
    options: Mapping[str, Any] | None = None
    search_steps: int | None = None
    recompute: bool = False  # compile's default is its own; search models keep their weights
    recompute_min_numel: int = 0  # weights smaller than this are kept (see npas_fx.recompute.AUTO_MIN_NUMEL)
    init: str = "random"  # "fit": banks start as the least-squares fit of the trained weights


# ---- which parameters are generated -------------------------------------------------------------
def _keep_matcher(keep: str | Sequence[str] | None) -> Any:
    if keep is None:
        return lambda name: False
    if isinstance(keep, str):
        pattern = re.compile(keep)
        return lambda name: pattern.fullmatch(name) is not None
    names = tuple(keep)
    return lambda name: any(name == k or name.endswith("." + k) for k in names)


def _kept_reason(info: ParamInfo, is_kept: Any) -> str | None:
    """Why a parameter stays dense, or ``None`` when it is generated."""
    if any(is_kept(a) for a in info.aliases):
        return "keep"
    if not info.reads:
        return "unused"
    if info.numel == 0:
        return "empty"  # costs nothing and has nothing to generate
    if len(info.shape) >= 2:
        return None
    if "Norm" in info.module_type:
        return "norm"
    return "bias" if info.name.endswith("bias") else "vector"


def _graph_order(infos: list[ParamInfo], gm: fx.GraphModule) -> list[ParamInfo]:
    position = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(infos, key=lambda p: min(position[r] for r in p.reads))


# ---- planning -----------------------------------------------------------------------------------
def hash_block(shape: Sequence[int], bank_size: int, config: GeneratorConfig) -> int:
    """Contiguous weights per hashed block of a layer: ``config.hash_chunk`` at most, never more
    than the bank holds (a longer block would only repeat it), and at most a quarter of a row.

    The row bound keeps every row at least four independently hashed blocks: with one block per
    row, whole rows of a small layer coincide up to sign (a byte LM's 256 embeddings of width 64,
    hashed in blocks of 64 at budget 5 %, became 132 distinct rows and the model fell behind a
    dense one of the same size).

    Example:
        >>> hash_block((256, 64), 10_000, GeneratorConfig()), hash_block((512, 784), 10_000, GeneratorConfig())
        (16, 64)
    """
    row = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
    return max(1, min(config.hash_chunk, bank_size, row // 4))


def _layer_plans(
    generated: list[ParamInfo], grouping: Grouping, alloc: Allocation, config: GeneratorConfig, copy_weights: bool
) -> list[LayerPlan]:
    plans: list[LayerPlan | None] = [None] * len(generated)
    for g, members in enumerate(grouping.groups):
        size = alloc.bank_sizes[g]
        for position, i in enumerate(members):
            info = generated[i]
            n, k = info.numel, alloc.templates[i]
            share = position / len(members)  # staggered start inside the group's bank
            fields: dict[str, Any] = {"templates": k}
            if grouping.force == "hash" or (k == 0 and config.upsample == "hash"):
                fields.update(generator="hash", salt=i, chunk=hash_block(info.shape, size, config))
            elif k == 0 and config.upsample == "interpolate":
                rows, cols = interpolation_grid(info.shape, size)
                fields.update(
                    generator="interpolate", grid=(rows, cols), offset=math.floor(share * (size - rows * cols))
                )
            elif k == 0:
                fields.update(generator=config.upsample, offset=math.floor(share * size) % size)
            else:
                fields.update(
                    generator="slice" if k == 1 else config.downsample, offset=math.floor(share * (size - k * n))
                )
            fields["copied"] = copy_weights and len(members) == 1 and fields["generator"] == "slice"
            plans[i] = LayerPlan(
                name=info.name,
                shape=info.shape,
                module=info.module,
                module_type=info.module_type,
                group=g,
                overhead=alloc.layer_overheads[i],
                aliases=info.aliases,
                **fields,
            )
    return [p for p in plans if p is not None]


def _plan_layers(
    generated: list[ParamInfo], grouping: Grouping, kept: int, target: int, config: GeneratorConfig, copy_weights: bool
) -> tuple[list[LayerPlan], list[GroupPlan]]:
    """Exact budget split and per-layer generators for a strategy's grouping."""
    if grouping.force == "superweight":
        return plan_superweights(generated, grouping, kept, target, config)
    alloc = allocate(
        [p.numel for p in generated],
        [list(g) for g in grouping.groups],
        kept,
        target,
        config,
        rows=[p.shape[0] for p in generated],
        force=grouping.force,
    )
    layers = _layer_plans(generated, grouping, alloc, config, copy_weights)
    groups = [
        GroupPlan(g, tuple(generated[i].name for i in members), alloc.bank_sizes[g], alloc.group_overheads[g])
        for g, members in enumerate(grouping.groups)
    ]
    return layers, groups


def _check_grouping(grouping: Grouping, count: int, strategy: str) -> None:
    seen = sorted(i for g in grouping.groups for i in g)
    if seen != list(range(count)) or any(len(g) == 0 for g in grouping.groups):
        raise RuntimeError(f"strategy {strategy!r} returned groups that do not cover each layer exactly once.")


def _match_plan(plan: Plan, infos: list[ParamInfo]) -> list[ParamInfo]:
    """The parameters ``plan.layers`` generate, in plan order; raise unless the plan fits the model."""
    by_alias = {a: p for p in infos for a in p.aliases}
    generated = []
    for layer in plan.layers:
        info = by_alias.get(layer.name)
        if info is None:
            raise ValueError(
                f"the plan generates {layer.name!r}, which this model has no trainable parameter called; "
                "was the plan made for another model?"
            )
        if tuple(info.shape) != tuple(layer.shape):
            raise ValueError(
                f"the plan expects {layer.name!r} of shape {tuple(layer.shape)}, this model has {info.shape}."
            )
        generated.append(info)
    covered = {a for p in generated for a in p.aliases} | {a for k in plan.kept for a in (k.name, *k.aliases)}
    for info in infos:
        if info.name not in covered:
            raise ValueError(
                f"the plan does not cover trainable parameter {info.name!r} of this model; "
                "compile it with a budget to make a new plan."
            )
    return generated


@torch.no_grad()
def _initialise(
    shared: SharedParameters, layers: list[LayerPlan], originals: list[torch.Tensor], calibrate: bool
) -> list[LayerPlan]:
    """Give banks and coefficients their start values; return layers with their gains set."""
    targets = [target_std(o) for o in originals]  # once per layer: each reads the whole weight
    for key, bank in shared.groups.items():
        members = [i for i, x in enumerate(layers) if f"g{x.group}" == key]
        bank.bank.mul_(sum(targets[i] for i in members) / len(members))
        # Layers mixing the same templates start from orthogonal coefficient vectors (SSN).
        by_k: dict[int, list[int]] = {}
        for i in members:
            if layers[i].generator == "wavg" and layers[i].templates > 1:
                by_k.setdefault(layers[i].templates, []).append(i)
        for k, ids in by_k.items():
            basis = torch.empty(k, k)
            nn.init.orthogonal_(basis)
            for row, i in enumerate(ids):
                shared.generators[f"l{i}"].coefficients.copy_(basis[row % k])
    for i, layer in enumerate(layers):
        if layer.copied:
            bank = shared.groups[f"g{layer.group}"].bank
            bank.narrow(0, layer.offset, layer.numel).copy_(originals[i].reshape(-1))
    if not calibrate:
        return layers
    result = []
    for i, layer in enumerate(layers):
        gain = 1.0
        if not layer.copied:
            produced = wide_std(shared.generate_sample(i, SAMPLE)) if layer.numel > 1 else 0.0
            gain = targets[i] / produced if produced > 0 and math.isfinite(produced) else 1.0
        shared.generators[f"l{i}"].gain = gain
        result.append(replace(layer, gain=gain))
    return result


def _place(shared: SharedParameters, layers: list[LayerPlan], generated: list[ParamInfo]) -> None:
    """Put each group's bank and generators on its first layer's device and dtype."""
    for key, bank in shared.groups.items():
        first = next(i for i, x in enumerate(layers) if f"g{x.group}" == key)
        bank.to(device=generated[first].device, dtype=generated[first].dtype)
        for i, x in enumerate(layers):
            if f"g{x.group}" == key:
                shared.generators[f"l{i}"].to(device=generated[first].device, dtype=generated[first].dtype)


# ---- the stage ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Selection:
    infos: list[ParamInfo]
    generated: list[ParamInfo]
    kept: list[KeptParam]


def _select(gm: fx.GraphModule, keep: str | Sequence[str] | None) -> _Selection:
    """Every trainable parameter, split into generated (graph order) and kept dense (with why)."""
    infos = collect_params(gm)
    is_kept = _keep_matcher(keep)
    if keep is not None and not any(is_kept(a) for p in infos for a in p.aliases):
        raise ValueError(f"`keep` {keep!r} matched no trainable parameter; names look like {infos[0].name!r}.")
    reasons = {p.name: _kept_reason(p, is_kept) for p in infos}
    kept = [KeptParam(p.name, p.numel, why, p.aliases) for p in infos if (why := reasons[p.name]) is not None]
    generated = _graph_order([p for p in infos if reasons[p.name] is None], gm)
    return _Selection(infos, generated, kept)


def _new_plan(traced: TraceResult, selection: _Selection, target: int, settings: BuildSettings) -> Plan:
    """Ask the strategy for groups and split the budget exactly (layers' gains are set later)."""
    kept_count = sum(k.numel for k in selection.kept)
    generated = selection.generated
    context = StrategyContext(
        shapes=[p.shape for p in generated],
        names=[p.name for p in generated],
        seed=settings.seed,
        budget=target,
        num_groups=settings.num_groups,
        graph_module=traced.graph_module,
        data=settings.data,
        loss_fn=settings.loss_fn,
        options=dict(settings.options or {}),
        search_steps=settings.search_steps,
        kept=kept_count,
        generator_config=settings.config,
        trace=traced,
    )
    # Banks never mix dtypes or devices: every strategy's groups are split by them.
    grouping = split_mixed_groups(STRATEGIES[settings.strategy](context), [(p.dtype, p.device) for p in generated])
    _check_grouping(grouping, len(generated), settings.strategy)
    layers, groups = _plan_layers(generated, grouping, kept_count, target, settings.config, settings.copy_weights)
    return Plan(
        strategy=settings.strategy,
        seed=settings.seed,
        budget=target,
        original_params=count_parameters(traced.graph_module),
        layers=tuple(layers),
        groups=tuple(groups),
        kept=tuple(selection.kept),
        generator_config=settings.config.to_dict(),
        opaque=tuple(OpaqueModule(path, why) for path, why in traced.opaque.items()),
        provenance=dict(grouping.provenance),
        traced=tuple(traced.traced),
    )


def build(traced: TraceResult, target: int, settings: BuildSettings) -> fx.GraphModule:
    """Compile the traced module in ``traced`` (edited in place) to exactly ``target`` parameters."""
    gm = traced.graph_module
    if hasattr(gm, SHARED_NAME):
        raise ValueError(f"the model already has an attribute {SHARED_NAME!r}, which npas_fx needs for its banks.")
    selection = _select(gm, settings.keep)
    if not selection.generated:
        raise ValueError(
            f"{gm.__class__.__name__} has no weight (a parameter of 2 or more dims that the forward reads) to "
            f"share; its {count_parameters(gm)} trainable parameters are all kept dense."
        )
    if settings.plan is not None:
        generated = _match_plan(settings.plan, selection.infos)
        check_plan_fits(settings.plan, selection.infos)
        plan = replace(settings.plan, traced=tuple(traced.traced))
    else:
        generated = selection.generated
        plan = _new_plan(traced, selection, target, settings)
    originals = [gm.get_parameter(p.name).detach() for p in generated]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        shared = SharedParameters(plan.layers, plan.groups, settings.config.embedding_dim, settings.config.normalize)
        _place(shared, list(plan.layers), generated)
        shared.init_complex_banks()
        layers = _initialise(shared, list(plan.layers), originals, calibrate=settings.plan is None)
        if settings.init == "fit":  # gains stay as calibrated: the plan is the one init="random" makes
            fitted = fit_shared(shared, originals)
            plan = replace(plan, provenance={**plan.provenance, "init": "fit", "fit_error": fitted.total_after})
    plan = replace(plan, layers=tuple(layers))
    del originals  # the dense weights go with the rewrite below
    gm.add_module(SHARED_NAME, shared)
    calls = {
        p.name: GeneratorCall(f"{SHARED_NAME}.generators.l{i}", shared.input_paths(i, f"{SHARED_NAME}."), p.aliases)
        for i, p in enumerate(generated)
    }
    insert_generators(gm, calls)
    attach_runtime(gm, shared, [p.aliases for p in generated], traced.root, traced.prefix)
    if traced.root is not None:
        install_fast_eval(gm)
    gm.meta[PLAN_KEY] = plan  # what deepcopy keeps
    setattr(gm, PLAN_KEY, plan)  # what pickling keeps
    setattr(shared, PLAN_KEY, plan)  # what deepcopy then pickling keeps
    if settings.recompute:
        set_recompute(gm, min_numel=settings.recompute_min_numel)
    achieved = count_parameters(gm)
    if achieved != target or plan.trainable_params != target:
        raise RuntimeError(
            f"npas_fx bug: compiled model has {achieved} trainable parameters (plan says "
            f"{plan.trainable_params}), budget {target}. Please report it with the model."
        )
    return gm
