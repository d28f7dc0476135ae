"""Fast evaluation: a compiled model in ``eval()`` without gradients runs as its dense equivalent.

A compiled forward pays per layer for the graph's attribute reads, the generator call and the
binding of the generated weight into the leaf; for small models at batch 1 that Python work costs
more than the arithmetic. In ``eval()`` under ``torch.no_grad()``/``torch.inference_mode()`` the
weights do not change between calls, so the GraphModule's call runs a *runner* instead: the
model's original-class module tree whose generated weights are bound, once, to the cached
generated tensors and whose every other parameter and buffer *is* the compiled model's own (no
copies). It is rebuilt whenever a bank, a generator parameter or any of the model's tensors is
replaced or changed in place (storage pointers and version counters are compared on every
call), and never used while training, with gradients enabled, under ``torch.compile``, or when
the compiled model has hooks of its own.

Example:
    >>> import torch, npas_fx
    >>> gm = npas_fx.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), 0.5)
    >>> x = torch.randn(3, 8)
    >>> with torch.no_grad():
    ...     slow = gm(x)                         # training mode: the compiled graph
    ...     fast = gm.eval()(x)                  # eval without grad: the dense runner
    >>> torch.equal(slow, fast)
    True
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import fx, nn

from .runtime import INDEX_ATTR, ROOT_KEY, RUNNERS, SHARED_ATTR, GeneratedParameters, explicit_cache_active

__all__ = ["install_fast_eval", "forget_runner", "INTERNAL_HOOK"]

INTERNAL_HOOK = "_npas_internal"  # set on npas_fx's own module hooks: they never block the runner

_SHARED = "npas"
CODE_KEY = "npas_code"  # in gm.meta: the code of the graph compile made


class _FastEvalCall:
    """Replaces a GraphModule class's ``_wrapped_call``: the runner when eligible, else the graph."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def __call__(self, gm: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # What torch.fx's own wrapper does, minus its error formatting, which dynamo skips.
            if getattr(self.wrapped, "cls_call", None) is None:
                return nn.Module.__call__(gm, *args, **kwargs)
            return self.wrapped.cls_call(gm, *args, **kwargs)
        runner = _runner(gm)
        if runner is not None:
            return runner(*args, **kwargs)
        return self.wrapped(gm, *args, **kwargs)


def _eligible(gm: fx.GraphModule) -> bool:
    if gm.training or torch.is_grad_enabled() or explicit_cache_active():
        return False
    hooks = (gm._forward_hooks, gm._forward_pre_hooks, gm._backward_hooks, gm._backward_pre_hooks)
    globals_ = nn.modules.module
    global_hooks = (globals_._global_forward_hooks, globals_._global_forward_pre_hooks)
    # npas_fx's own hooks (recompute's, which do nothing without gradients) do not count.
    if any(not getattr(h, INTERNAL_HOOK, False) for table in hooks for h in table.values()) or any(global_hooks):
        return False
    # The runner is the original forward: valid only for the graph compile made (not one edited since).
    unedited = gm.meta.get(CODE_KEY) == gm.__dict__.get("_code")
    return unedited and ROOT_KEY in gm.__dict__


def _same_leaves(gm: fx.GraphModule, root: nn.Module, prefix: str) -> bool:
    """Whether every module the graph calls is still the original-class tree's own object (no
    module of the compiled model was replaced since compile), so the original forward is the graph's."""
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op not in ("call_module", "get_attr") or target.startswith(_SHARED + "."):
            continue
        ours = _find(gm, target) if node.op == "call_module" else None
        if ours is not None and ours is not root and _find(root, target.removeprefix(prefix)) is not ours:
            return False
    return True


def _modules(gm: fx.GraphModule) -> list[nn.Module]:
    found, stack, seen = [], [gm], set()
    while stack:
        module = stack.pop()
        if id(module) not in seen:
            seen.add(id(module))
            found.append(module)
            stack.extend(m for m in module._modules.values() if m is not None)
    return found


