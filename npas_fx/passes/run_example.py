"""Run a module once on example inputs without changing it, and name the module that fails.

Checks need to *run* models (does the traced graph agree with the model? does the compiled model
run at all?) without leaving a trace: :func:`run_example` runs under ``no_grad``, in the mode
asked for, with the RNG forked, and restores every module's mode and every buffer (BatchNorm
running statistics, counters) afterwards. When the run fails, :class:`ModuleRunError` names the
innermost module whose ``forward`` was running, so an error can say *where* a model broke.

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> out = run_example(bn, (torch.randn(4, 3),), training=True)
    >>> float(bn.running_mean.abs().sum()), bn.training  # statistics and mode are restored
    (0.0, True)
    >>> class Broken(torch.nn.Module):
    ...     def forward(self, x):
    ...         raise ValueError("no")
    >>> try:
    ...     run_example(torch.nn.Sequential(torch.nn.Linear(3, 3), Broken()), (torch.ones(1, 3),))
    ... except ModuleRunError as error:
    ...     print(error.path, error.module_type)
    1 Broken
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

__all__ = ["ModuleRunError", "run_example", "call_example", "same_outputs"]


class ModuleRunError(RuntimeError):
    """Running a module failed inside submodule ``path`` (``""``: the module's own forward)."""

    def __init__(self, path: str, module_type: str, error: BaseException) -> None:
        where = f"module {path!r} ({module_type})" if path else f"the forward of {module_type}"
        super().__init__(f"{where} raised {type(error).__name__}: {error}")
        self.path = path
        self.module_type = module_type
        self.error = error


def call_example(module: Callable[..., Any], example_inputs: tuple | Mapping[str, Any]) -> Any:
    """``module(*example_inputs)`` for a tuple, ``module(**example_inputs)`` for a mapping."""
    if isinstance(example_inputs, Mapping):
        return module(**example_inputs)
    return module(*example_inputs)


def run_example(module: nn.Module, example_inputs: tuple | Mapping[str, Any], training: bool | None = False) -> Any:
    """Output of ``module`` on ``example_inputs``; the module is left exactly as it was.

    ``training``: the mode to run in (``None``: as it is). Raises :class:`ModuleRunError`.
    """
    modules = dict(module.named_modules())
    modes = {m: m.training for m in modules.values()}
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    stack: list[str] = []
    path_of = {id(m): name for name, m in modules.items()}

    def push(m: nn.Module, *_: Any) -> None:
        stack.append(path_of[id(m)])

    def pop(m: nn.Module, *_: Any) -> None:
        # Pop down to this module: entries above it belong to calls that raised and were caught.
        name = path_of[id(m)]
        while stack and stack.pop() != name:
            pass

    handles = [m.register_forward_pre_hook(push) for m in modules.values()]
    handles += [m.register_forward_hook(pop) for m in modules.values()]
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        if training is not None:
            module.train(training)
        # A GraphModule's __call__ prints a failure of its generated code to stderr, importing
        # torch._dynamo (seconds) to format it; the error we raise says it all, so skip it.
        runnable = module.forward if isinstance(module, fx.GraphModule) else module
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(0)
            return call_example(runnable, example_inputs)
    except Exception as error:
        path = stack[-1] if stack else ""
        raise ModuleRunError(path, type(modules[path]).__name__, error) from error
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def same_outputs(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """True when ``a`` and ``b`` have the same structure (types, keys) and equal values."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if type(x) is not type(y):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            close = torch.allclose(x, y, rtol, atol, equal_nan=True) if x.is_floating_point() else torch.equal(x, y)
            if not close:
                return False
        elif isinstance(x, (bool, int, float, str, type(None))) and x != y:
            return False  # other objects (caches, configs) are compared by type only
    return True
