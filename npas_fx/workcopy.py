"""The working copy :func:`npas_fx.compile` traces and rewrites, without copying the weights it replaces.

``compile`` never edits the user's model, so it works on a copy; but most of a model's bytes are
weights that generators are about to replace, and copying them only to drop them doubled the peak
memory of a compile. :func:`working_copy` deep-copies the model except its trainable parameters of
two or more dimensions (the weights generators may replace): the copy holds new ``Parameter``
objects that *share storage* with the originals (tied weights stay one object). Reading them
(planning, gain calibration, ``init="fit"``, the trace check) costs nothing; writing them would
write the user's model, so:

* :meth:`WorkingCopy.read_only` wraps the runs of user code on the copy (the trace check): an
  in-place write to a shared weight (``w.mul_``, ``w.data.copy_``, ``out=``) raises
  :class:`SharedWeightWrite` *before* it happens; ``compile`` then starts again from a full copy;
* :meth:`WorkingCopy.release` gives every shared weight still in the compiled module (kept dense,
  unused) its own storage, so the result shares nothing with the user's model.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 3)
    >>> work = working_copy(model)
    >>> work.module.weight.data_ptr() == model.weight.data_ptr(), work.module.bias is model.bias
    (True, False)
    >>> with work.read_only():
    ...     try:
    ...         _ = work.module.weight.data.mul_(2)
    ...     except SharedWeightWrite as error:
    ...         print("refused")
    refused
    >>> work.release(work.module)
    >>> work.module.weight.data_ptr() == model.weight.data_ptr()
    False
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["WorkingCopy", "SharedWeightWrite", "working_copy", "full_copy"]


class SharedWeightWrite(BaseException):  # noqa: N818 - a signal, not an error users see
    """User code tried to write a weight the working copy shares with the user's model.

    A ``BaseException``, so that ``except Exception`` in model code or in the trace check cannot
    swallow it: ``compile`` catches it and starts again from a full copy.
    """


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _ReadOnly(TorchDispatchMode):
    """Refuse, before it runs, any operator that writes into one of ``storages``."""

    def __init__(self, storages: frozenset[int]) -> None:
        super().__init__()
        self.storages = storages

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            for position, argument in enumerate(func._schema.arguments):
                if argument.alias_info is None or not argument.alias_info.is_write:
                    continue
                value = args[position] if position < len(args) else kwargs.get(argument.name)
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(t, Tensor) and t.device.type != "meta" and _storage(t) in self.storages:
                        raise SharedWeightWrite(f"{func} writes a weight shared with the input model")
        return func(*args, **kwargs)


def _shareable(p: nn.Parameter) -> bool:
    # Plain Parameters only: a subclass may carry state its own __deepcopy__ must copy.
    return type(p) is nn.Parameter and type(p.data) is Tensor and p.requires_grad and p.dim() >= 2 and p.numel() > 0


class WorkingCopy:
    """A copy of a model (``module``) sharing the storage of the weights generators may replace."""

    def __init__(self, module: nn.Module, shared: frozenset[int]) -> None:
        self.module = module
        self.shared = shared  # storage addresses of the user's weights the copy reads

    @contextlib.contextmanager
    def read_only(self) -> Iterator[None]:
        """Run user code on the copy: a write to a shared weight raises :class:`SharedWeightWrite`."""
        if not self.shared:
            yield
            return
        with _ReadOnly(self.shared):
            yield

    def release(self, *modules: nn.Module | None) -> None:
        """Give each parameter of ``modules`` that still shares the user's storage a copy of its own."""
        seen: set[int] = set()
        for module in modules:
            for p in module.parameters() if module is not None else ():
                if id(p) not in seen and p.device.type != "meta" and _storage(p) in self.shared:
                    seen.add(id(p))
                    p.data = p.data.clone(memory_format=torch.preserve_format)


def working_copy(model: nn.Module) -> WorkingCopy:
    """Deep copy of ``model`` whose trainable weights (2+ dims) share the original's storage."""
    memo: dict[int, Any] = {}
    shared: set[int] = set()
    for p in model.parameters():  # each tied parameter once
        if _shareable(p):
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=True)
            shared.add(_storage(p))
    module = copy.deepcopy(model, memo)
    return WorkingCopy(module, frozenset(shared))


def full_copy(model: nn.Module) -> WorkingCopy:
    """A plain deep copy (nothing shared): the fallback when user code writes its weights."""
    return WorkingCopy(copy.deepcopy(model), frozenset())
