"""Shared ensembles: several models, one exact parameter budget, anytime prediction (SuperWeight Networks).

:func:`compile_ensemble` puts the members in one container (``members = nn.ModuleList(models)``,
whose forward calls every member on the same inputs and returns a tuple) and compiles the
container with :func:`npas_fx.compile`. Every strategy therefore groups layers *across* members:
a 3x3 convolution of one CNN can draw its weight from the same bank as one of another CNN of
different width. Untraceable members become opaque leaves as in a single model.

The result, a :class:`SharedEnsemble`, trains all members at once (``forward`` returns every
member's output; sum their losses) and predicts by averaging the members' softmax probabilities,
cheapest member first (FLOPs measured on ``example_inputs``), so that ``anytime`` can stop after
any number of members. ``member(i)`` runs one member alone on the same banks.

Example:
    >>> import torch, npas_fx
    >>> models = [torch.nn.Linear(8, 3), torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))]
    >>> ens = npas_fx.compile_ensemble(models, 120, strategy="single", example_inputs=(torch.ones(2, 8),))
    >>> npas_fx.count_parameters(ens), len(ens), ens.order
    (120, 2, (0, 1))
    >>> [tuple(out.shape) for out in ens(torch.ones(2, 8))], tuple(ens.predict(torch.ones(2, 8)).shape)
    ([(2, 3), (2, 3)], (2, 3))
"""

from __future__ import annotations

import inspect
import keyword
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor, fx, nn
from torch.utils.flop_counter import FlopCounterMode

from . import compiler
from .compiler import PLAN_KEY, SHARED_NAME, count_parameters
from .passes.run_example import ModuleRunError, run_example
from .plan import Plan
from .runtime import ROOT_KEY, generated_class, is_generated

__all__ = ["compile_ensemble", "SharedEnsemble", "member_of", "ENSEMBLE_KEY"]

#: Key of the ensemble record in ``plan.provenance``: members, prediction order, FLOPs.
ENSEMBLE_KEY = "ensemble"
_MEMBER = re.compile(r"(?:^|\.)members\.(\d+)\.")


def member_of(name: str) -> int | None:
    """The member a parameter of an ensemble plan belongs to (``members.<i>.`` in its name).

    Example:
        >>> member_of("members.2.conv.weight"), member_of("model.members.0.fc.bias"), member_of("fc.weight")
        (2, 0, None)
    """
    match = _MEMBER.search(name)
    return int(match.group(1)) if match else None


