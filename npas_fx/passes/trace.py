"""Trace a module with torch.fx as deep as it can; whatever cannot be traced runs as a leaf.

Standard ``torch.nn`` modules stay ``call_module`` leaves (as in torch.fx's default tracer): their
``forward`` reads ``self.training`` at run time, so BatchNorm and Dropout keep their train/eval
behaviour, which tracing through them would freeze. Modules torch.fx cannot trace become leaves
too (:mod:`.find_opaque`); extra leaves can be named in ``opaque``.

When even the root cannot be traced (every Hugging Face transformers model), the result is a
GraphModule around the root as one leaf: the root lives at ``gm.model`` and, for a root whose
``forward(self, input_ids=None, *, return_dict=None, **kwargs)``, the graph is::

    def forward(self, input_ids=None, *, return_dict=None, **kwargs):
        model = self.model
        call_with_parameters = call_with_parameters(model, {}, (input_ids,), {'return_dict': return_dict}, kwargs)
        return call_with_parameters

(the root's own signature, so tools that inspect it see the model's), so every input (keywords,
non-tensors) and every output (dicts, ``ModelOutput``) passes through unchanged, and :mod:`.insert_generators` feeds the generated parameters into the ``{}``.

With ``example_inputs`` the trace is checked, not trusted: arguments the inputs leave out may be
specialised to their defaults (torch.fx guards them at run time), and a deep trace is kept only
when the graph gives the model's own outputs on the inputs. Otherwise the root runs as a leaf.

Example:
    >>> import torch
    >>> result = trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> [n.op for n in result.graph_module.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    >>> class Sign(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x if x.sum() > 0 else -x
    >>> result = trace(Sign())
    >>> result.opaque
    {'': 'TraceError: symbolically traced variables cannot be used as inputs to control flow'}
    >>> print(result.graph_module.code.strip())  # doctest: +ELLIPSIS
    def forward(self, x):
        model = self.model
        call_with_parameters = ...call_with_parameters(model, {}, (x,), {}, None);  model = x = None
        return call_with_parameters
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .find_opaque import LeafTracer, OpaqueSearch, describe_error, find_opaque
from .insert_generators import call_with_parameters
from .run_example import ModuleRunError, run_example, same_outputs

__all__ = ["LeafTracer", "TraceResult", "trace", "is_traceable", "ROOT_LEAF"]

ROOT_LEAF = "model"  # where the root lives in the GraphModule when it runs as one leaf
_BASE_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class TraceResult:
    """A traced GraphModule and what tracing found.

    Attributes:
        graph_module: the GraphModule (parameters at the root's paths, or under ``model.``
            when the root runs as a leaf).
        opaque: path -> reason for every module that runs as a leaf; ``""`` is the root.
        traced: paths of the modules whose ``forward`` was traced through, ``""`` first.
        specialized: the arguments fixed to a value by tracing (torch.fx checks them when called).
        root: the module that was traced. Its submodules are the GraphModule's leaves (the same
            objects), so it is the original-class skeleton around them (``None``: not kept).
    """

    graph_module: fx.GraphModule
    opaque: Mapping[str, str] = field(default_factory=dict)
    traced: tuple[str, ...] = ()
    specialized: Mapping[str, Any] = field(default_factory=dict)
    root: nn.Module | None = None

    @property
    def prefix(self) -> str:
        """Prefix of the root's parameter names in the GraphModule (``"model."`` or ``""``)."""
        return f"{ROOT_LEAF}." if "" in self.opaque else ""


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


def _mirrored_signature(root: nn.Module) -> inspect.Signature | None:
    """``root.forward``'s signature when the wrapper can repeat it (defaults torch.fx can print)."""
    try:
        signature = inspect.signature(root.forward)
    except (TypeError, ValueError):
        return None
    for parameter in signature.parameters.values():
        default = parameter.default
        if default is not inspect.Parameter.empty and not isinstance(default, _BASE_TYPES):
            return None
        if not parameter.name.isidentifier() or parameter.name in ("self", ROOT_LEAF):
            return None
    return signature


