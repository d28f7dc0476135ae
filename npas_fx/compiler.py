"""``npas_fx.compile``: an unmodified ``nn.Module`` in, a GraphModule with an exact budget out.

Pipeline (every check happens before anything is built; the input model is never modified)::

    validate -> copy + trace -> collect_params -> strategy (groups) -> allocate (exact budget)
             -> plan -> build banks & generators -> insert_generators (rewrite) -> verify count

Example:
    >>> import torch, npas_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    >>> gm = npas_fx.compile(model, 200)
    >>> npas_fx.count_parameters(gm)
    200
"""

from __future__ import annotations

import copy
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from .budget import Allocation, GeneratorConfig, allocate, resolve_budget
from .generators import interpolation_grid
from .passes.collect_params import ParamInfo, collect_params
from .passes.insert_generators import GeneratorCall, insert_generators
from .passes.run_example import ModuleRunError, run_example
from .passes.trace import trace
from .plan import GroupPlan, KeptParam, LayerPlan, OpaqueModule, Plan
from .shared_params import SharedParameters, target_std
from .strategies import STRATEGIES, Grouping, StrategyContext
from .superweights import plan_superweights

__all__ = ["compile", "plan_of", "count_parameters"]

PLAN_KEY = "npas_plan"
SHARED_NAME = "npas"


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``, a tied parameter counted once.

    Example:
        >>> count_parameters(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def plan_of(gm: nn.Module) -> Plan:
    """The :class:`~npas_fx.plan.Plan` of a module made by :func:`compile`."""
    meta = getattr(gm, "meta", None)
    plan = meta.get(PLAN_KEY) if isinstance(meta, dict) else None
    plan = plan if plan is not None else getattr(gm, PLAN_KEY, None)  # pickling keeps attributes only
    # deepcopy drops the attribute and pickling drops meta; the banks' module keeps it through both
    plan = plan if plan is not None else getattr(getattr(gm, SHARED_NAME, None), PLAN_KEY, None)
    if not isinstance(plan, Plan):
        raise ValueError(f"{type(gm).__name__} was not made by npas_fx.compile: it carries no plan.")
    return plan


# ---- validation ---------------------------------------------------------------------------------
def _validate_arguments(model: Any, budget: Any, plan: Any, strategy: Any, seed: Any, generators: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` should be a torch.nn.Module, got {type(model).__name__}.")
    if plan is None and budget is None:
        raise TypeError("give a `budget` (int count or float multiple) or a saved `plan=`.")
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"`plan` should be an npas_fx.Plan (see Plan.from_json), got {type(plan).__name__}.")
    if plan is None and strategy not in STRATEGIES:
        raise ValueError(f"unknown `strategy` {strategy!r}; available: {sorted(STRATEGIES)}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` should be an int, got {type(seed).__name__} {seed!r}.")
    if generators is not None and not isinstance(generators, GeneratorConfig):
        raise TypeError(f"`generators` should be an npas_fx.GeneratorConfig, got {type(generators).__name__}.")


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
    if len(info.shape) >= 2:
        return None
    if "Norm" in info.module_type:
        return "norm"
    return "bias" if info.name.endswith("bias") else "vector"


def _graph_order(infos: list[ParamInfo], gm: fx.GraphModule) -> list[ParamInfo]:
    position = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(infos, key=lambda p: min(position[r] for r in p.reads))


# ---- planning -----------------------------------------------------------------------------------
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
                fields.update(generator="hash", salt=i, chunk=config.hash_chunk)
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


# ---- building -----------------------------------------------------------------------------------
def _check_runs(gm: fx.GraphModule, model: nn.Module, example_inputs: Any, prefix: str, generated: list[str]) -> None:
    """Run ``gm`` once on the example; a module that fails with generated parameters is named."""
    try:
        run_example(gm, example_inputs, training=None)
    except ModuleRunError as error:
        try:
            run_example(model, example_inputs, training=None)
        except ModuleRunError as original:
            raise ValueError(
                f"{type(model).__name__} itself fails on `example_inputs`: {original}. Give inputs the model "
                "accepts (a tuple of positional inputs or a dict of keyword inputs)."
            ) from original.error
        path = "" if error.path + "." == prefix else error.path.removeprefix(prefix)
        names = [n.removeprefix(prefix) for n in generated if n.startswith(error.path + ".")] if path else []
        hint = f" (e.g. keep={names[:3]!r})" if names else ""
        raise RuntimeError(
            f"npas_fx cannot compile {type(model).__name__}: module {path or '<root>'!r} "
            f"({error.module_type}) fails when run with generated parameters: "
            f"{type(error.error).__name__}: {error.error}. Keep the parameters it reads dense with `keep=`{hint}."
        ) from error.error


@torch.no_grad()
def _initialise(
    shared: SharedParameters, layers: list[LayerPlan], originals: list[torch.Tensor], calibrate: bool
) -> list[LayerPlan]:
    """Give banks and coefficients their start values; return layers with their gains set."""
    for key, bank in shared.groups.items():
        members = [i for i, x in enumerate(layers) if f"g{x.group}" == key]
        bank.bank.mul_(sum(target_std(originals[i]) for i in members) / len(members))
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
            produced = float(shared.generate(i).double().std()) if layer.numel > 1 else 0.0
            gain = target_std(originals[i]) / produced if produced > 0 and math.isfinite(produced) else 1.0
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


def compile(  # noqa: A001 - mirrors torch.compile
    model: nn.Module,
    budget: int | float | None = None,
    *,
    example_inputs: tuple | Mapping[str, Any] | None = None,
    strategy: str = "shape",
    seed: int = 0,
    plan: Plan | None = None,
    generators: GeneratorConfig | None = None,
    keep: str | Sequence[str] | None = None,
    num_groups: int | None = None,
    copy_weights: bool = True,
    data: Any = None,
    loss_fn: Any = None,
    options: Mapping[str, Any] | None = None,
    search_steps: int | None = None,
) -> fx.GraphModule:
    """Compile ``model`` into a GraphModule with exactly ``budget`` trainable parameters.

    Args:
        model: any ``nn.Module``; it is copied, never modified.
        budget: an ``int`` (exact count) or a ``float`` (multiple of the model's trainable count).
        example_inputs: positional tuple or keyword dict of inputs, used by search and tracing
            (arguments they leave out may be specialised; a partial trace is kept only if it gives
            the model's outputs, else the root runs as one leaf); the result is run on them once,
            so a module that fails with generated weights is named at compile time.
        strategy: ``"shape"`` (identical shapes share), ``"single"``, ``"random"``, ``"hash"``,
            ``"superweight"`` (SuperWeights per bin), the learned ``"ssn"`` and ``"swn"`` (need
            ``data``), or one registered by :func:`npas_fx.strategies.register_strategy`.
        seed: seeds grouping and initialisation; the same seed gives the same model.
        plan: a saved :class:`Plan` to re-apply instead of planning (``budget`` then optional).
        generators: how weights are generated (:class:`GeneratorConfig`).
        keep: parameters to leave dense: a regex (full match) or a list of names / name suffixes.
            1-D parameters (biases, norms) are always kept dense.
        num_groups: number of groups for ``"random"`` and ``"ssn"``; an upper bound for ``"swn"``.
        copy_weights: copy the original weight into a bank a single layer owns by plain slice,
            so the identity plan reproduces the original model exactly.
        data: batches for learned strategies (``"ssn"``, ``"swn"``).
        loss_fn: loss of learned strategies' short pre-training.
        options: strategy-specific options.
        search_steps: optimiser steps of a learned strategy's short pre-training (see
            :mod:`npas_fx.search`; the batch convention is in :mod:`npas_fx.search.pretrain`).

    Returns:
        A ``torch.fx.GraphModule``; :func:`plan_of` gives its plan.

    Example:
        >>> import torch, npas_fx
        >>> model = torch.nn.Linear(10, 10)
        >>> gm = npas_fx.compile(model, 1.0)  # the identity plan: outputs are unchanged
        >>> torch.equal(gm(torch.ones(1, 10)), model(torch.ones(1, 10)))
        True
    """
    _validate_arguments(model, budget, plan, strategy, seed, generators)
    if search_steps is not None and (
        isinstance(search_steps, bool) or not isinstance(search_steps, numbers.Integral) or search_steps < 1
    ):
        raise ValueError(f"`search_steps` should be a positive int, got {search_steps!r}.")
    original = count_parameters(model)
    if original == 0:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters, so there is nothing to share; "
            "check that its parameters have requires_grad=True."
        )
    if plan is not None:
        config = GeneratorConfig(**plan.generator_config)
        target = plan.budget if budget is None else resolve_budget(budget, original)
        if target != plan.budget:
            raise ValueError(f"`budget` {budget!r} (= {target}) differs from the plan's {plan.budget}; drop one.")
        seed, strategy = plan.seed, plan.strategy
    else:
        config = generators or GeneratorConfig()
        target = resolve_budget(budget, original)

    work = copy.deepcopy(model)
    # A saved plan re-applies to the same leaves (its parameter names depend on them).
    leaves = frozenset(o.path for o in plan.opaque) if plan is not None else frozenset()
    traced = trace(work, leaves, example_inputs)
    gm = traced.graph_module
    if hasattr(gm, SHARED_NAME):
        raise ValueError(f"the model already has an attribute {SHARED_NAME!r}, which npas_fx needs for its banks.")
    infos = collect_params(gm)
    is_kept = _keep_matcher(keep)
    if keep is not None and not any(is_kept(a) for p in infos for a in p.aliases):
        raise ValueError(f"`keep` {keep!r} matched no trainable parameter; names look like {infos[0].name!r}.")
    reasons = {p.name: _kept_reason(p, is_kept) for p in infos}
    kept = [KeptParam(p.name, p.numel, why, p.aliases) for p in infos if (why := reasons[p.name]) is not None]
    generated = _graph_order([p for p in infos if reasons[p.name] is None], gm)
    if not generated:
        raise ValueError(
            f"{type(model).__name__} has no weight (a parameter of 2 or more dims that the forward reads) to "
            f"share; its {original} trainable parameters are all kept dense."
        )
    kept_count = sum(k.numel for k in kept)

    if plan is not None:
        generated = _match_plan(plan, infos)
        layers = list(plan.layers)
        groups = list(plan.groups)
        kept = list(plan.kept)
        opaque = plan.opaque
        provenance = plan.provenance
        calibrate = False
    else:
        context = StrategyContext(
            shapes=[p.shape for p in generated],
            names=[p.name for p in generated],
            seed=int(seed),
            budget=target,
            num_groups=num_groups,
            graph_module=gm,
            data=data,
            loss_fn=loss_fn,
            options=dict(options or {}),
            search_steps=search_steps,
            kept=kept_count,
            generator_config=config,
        )
        grouping = STRATEGIES[strategy](context)
        _check_grouping(grouping, len(generated), strategy)
        layers, groups = _plan_layers(generated, grouping, kept_count, target, config, copy_weights)
        opaque = tuple(OpaqueModule(path, why) for path, why in traced.opaque.items())
        provenance = dict(grouping.provenance)
        calibrate = True

    originals = [gm.get_parameter(p.name).detach() for p in generated]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        shared = SharedParameters(layers, groups, config.embedding_dim, config.normalize)
        _place(shared, layers, generated)
        layers = _initialise(shared, layers, originals, calibrate)

    result = Plan(
        strategy=strategy,
        seed=int(seed),
        budget=target,
        original_params=original,
        layers=tuple(layers),
        groups=tuple(groups),
        kept=tuple(kept),
        generator_config=config.to_dict(),
        opaque=tuple(opaque),
        provenance=provenance,
        traced=tuple(traced.traced),
    )
    gm.add_module(SHARED_NAME, shared)
    calls = {
        p.name: GeneratorCall(f"{SHARED_NAME}.generators.l{i}", shared.input_paths(i, f"{SHARED_NAME}."), p.aliases)
        for i, p in enumerate(generated)
    }
    insert_generators(gm, calls)
    gm.meta[PLAN_KEY] = result  # what deepcopy keeps
    setattr(gm, PLAN_KEY, result)  # what pickling keeps
    setattr(shared, PLAN_KEY, result)  # what deepcopy then pickling keeps
    achieved = count_parameters(gm)
    if achieved != target or result.trainable_params != target:
        raise RuntimeError(
            f"npas_fx bug: compiled model has {achieved} trainable parameters (plan says "
            f"{result.trainable_params}), budget {target}. Please report it with the model."
        )
    if example_inputs is not None:
        _check_runs(gm, model, example_inputs, traced.prefix, [a for p in generated for a in p.aliases])
    return gm
