"""npas_fx: compile any PyTorch model to an exact trainable-parameter budget.

Example:
    >>> import torch, npas_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    >>> gm = npas_fx.compile(model, 0.25)
    >>> npas_fx.count_parameters(gm), npas_fx.plan_of(gm).budget
    (528, 528)
"""

from . import opaque_kernels, search  # noqa: F401 - registering the custom ops and the strategies "ssn", "swn"
from .budget import GeneratorConfig
from .compiler import compile, count_parameters, plan_of
from .draw import draw_plan
from .ensemble import SharedEnsemble, compile_ensemble
from .materialize import materialize
from .plan import Plan
from .recompute import recompute_enabled, set_recompute
from .runtime import cached, clear_cache
from .saving import load, save
from .strategies import STRATEGIES, register_strategy

__all__ = [
    "compile",
    "compile_ensemble",
    "SharedEnsemble",
    "count_parameters",
    "plan_of",
    "Plan",
    "GeneratorConfig",
    "STRATEGIES",
    "register_strategy",
    "draw_plan",
    "materialize",
    "cached",
    "set_recompute",
    "recompute_enabled",
    "clear_cache",
    "save",
    "load",
]
__version__ = "0.1.0"
