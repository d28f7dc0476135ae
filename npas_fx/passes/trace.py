"""Trace a module with torch.fx, keeping torch.nn layers as leaves.

Standard ``torch.nn`` modules stay ``call_module`` leaves (as in torch.fx's default tracer): their
``forward`` reads ``self.training`` at run time, so BatchNorm and Dropout keep their train/eval
behaviour, which tracing through them would freeze. Extra leaves can be named in ``opaque``.

Example:
    >>> import torch
    >>> result = trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> [n.op for n in result.graph_module.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

__all__ = ["LeafTracer", "TraceResult", "trace"]


class LeafTracer(fx.Tracer):
    """torch.fx's tracer plus user-chosen leaf modules (by qualified path)."""

    def __init__(self, opaque: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class TraceResult:
    """A traced GraphModule and the modules that had to stay opaque (path -> reason)."""

    graph_module: fx.GraphModule
    opaque: Mapping[str, str] = field(default_factory=dict)


def _attach_unused_modules(gm: fx.GraphModule, root: nn.Module) -> None:
    # GraphModule copies only what the graph reads; modules it never calls still own parameters
    # and buffers that must not be lost, so they are attached at their original paths.
    for name, module in root.named_modules():
        if not name:
            continue
        try:
            gm.get_submodule(name)
        except AttributeError:
            parent, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            owner.add_module(leaf, module)
    for name, param in root.named_parameters(recurse=False):
        if not hasattr(gm, name):
            gm.register_parameter(name, param)
    for name, buf in root.named_buffers(recurse=False):
        if not hasattr(gm, name):
            gm.register_buffer(name, buf, persistent=name not in root._non_persistent_buffers_set)


def trace(
    root: nn.Module, opaque: frozenset[str] = frozenset(), concrete_args: dict[str, Any] | None = None
) -> TraceResult:
    """Symbolically trace ``root`` (which the caller owns: it is not copied).

    Raises the tracer's error chained in a ``RuntimeError`` that names the module and the fix.
    """
    tracer = LeafTracer(frozenset(opaque))
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as error:  # torch.fx raises many types (TraceError, TypeError, ...)
        raise RuntimeError(
            f"torch.fx could not trace {type(root).__name__}: {type(error).__name__}: {error}. "
            "Make its forward traceable or name the offending submodule in `opaque=`."
        ) from error
    gm = fx.GraphModule(tracer.root, graph, root.__class__.__name__)
    _attach_unused_modules(gm, root)
    gm.training = root.training
    return TraceResult(gm, {name: "named opaque" for name in opaque})


def is_traceable(module: nn.Module) -> bool:
    """True when ``torch.fx`` traces ``module`` without error (no graph is kept)."""
    try:
        LeafTracer().trace(module)
    except Exception:
        return False
    return True

