"""Rewrite pass: parameter reads become generator calls, and the dense parameters go away.

The pass is told, per parameter, which module of the GraphModule generates it and which
attributes (banks) that module takes as inputs; it knows nothing of budgets or strategies.

* ``get_attr`` of a parameter (read in a traced-through forward) -> the generator's output.
* ``call_module`` of a leaf that owns parameters (Linear, BatchNorm, MultiheadAttention, an
  opaque module) -> ``call_with_parameters(leaf, {name: generated, ...}, args, kwargs)``
  (``torch.func.functional_call``),
  so the leaf's own forward still runs (and still reads ``self.training``).
* ``call_with_parameters(leaf, {...}, args, kwargs)`` already in the graph (a root that runs as
  one leaf, see :mod:`.trace`) -> the generated parameters under ``leaf`` join its dict.
* A parameter read in several places (tied weights) is generated once and fed to every reader.

Example:
    >>> import torch
    >>> from npas_fx.passes.trace import trace
    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(3, 2))).graph_module
    >>> gm.register_parameter("bank", torch.nn.Parameter(torch.zeros(6)))
    >>> class View(torch.nn.Module):
    ...     def forward(self, bank):
    ...         return bank.view(2, 3)
    >>> gm.add_module("gen", View())
    >>> gm = insert_generators(gm, {"0.weight": GeneratorCall("gen", ("bank",), ("0.weight",))})
    >>> print(gm.code.strip())
    def forward(self, input):
        input_1 = input
        bank = self.bank
        gen = self.gen(bank);  bank = None
        _0_1 = getattr(self, "0")
        call_with_parameters = npas_fx_passes_insert_generators_call_with_parameters(_0_1, {'weight': gen}, (input_1,), {});  _0_1 = gen = input_1 = None
        return call_with_parameters
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx
from torch.func import functional_call

__all__ = ["GeneratorCall", "insert_generators", "call_with_parameters", "forget_flat_weights", "GeneratedModuleTracer"]


def call_with_parameters(
    module: torch.nn.Module,
    parameters: Mapping[str, Tensor],
    args: tuple,
    kwargs: Mapping[str, Any],
    more_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """``module(*args, **kwargs, **more_kwargs)`` with ``parameters`` (relative name -> tensor) in
    place of its own (``more_kwargs``: a forward's ``**kwargs`` passed through).

    The eager path puts the tensors into their owners' parameter slots for the call and restores
    them after (what ``torch.func.functional_call`` does, minus bookkeeping that costs more than a
    small layer's forward). A name whose owner is gone or no longer has that slot (a layer replaced
    by a wrapper, e.g. peft's LoRA) is skipped: the wrapper reads the weight itself. Under
    ``torch.compile``/``torch.export`` it is ``functional_call`` with a fresh dict (a graph's literal
    dict is immutable, and ``functional_call`` writes into its argument).
    """
    if more_kwargs:
        kwargs = {**kwargs, **more_kwargs}
    if any(isinstance(t, fx.Proxy) for t in parameters.values()):
        # Tracing into the call would record a plain call of the leaf and lose its parameters.
        raise TypeError(
            "call_with_parameters must stay one node when a compiled module is traced: trace it with "
            "its own tracer class (gm._tracer_cls, npas_fx.passes.insert_generators.GeneratedModuleTracer)."
        )
    if torch.compiler.is_compiling():
        return functional_call(module, dict(parameters), tuple(args), dict(kwargs))
    slots = [(found, tensor) for name, tensor in parameters.items() if (found := _slot(module, name)) is not None]
    previous = [owner._parameters[leaf] for (owner, leaf), _ in slots]
    try:
        for (owner, leaf), tensor in slots:
            owner._parameters[leaf] = tensor
        return module(*args, **kwargs)
    finally:
        for ((owner, leaf), _), old in zip(slots, previous, strict=True):
            owner._parameters[leaf] = old
            forget_flat_weights(owner, (leaf,))


def _slot(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str] | None:
    path, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        return None
    return (owner, leaf) if leaf in owner._parameters else None


def forget_flat_weights(owner: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Drop ``names`` from an RNN's ``_flat_weights`` list (its forward refills it from the attributes).

    RNNs keep their weights in a list beside ``_parameters``; after a rewrite or a bound call it
    would keep the dense originals, or the last generated tensors and their graph, alive.
    """
    flat_names = owner.__dict__.get("_flat_weights_names")
    flat = owner.__dict__.get("_flat_weights")
    if flat_names is not None and flat is not None:
        owner.__dict__["_flat_weights"] = [None if n in names else w for n, w in zip(flat_names, flat, strict=True)]


class GeneratedModuleTracer(fx.Tracer):
    """Tracer that keeps :func:`call_with_parameters` as one node.

    Unpickling a GraphModule re-traces its ``forward`` with a subclass of the tracer recorded in
    ``gm._tracer_cls``; tracing into ``functional_call`` with proxies fails, so it stays a leaf.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(autowrap_functions=(call_with_parameters,))


@dataclass(frozen=True)
class GeneratorCall:
    """Generate a parameter by calling submodule ``module`` on the attributes ``inputs``.

    ``aliases`` are all qualified names of the parameter (tied names included).
    """

    module: str
    inputs: tuple[str, ...]
    aliases: tuple[str, ...]


def _generated_under(prefix: str, alias_to_param: Mapping[str, str]) -> dict[str, str]:
    """Aliases below module ``prefix``: relative name -> canonical parameter name."""
    start = prefix + "."
    return {a[len(start) :]: p for a, p in alias_to_param.items() if a.startswith(start)}


def insert_generators(gm: fx.GraphModule, calls: Mapping[str, GeneratorCall]) -> fx.GraphModule:
    """Rewrite ``gm`` in place so that every parameter in ``calls`` is generated; returns ``gm``.

    The generator modules and bank attributes named in ``calls`` must already be attached to
    ``gm``. After the rewrite the dense parameters are unregistered (set to ``None`` on their
    modules), so they no longer count, train, or appear in ``state_dict()``.
    """
    alias_to_param = {alias: name for name, call in calls.items() for alias in call.aliases}
    for call in calls.values():
        gm.get_submodule(call.module)  # fail early, naming the missing piece
        for attr in call.inputs:
            _get_attr(gm, attr)
    graph = gm.graph
    generated: dict[str, fx.Node] = {}

    def generated_value(param: str, before: fx.Node) -> fx.Node:
        if param not in generated:
            call = calls[param]
            with graph.inserting_before(before):
                inputs = tuple(graph.get_attr(attr) for attr in call.inputs)
                generated[param] = graph.call_module(call.module, inputs)
        return generated[param]

    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in alias_to_param:
            node.replace_all_uses_with(generated_value(alias_to_param[node.target], node))
            graph.erase_node(node)
        elif node.op == "call_module":
            inside = _generated_under(str(node.target), alias_to_param)
            if not inside:
                continue
            feeds = {rel: generated_value(param, node) for rel, param in inside.items()}
            with graph.inserting_before(node):
                leaf = graph.get_attr(node.target)
                call = graph.call_function(call_with_parameters, (leaf, feeds, tuple(node.args), dict(node.kwargs)))
            call.meta.update(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is call_with_parameters and _is_get_attr(node.args[0]):
            # Already a parameterised call (a root that runs as one leaf): add the generated ones.
            inside = _generated_under(str(node.args[0].target), alias_to_param)
            feeds = {rel: generated_value(param, node) for rel, param in inside.items()}
            if feeds:
                node.args = (node.args[0], {**node.args[1], **feeds}, *node.args[2:])

    for alias in alias_to_param:
        owner_path, _, leaf_name = alias.rpartition(".")
        owner = gm.get_submodule(owner_path)
        # None keeps the slot (calls bind the generated tensor there) while removing the parameter.
        owner._parameters[leaf_name] = None
        forget_flat_weights(owner, (leaf_name,))
    for node in graph.nodes:
        if isinstance(node.type, str):
            # A string annotation (``from __future__ import annotations`` in the model's file)
            # breaks torch.save's import block; the annotation is documentation only.
            node.type = None
    graph.lint()
    gm.recompile()
    # deepcopy rebuilds a GraphModule from its graph, so the graph must name the tracer too.
    graph._tracer_cls = gm._tracer_cls = GeneratedModuleTracer
    return gm


def _is_get_attr(arg: object) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _get_attr(gm: fx.GraphModule, path: str) -> torch.Tensor:
    owner_path, _, leaf = path.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if not hasattr(owner, leaf):
        raise AttributeError(f"generator input {path!r} is not an attribute of the GraphModule")
    return getattr(owner, leaf)