class _Watch:
    """What a runner depends on, gathered once: the banks' and generators' tensors (their values
    are baked into the runner's weights) and the tensor and submodule dicts of every module (the
    runner shares their current entries, so in-place writes show through, replacements do not)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        shared = getattr(gm, _SHARED)
        internal = {id(m) for m in shared.modules()}  # banks' versions are watched below instead
        modules = [m for m in _modules(gm) if id(m) not in internal]
        self.gm = weakref.ref(gm)
        self.baked = [*shared.parameters()]
        # Empty dicts are skipped: what a forward reads is already there (a replacement shows).
        self.dicts = [d for m in modules for d in (m._parameters, m._buffers, m._modules) if d]

    def key(self) -> tuple | None:
        try:
            versions = tuple([(t.data_ptr(), t._version) for t in self.baked])
        except RuntimeError:  # inference tensors have no version counter
            return None
        return versions, tuple([id(v) for d in self.dicts for v in d.values()])


_RUNNERS = RUNNERS  # banks' module -> (watch, key, runner)


def _runner(gm: fx.GraphModule) -> nn.Module | None:
    if not _eligible(gm):
        return None
    shared = getattr(gm, _SHARED)
    entry = _RUNNERS.get(shared)
    if entry is not None and entry[0].gm() is gm and entry[0].key() == entry[1]:
        return entry[2]
    watch = _Watch(gm)
    key = watch.key()
    if key is None:
        return None
    runner = _build_runner(gm)  # None when the model was edited since compile: the graph runs
    _RUNNERS[shared] = (watch, key, runner)
    return runner


def forget_runner(shared: nn.Module) -> None:
    """Drop the runner of the model whose banks ``shared`` holds (it holds the cached weights)."""
    _RUNNERS.pop(shared, None)


def _build_runner(gm: fx.GraphModule) -> nn.Module | None:
    root = gm.__dict__[ROOT_KEY].module
    shared = getattr(gm, _SHARED)
    prefix = "model." if getattr(gm, "model", None) is root else ""
    if not _same_leaves(gm, root, prefix):
        return None
    # Share every tensor of the compiled model (no copies): only the module objects are new.
    memo: dict[int, Any] = {id(shared): shared}
    memo.update({id(t): t for t in [*gm.parameters(), *gm.buffers()]})
    memo.update({id(t): t for t in [*root.parameters(), *root.buffers()]})
    runner = copy.deepcopy(root, memo)
    _bind_current_tensors(gm, runner, prefix)
    weights: dict[int, torch.Tensor] = {}
    for module in runner.modules():
        if isinstance(module, GeneratedParameters) and module.__dict__.get(SHARED_ATTR) is shared:
            for name, index in module.__dict__.get(INDEX_ATTR, {}).items():
                if index not in weights:
                    weights[index] = shared.generate(index)  # cached: eval without grad
                module._parameters[name] = weights[index]
    for name, module in gm.named_modules():  # a traced root's containers do not follow gm.eval()
        if name.startswith(prefix) and (found := _find(runner, name[len(prefix) :])) is not None:
            found.training = module.training
    return runner


def _find(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _bind_current_tensors(gm: fx.GraphModule, runner: nn.Module, prefix: str) -> None:
    # The compiled model owns the live tensors (``.to()`` replaces them in its own containers).
    for name, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        if name.startswith(_SHARED + ".") or not name.startswith(prefix):
            continue
        path, _, leaf = name[len(prefix) :].rpartition(".")
        owner = _find(runner, path)
        if owner is None:
            continue
        if leaf in owner._parameters:
            owner._parameters[leaf] = tensor
        elif leaf in owner._buffers:
            owner._buffers[leaf] = tensor


def install_fast_eval(gm: fx.GraphModule) -> None:
    """Route ``gm``'s calls in eval without gradients to its dense runner (see the module doc)."""
    cls = type(gm)
    if not isinstance(cls.__dict__.get("_wrapped_call"), _FastEvalCall):
        cls._wrapped_call = _FastEvalCall(cls._wrapped_call)
    gm.meta[CODE_KEY] = gm.__dict__.get("_code")  # the graph the runner stands for
    if install_fast_eval not in getattr(gm, "_deepcopy_hooks", []):
        gm._register_deepcopy_hook(install_fast_eval)  # a deepcopy builds a new class
    forget_runner(getattr(gm, _SHARED))
