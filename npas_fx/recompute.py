"""Regenerate generated weights in backward instead of keeping them (``compile(..., recompute=True)``).

A compiled model's trainable state follows the budget, but autograd would keep every generated
weight from forward to backward: the op that reads it (``F.linear``, a convolution, attention)
saves it to compute its input's gradient. At a small budget those saved weights are most of the
training memory. With recompute on, a saved tensor that is (a view of) a generated weight is
replaced by a small token, and the weight is made again from the banks when backward needs it:

* every generator call inside the compiled forward is recorded (a forward hook on the generator):
  its output's storage (weakly), the generator, its input tensors and their version counters;
* around the compiled forward (a pre-hook and an always-called hook on the GraphModule),
  ``torch.autograd.graph.saved_tensors_hooks`` packs a saved tensor whose storage is a recorded
  weight's into a :class:`_Token` (recipe + view geometry) and unpacks it by running the
  generator again (gradient mode as backward has it: a ``create_graph`` backward gets a
  differentiable weight), then taking the same view;
* if a bank or generator parameter changed in place between forward and backward (an optimizer
  step before ``backward``), the regenerated weight would differ: unpacking raises instead.

Weights that are views of a bank (a slice generator at gain 1) cost nothing to keep and are not
recorded. What the generators save for their own backward is small (bank views, coefficients, one
index per hashed block; see :mod:`npas_fx.kernels`), so what autograd keeps follows the budget.
Under ``torch.compile`` the hooks do nothing: AOTAutograd's partitioner decides what to save.
Activation checkpointing composes: a checkpointed region's own hooks are innermost, so it saves
nothing there and recomputes (weights included, through the layers' properties) as without npas_fx.

Example:
    >>> import torch, npas_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))
    >>> gm = npas_fx.compile(model, 0.1, recompute=True)
    >>> saved = []
    >>> with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
    ...     loss = gm(torch.randn(2, 64)).square().sum()
    >>> recompute_enabled(gm), max(saved) < 64 * 64  # no 64x64 weight kept for backward
    (True, True)
    >>> loss.backward()
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["set_recompute", "recompute_enabled", "RecomputeError", "AUTO_MIN_NUMEL"]

# compile's default (``recompute=None`` below the model's size) regenerates only weights of at least
# this many values (1 MiB in float32). Below it, regenerating costs mostly per-call overhead (a
# 100K-value `signed` weight: 11x its clone forward, benchmarks/generators.py; the CNN step of
# benchmarks/overhead.py at 0.1: 1.26x with recompute, 1.08x without) while keeping it costs under
# 1 MiB (that CNN's step peak: 0.78x -> 0.80x, benchmarks/memory.py). README, "Training-step overhead".
AUTO_MIN_NUMEL = 1 << 18
_MIN_NUMEL_ATTR = "_npas_recompute_min_numel"  # on the banks' module: survives deepcopy and pickling


class RecomputeError(RuntimeError):
    """A generated weight cannot be remade in backward: its inputs changed since the forward."""


# ---- what one generated weight is made from -----------------------------------------------------
class _Recipe:
    """Generator, inputs and their versions, and the output's layout: enough to make it again."""

    __slots__ = ("label", "generator", "inputs", "versions", "version", "dtype", "size", "stride", "offset", "last")

    def __init__(self, label: str, generator: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.label = label
        self.generator = generator
        self.inputs = inputs
        self.versions = _versions(generator, inputs)
        self.version = output._version  # a weight edited in place after generation is not what we would remake
        self.dtype = output.dtype
        self.size, self.stride, self.offset = output.size(), output.stride(), output.storage_offset()
        self.last: weakref.ref | None = None  # the last regenerated weight, reused while alive

    def weight(self) -> Tensor:
        now = _versions(self.generator, self.inputs)
        if now != self.versions:
            raise RecomputeError(
                f"npas_fx recompute: {self.label}'s weight is regenerated in backward, but a bank or generator "
                f"parameter it is made from changed in place since the forward (versions {self.versions} -> {now}), "
                "e.g. optimizer.step() or an in-place edit between forward and backward. Call backward before "
                "changing the banks, or compile with recompute=False to keep the generated weights instead."
            )
        last = self.last() if self.last is not None else None
        if last is not None and torch.is_grad_enabled() == last.requires_grad:
            return last
        made = self.generator.forward(*self.inputs)  # not __call__: no cache, no recording
        if made.size() != self.size or made.stride() != self.stride:
            raise RuntimeError(f"npas_fx bug: {self.label} regenerated with another layout than in forward.")
        self.last = weakref.ref(made)
        return made


def _own_tensors(generator: nn.Module) -> tuple[Tensor, ...]:
    """The generator's parameters and buffers (its own dicts when it has no submodules: the module
    iterators cost more than the rest of a small generator's bookkeeping)."""
    if generator._modules:
        return (*generator.parameters(), *generator.buffers())
    return tuple(t for t in (*generator._parameters.values(), *generator._buffers.values()) if t is not None)


def _versions(generator: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[int, ...]:
    return tuple(t._version for t in (*inputs, *_own_tensors(generator)))


class _Token:
    """What autograd keeps instead of (a view of) a generated weight."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, tensor: Tensor) -> None:
        self.recipe = recipe
        self.size, self.stride, self.offset = tensor.size(), tensor.stride(), tensor.storage_offset()

    def unpack(self) -> Tensor:
        made = self.recipe.weight()
        if (self.size, self.stride, self.offset) == (made.size(), made.stride(), made.storage_offset()):
            return made
        return made.as_strided(self.size, self.stride, made.storage_offset() + self.offset - self.recipe.offset)


# ---- per-thread state of the running compiled forward(s) ----------------------------------------
class _State(threading.local):
    def __init__(self) -> None:
        self.depth = 0  # nested compiled forwards share one registry and one hooks context
        self.weights: dict[StorageWeakRef, _Recipe] = {}
        self.hooks: Any = None
        self.outer: tuple[Any, Any] | None = None  # saved-tensor hooks active around the forward


_STATE = _State()
# The (pack, unpack) pair innermost before ours (torch's own AOTAutograd reads it the same way).
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda ignore_tracing: None)


class _Delegated:
    """A tensor packed by the saved-tensor hooks around the compiled forward (e.g. ``save_on_cpu``)."""

    __slots__ = ("unpack", "packed")

    def __init__(self, unpack: Any, packed: Any) -> None:
        self.unpack, self.packed = unpack, packed


def _pack(tensor: Tensor) -> Any:
    recipe = None
    if _STATE.weights:
        try:
            recipe = _STATE.weights.get(StorageWeakRef(tensor.untyped_storage()))
        except (RuntimeError, NotImplementedError, TypeError):  # no plain storage (sparse, subclasses)
            recipe = None
    if recipe is not None and tensor.dtype == recipe.dtype and tensor._version == recipe.version:
        return _Token(recipe, tensor)
    outer = _STATE.outer  # everything else goes to the hooks that would have seen it without us
    return tensor if outer is None else _Delegated(outer[1], outer[0](tensor))


def _unpack(packed: Any) -> Any:
    if isinstance(packed, _Token):
        return packed.unpack()
    return packed.unpack(packed.packed) if isinstance(packed, _Delegated) else packed


def _record(label: str, generator: nn.Module, inputs: tuple, output: Any, *, min_numel: int = 0) -> None:
    """Forward hook of a generator: remember how its output was made (inside a compiled forward)."""
    if torch.compiler.is_compiling() or not _STATE.depth or not torch.is_grad_enabled():
        return
    if not isinstance(output, Tensor) or output.is_inference() or output.numel() < min_numel:
        return
    try:
        storage = StorageWeakRef(output.untyped_storage())
        sources = (*inputs, *_own_tensors(generator))
        if any(isinstance(t, Tensor) and StorageWeakRef(t.untyped_storage()) == storage for t in sources):
            return  # a view of a bank: keeping it costs nothing
    except (RuntimeError, NotImplementedError, TypeError):  # no plain storage: leave it to autograd
        return
    _STATE.weights[storage] = _Recipe(label, generator, tuple(inputs), output)


def _enter(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of the compiled model: pack saved generated weights until it returns."""
    if torch.compiler.is_compiling():
        return
    state = _STATE
    if state.depth == 0:
        state.weights, state.outer = {}, _top_hooks(True)
        hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
        try:
            hooks.__enter__()
        except RuntimeError:  # saved-tensor hooks are disabled here (disable_saved_tensors_hooks)
            hooks = None
        state.hooks = hooks
    state.depth += 1


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (always called, errors too): leave what :func:`_enter` entered."""
    if torch.compiler.is_compiling():
        return
    state = _STATE
    if state.depth == 0:  # the pre-hook did not run (an earlier pre-hook raised)
        return
    state.depth -= 1
    if state.depth == 0:
        hooks, state.hooks, state.weights, state.outer = state.hooks, None, {}, None  # tokens keep their recipes
        if hooks is not None:
            hooks.__exit__(None, None, None)


# ---- switching it on and off --------------------------------------------------------------------
# Not user hooks: they do nothing without gradients, so they never keep a compiled model in eval
# from its fast runner (npas_fx.inference.INTERNAL_HOOK).
_enter._npas_internal = _exit._npas_internal = True  # type: ignore[attr-defined]


def _remove(hooks: dict, predicate: Any, always: dict | None = None) -> None:
    for key in [k for k, h in hooks.items() if predicate(h)]:
        del hooks[key]
        if always is not None:
            always.pop(key, None)


def _is_record(hook: Any) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _record


def _shared(gm: nn.Module) -> nn.Module:
    from .build import PLAN_KEY, SHARED_NAME  # late: build imports this module

    shared = getattr(gm, SHARED_NAME, None)
    if getattr(shared, PLAN_KEY, None) is None:  # the banks' module keeps the plan through copies and pickling
        raise ValueError(f"{type(gm).__name__} is not a model compiled by npas_fx.compile (it has no plan or banks).")
    return shared


def _generators(gm: nn.Module) -> list[tuple[str, nn.Module]]:
    from .build import PLAN_KEY

    shared = _shared(gm)
    plan = getattr(shared, PLAN_KEY)
    return [(f"layer {i} ({layer.name!r})", shared.generators[f"l{i}"]) for i, layer in enumerate(plan.layers)]


def set_recompute(gm: nn.Module, enabled: bool = True, *, min_numel: int = 0) -> nn.Module:
    """Turn recomputation of generated weights in backward on or off for compiled model ``gm``.

    Installs (or removes) a forward pre-hook and an always-called forward hook on ``gm`` and a
    forward hook on each generator. ``copy.deepcopy`` and pickling of a GraphModule drop its own
    forward hooks, so they are installed again on the copy (a deepcopy hook; a ``__reduce__`` on
    the class torch.fx makes for this one GraphModule). Weights of fewer than ``min_numel`` values
    are kept as without recompute (compile's default uses :data:`AUTO_MIN_NUMEL`). Returns ``gm``.

    Example:
        >>> import torch, npas_fx
        >>> gm = npas_fx.compile(torch.nn.Linear(8, 8), 0.5, recompute=False)
        >>> recompute_enabled(set_recompute(gm)), recompute_enabled(set_recompute(gm, False))
        (True, False)
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` should be True or False, got {type(enabled).__name__} {enabled!r}.")
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise TypeError(f"`min_numel` should be a non-negative int, got {type(min_numel).__name__} {min_numel!r}.")
    generators = _generators(gm)
    setattr(_shared(gm), _MIN_NUMEL_ATTR, min_numel if enabled else 0)
    _remove(gm._forward_pre_hooks, lambda h: h is _enter)
    _remove(gm._forward_hooks, lambda h: h is _exit, gm._forward_hooks_always_called)
    for _, generator in generators:
        _remove(generator._forward_hooks, _is_record)
    copy_hooks = gm.__dict__.get("_deepcopy_hooks")
    if copy_hooks is not None:
        copy_hooks[:] = [h for h in copy_hooks if h is not _copied]
    if _own_class(gm) and "__reduce__" in vars(type(gm)):
        del type(gm).__reduce__
    if enabled:
        gm.register_forward_pre_hook(_enter)
        gm.register_forward_hook(_exit, always_call=True)
        for label, generator in generators:
            generator.register_forward_hook(functools.partial(_record, label, min_numel=min_numel))
        if copy_hooks is not None:
            copy_hooks.append(_copied)
        if _own_class(gm):
            type(gm).__reduce__ = _reduce
    return gm


def _own_class(gm: nn.Module) -> bool:
    """Whether ``gm``'s class is the one torch.fx made for this GraphModule alone (safe to edit)."""
    return isinstance(gm, fx.GraphModule) and type(gm).__qualname__.endswith("GraphModuleImpl")


def _min_numel(gm: nn.Module) -> int:
    return getattr(_shared(gm), _MIN_NUMEL_ATTR, 0)


def _copied(copy: nn.Module) -> None:
    set_recompute(copy, True, min_numel=_min_numel(copy))


def _reduce(gm: fx.GraphModule) -> tuple:
    rebuild, args = fx.GraphModule.__reduce__(gm)
    return (_rebuilt, (rebuild, args))


def _rebuilt(rebuild: Any, args: tuple) -> nn.Module:
    gm = rebuild(*args)
    return set_recompute(gm, True, min_numel=_min_numel(gm))


def recompute_enabled(gm: nn.Module) -> bool:
    """Whether ``gm`` regenerates its generated weights in backward (see :func:`set_recompute`)."""
    return any(h is _enter for h in gm._forward_pre_hooks.values())