# ---- the container compiled in place of the members ---------------------------------------------
class _Members(nn.Module):
    """Calls every member on the same inputs; the tuple of their outputs.

    torch.fx cannot trace ``*args`` (it cannot iterate a proxy), so :func:`_container` gives the
    traced container an explicit signature; this generic class is what runs when the container
    itself ends up an opaque leaf (and what pickles, as a class of this module).
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        return tuple(member(*args, **kwargs) for member in self.members)


_RESERVED = frozenset({"self", "tuple", "member"})  # names the generated forward uses itself


def _usable(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name) and name not in _RESERVED


def _input_names(first: nn.Module, example_inputs: tuple | Mapping[str, Any] | None) -> tuple[list[str], bool] | None:
    """Argument names of the container's forward and whether members take them by keyword.

    ``example_inputs`` fixes them (a tuple: that many positional inputs; a dict: its keys);
    without it, the first member's required positional arguments. ``None``: no fixed signature.
    """
    if isinstance(example_inputs, Mapping):
        names = [str(k) for k in example_inputs]
        return (names, True) if names and all(_usable(n) for n in names) else None
    try:
        signature = inspect.signature(first.forward)
    except (TypeError, ValueError):
        return None
    positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    count = len(example_inputs) if example_inputs is not None else sum(p.default is p.empty for p in positional)
    if count == 0:
        return None
    names = [p.name for p in positional[:count]]
    usable = len(names) == count and all(_usable(n) for n in names)
    return (names if usable else [f"input_{i}" for i in range(count)]), False


def _container(models: Sequence[nn.Module], example_inputs: tuple | Mapping[str, Any] | None) -> nn.Module:
    """The container to compile: a :class:`_Members` whose forward has an explicit signature."""
    found = _input_names(models[0], example_inputs)
    if found is None:
        return _Members(models)
    names, by_keyword = found
    call = ", ".join(f"{n}={n}" if by_keyword else n for n in names)
    source = f"def forward(self, {', '.join(names)}):\n    return tuple(member({call}) for member in self.members)\n"
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # noqa: S102 - a fixed template over checked identifiers, as torch.fx does
    traced_class = type("_Members", (_Members,), {"forward": namespace["forward"], "__module__": __name__})
    return traced_class(models)


# ---- validation ---------------------------------------------------------------------------------
def _validate_models(models: Any) -> list[nn.Module]:
    if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
        raise TypeError(
            f"`models` should be a sequence of nn.Modules (e.g. [cnn, mlp]), got one {type(models).__name__}; "
            "wrap it in a list."
        )
    if not isinstance(models, (Sequence, nn.ModuleList)) or isinstance(models, (str, bytes)):
        raise TypeError(f"`models` should be a list or tuple of nn.Modules, got {type(models).__name__}.")
    models = list(models)
    if not models:
        raise ValueError("`models` is empty; an ensemble needs at least one nn.Module.")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`models[{i}]` should be an nn.Module, got {type(model).__name__}.")
    owner: dict[int, int] = {}
    for i, model in enumerate(models):
        for j, other in enumerate(models[:i]):
            if model is other:
                raise ValueError(
                    f"`models[{i}]` is `models[{j}]` (the same {type(model).__name__} passed twice); pass distinct "
                    "models, e.g. copy.deepcopy(model) for a second member of the same architecture."
                )
        for p in model.parameters():
            j = owner.setdefault(id(p), i)
            if j != i:
                raise ValueError(
                    f"`models[{i}]` and `models[{j}]` share a parameter (a module or weight used by both); "
                    "members must own their parameters: pass copy.deepcopy of one of them."
                )
    if sum(count_parameters(m) for m in models) == 0:
        raise ValueError("the models have no trainable parameters (requires_grad=True), so there is nothing to share.")
    return models


def _validate_order(order: Any, count: int, example_inputs: Any) -> str | tuple[int, ...]:
    if order is None:
        return "flops" if example_inputs is not None else "given"
    if isinstance(order, str):
        if order not in ("flops", "given"):
            raise ValueError(f"`order` should be 'flops', 'given' or a permutation of member indices, got {order!r}.")
        if order == "flops" and example_inputs is None:
            raise ValueError("`order='flops'` measures each member's FLOPs on `example_inputs`; pass them too.")
        return order
    items = list(order) if isinstance(order, Sequence) else None
    if items is None or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items):
        raise TypeError(f"`order` should be 'flops', 'given' or a sequence of member indices, got {order!r}.")
    if sorted(int(i) for i in items) != list(range(count)):
        raise ValueError(f"`order` {order!r} should list each of the {count} member indices 0..{count - 1} once.")
    return tuple(int(i) for i in items)


# ---- order and record ---------------------------------------------------------------------------
def _flops(models: Sequence[nn.Module], example_inputs: tuple | Mapping[str, Any]) -> list[int]:
    """Each member's FLOPs on the example (eval mode, no grad; the models are left as they were)."""
    result = []
    for i, model in enumerate(models):
        try:
            with FlopCounterMode(display=False) as counter:
                run_example(model, example_inputs, training=False)
        except ModuleRunError as error:
            raise ValueError(
                f"`models[{i}]` ({type(model).__name__}) fails on `example_inputs`: {error}. Every member is "
                "called with the same inputs."
            ) from error.error
        result.append(int(counter.get_total_flops()))
    return result


def _record(
    models: Sequence[nn.Module], order: str | tuple[int, ...], flops: list[int] | None, saved: dict | None
) -> dict:
    """The ensemble record kept in ``plan.provenance["ensemble"]`` (JSON-friendly lists)."""
    if flops is None and saved is not None:
        flops = saved.get("flops")
    if isinstance(order, tuple):
        chosen = list(order)
    elif order == "flops" and flops is not None:
        chosen = sorted(range(len(models)), key=lambda i: (flops[i], i))
    elif saved is not None and order == "given" and saved.get("order") is not None:
        chosen = list(saved["order"])  # a saved plan keeps its order unless told otherwise
    else:
        chosen = list(range(len(models)))
    members = [
        {"index": i, "type": type(m).__name__, "params": count_parameters(m), "prefix": f"members.{i}."}
        for i, m in enumerate(models)
    ]
    return {"members": members, "order": chosen, "flops": list(flops) if flops is not None else None}


def _attach(gm: fx.GraphModule, plan: Plan) -> None:
    # where npas_fx.plan_of looks: meta (deepcopy), attribute (pickle), the banks' module (both)
    gm.meta[PLAN_KEY] = plan
    setattr(gm, PLAN_KEY, plan)
    setattr(getattr(gm, SHARED_NAME), PLAN_KEY, plan)


def _member_loss(loss_fn: Callable[..., Tensor] | None) -> Callable[..., Tensor]:
    """The container's loss for learned strategies: the sum of the members' losses."""

    def own(output: Any) -> Tensor:
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise ValueError(
                f"no `loss_fn` was given and a member's output ({type(output).__name__}) carries no 'loss'; pass "
                "loss_fn=... (one member's loss: loss_fn(output, target); the ensemble sums it over members)."
            )
        return loss

    def total(outputs: tuple, *target: Any) -> Tensor:
        return sum(loss_fn(o, *target) if loss_fn is not None else own(o) for o in outputs)

    return total


