"""Checks of ``npas_fx.compile``'s arguments and model, all run before anything is built.

Every check raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong
value) that names the argument, the value received and the fix. Nothing here copies, traces or
runs the model.

Example:
    >>> import torch
    >>> check_arguments(torch.nn.Linear(2, 2), budget=0.5, strategy="shape", seed=0)
    >>> try:
    ...     check_arguments(torch.nn.Linear(2, 2), budget=0.5, strategy="shape", seed=0, num_groups=1.5)
    ... except TypeError as error:
    ...     print(error)
    `num_groups` should be a positive int (a number of groups), got float 1.5.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .strategies import DATA_FREE, STRATEGIES, Grouping

__all__ = [
    "check_arguments",
    "check_model",
    "check_budget_size",
    "split_mixed_groups",
    "strategy_options",
    "MAX_SEED",
    "LARGE_BUDGET",
]

MAX_SEED = 2**32 - 1  # numpy / scikit-learn (ssn's k-means) take seeds below 2**32
LARGE_BUDGET = 1000  # a budget over this multiple of the original needs allow_large_budget=True
LEARNED = ("ssn", "swn")
_SUPERWEIGHT_OPTIONS = ("groups", "hard", "shares")
_GROUP_COUNTING = ("random", "ssn", "swn")  # the built-in strategies that read `num_groups`
# What a saved plan fixes, with compile's defaults: giving another value next to `plan=` is refused.
_PLAN_FIXES = {"strategy": "auto", "seed": 0, "copy_weights": True}
_PLAN_FIXES_NONE = ("generators", "keep", "num_groups", "data", "loss_fn", "options", "search_steps")


def strategy_options(strategy: str) -> tuple[str, ...] | None:
    """The ``options`` keys a built-in strategy takes (``None``: a registered one, not known).

    Example:
        >>> strategy_options("shape"), strategy_options("superweight")
        ((), ('groups', 'hard', 'shares'))
    """
    if strategy in DATA_FREE:
        return ()
    if strategy == "superweight":
        return _SUPERWEIGHT_OPTIONS
    if strategy in LEARNED:
        from .search import ssn, swn  # late: the search modules import the compiler

        return {"ssn": ssn.OPTIONS, "swn": swn.OPTIONS}[strategy]
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _check_strategy(strategy: Any) -> None:
    if not isinstance(strategy, str):
        raise TypeError(f"`strategy` should be a strategy name (a str), got {_describe(strategy)}; e.g. 'shape'.")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown `strategy` {strategy!r}; available: {sorted(STRATEGIES)}.")


def _check_keep(keep: Any) -> None:
    if keep is None:
        return
    if isinstance(keep, str):
        try:
            re.compile(keep)
        except re.error as error:
            raise ValueError(
                f"`keep` {keep!r} is not a valid regular expression ({error}); escape special characters "
                "(re.escape) or pass a list of names: keep=['fc.weight']."
            ) from None
        return
    if not isinstance(keep, Sequence) or not all(isinstance(k, str) for k in keep):
        raise TypeError(
            f"`keep` should be a regex (str) or a list of parameter names / name suffixes, got {_describe(keep)}; "
            "e.g. keep=['head.weight'] or keep=r'.*\\.head\\..*'."
        )


def _check_options(strategy: str, options: Any) -> None:
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise TypeError(f"`options` should be a dict of strategy options, got {_describe(options)}.")
    allowed = strategy_options(strategy)
    unknown = sorted(str(k) for k in options if allowed is not None and k not in allowed)
    if unknown:
        takes = f"it takes {sorted(allowed)}" if allowed else "it takes none: drop `options`"
        raise ValueError(f"unknown `options` {unknown} for strategy {strategy!r}; {takes}.")


def _check_learned(strategy: str, data: Any, loss_fn: Any, search_steps: Any) -> None:
    if loss_fn is not None and not callable(loss_fn):
        hint = f" e.g. torch.nn.functional.{loss_fn}" if isinstance(loss_fn, str) else ""
        raise TypeError(
            f"`loss_fn` should be a callable (loss_fn(output, target) -> scalar tensor), got {_describe(loss_fn)};"
            f"{hint or ' e.g. torch.nn.functional.cross_entropy'}."
        )
    if search_steps is not None and (not _is_int(search_steps) or search_steps < 1):
        raise ValueError(f"`search_steps` should be a positive int, got {search_steps!r}.")
    if data is not None and (isinstance(data, torch.Tensor) or not isinstance(data, Iterable)):
        raise TypeError(
            f"`data` should be an iterable of batches (a list or a DataLoader), got {type(data).__name__}; "
            "wrap a single batch in a list: data=[(inputs, target)]."
        )
    given = [n for n, v in (("data", data), ("loss_fn", loss_fn), ("search_steps", search_steps)) if v is not None]
    if given and (strategy in DATA_FREE or strategy == "superweight"):
        raise ValueError(
            f"strategy {strategy!r} is data-free and would ignore {', '.join(f'`{n}`' for n in given)}; drop "
            f"them, or use a learned strategy ({', '.join(repr(s) for s in LEARNED)})."
        )


def check_arguments(
    model: Any,
    budget: Any = None,
    *,
    plan: Any = None,
    strategy: Any = "auto",
    seed: Any = 0,
    generators: Any = None,
    keep: Any = None,
    num_groups: Any = None,
    copy_weights: Any = True,
    data: Any = None,
    loss_fn: Any = None,
    options: Any = None,
    search_steps: Any = None,
    example_inputs: Any = None,
    allow_large_budget: Any = False,
    recompute: Any = None,
    init: Any = "random",
) -> None:
    """Check every argument of :func:`npas_fx.compile` (types, ranges, option names)."""
    from .budget import GeneratorConfig  # late: budget is light, but keep this module's imports minimal
    from .plan import Plan

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` should be a torch.nn.Module, got {type(model).__name__}.")
    if plan is None and budget is None:
        raise TypeError("give a `budget` (int count or float multiple) or a saved `plan=`.")
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"`plan` should be an npas_fx.Plan (see Plan.from_json), got {type(plan).__name__}.")
    if not _is_int(seed):
        raise TypeError(f"`seed` should be an int, got {_describe(seed)}.")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"`seed` should be between 0 and 2**32 - 1, got {seed}; e.g. seed=0.")
    if generators is not None and not isinstance(generators, GeneratorConfig):
        raise TypeError(f"`generators` should be an npas_fx.GeneratorConfig, got {type(generators).__name__}.")
    if num_groups is not None and not _is_int(num_groups):
        raise TypeError(f"`num_groups` should be a positive int (a number of groups), got {_describe(num_groups)}.")
    if num_groups is not None and num_groups < 1:
        raise ValueError(f"`num_groups` should be a positive int (a number of groups), got {num_groups}.")
    for name, value in (("copy_weights", copy_weights), ("allow_large_budget", allow_large_budget)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` should be True or False, got {_describe(value)}.")
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(
            f"`recompute` should be True, False or None (on below the original's size), got {_describe(recompute)}."
        )
    if example_inputs is not None and not isinstance(example_inputs, (tuple, Mapping)):
        raise TypeError(
            f"`example_inputs` should be a tuple of positional inputs or a dict of keyword inputs, got "
            f"{type(example_inputs).__name__}; wrap a single tensor as (x,)."
        )
    _check_keep(keep)
    _check_init(init)
    values = {"strategy": strategy, "seed": seed, "copy_weights": copy_weights, "generators": generators}
    values.update(keep=keep, num_groups=num_groups, data=data, loss_fn=loss_fn, options=options)
    if plan is not None:
        _check_plan_alone(values | {"search_steps": search_steps})
        return
    _check_strategy(strategy)
    _check_options(strategy, options)
    _check_learned(strategy, data, loss_fn, search_steps)
    builtin = strategy_options(strategy) is not None
    if num_groups is not None and builtin and strategy not in _GROUP_COUNTING:
        raise ValueError(
            f"strategy {strategy!r} does not take `num_groups` (got {num_groups}); it is read by "
            f"{', '.join(repr(s) for s in _GROUP_COUNTING)}. Drop it or pick one of those."
        )


def _check_init(init: Any) -> None:
    from .fit import INITS

    if not isinstance(init, str):
        raise TypeError(f"`init` should be one of {list(INITS)} (a str), got {_describe(init)}.")
    if init not in INITS:
        raise ValueError(
            f"unknown `init` {init!r}; use 'random' (banks start random) or 'fit' (banks start as the "
            "least-squares fit of the model's trained weights)."
        )


def _check_plan_alone(values: Mapping[str, Any]) -> None:
    """A saved plan fixes strategy, seed, generators and groups: other values would be ignored."""
    given = [n for n, default in _PLAN_FIXES.items() if values[n] is not default and values[n] != default]
    given += [n for n in _PLAN_FIXES_NONE if values[n] is not None]
    if given:
        shown = ", ".join(f"`{n}`={values[n]!r}" for n in given)
        raise ValueError(
            f"a saved `plan` fixes how the model is compiled, so {shown} would be ignored; drop "
            f"{'it' if len(given) == 1 else 'them'} (or compile with a budget to make a new plan)."
        )


def check_budget_size(target: int, original: int, allow_large_budget: bool = False) -> None:
    """Refuse a budget over :data:`LARGE_BUDGET` times the original unless the user opts in.

    Example:
        >>> check_budget_size(10**9, 5000, allow_large_budget=True)
    """
    if target > LARGE_BUDGET * original and not allow_large_budget:
        raise ValueError(
            f"`budget` {target:,} is {target / original:,.0f}x the model's {original:,} trainable parameters "
            f"(about {target * 4 / 2**30:.3g} GiB of float32 banks); pass allow_large_budget=True if you mean it."
        )


def _module_problem(model: nn.Module) -> str | None:
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = f"submodule {path!r}" if path else "the model itself"
            return (
                f"{where} is a TorchScript module ({type(module).__name__}); torch.fx cannot see or generate its "
                "parameters. Pass the eager module (before torch.jit.script / trace) instead."
            )
    return None


def check_model(model: nn.Module) -> None:
    """Refuse models npas_fx cannot compile faithfully: TorchScript parts and meta tensors.

    Example:
        >>> check_model(torch.nn.Linear(2, 2))
        >>> try:
        ...     check_model(torch.nn.Sequential(torch.jit.script(torch.nn.Linear(2, 2))))
        ... except ValueError as error:
        ...     print(str(error)[:44])
        submodule '0' is a TorchScript module (Recur
    """
    problem = _module_problem(model)
    if problem is not None:
        raise ValueError(problem)
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(
            f"{type(model).__name__} has tensors on the 'meta' device (e.g. {meta[0]!r}), which hold no values to "
            "plan, copy or check; materialise it first (model.to_empty(device='cpu') and initialise it)."
        )


def split_mixed_groups(grouping: Grouping, dtypes: Sequence[Any]) -> Grouping:
    """Split every group whose layers differ in ``dtypes`` (any hashable key: dtype and device).

    A bank has one dtype and device, so a group that mixed them would fail at the first forward.

    Example:
        >>> g = split_mixed_groups(Grouping(((0, 1, 2),)), ["f32", "f64", "f32"])
        >>> g.groups
        ((0, 2), (1,))
    """
    groups: list[tuple[int, ...]] = []
    for members in grouping.groups:
        parts: dict[Any, list[int]] = {}
        for i in members:
            parts.setdefault(dtypes[i], []).append(i)
        groups.extend(tuple(p) for p in parts.values())
    if len(groups) == len(grouping.groups):
        return grouping
    return Grouping(tuple(groups), grouping.force, grouping.provenance, grouping.shares)
