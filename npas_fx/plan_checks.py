"""Checks of a :class:`~npas_fx.plan.Plan`: its structure, its budget accounting, and its fit to a model.

A plan read from a file may be hand-edited or corrupted; it is checked completely before anything is
built, and every error names the field (``plan.layers[3].offset=...``) and the value.

* :func:`check_plan` (run by ``Plan.__post_init__``): types, ranges, group membership, unique
  names, each generator's window inside its bank, and ``banks + overhead + kept == budget``.
* :func:`check_plan_fits` (run by ``npas_fx.compile(model, plan=...)``): the kept parameters
  exist in the model with their sizes, no group mixes dtypes or devices, and the banks and generators the plan describes build and
  produce each layer's shape with exactly the parameters the plan counts (built on the ``meta``
  device: no memory, no values).

Example:
    >>> import torch, npas_fx
    >>> from dataclasses import replace
    >>> plan = npas_fx.plan_of(npas_fx.compile(torch.nn.Linear(4, 4), 10))
    >>> try:
    ...     replace(plan, budget=11)
    ... except ValueError as error:
    ...     print(str(error)[:60])
    plan.budget=11 differs from what the plan accounts for: bank
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PlanError", "check_plan", "check_plan_fits", "check_plan_dict", "GENERATORS"]

GENERATORS = ("slice", "wavg", "emb", "repeat", "signed", "interpolate", "mask", "hash", "superweight")


class PlanError(ValueError):
    """A plan that is malformed or inconsistent (a ``ValueError`` naming the field)."""


def _fail(field: str, value: Any, why: str) -> PlanError:
    return PlanError(f"{field}={value!r} {why}; the plan file is corrupted or was edited: re-plan with a budget.")


def _int(value: Any, field: str, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(field, value, "should be an int")
    if minimum is not None and value < minimum:
        raise _fail(field, value, f"should be >= {minimum}")
    return int(value)


def _str(value: Any, field: str, empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise _fail(field, value, "should be a " + ("str" if empty else "non-empty str"))
    return value


def _ints(value: Any, field: str, minimum: int, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, tuple) or (length is not None and len(value) != length):
        raise _fail(field, value, f"should be a list of {length or 'some'} ints")
    return tuple(_int(v, f"{field}[{i}]", minimum) for i, v in enumerate(value))


def _strs(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        raise _fail(field, value, "should be a list of str")
    return tuple(_str(v, f"{field}[{i}]", empty=False) for i, v in enumerate(value))


def _items(plan: Any, name: str, cls: type) -> tuple:
    value = getattr(plan, name)
    if not isinstance(value, tuple) or not all(isinstance(x, cls) for x in value):
        raise _fail(f"plan.{name}", value, f"should be a list of {cls.__name__}")
    return value


def _check_window(layer: Any, field: str, bank: int) -> None:
    """The bank values a layer's generator reads lie inside its bank."""
    kind, n = layer.generator, math.prod(layer.shape)
    if kind in ("slice", "wavg", "emb"):
        least = 2 if kind == "emb" else 1
        if layer.templates < least or (kind == "wavg" and layer.templates < 1):
            raise _fail(f"{field}.templates", layer.templates, f"should be >= {least} for generator {kind!r}")
        if layer.offset + layer.templates * n > bank:
            raise _fail(
                f"{field}.offset", layer.offset, f"reads {layer.templates} x {n} values past its bank of {bank}"
            )
    elif kind in ("repeat", "signed", "mask") and layer.offset >= bank:
        raise _fail(f"{field}.offset", layer.offset, f"is past its bank of {bank}")
    elif kind == "interpolate":
        rows, cols = _ints(layer.grid, f"{field}.grid", 1, 2)
        if layer.offset + rows * cols > bank:
            raise _fail(f"{field}.grid", layer.grid, f"from offset {layer.offset} reads past its bank of {bank}")