# ---- public API ---------------------------------------------------------------------------------
def compile_ensemble(
    models: Sequence[nn.Module],
    budget: int | float | None = None,
    *,
    strategy: str = "single",
    example_inputs: tuple | Mapping[str, Any] | None = None,
    data: Any = None,
    loss_fn: Callable[..., Tensor] | None = None,
    seed: int = 0,
    order: str | Sequence[int] | None = None,
    **compile_kwargs: Any,
) -> SharedEnsemble:
    """Compile several models into one :class:`SharedEnsemble` with exactly ``budget`` trainable parameters.

    Args:
        models: distinct ``nn.Module`` s (any mix :func:`npas_fx.compile` accepts, untraceable ones
            included), all called with the same inputs; they are copied, never modified.
        budget: an ``int`` (exact count) or a ``float`` (multiple of the members' summed trainable count).
        strategy: as in :func:`npas_fx.compile`; groups span members. ``"single"`` (default): one
            bank for every layer of every member; on digits (``benchmarks/ensembles.py``) it gave
            the best anytime curve at the budget of one member. ``"superweight"`` (SWN's per-bin
            sharing) was best at twice that budget; ``"shape"`` starved the small members at 1x.
        example_inputs: inputs every member accepts (tuple or dict); they fix the ensemble's
            signature, check the result runs, and measure each member's FLOPs for the order.
        data, loss_fn: for learned strategies; ``loss_fn(output, target)`` is ONE member's loss,
            the search sums it over members.
        seed: seeds grouping and initialisation.
        order: prediction order: ``"flops"`` (cheapest first, the default with ``example_inputs``),
            ``"given"`` (the order of ``models``, the default without), or a permutation of indices.
        **compile_kwargs: passed to :func:`npas_fx.compile` (``plan=``, ``generators=``, ``keep=``
            with names like ``"members.0.fc.weight"``, ``options=``, ``search_steps=``...).

    Example:
        >>> import torch, npas_fx
        >>> models = [torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)]
        >>> ens = npas_fx.compile_ensemble(models, 0.5, strategy="shape")
        >>> npas_fx.count_parameters(ens), [len(g.layers) for g in npas_fx.plan_of(ens).groups]
        (28, [2])
    """
    members = _validate_models(models)
    chosen = _validate_order(order, len(members), example_inputs)
    plan = compile_kwargs.get("plan")
    saved = plan.provenance.get(ENSEMBLE_KEY) if isinstance(plan, Plan) else None
    if isinstance(plan, Plan) and (saved is None or len(saved.get("members", ())) != len(members)):
        made = f"an ensemble of {len(saved['members'])} members" if saved else "a single model"
        raise ValueError(f"the plan was made for {made}, not for these {len(members)} models.")
    flops = _flops(members, example_inputs) if chosen == "flops" else None
    if loss_fn is not None or data is not None:
        compile_kwargs.update(data=data, loss_fn=_member_loss(loss_fn))
    container = _container(members, example_inputs)
    if compile_kwargs.get("plan") is None:  # a saved plan fixes strategy and seed itself
        compile_kwargs.update(strategy=strategy, seed=seed)
    gm = compiler.compile(container, budget, example_inputs=example_inputs, **compile_kwargs)
    # The container's class is made per call (its forward's signature); the root kept for
    # materialize (and gm.model, when the root runs as a leaf) get the generic class pickle can find.
    root = gm.__dict__.get(ROOT_KEY)
    for module in (getattr(gm, "model", None), root.module if root is not None else None):
        if isinstance(module, _Members):
            module.__class__ = generated_class(_Members, module._npas_names) if is_generated(module) else _Members
    current = compiler.plan_of(gm)
    record = _record(members, chosen, flops, saved)
    result = replace(current, provenance={**current.provenance, ENSEMBLE_KEY: record})
    _attach(gm, result)
    return SharedEnsemble(gm)


