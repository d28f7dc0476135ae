"""Generated weights outside the compiled forward: attribute reads, binding, and caching.

A compiled model's dense weights are gone (its trainable parameters are the banks), yet code
that reads a layer's weight directly -- Hugging Face ``generate``, activation checkpointing that
recomputes a block in backward, peft wrapping a Linear, a user printing ``layer.weight`` -- must
see the current generated tensor, never ``None``. So every module that owned a generated
parameter becomes an instance of a subclass of its own class (same name, ``isinstance`` holds)
in which that attribute is a property:

* while the compiled forward binds the layer's generated tensor (``call_with_parameters``),
  the property returns it, so the traced ``bank -> generator -> weight`` graph is what runs;
* otherwise it generates the weight from the banks (differentiable, so gradients reach them).

This is ``torch.nn.utils.parametrize`` in spirit, but without an ``original`` tensor per weight
(there is none: that is the point of sharing) and picklable (``torch.save`` of a parametrized
module is refused). Generation is cached (:func:`generate_cached`): in ``eval()`` under
``no_grad``/``inference_mode`` each weight is made once and reused while the version counters
of its inputs are unchanged; ``with cached(gm):`` does the same with gradients enabled.

Example:
    >>> import torch, npas_fx
    >>> gm = npas_fx.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), 0.5)
    >>> w = gm.get_submodule("0").weight            # generated from the banks, not None
    >>> w.shape, w.requires_grad, type(gm.get_submodule("0")).__name__
    (torch.Size([4, 4]), True, 'Linear')
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .passes.insert_generators import forget_flat_weights

__all__ = [
    "GeneratedParameters",
    "generated_class",
    "attach_generated",
    "generate_cached",
    "cached",
    "uncached",
    "clear_cache",
    "is_generated",
]

SHARED_ATTR = "_npas_shared"  # on an owner: the SharedParameters its weights come from
INDEX_ATTR = "_npas_index"  # on an owner: attribute name -> generator index
CACHE_ATTR = "_npas_cache"  # on a generator: (key, tensor) of the eval cache


# ---- owners whose weights are generated ---------------------------------------------------------
class GeneratedParameters:
    """Mixin of the generated subclasses (see the module docstring); holds no state of its own."""

    _npas_base: type
    _npas_names: tuple[str, ...]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A generated class is made at run time and cannot be found by name: rebuild it from the
        # base class and the names, then let the usual state restore the instance.
        reduced = super().__reduce_ex__(protocol)
        return (_new_instance, (self._npas_base, self._npas_names), *reduced[2:])


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}
_LOCK = threading.Lock()


def _generated_property(name: str) -> property:
    def read(self: nn.Module) -> Tensor | None:
        bound = self._parameters.get(name)
        if bound is not None:  # bound by the compiled forward, or set by the user
            return bound
        index = self.__dict__.get(INDEX_ATTR, {}).get(name)
        shared = self.__dict__.get(SHARED_ATTR)
        if index is None or shared is None:
            return None
        if torch.compiler.is_compiling():
            return shared.generate(index)
        # What the generator saves for its own backward is its business: hidden from outer
        # saved-tensor hooks, an activation checkpoint that recomputes this layer (where the weight
        # was bound in forward and is generated now) sees the same saved tensors both times.
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            return shared.generate(index)

    return property(read, doc=f"``{name}``, generated from npas_fx banks on every read (cached in eval).")


def _keep(tensor: Tensor) -> Tensor:
    return tensor


def generated_class(base: type, names: tuple[str, ...]) -> type:
    """The subclass of ``base`` whose attributes ``names`` are generated (made once per pair).

    Example:
        >>> cls = generated_class(torch.nn.Linear, ("weight",))
        >>> issubclass(cls, torch.nn.Linear), cls.__name__, generated_class(torch.nn.Linear, ("weight",)) is cls
        (True, 'Linear', True)
    """
    if issubclass(base, GeneratedParameters):
        base, names = base._npas_base, tuple(sorted({*base._npas_names, *names}))
    key = (base, tuple(sorted(names)))
    with _LOCK:
        if key not in _CLASSES:
            namespace: dict[str, Any] = {name: _generated_property(name) for name in key[1]}
            if callable(getattr(base, "save_pretrained", None)):
                namespace["save_pretrained"] = _save_pretrained
            namespace.update(_npas_base=base, _npas_names=key[1], __module__=base.__module__)
            namespace["__qualname__"] = base.__qualname__
            _CLASSES[key] = type(base.__name__, (GeneratedParameters, base), namespace)
    return _CLASSES[key]


def _save_pretrained(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    """Save the dense weights this compiled model generates (``npas_fx.materialize``), so that
    ``from_pretrained`` of the original class loads them; ``npas_fx.save`` keeps the banks instead."""
    from .materialize import materialize  # materialize builds on this module

    return materialize(self).save_pretrained(save_directory, *args, **kwargs)


def _new_instance(base: type, names: tuple[str, ...]) -> nn.Module:
    cls = generated_class(base, names)
    return cls.__new__(cls)


def is_generated(module: nn.Module) -> bool:
    """Whether ``module`` reads some of its parameters from npas_fx banks."""
    return isinstance(module, GeneratedParameters)


def attach_generated(owner: nn.Module, name: str, shared: nn.Module, index: int) -> None:
    """Make ``owner.<name>`` read generator ``index`` of ``shared``; drops the dense parameter."""
    if owner._parameters.get(name) is not None or name not in owner._parameters:
        owner._parameters[name] = None  # the slot stays: binding and functional_call fill it
    if not isinstance(owner, GeneratedParameters) or name not in owner._npas_names:
        owner.__class__ = generated_class(type(owner), (name,))
    # Plain attributes (not submodules): the banks belong to the compiled model, not to every owner.
    owner.__dict__[SHARED_ATTR] = shared
    owner.__dict__.setdefault(INDEX_ATTR, {})[name] = index
    forget_flat_weights(owner, (name,))


# ---- caching ------------------------------------------------------------------------------------
class _ExplicitCache(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.tensors: dict[int, tuple[tuple, Tensor]] = {}
        self.off = 0  # inside uncached(): nothing is cached


_EXPLICIT = _ExplicitCache()


def _key(generator: nn.Module, inputs: tuple[Tensor, ...]) -> tuple | None:
    """What a generated weight depends on: each input's storage and version counter (a new
    dtype, device or shape means new storage; in-place writes move the version)."""
    try:
        key = [(t.data_ptr(), t._version) for t in inputs]
        key += [(p.data_ptr(), p._version) for p in generator._parameters.values() if p is not None]
    except RuntimeError:  # inference tensors have no version counter: never cache them
        return None
    return tuple(key)


def generate_cached(generator: nn.Module, inputs: tuple[Tensor, ...], compute: Any) -> Tensor:
    """``compute(*inputs)``, reused while nothing it depends on changed, when caching is on.

    Caching is on in ``eval()`` with gradients disabled (``no_grad``, ``inference_mode``), and
    inside :func:`cached`; never while ``torch.compile`` traces (the compiled graph decides).
    """
    if torch.compiler.is_compiling() or _EXPLICIT.off:
        return compute(*inputs)
    explicit = _EXPLICIT.depth > 0
    if not explicit and (generator.training or torch.is_grad_enabled()):
        return compute(*inputs)
    key = _key(generator, inputs)
    if key is None:
        return compute(*inputs)
    entry = _EXPLICIT.tensors.get(id(generator)) if explicit else generator.__dict__.get(CACHE_ATTR)
    if entry is not None and entry[0] == key:
        return entry[1]
    value = compute(*inputs)
    if explicit:
        _EXPLICIT.tensors[id(generator)] = (key, value)
    else:
        # A generator may return a strided view of its bank (tiles); reused many times, a dense
        # layout is worth one copy: matmuls read it at full speed.
        value = value.contiguous()
        generator.__dict__[CACHE_ATTR] = (key, value)
    return value


def explicit_cache_active() -> bool:
    """Whether this thread is inside :func:`cached`."""
    return _EXPLICIT.depth > 0


# The banks' module of a compiled model -> its fast-eval runner (see npas_fx.inference), which
# holds the cached weights too. Weak: a runner never keeps a model alive.
RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_cache(module: nn.Module) -> None:
    """Drop the eval-mode weights cached under ``module`` (they are rebuilt on demand)."""
    for sub in module.modules():
        sub.__dict__.pop(CACHE_ATTR, None)
        RUNNERS.pop(sub, None)


@contextlib.contextmanager
def cached(module: nn.Module | None = None) -> Iterator[None]:
    """Generate each weight once inside the block and reuse it, gradients enabled or not.

    For loops that run a compiled model many times at fixed banks (evaluation with gradients,
    several forwards before one backward). A bank changed in place inside the block is noticed
    (its version counter moves) and the weight regenerated. ``module`` is accepted for symmetry
    with ``torch.nn.utils.parametrize.cached`` and ignored: the cache is per thread.

    Example:
        >>> import torch, npas_fx
        >>> gm = npas_fx.compile(torch.nn.Linear(8, 8), 0.5)
        >>> with npas_fx.cached(gm):
        ...     a, b = gm(torch.ones(1, 8)), gm(torch.ones(1, 8))
        >>> torch.equal(a, b)
        True
    """
    _EXPLICIT.depth += 1
    try:
        yield
    finally:
        _EXPLICIT.depth -= 1
        if _EXPLICIT.depth == 0:
            _EXPLICIT.tensors.clear()


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """Cache no generated weight inside the block, even in ``eval()`` without grad (a run that must
    hold one weight at a time, such as the check ``npas_fx.compile`` runs on ``example_inputs``)."""
    _EXPLICIT.off += 1
    try:
        yield
    finally:
        _EXPLICIT.off -= 1


# ---- installing the runtime on a compiled model -------------------------------------------------
class RootRef:
    """Holds the traced model's original-class root without registering it as a submodule
    (its leaves are the GraphModule's; registering would list every parameter twice)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


ROOT_KEY = "npas_root"


def _owners(gm: nn.Module, root: nn.Module | None, prefix: str, alias: str) -> list[tuple[nn.Module, str]]:
    path, _, leaf = alias.rpartition(".")
    found = [] if not path else [gm.get_submodule(path)]  # the GraphModule itself reads via its graph
    if root is not None and (path + ".").startswith(prefix):
        try:
            found.append(root.get_submodule(path[len(prefix) :] if prefix else path))
        except AttributeError:
            pass
    unique = {id(m): m for m in found}
    return [(m, leaf) for m in unique.values()]


def attach_runtime(
    gm: nn.Module, shared: nn.Module, aliases: list[tuple[str, ...]], root: nn.Module | None, prefix: str
) -> None:
    """Give every owner of a generated parameter (``aliases[i]``: the names of generator ``i``'s
    parameter) a generated property, in ``gm`` and in the original-class ``root`` around its
    leaves; keep ``root`` reachable from ``gm`` for :func:`npas_fx.materialize`."""
    for index, names in enumerate(aliases):
        for alias in names:
            for owner, leaf in _owners(gm, root, prefix, alias):
                attach_generated(owner, leaf, shared, index)
    if root is None:
        return
    for module in root.modules():  # Hugging Face models: save_pretrained must not lose weights
        if callable(getattr(module, "save_pretrained", None)) and not isinstance(module, GeneratedParameters):
            module.__class__ = generated_class(type(module), ())
            module.__dict__[SHARED_ATTR] = shared
    ref = RootRef(root)
    gm.meta[ROOT_KEY] = ref  # what deepcopy keeps
    gm.__dict__[ROOT_KEY] = ref  # what pickling keeps
