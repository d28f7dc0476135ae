"""Analysis pass: trace as deep as torch.fx can, finding the modules that must stay opaque.

torch.fx fails on a module whose ``forward`` does what a Proxy cannot (item assignment, control
flow on tensor values, iterating a tensor, ``**kwargs`` expansion...). :func:`find_opaque` traces,
and when tracing fails it blames the *innermost* module whose own ``forward`` was running when the
error was raised, makes that module a leaf (``call_module``) and traces again. A module that
fails even with its children as leaves is blamed itself on the next try, so the search climbs
towards the root only as far as it must. The root failing ends the search.

Tracing bakes Python values into the graph. Values of ``self.training`` are the classic trap
(``dropout(p=0.0 if not self.training else p)``): a graph traced in train mode would keep
dropping out in eval mode. So every successful trace is repeated with every module in the
opposite mode; where the two graphs differ, the module that created the first differing node
reads its mode, and it becomes a leaf too (a leaf's ``forward`` reads ``self.training`` at run
time). The pass records, it does not edit the module.

Example:
    >>> import torch
    >>> class Gate(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x if x.sum() > 0 else -x  # control flow on a tensor value
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), Gate())
    >>> search = find_opaque(model)
    >>> search.opaque
    {'1': 'TraceError: symbolically traced variables cannot be used as inputs to control flow'}
    >>> [n.op for n in search.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

__all__ = ["LeafTracer", "OpaqueSearch", "find_opaque", "describe_error"]

MODULE_KEY = "npas_module"  # node.meta key: path of the traced-through module that created the node


def describe_error(error: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, shortened to ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LeafTracer(fx.Tracer):
    """torch.fx's tracer plus user-chosen leaf modules (by qualified path).

    It also records which modules it traced through (``traced``), tags every node with the path of
    the module whose ``forward`` created it (``node.meta["npas_module"]``), and remembers in which
    module's ``forward`` an error was raised (:meth:`culprit`).
    """

    def __init__(self, opaque: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque
        self.traced: dict[str, None] = {}  # ordered set of traced-through paths
        self._stack: list[str] = []
        self._origins: dict[int, tuple[BaseException, str]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        if isinstance(root, nn.Module):
            self.traced[""] = None
        return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:
            path = None  # not a submodule of the root: torch.fx raises, blamed on the caller
        if path is None or self.is_leaf_module(m, path):
            # A failure while emitting a leaf call (an argument a node cannot hold) is the
            # caller's: making the leaf "more opaque" could not help.
            return super().call_module(m, forward, args, kwargs)
        self.traced[path] = None
        self._stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            # The innermost frame sees the error first; outer frames keep its record.
            self._origins.setdefault(id(error), (error, path))
            raise
        finally:
            self._stack.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[MODULE_KEY] = self._stack[-1] if self._stack else ""
        return node

    def culprit(self, error: BaseException) -> str:
        """Path of the innermost module whose own ``forward`` raised ``error`` (``""``: the root).

        Follows the exception chain to its first cause, so an error that a module caught and
        re-raised as another type is still blamed on the module where it started.
        """
        chain: list[BaseException] = []
        current: BaseException | None = error
        while current is not None and all(current is not seen for seen in chain):
            chain.append(current)
            current = current.__cause__ or current.__context__
        for cause in reversed(chain):
            record = self._origins.get(id(cause))
            if record is not None and record[0] is cause:
                return record[1]
        return ""


@dataclass
class OpaqueSearch:
    """Result of :func:`find_opaque`.

    Attributes:
        graph: the traced graph, or ``None`` when the root itself cannot be traced.
        root: the tracer's root (what a ``GraphModule`` is built around).
        opaque: path -> reason for every module that runs as a leaf (named ones included).
        traced: paths of the modules traced through, ``""`` (the root) first.
        failure: why the root cannot be traced (``None`` when it can).
    """

    graph: fx.Graph | None
    root: nn.Module
    opaque: dict[str, str] = field(default_factory=dict)
    traced: tuple[str, ...] = ()
    failure: str | None = None


def _set_modes(modes: Mapping[nn.Module, bool]) -> None:
    for module, mode in modes.items():
        module.training = mode


def _fingerprint(graph: fx.Graph) -> list[str]:
    # What a node computes, not how often it is used (``format_node`` counts users, which a
    # difference further down would change).
    return [f"{node.name}={node.op}[{node.target}]({node.args}, {node.kwargs})" for node in graph.nodes]


def _first_difference(a: fx.Graph, b: fx.Graph) -> str | None:
    """Module path that created the first node where ``a`` and ``b`` differ (None: identical)."""
    nodes = list(a.nodes)
    for i, (x, y) in enumerate(zip(_fingerprint(a), _fingerprint(b), strict=False)):
        if x != y:
            return nodes[i].meta.get(MODULE_KEY, "")
    # Both graphs end in their output node, so a length difference shows up inside the zip.
    return None if len(nodes) == len(b.nodes) else ""


def _outermost(reasons: dict[str, str]) -> dict[str, str]:
    # A leaf found early may sit inside one found later; only the outer one is a node.
    return {p: r for p, r in reasons.items() if not any(p.startswith(q + ".") for q in reasons if q)}


def _trace_once(
    root: nn.Module, opaque: frozenset[str], concrete_args: dict | None
) -> tuple[LeafTracer, fx.Graph | Exception]:
    """Trace; return the tracer and the graph, or the tracer and the error."""
    tracer = LeafTracer(opaque)
    try:
        return tracer, tracer.trace(root, concrete_args=concrete_args)
    except Exception as error:  # torch.fx and model code raise many types
        return tracer, error


def find_opaque(
    root: nn.Module, opaque: Mapping[str, str] | None = None, concrete_args: dict[str, Any] | None = None
) -> OpaqueSearch:
    """Trace ``root`` as deep as torch.fx can; untraceable modules become leaves.

    ``opaque`` names modules to keep as leaves from the start (path -> reason). ``concrete_args``
    is handed to ``torch.fx.Tracer.trace`` (specialised inputs). ``root`` may be traced several
    times, in both train and eval mode; its modes are restored before returning.
    """
    reasons = dict(opaque or {})
    modes = {m: m.training for m in root.modules()}
    flipped = {m: not mode for m, mode in modes.items()}
    try:
        for _ in range(len(modes) + 1):  # each round adds a leaf or ends
            tracer, outcome = _trace_once(root, frozenset(reasons), concrete_args)
            if isinstance(outcome, Exception):
                blame, why = tracer.culprit(outcome), describe_error(outcome)
            else:
                _set_modes(flipped)
                other, other_outcome = _trace_once(root, frozenset(reasons), concrete_args)
                _set_modes(modes)
                if isinstance(other_outcome, Exception):
                    blame, why = other.culprit(other_outcome), describe_error(other_outcome)
                    why = f"in {'eval' if root.training else 'train'} mode: {why}"
                else:
                    difference = _first_difference(outcome, other_outcome)
                    if difference is None:
                        return OpaqueSearch(outcome, tracer.root, _outermost(reasons), tuple(tracer.traced))
                    blame = difference
                    why = "its traced forward depends on self.training (train/eval graphs differ)"
            if blame == "" or blame in reasons:
                return OpaqueSearch(None, root, reasons, (), failure=why)
            reasons[blame] = why
        return OpaqueSearch(None, root, reasons, (), failure="no traceable set of leaves found")
    finally:
        _set_modes(modes)
