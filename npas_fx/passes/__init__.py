"""torch.fx passes used by npas_fx, free of NPAS policy.

- :mod:`.trace` — trace a module as deep as torch.fx can (analysis of what is traceable).
- :mod:`.collect_params` — analysis: every trainable parameter, its aliases and where it is read.
- :mod:`.insert_generators` — rewrite: parameter reads become generator calls.

Analysis passes never edit a graph; the rewrite pass ends with ``graph.lint()`` and ``recompile()``.
"""

from .collect_params import ParamInfo, collect_params
from .insert_generators import GeneratorCall, insert_generators
from .trace import TraceResult, trace

__all__ = ["ParamInfo", "collect_params", "GeneratorCall", "insert_generators", "TraceResult", "trace"]
