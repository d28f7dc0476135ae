"""The sharing plan: which layers share which bank, how each weight is generated, where every
parameter of the budget went, and how the plan was found.

A :class:`Plan` is plain data: it serialises to JSON, prints as a table, and
``npas_fx.compile(model, plan=plan)`` re-applies it exactly (same layers, groups, bank sizes,
generators and gains) without searching again.

Example:
    >>> import torch, npas_fx
    >>> gm = npas_fx.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), 0.5)
    >>> plan = npas_fx.plan_of(gm)
    >>> npas_fx.Plan.from_json(plan.to_json()) == plan
    True
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .plan_checks import PlanError, check_plan, check_plan_dict

__all__ = ["LayerPlan", "GroupPlan", "KeptParam", "OpaqueModule", "Plan", "PLAN_FORMAT"]

PLAN_FORMAT = 1


@dataclass(frozen=True)
class LayerPlan:
    """One generated parameter (a tied parameter is one entry with several ``aliases``)."""

    name: str
    shape: tuple[int, ...]
    module: str
    module_type: str
    group: int
    generator: str
    templates: int = 0
    offset: int = 0
    gain: float = 1.0
    overhead: int = 0
    aliases: tuple[str, ...] = ()
    copied: bool = False
    grid: tuple[int, ...] = ()
    salt: int = 0
    block: tuple[int, ...] = ()  # superweight: the group's base SuperWeight shape
    coefficient_set: int = 0  # superweight: layers of a group with equal sets share coefficients
    chunk: int = 1  # hash: weights per hashed block (1 = per element, the format of older plans)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self, bank_size: int | None = None) -> str:
        """Short generator label, e.g. ``wavg K=4``, ``slice``, ``interpolate x3``, ``repeat x10``.

        ``bank_size`` (the group's) adds the expansion factor to ``repeat``, ``mask`` and ``hash``.
        """
        if self.generator in ("wavg", "emb"):
            return "slice" if self.templates <= 1 else f"{self.generator} K={self.templates}"
        if self.generator == "superweight" and self.block:
            rows, cols = (-(-self.shape[d] // self.block[d]) for d in (0, 1))
            return f"superweight {rows}x{cols} K={self.templates} c{self.coefficient_set}"
        if self.generator == "interpolate" and self.grid:
            return f"interpolate x{self.numel / (self.grid[0] * self.grid[1]):.3g}"
        if self.generator in ("repeat", "signed", "mask", "hash") and bank_size:
            return f"{self.generator} x{self.numel / bank_size:.3g}"
        return self.generator


@dataclass(frozen=True)
class GroupPlan:
    """One bank and the layers generated from it."""

    index: int
    layers: tuple[str, ...]
    bank_size: int
    overhead: int = 0


@dataclass(frozen=True)
class KeptParam:
    """A trainable parameter left dense, with the reason (``bias``, ``norm``, ``keep``, ``unused``)."""

    name: str
    numel: int
    reason: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpaqueModule:
    """A submodule torch.fx could not trace through; it runs as one leaf with generated params."""

    path: str
    reason: str


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _load(cls: type, data: dict, where: str) -> Any:
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: _as_tuples(v) for k, v in data.items() if k in names})
    except TypeError as error:  # a required field is missing
        raise PlanError(
            f"{where} is incomplete ({error}); the plan file is corrupted: re-plan with a budget."
        ) from None


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass
class Plan:
    """Everything needed to rebuild a compiled model, and the accounting that proves its budget.

    Attributes:
        strategy, seed: how the grouping was found.
        budget: the exact number of trainable parameters requested.
        original_params: trainable parameters of the input model (tied ones counted once).
        layers, groups, kept: generated parameters, banks, dense parameters.
        generator_config: the :class:`~npas_fx.budget.GeneratorConfig` as a dict.
        opaque: modules run as leaves because they could not be traced.
        provenance: strategy-specific record (scores, search steps, thresholds).
        traced: paths of the modules whose forward torch.fx traced through (``""``: the root).
    """

    strategy: str
    seed: int
    budget: int
    original_params: int
    layers: tuple[LayerPlan, ...]
    groups: tuple[GroupPlan, ...]
    kept: tuple[KeptParam, ...]
    generator_config: dict = field(default_factory=dict)
    opaque: tuple[OpaqueModule, ...] = ()
    provenance: dict = field(default_factory=dict)
    traced: tuple[str, ...] = ()
    format: int = PLAN_FORMAT

    def __post_init__(self) -> None:
        check_plan(self)  # every field named in the error; see npas_fx.plan_checks

    # ---- accounting -------------------------------------------------------------------------
    @property
    def bank_params(self) -> int:
        return sum(g.bank_size for g in self.groups)

    @property
    def overhead_params(self) -> int:
        return sum(layer.overhead for layer in self.layers) + sum(g.overhead for g in self.groups)

    @property
    def kept_params(self) -> int:
        return sum(k.numel for k in self.kept)

    @property
    def trainable_params(self) -> int:
        """Trainable parameters of the compiled model: banks + generator overhead + kept."""
        return self.bank_params + self.overhead_params + self.kept_params

    def accounting(self) -> dict[str, int]:
        """Where the budget went, e.g. ``{"requested": 100, "banks": 80, ...}``."""
        return {
            "requested": self.budget,
            "achieved": self.trainable_params,
            "banks": self.bank_params,
            "generator_overhead": self.overhead_params,
            "kept_dense": self.kept_params,
            "original": self.original_params,
        }

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name or name in layer.aliases:
                return layer
        raise KeyError(f"no generated parameter named {name!r}; generated: {[x.name for x in self.layers]}")

    def to_networkx(self) -> Any:
        """The plan as a ``networkx.DiGraph``, for your own analyses.

        Nodes: each group by its index (an ``int``: ``kind="group"``, ``bank_size``, ``overhead``),
        each generated layer by its name (``kind="layer"``, ``order`` in execution, ``shape``,
        ``numel``, ``group``, ``generator`` label, ``module``, ``aliases``, ``overhead``), and each
        dense parameter by its name (``kind="kept"``, ``numel``, ``reason``). Edges: group -> layer
        (``kind="generates"``); with ``provenance["similarity"]``, layer <-> layer
        (``kind="similarity"``, ``weight`` = score). ``graph.graph`` holds strategy, seed and
        :meth:`accounting`.

        Example:
            >>> import torch, npas_fx
            >>> gm = npas_fx.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), 0.5)
            >>> g = npas_fx.plan_of(gm).to_networkx()
            >>> sorted(g.successors(0)), sum(d.get("numel", 0) for n, d in g.nodes(data=True) if d["kind"] == "kept")
            (['0.weight', '1.weight'], 16)
        """
        import networkx as nx  # late: only this method needs it

        graph = nx.DiGraph(strategy=self.strategy, seed=self.seed, **self.accounting())
        for g in self.groups:
            graph.add_node(g.index, kind="group", label=f"g{g.index}", bank_size=g.bank_size, overhead=g.overhead)
        for order, x in enumerate(self.layers):
            attributes = {"order": order, "shape": tuple(x.shape), "numel": x.numel, "group": x.group}
            attributes.update(generator=x.describe(), module=x.module, module_type=x.module_type)
            graph.add_node(x.name, kind="layer", aliases=tuple(x.aliases), overhead=x.overhead, **attributes)
            graph.add_edge(x.group, x.name, kind="generates", generator=x.describe())
        for k in self.kept:
            graph.add_node(k.name, kind="kept", numel=k.numel, reason=k.reason, aliases=tuple(k.aliases))
        record = self.provenance.get("similarity") if isinstance(self.provenance, dict) else None
        if isinstance(record, dict) and "layers" in record and "matrix" in record:
            known = {a: x.name for x in self.layers for a in (x.name, *x.aliases)}
            names = [known.get(n) for n in record["layers"]]
            for i, a in enumerate(names):
                for j, b in enumerate(names):
                    score = record["matrix"][i][j]
                    if a is not None and b is not None and a != b and score is not None:  # None: other bins
                        graph.add_edge(a, b, kind="similarity", weight=float(score))
        return graph

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 1) -> str:
        """JSON text of the plan (strict JSON: a NaN in the provenance is written as null);
        also written to ``path`` when given."""
        text = json.dumps(_finite(self.to_dict()), indent=indent, sort_keys=False, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """A plan from :meth:`to_dict`'s output; checked completely (:mod:`npas_fx.plan_checks`)."""
        if isinstance(data, dict) and data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise ValueError(f"plan format {data.get('format')} is not supported (this npas_fx reads {PLAN_FORMAT}).")
        check_plan_dict(data)
        data = dict(data)
        for key, kind in (("layers", LayerPlan), ("groups", GroupPlan), ("kept", KeptParam), ("opaque", OpaqueModule)):
            data[key] = tuple(_load(kind, x, f"plan.{key}[{i}]") for i, x in enumerate(data.get(key, ())))
        return _load(cls, data, "plan")

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Plan:
        """Read a plan from JSON text, or from a file given as a ``str`` or ``pathlib.Path``."""
        is_text = isinstance(text_or_path, str) and text_or_path.lstrip()[:1] in ("{", "[")
        if not is_text and not isinstance(text_or_path, (str, os.PathLike)):
            raise TypeError(f"Plan.from_json takes JSON text or a file path, got {type(text_or_path).__name__}.")
        text = text_or_path
        if not is_text:
            with open(text_or_path, encoding="utf-8") as handle:
                text = handle.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            where = "the JSON text" if is_text else f"plan file {os.fspath(text_or_path)!r}"
            raise PlanError(f"{where} is not valid JSON ({error}).") from None
        return cls.from_dict(data)

    # ---- display -----------------------------------------------------------------------------
    def summary(self) -> str:
        """A readable table: one row per generated layer, then groups and the budget accounting."""
        head = ("layer", "shape", "group", "generator", "params")
        sizes = {g.index: g.bank_size for g in self.groups}
        rows = [
            (x.name, "x".join(map(str, x.shape)), f"g{x.group}", x.describe(sizes.get(x.group)), str(x.overhead))
            for x in self.layers
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"npas_fx plan: strategy={self.strategy} seed={self.seed}", line.format(*head)]
        out += [line.format(*r) for r in rows]
        out.append("")
        for g in self.groups:
            members = sum(self.layer(n).numel for n in g.layers)
            out.append(
                f"g{g.index}: bank {g.bank_size:,} for {len(g.layers)} layer{'s' * (len(g.layers) != 1)}, "
                f"{members:,} weights in all "
                f"(x{g.bank_size / members:.3g})"
            )
        acc = self.accounting()
        out.append(
            f"budget: requested {acc['requested']:,}, achieved {acc['achieved']:,} = banks {acc['banks']:,} "
            f"+ generators {acc['generator_overhead']:,} + kept dense {acc['kept_dense']:,} "
            f"(original {acc['original']:,}, x{acc['achieved'] / acc['original']:.3g})"
        )
        if self.opaque:
            out.append(
                "opaque (run as leaves): " + ", ".join(f"{o.path or '<root>'} ({o.reason})" for o in self.opaque)
            )
        return "\n".join(out)

    def __str__(self) -> str:
        return self.summary()