def _check_layer(layer: Any, field: str, banks: Mapping[int, int]) -> None:
    _str(layer.name, f"{field}.name", empty=False)
    _ints(layer.shape, f"{field}.shape", 1)
    if not layer.shape:
        raise _fail(f"{field}.shape", layer.shape, "should have at least one dimension")
    _str(layer.module, f"{field}.module")
    _str(layer.module_type, f"{field}.module_type")
    if _int(layer.group, f"{field}.group", None) not in banks:
        raise _fail(f"{field}.group", layer.group, f"is no group of the plan (groups: {sorted(banks)})")
    if layer.generator not in GENERATORS:
        raise _fail(f"{field}.generator", layer.generator, f"is no generator (known: {', '.join(GENERATORS)})")
    for name in ("templates", "offset", "overhead", "coefficient_set"):
        _int(getattr(layer, name), f"{field}.{name}")
    _int(layer.salt, f"{field}.salt", None)
    _int(getattr(layer, "chunk", 1), f"{field}.chunk", 1)  # hash: contiguous weights per hashed block
    gain = layer.gain
    if isinstance(gain, bool) or not isinstance(gain, numbers.Real) or not math.isfinite(gain):
        raise _fail(f"{field}.gain", gain, "should be a finite number")
    if not isinstance(layer.copied, bool):
        raise _fail(f"{field}.copied", layer.copied, "should be true or false")
    if layer.aliases and _strs(layer.aliases, f"{field}.aliases")[0] != layer.name:
        raise _fail(f"{field}.aliases", layer.aliases, f"should start with the layer's name {layer.name!r}")
    _ints(layer.grid, f"{field}.grid", 1)
    _ints(layer.block, f"{field}.block", 1)
    _check_window(layer, field, banks[layer.group])


def _check_groups(plan: Any) -> dict[int, int]:
    banks: dict[int, int] = {}
    for j, g in enumerate(_items(plan, "groups", _group_cls())):
        field = f"plan.groups[{j}]"
        index = _int(g.index, f"{field}.index")
        if index in banks:
            raise _fail(f"{field}.index", index, "is the index of an earlier group too")
        banks[index] = _int(g.bank_size, f"{field}.bank_size", 1)
        _int(g.overhead, f"{field}.overhead")
        _strs(g.layers, f"{field}.layers")
    return banks


def _check_membership(plan: Any) -> None:
    members: dict[int, list[str]] = {}
    for x in plan.layers:
        members.setdefault(x.group, []).append(x.name)
    for j, g in enumerate(plan.groups):
        if sorted(g.layers) != sorted(members.get(g.index, [])):
            raise _fail(
                f"plan.groups[{j}].layers",
                list(g.layers),
                f"should list the layers of group {g.index}: {members.get(g.index, [])}",
            )


def _check_names(plan: Any) -> None:
    seen: dict[str, str] = {}
    entries = [(f"plan.layers[{i}]", x.name, x.aliases) for i, x in enumerate(plan.layers)]
    entries += [(f"plan.kept[{i}]", k.name, k.aliases) for i, k in enumerate(plan.kept)]
    for field, name, aliases in entries:
        for alias in dict.fromkeys((name, *aliases)):
            if alias in seen:
                raise _fail(f"{field}.name", name, f"names parameter {alias!r} that {seen[alias]} names too")
            seen[alias] = field


def _group_cls() -> type:
    from .plan import GroupPlan

    return GroupPlan


def check_plan(plan: Any) -> None:
    """Raise :class:`PlanError` unless ``plan`` is well-formed and its accounting adds up."""
    from .budget import GeneratorConfig
    from .plan import PLAN_FORMAT, KeptParam, LayerPlan, OpaqueModule

    if plan.format != PLAN_FORMAT:
        raise _fail("plan.format", plan.format, f"is not supported (this npas_fx reads {PLAN_FORMAT})")
    _str(plan.strategy, "plan.strategy", empty=False)
    _int(plan.seed, "plan.seed", None)
    _int(plan.budget, "plan.budget", 1)
    _int(plan.original_params, "plan.original_params", 1)
    banks = _check_groups(plan)
    for i, layer in enumerate(_items(plan, "layers", LayerPlan)):
        _check_layer(layer, f"plan.layers[{i}]", banks)
    for i, k in enumerate(_items(plan, "kept", KeptParam)):
        _str(k.name, f"plan.kept[{i}].name", empty=False)
        _int(k.numel, f"plan.kept[{i}].numel")
        _str(k.reason, f"plan.kept[{i}].reason")
        _strs(k.aliases, f"plan.kept[{i}].aliases")
    for i, o in enumerate(_items(plan, "opaque", OpaqueModule)):
        _str(o.path, f"plan.opaque[{i}].path")
        _str(o.reason, f"plan.opaque[{i}].reason")
    if not isinstance(plan.traced, tuple):
        raise _fail("plan.traced", plan.traced, "should be a list of module paths")
    for i, path in enumerate(plan.traced):
        _str(path, f"plan.traced[{i}]")
    if not plan.layers:
        raise _fail("plan.layers", [], "should list at least one generated layer")
    _check_membership(plan)
    _check_names(plan)
    for name in ("generator_config", "provenance"):
        if not isinstance(getattr(plan, name), dict):
            raise _fail(f"plan.{name}", getattr(plan, name), "should be a dict")
    try:
        GeneratorConfig(**plan.generator_config)
    except (TypeError, ValueError) as error:
        raise _fail("plan.generator_config", plan.generator_config, f"is no GeneratorConfig ({error})") from None
    if plan.trainable_params != plan.budget:
        raise _fail(
            "plan.budget",
            plan.budget,
            f"differs from what the plan accounts for: banks {plan.bank_params} + generators "
            f"{plan.overhead_params} + kept {plan.kept_params} = {plan.trainable_params}",
        )


