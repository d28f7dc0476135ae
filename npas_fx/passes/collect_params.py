"""Analysis pass: every trainable parameter of a traced module, its aliases, and where it is read.

A parameter reachable under several names (weight tying) is one :class:`ParamInfo` with all its
names in ``aliases``. A read is either a ``get_attr`` node of the parameter itself or a
``call_module`` node of a leaf module that owns it (directly or through its children, as
``MultiheadAttention`` owns ``out_proj.weight``). The pass records, it does not edit.

Example:
    >>> import torch
    >>> from npas_fx.passes.trace import trace
    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(3, 2))).graph_module
    >>> [(p.name, p.shape, p.reads) for p in collect_params(gm)]
    [('0.weight', (2, 3), ('_0',)), ('0.bias', (2,), ('_0',))]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["ParamInfo", "collect_params"]


@dataclass(frozen=True)
class ParamInfo:
    """One distinct trainable parameter.

    Attributes:
        name: the first qualified name (``named_parameters`` order).
        aliases: every qualified name of the same Parameter object, ``name`` first.
        shape, dtype, device: of the parameter.
        module: qualified path of the module that owns ``name`` directly.
        module_type: class name of that module.
        reads: names of the graph nodes that read it (``get_attr`` or leaf ``call_module``).
    """

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    module: str
    module_type: str
    reads: tuple[str, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def collect_params(gm: fx.GraphModule) -> list[ParamInfo]:
    """List the trainable parameters of ``gm`` with the graph nodes that read them."""
    aliases: dict[int, list[str]] = {}
    objects: dict[int, torch.nn.Parameter] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            aliases.setdefault(id(param), []).append(name)
            objects[id(param)] = param
    readers: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            readers.setdefault(str(node.target), []).append(node.name)
    result = []
    for key, names in aliases.items():
        reads: list[str] = []
        for alias in names:
            # A read of the parameter itself, or a call of any module on its path (a leaf that
            # owns it through children, e.g. MultiheadAttention -> out_proj.weight).
            parts = alias.split(".")
            for depth in range(len(parts), -1, -1):
                reads += readers.get(".".join(parts[:depth]), [])
        owner = _owner(names[0])
        param = objects[key]
        result.append(
            ParamInfo(
                name=names[0],
                aliases=tuple(names),
                shape=tuple(param.shape),
                dtype=param.dtype,
                device=param.device,
                module=owner,
                module_type=type(gm.get_submodule(owner)).__name__,
                reads=tuple(dict.fromkeys(reads)),
            )
        )
    return result
