"""``npas_fx.compile``: an unmodified ``nn.Module`` in, a GraphModule with an exact budget out.

Pipeline (every check happens before anything is built; the input model is never modified)::

    validate -> copy (sharing the weights to replace) + trace -> collect_params -> strategy (groups)
             -> allocate (exact budget)
             -> plan -> build banks & generators -> insert_generators (rewrite) -> verify count

Example:
    >>> import torch, npas_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    >>> gm = npas_fx.compile(model, 200)
    >>> npas_fx.count_parameters(gm)
    200
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import fx, nn

from .budget import GeneratorConfig, resolve_budget
from .build import PLAN_KEY, SHARED_NAME, BuildSettings, build, count_parameters
from .passes.insert_generators import forget_flat_weights
from .passes.run_example import ModuleRunError, run_example
from .passes.trace import trace
from .plan import Plan
from .recompute import AUTO_MIN_NUMEL
from .runtime import INDEX_ATTR, SHARED_ATTR, uncached
from .strategies import resolve_auto
from .validation import check_arguments, check_budget_size, check_model
from .workcopy import SharedWeightWrite, full_copy, working_copy

__all__ = ["compile", "plan_of", "count_parameters"]


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


# ---- validation (argument checks live in npas_fx.validation) ------------------------------------
@contextlib.contextmanager
def _bound_per_module(root: nn.Module) -> Iterator[None]:
    """Inside the block, each module owning generated weights gets them bound for its own forward
    only: generated as it starts, dropped as it ends (a read elsewhere generates on its own)."""

    def bind(owner: nn.Module, *_: Any) -> None:
        shared = owner.__dict__[SHARED_ATTR]
        for name, index in owner.__dict__[INDEX_ATTR].items():
            owner._parameters[name] = shared.generate(index)

    def unbind(owner: nn.Module, *_: Any) -> None:
        for name in owner.__dict__[INDEX_ATTR]:
            owner._parameters[name] = None
        forget_flat_weights(owner, tuple(owner.__dict__[INDEX_ATTR]))

    owners = [m for m in root.modules() if INDEX_ATTR in m.__dict__ and SHARED_ATTR in m.__dict__]
    handles = [h for m in owners for h in (m.register_forward_pre_hook(bind), m.register_forward_hook(unbind))]
    try:
        with uncached():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for owner in owners:
            unbind(owner)


def _run_check(gm: fx.GraphModule, example_inputs: Any, prefix: str) -> None:
    """Run ``gm`` once on the example, holding about one generated weight at a time.

    A traced graph drops each generated weight after its last reader. A root that runs as one
    leaf would take all of them at once (its forward binds every weight before the call: the
    model's size again), so the check runs that root itself, each layer binding its own weights.
    """
    if not prefix:
        with uncached():
            run_example(gm, example_inputs, training=None)
        return
    root = gm.get_submodule(prefix[:-1])
    try:
        with _bound_per_module(root):
            run_example(root, example_inputs, training=None)
    except ModuleRunError as error:
        raise ModuleRunError(prefix + error.path if error.path else prefix[:-1], error.module_type, error.error) from (
            error.error
        )


def _check_runs(gm: fx.GraphModule, model: nn.Module, example_inputs: Any, prefix: str, generated: list[str]) -> None:
    """Run ``gm`` once on the example; a module that fails with generated parameters is named."""
    try:
        _run_check(gm, example_inputs, prefix)
    except ModuleRunError as error:
        try:
            run_example(copy.deepcopy(model), example_inputs, training=None)  # a forward may edit its weights
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


def compile(  # noqa: A001 - mirrors torch.compile
    model: nn.Module,
    budget: int | float | None = None,
    *,
    example_inputs: tuple | Mapping[str, Any] | None = None,
    strategy: str = "auto",
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
    allow_large_budget: bool = False,
    recompute: bool | None = None,
    init: str = "random",
) -> fx.GraphModule:
    """Compile ``model`` into a GraphModule with exactly ``budget`` trainable parameters.

    Args:
        model: any ``nn.Module``; it is copied, never modified.
        budget: an ``int`` (exact count) or a ``float`` (multiple of the model's trainable count).
        example_inputs: positional tuple or keyword dict of inputs, used by search and tracing
            (arguments they leave out may be specialised; a partial trace is kept only if it gives
            the model's outputs, else the root runs as one leaf); the result is run on them once,
            so a module that fails with generated weights is named at compile time.
        strategy: ``"auto"`` (default: ``"single"`` below the model's parameter count, where it
            measured best, ``"shape"`` at or above it), ``"shape"`` (identical shapes share),
            ``"single"`` (one bank), ``"random"``, ``"hash"``,
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
        allow_large_budget: allow a budget over 1000x the model's parameter count (refused by
            default: such a budget is almost always a typo, and its banks may not fit in memory).
        recompute: regenerate each generated weight in backward instead of keeping it from the
            forward (:mod:`npas_fx.recompute`), so that training memory follows the budget. ``None``
            (default): on when the budget is below the model's trainable count, where generated
            weights are most of what a step holds (``benchmarks/memory.py``), for weights of at least
            ``AUTO_MIN_NUMEL`` (2**18) values: smaller ones cost more time to remake than memory to
            keep. Off at or above the model's count, where banks and their Adam state dominate and
            regeneration would only cost time. ``True``: every generated weight.
            A no-op under ``torch.compile``; switch later with ``npas_fx.set_recompute(gm, flag)``.
        init: ``"random"`` (banks start random, at the trained weights' scale) or ``"fit"`` (banks and
            coefficients start as the least-squares fit of the model's trained weights, see
            :mod:`npas_fx.fit`: compress a trained model); also with ``plan=``.

    Returns:
        A ``torch.fx.GraphModule``; :func:`plan_of` gives its plan.

    Example:
        >>> import torch, npas_fx
        >>> model = torch.nn.Linear(10, 10)
        >>> gm = npas_fx.compile(model, 1.0)  # the identity plan: outputs are unchanged
        >>> torch.equal(gm(torch.ones(1, 10)), model(torch.ones(1, 10)))
        True
    """
    check_arguments(**locals())  # every argument, before anything is built
    check_model(model)
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
        if strategy == "auto":  # the plan records the strategy it stands for
            strategy = resolve_auto(target, original)
    check_budget_size(target, original, allow_large_budget)

    # A saved plan re-applies to the same leaves (its parameter names depend on them).
    leaves = frozenset(o.path for o in plan.opaque) if plan is not None else frozenset()
    work = working_copy(model)  # shares the weights generators replace: they are read, never copied
    try:
        with work.read_only():  # tracing runs the model's code (the check on example_inputs)
            traced = trace(work.module, leaves, example_inputs)
    except SharedWeightWrite:  # its forward writes its own weights: it gets a copy of its own
        work = full_copy(model)
        traced = trace(work.module, leaves, example_inputs)
    settings = BuildSettings(
        strategy=strategy,
        seed=int(seed),
        plan=plan,
        config=config,
        keep=keep,
        num_groups=num_groups,
        copy_weights=copy_weights,
        data=data,
        loss_fn=loss_fn,
        options=options,
        search_steps=search_steps,
        recompute=target < original if recompute is None else recompute,
        recompute_min_numel=AUTO_MIN_NUMEL if recompute is None else 0,
        init=init,
    )
    gm = build(traced, target, settings)
    work.release(gm, traced.root)  # weights left dense (kept, unused) get storage of their own
    if example_inputs is not None:
        generated = list(dict.fromkeys(a for layer in plan_of(gm).layers for a in (layer.name, *layer.aliases)))
        _check_runs(gm, model, example_inputs, traced.prefix, generated)
    return gm