def check_plan_dict(data: Any) -> None:
    """Before loading: the top level is an object with the lists a plan needs."""
    if not isinstance(data, Mapping):
        raise _fail("plan", type(data).__name__, "should be a JSON object")
    for name in ("strategy", "seed", "budget", "original_params", "layers", "groups", "kept"):
        if name not in data:
            raise PlanError(f"plan.{name} is missing; the plan file is corrupted or was edited: re-plan with a budget.")
    for name in ("layers", "groups", "kept", "opaque"):
        value = data.get(name, [])
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, Mapping) for x in value):
            raise _fail(f"plan.{name}", value, "should be a list of objects")


def check_plan_fits(plan: Any, infos: Sequence[Any]) -> None:
    """Raise :class:`PlanError` unless ``plan`` fits the model whose parameters are ``infos``
    (:class:`~npas_fx.passes.collect_params.ParamInfo`) and its banks and generators build."""
    by_alias = {a: p for p in infos for a in p.aliases}
    for i, k in enumerate(plan.kept):
        info = by_alias.get(k.name)
        if info is None:
            raise PlanError(f"plan.kept[{i}].name={k.name!r} is no trainable parameter of this model.")
        if info.numel != k.numel:
            raise PlanError(f"plan.kept[{i}].numel={k.numel} but the model's {k.name!r} has {info.numel} values.")
    kinds: dict[int, set] = {}
    for x in plan.layers:
        info = by_alias.get(x.name)
        if info is not None:
            kinds.setdefault(x.group, set()).add(f"{info.dtype} on {info.device}")
    for j, g in enumerate(plan.groups):
        if len(kinds.get(g.index, ())) > 1:
            raise _fail(f"plan.groups[{j}].layers", list(g.layers), f"mix {' and '.join(sorted(kinds[g.index]))}")
    original = sum(p.numel for p in infos)
    if plan.original_params != original:
        raise PlanError(f"plan.original_params={plan.original_params} but this model has {original}.")
    _check_build(plan)


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_build(plan: Any) -> None:
    """Build the plan's banks and generators on ``meta`` and run each generator once."""
    import torch

    from .budget import GeneratorConfig
    from .shared_params import SharedParameters

    config = GeneratorConfig(**plan.generator_config)
    try:
        with torch.device("meta"):
            shared = SharedParameters(plan.layers, plan.groups, config.embedding_dim, config.normalize)
    except (ValueError, RuntimeError, IndexError, StopIteration) as error:
        raise PlanError(f"plan.layers do not build: {error}") from None
    for i, layer in enumerate(plan.layers):
        field = f"plan.layers[{i}]"
        try:
            weight = shared.generate(i)
        except (ValueError, RuntimeError, IndexError) as error:
            raise PlanError(f"{field} ({layer.name!r}) cannot be generated from its bank: {error}") from None
        if tuple(weight.shape) != tuple(layer.shape):
            raise PlanError(f"{field} generates shape {tuple(weight.shape)}, not its shape {tuple(layer.shape)}.")
        if _count(shared.generators[f"l{i}"]) != layer.overhead:
            raise _fail(
                f"{field}.overhead", layer.overhead, f"but its generator has {_count(shared.generators[f'l{i}'])}"
            )
    for j, g in enumerate(plan.groups):
        extra = _count(shared.groups[f"g{g.index}"]) - g.bank_size
        if extra != g.overhead:
            raise _fail(f"plan.groups[{j}].overhead", g.overhead, f"but the group has {extra} values besides its bank")