def _mirror_call(graph: fx.Graph, module: fx.Node, signature: inspect.Signature | None) -> fx.Node:
    """Placeholders repeating ``signature`` and the call passing each of them on, unchanged."""
    if signature is None:
        args = graph.create_node("placeholder", "*args", name="args")
        kwargs = graph.create_node("placeholder", "**kwargs", name="kwargs")
        return graph.call_function(call_with_parameters, (module, {}, args, kwargs))
    kinds = inspect.Parameter
    has_star = any(p.kind is kinds.VAR_POSITIONAL for p in signature.parameters.values())
    positional: list[fx.Node] = []
    star: fx.Node | None = None
    named: dict[str, fx.Node] = {}
    extra: fx.Node | None = None
    for name, parameter in signature.parameters.items():
        if parameter.kind is kinds.VAR_POSITIONAL:
            star = graph.create_node("placeholder", "*" + name, name=name)
        elif parameter.kind is kinds.VAR_KEYWORD:
            extra = graph.create_node("placeholder", "**" + name, name=name)
        else:
            node = graph.placeholder(name, default_value=parameter.default)
            # Required arguments go by position (as callers pass them: forward pre-hooks see them in
            # ``args``), optional ones by keyword: a decorated forward (Hugging Face) may fill some
            # of them itself from ``**kwargs``, and keywords cannot collide with that.
            by_position = parameter.kind is kinds.POSITIONAL_ONLY or (
                parameter.kind is kinds.POSITIONAL_OR_KEYWORD
                and (has_star or parameter.default is inspect.Parameter.empty)
            )
            if by_position:
                positional.append(node)
            else:
                named[name] = node
    args: Any = tuple(positional) if star is None else graph.call_function(operator.add, (tuple(positional), star))
    return graph.call_function(call_with_parameters, (module, {}, args, named, extra))


def _mark_non_persistent(gm: nn.Module, names: tuple[tuple[str, str], ...]) -> None:
    for path, name in names:
        try:
            owner = gm.get_submodule(path)
        except AttributeError:
            continue
        if name in owner._buffers:
            owner._non_persistent_buffers_set.add(name)


def _restore_non_persistent(gm: fx.GraphModule, root: nn.Module) -> None:
    # A GraphModule registers the buffers its graph reads (get_attr) as persistent, again on every
    # deepcopy; a buffer the model keeps out of its state_dict must stay out of the compiled one's.
    names = tuple((path, name) for path, module in root.named_modules() for name in module._non_persistent_buffers_set)
    if names:
        _mark_non_persistent(gm, names)
        gm._register_deepcopy_hook(functools.partial(_mark_non_persistent, names=names))


def root_hooks(root: nn.Module) -> list[str]:
    """Kinds of hooks registered on ``root`` itself (tracing calls ``root.forward``, skipping them).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> _ = m.register_forward_pre_hook(lambda module, args: None)
        >>> root_hooks(m)
        ['forward pre-hook']
    """
    kinds = {
        "_forward_pre_hooks": "forward pre-hook",
        "_forward_hooks": "forward hook",
        "_backward_pre_hooks": "backward pre-hook",
        "_backward_hooks": "backward hook",
        "_state_dict_pre_hooks": "state_dict pre-hook",
        "_state_dict_hooks": "state_dict hook",
        "_load_state_dict_pre_hooks": "load_state_dict pre-hook",
        "_load_state_dict_post_hooks": "load_state_dict post-hook",
    }
    return [label for attr, label in kinds.items() if getattr(root, attr, None)]


def root_as_leaf(root: nn.Module) -> fx.GraphModule:
    """A GraphModule that runs ``root`` (kept at ``gm.model``) as one node; see the module doc.

    Its ``forward`` repeats ``root.forward``'s signature (names, defaults, ``*args``/``**kwargs``),
    so tools that read it -- Hugging Face ``Trainer`` drops dataset columns the forward does not
    name and finds ``labels`` there -- see the model's own; every argument is passed on unchanged.
    """
    holder = nn.Module()
    holder.add_module(ROOT_LEAF, root)
    graph = fx.Graph()
    module = graph.get_attr(ROOT_LEAF)
    graph.output(_mirror_call(graph, module, _mirrored_signature(root)))
    # Named for what it is: a compiled wrapper, not the wrapped class (error messages, reprs).
    gm = fx.GraphModule(holder, graph, f"Compiled{type(root).__name__}")
    gm.training = root.training
    return gm


def _check_example_inputs(example_inputs: Any) -> None:
    if example_inputs is not None and not isinstance(example_inputs, (tuple, Mapping)):
        raise TypeError(
            f"`example_inputs` should be a tuple of positional inputs or a dict of keyword inputs, got "
            f"{type(example_inputs).__name__}; wrap a single tensor as (x,)."
        )


def _specializations(root: nn.Module, example_inputs: tuple | Mapping[str, Any] | None) -> list[dict | None]:
    """Ways to trace ``root``, most general first (each fixes more arguments than the last):
    nothing; the arguments the example leaves out whose default is ``None`` (and empty ``*args``,
    ``**kwargs``); all left-out arguments with a default; also the example's non-tensor values."""
    if example_inputs is None:
        return [None]
    signature = inspect.signature(root.forward)
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, tuple) else ((), dict(example_inputs))
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"`example_inputs` do not fit {type(root).__name__}.forward{signature}: {error}. "
            "Give a tuple of positional inputs or a dict keyed by forward's argument names."
        ) from error
    absent: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    supplied: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            if name not in bound.arguments:
                absent["*" + name] = ()
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            if name not in bound.arguments:
                absent["**" + name] = {}
        elif name in bound.arguments:
            if isinstance(bound.arguments[name], _BASE_TYPES):
                supplied[name] = bound.arguments[name]
        elif parameter.default is None:
            absent[name] = None
        elif parameter.default is not inspect.Parameter.empty and isinstance(parameter.default, _BASE_TYPES):
            # Only values torch.fx can guard (it asserts them at run time); others stay inputs.
            defaults[name] = parameter.default
    levels: list[dict | None] = [None]
    for level in (absent, {**absent, **defaults}, {**absent, **defaults, **supplied}):
        if level and level != levels[-1]:
            levels.append(level)
    return levels