class SharedEnsemble(nn.Module):
    """Members sharing one budget: ``forward`` gives every member's output, ``predict`` their mean softmax.

    Attributes:
        compiled: the GraphModule of all members (its parameters are the ensemble's).
        order: the prediction order (member indices, cheapest first by default).
        flops: each member's FLOPs on ``example_inputs`` (``None`` when not measured).
    """

    def __init__(self, compiled: fx.GraphModule) -> None:
        super().__init__()
        self.compiled = compiled
        plan = compiler.plan_of(compiled)
        setattr(self, PLAN_KEY, plan)  # npas_fx.plan_of(ensemble)
        record = plan.provenance[ENSEMBLE_KEY]
        self.order: tuple[int, ...] = tuple(record["order"])
        self.flops: tuple[int, ...] | None = tuple(record["flops"]) if record.get("flops") is not None else None
        self._views: dict[int, nn.Module] = {}

    def __len__(self) -> int:
        return len(self.order)

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        """Every member's output, in the order of ``models`` (sum their losses to train them all)."""
        return self.compiled(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> SharedEnsemble:
        self._views.clear()  # .to()/.half() may replace buffers a cached view holds
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_views": {}}  # views are rebuilt on demand, not saved

    def _view(self, index: int) -> nn.Module:
        if index not in self._views:
            self._views[index] = _member_view(self.compiled, index)
        return self._views[index]

    def member(self, index: int) -> nn.Module:
        """Member ``index`` alone: a module on the same banks (a view, not a copy), in the ensemble's mode.

        Traced ensembles give a GraphModule that runs only that member's layers and generators;
        when the container itself ran as one opaque leaf it runs everything and keeps output ``index``.
        """
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < len(self):
            raise IndexError(f"member index should be an int in 0..{len(self) - 1}, got {index!r}.")
        view = self._view(int(index))
        view.train(self.training)
        return view

    def anytime(self, *args: Any, **kwargs: Any) -> Iterator[Tensor]:
        """The running prediction (mean softmax of the members so far) after each member, in ``order``."""
        total: Tensor | None = None
        for count, index in enumerate(self.order, 1):
            probabilities = _probabilities(self._view(index)(*args, **kwargs), index)
            total = probabilities if total is None else total + probabilities
            yield total / count

    def predict(self, *args: Any, k: int | None = None, **kwargs: Any) -> Tensor:
        """Mean softmax probability of the first ``k`` members in ``order`` (default: all)."""
        k = len(self) if k is None else k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= len(self):
            raise ValueError(f"`k` should be an int in 1..{len(self)} (members to average), got {k!r}.")
        for count, prediction in enumerate(self.anytime(*args, **kwargs), 1):
            if count == k:
                return prediction
        raise AssertionError("unreachable: anytime yields one prediction per member")

    def summary(self) -> str:
        """The plan's table, then one row per member: its layers and the groups it shares."""
        plan = getattr(self, PLAN_KEY)
        record = plan.provenance[ENSEMBLE_KEY]
        users: dict[int, set[int]] = {}
        for layer in plan.layers:
            users.setdefault(layer.group, set()).add(member_of(layer.name))
        head = ["", "members (prediction order " + " -> ".join(map(str, self.order)) + "):"]
        for item in record["members"]:
            i = item["index"]
            groups = sorted({x.group for x in plan.layers if member_of(x.name) == i})
            shared = [f"g{g}" for g in groups if len(users[g]) > 1]
            flops = f", {record['flops'][i]:,} FLOPs" if record.get("flops") else ""
            head.append(
                f"member {i}: {item['type']} ({item['params']:,} original params{flops}), "
                f"{sum(member_of(x.name) == i for x in plan.layers)} generated layer(s) in "
                f"{len(groups)} group(s), shared with other members: {', '.join(shared) or 'none'}"
            )
        return plan.summary() + "\n".join(head)


# ---- helpers of SharedEnsemble ------------------------------------------------------------------
def _probabilities(output: Any, index: int) -> Tensor:
    logits = output
    if not isinstance(output, Tensor):
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"member {index} returned {type(output).__name__}; predict averages softmaxes of logits, so a member "
            "should return a floating tensor of logits (or an output with a `logits` entry)."
        )
    return logits.softmax(-1)


class _WholeRun(nn.Module):
    """Member ``index`` of an ensemble whose members cannot be separated: runs all, keeps one."""

    def __init__(self, compiled: fx.GraphModule, index: int) -> None:
        super().__init__()
        self.compiled = compiled
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)[self.index]


def _member_view(gm: fx.GraphModule, index: int) -> nn.Module:
    """A GraphModule of ``gm``'s graph cut down to what output ``index`` needs (same modules, same banks)."""
    graph = fx.Graph()
    outputs = graph.graph_copy(gm.graph, {})
    if type(gm.graph._codegen) is not fx.graph.CodeGen or not isinstance(outputs, tuple):
        return _WholeRun(gm, index)  # the root is one leaf, or inputs/outputs are pytree-flattened
    wanted = outputs[index]
    graph.output(wanted)
    needed: set[fx.Node] = set()
    stack = [x for x in pytree.tree_leaves(wanted) if isinstance(x, fx.Node)]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and node not in needed:
            graph.erase_node(node)
    graph.lint()
    graph._tracer_cls = gm._tracer_cls  # unpickling re-traces the view with npas_fx's tracer
    view = fx.GraphModule(gm, graph, f"{type(gm).__name__}Member{index}")
    view.meta[PLAN_KEY] = compiler.plan_of(gm)
    setattr(view, PLAN_KEY, compiler.plan_of(gm))
    return view
