"""torch.fx passes used by npas_fx, free of NPAS policy.

- :mod:`.trace` — trace a module as deep as torch.fx can; an untraceable root runs as one leaf.
- :mod:`.find_opaque` — analysis: which modules torch.fx cannot trace (or would freeze), and why.
- :mod:`.run_example` — run a module once without changing it; name the submodule that fails.
- :mod:`.collect_params` — analysis: every trainable parameter, its aliases and where it is read.
- :mod:`.insert_generators` — rewrite: parameter reads become generator calls.

Analysis passes never edit a graph; the rewrite pass ends with ``graph.lint()`` and ``recompile()``.
"""

from .collect_params import ParamInfo, collect_params
from .find_opaque import OpaqueSearch, find_opaque
from .insert_generators import GeneratorCall, insert_generators
from .run_example import ModuleRunError, run_example
from .trace import TraceResult, trace

__all__ = [
    "ParamInfo",
    "collect_params",
    "GeneratorCall",
    "insert_generators",
    "TraceResult",
    "trace",
    "OpaqueSearch",
    "find_opaque",
    "ModuleRunError",
    "run_example",
]