def _restore_argument_names(graph: fx.Graph, concrete_args: Mapping[str, Any]) -> None:
    # torch.fx names a specialised argument's placeholder ``name_1``; the forward's own name keeps
    # keyword calls (``gm(attention_mask=...)``) working and the guard message readable.
    for node in graph.nodes:
        if node.op == "placeholder" and str(node.target).endswith("_1"):
            name = str(node.target)[:-2]
            if name in concrete_args and not isinstance(concrete_args[name], (tuple, list, dict)):
                node.target = name


def _build(
    search: OpaqueSearch, graph: fx.Graph, root: nn.Module, concrete_args: Mapping[str, Any] | None
) -> fx.GraphModule:
    if concrete_args:
        _restore_argument_names(graph, concrete_args)
    gm = fx.GraphModule(search.root, graph, type(root).__name__)
    _attach_unused_modules(gm, root)
    _restore_non_persistent(gm, root)
    gm.training = root.training
    return gm


def _expected_output(root: nn.Module, example_inputs: tuple | Mapping[str, Any]) -> Any:
    try:
        return run_example(root, example_inputs)
    except ModuleRunError as error:
        raise ValueError(
            f"{type(root).__name__} itself fails on `example_inputs`: {error}. "
            "Give inputs the model accepts (a tuple of positional inputs or a dict of keyword inputs)."
        ) from error


def _disagreement(gm: fx.GraphModule, expected: Any, example_inputs: tuple | Mapping[str, Any]) -> str | None:
    """Why the traced ``gm`` does not give ``expected`` on the example (eval mode), or None."""
    try:
        got = run_example(gm, example_inputs)
    except ModuleRunError as error:
        return f"the traced graph fails on example_inputs ({describe_error(error.error)})"
    if not same_outputs(got, expected):
        return "the traced graph's outputs differ from the model's on example_inputs"
    return None


def trace(
    root: nn.Module,
    opaque: frozenset[str] = frozenset(),
    example_inputs: tuple | Mapping[str, Any] | None = None,
    *,
    fallback: bool = True,
) -> TraceResult:
    """Trace ``root`` (which the caller owns: it is not copied) as deep as torch.fx can.

    Args:
        root: the module.
        opaque: paths of submodules to keep as leaves (``""``: the root itself).
        example_inputs: a tuple of positional or a dict of keyword inputs; lets tracing
            specialise left-out arguments and checks the trace against the model.
        fallback: when the root cannot be traced, run it as one leaf (default) instead of
            raising a ``RuntimeError`` that names why.
    """
    _check_example_inputs(example_inputs)
    named = {path: "named opaque" for path in opaque}
    if (hooks := root_hooks(root)) and "" not in named:
        # A traced graph is a new root without the model's hooks; run as a leaf, the root keeps them.
        named[""] = f"the root has hooks ({', '.join(hooks)})"
    failures: list[str] = []
    expected: list[Any] = []  # the model's own output, computed once when first needed
    if "" not in named:
        for concrete in _specializations(root, example_inputs):
            search = find_opaque(root, named, concrete)
            if search.graph is None:
                failures.append(search.failure or "untraceable")
                continue
            gm = _build(search, search.graph, root, concrete)
            if example_inputs is not None:
                expected = expected or [_expected_output(root, example_inputs)]
                if why := _disagreement(gm, expected[0], example_inputs):
                    failures.append(why)
                    continue
            return TraceResult(gm, search.opaque, search.traced, dict(concrete or {}), root)
    # The unspecialised trace's error is torch.fx's own; a graph that disagreed is worth adding.
    why = "; ".join(dict.fromkeys(failures[:1] + [f for f in failures if f.startswith("the traced graph")]))
    why = why or named.get("", "named opaque")
    if not fallback:
        raise RuntimeError(
            f"torch.fx could not trace {type(root).__name__}: {why}. "
            "Make its forward traceable, or let it run as one leaf (fallback=True)."
        )
    return TraceResult(root_as_leaf(root), {"": why}, root=root)


def is_traceable(module: nn.Module) -> bool:
    """True when ``torch.fx`` traces ``module`` whole, without new leaves (no graph is kept)."""
    try:
        LeafTracer().trace(module)
    except Exception:
        return False
    return True
