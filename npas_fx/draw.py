"""Draw a sharing plan with graphviz: which layers share which bank, and how each weight is made.

The picture has one lane (a graphviz cluster) per parameter group: the group's bank on top, its
layers below. Layers run top to bottom in execution order (grey arrows), each labelled with its
name and shape; the edge from a bank to a layer carries the layer's generator (``wavg K=4``,
``interpolate x3``, ``hash``; an unknown kind is drawn by its ``describe()`` label). Tied
parameters have a double border, layers inside opaque (untraced) modules a dashed one. When the
plan's provenance holds similarity scores, layer pairs scoring at least ``similarity_threshold``
are joined by dashed edges coloured by score. A legend gives the budget accounting.

Large models stay readable: runs of identically structured blocks (``h.0.*``, ``h.1.*``, ...) are
drawn once, as ``h.[0..11].attn.weight (x12)``, when the plan has more than ``max_layers`` layers.

Example:
    >>> import torch, npas_fx
    >>> gm = npas_fx.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), 0.5)
    >>> source = plan_graph(gm).source
    >>> "0.weight" in source and "g0: bank" in source
    True
"""

from __future__ import annotations

import html
import math
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import graphviz

from .plan import LayerPlan, Plan

__all__ = ["draw_plan", "plan_graph", "FORMATS"]

#: File extensions :func:`draw_plan` writes; ``dot``/``gv`` is the graphviz source itself.
FORMATS = ("svg", "png", "pdf", "dot", "gv")

# ColorBrewer "Set3"/"Pastel1" fills: light enough that black text stays readable on them.
_PALETTE = (
    "#8dd3c7",
    "#ffffb3",
    "#bebada",
    "#fb8072",
    "#80b1d3",
    "#fdb462",
    "#b3de69",
    "#fccde5",
    "#d9d9d9",
    "#bc80bd",
    "#ccebc5",
    "#ffed6f",
)
# Layer fills per ensemble member (ColorBrewer "Pastel2"): a second, lighter scheme than the lanes'.
_MEMBER_FILLS = ("#b3e2cd", "#fdcdac", "#cbd5e8", "#f4cae4", "#e6f5c9", "#fff2ae", "#f1e2cc", "#cccccc")
# Similarity edges go from light orange (at the threshold) to dark red (at 1).
_LOW, _HIGH = (0xFD, 0xBB, 0x84), (0xB3, 0x00, 0x00)
_FONT = "Helvetica"
_LEGEND_GROUP_ROWS = 24


# ---- what gets drawn -----------------------------------------------------------------------------
@dataclass
class _Run:
    """Consecutive blocks ``prefix.<i>.*`` with identical structure, drawn once."""

    prefix: str
    indices: list[int]
    blocks: list[list[int]]  # layer positions of each block, in execution order


@dataclass
class _Node:
    """One drawn layer node: a single layer, or the same layer of every block of a run."""

    id: str
    members: list[int]
    title: str
    run: _Run | None = None


def _first_index(tokens: Sequence[str], start: int) -> int | None:
    return next((j for j in range(start, len(tokens)) if tokens[j].isdigit()), None)


def _collapse(
    positions: list[int], tokens: list[list[str]], shapes: list[tuple[int, ...]], level: int
) -> list[int | _Run]:
    """Split ``positions`` into single layers and runs of >= 2 identical consecutive blocks.

    A block is a maximal stretch of layers whose names agree up to the first numeric token at or
    after ``level`` (``blocks.3.up.weight`` is in block ``blocks.3``). Blocks that do not repeat
    are searched again one level deeper, so ``stages.0.blocks.<i>`` still collapses.
    """
    pieces: list[tuple[Any, int, list[int]]] = []  # (prefix key, block index, positions)
    for p in positions:
        j = _first_index(tokens[p], level)
        key = None if j is None else (tuple(tokens[p][:j]), j)
        index = -1 if j is None else int(tokens[p][j])
        if key is not None and pieces and pieces[-1][0] == key and pieces[-1][1] == index:
            pieces[-1][2].append(p)
        else:
            pieces.append((key, index, [p]))

    def signature(piece: tuple[Any, int, list[int]]) -> tuple:
        j = piece[0][1]
        return tuple((tuple(tokens[p][j + 1 :]), shapes[p]) for p in piece[2])

    units: list[int | _Run] = []
    i = 0
    while i < len(pieces):
        key, _, members = pieces[i]
        if key is None:
            units.extend(members)
            i += 1
            continue
        k, seen = i + 1, {pieces[i][1]}
        while (
            k < len(pieces)
            and pieces[k][0] == key
            and pieces[k][1] not in seen
            and signature(pieces[k]) == signature(pieces[i])
        ):
            seen.add(pieces[k][1])
            k += 1
        if k - i >= 2:
            units.append(_Run(".".join(key[0]), [x[1] for x in pieces[i:k]], [x[2] for x in pieces[i:k]]))
        else:
            units.extend(_collapse(members, tokens, shapes, key[1] + 1))
        i = k
    return units


def _index_text(indices: list[int]) -> str:
    """``[0..11]`` for a range, ``[0,2..98]`` for a stride, else a short list."""
    if len(indices) > 2:
        step = indices[1] - indices[0]
        if step > 0 and all(b - a == step for a, b in pairwise(indices)):
            return f"[{indices[0]}..{indices[-1]}]" if step == 1 else f"[{indices[0]},{indices[1]}..{indices[-1]}]"
    text = ",".join(map(str, indices))
    return f"[{text}]" if len(text) <= 24 else f"[{text[:20].rsplit(',', 1)[0]},..]"


def _nodes(plan: Plan, collapse: bool) -> list[_Node]:
    """Layer nodes in execution order (by their first member)."""
    layers = plan.layers
    if not collapse:
        return [_Node(f"L{p}", [p], x.name) for p, x in enumerate(layers)]
    tokens = [x.name.split(".") for x in layers]
    nodes: list[_Node] = []
    for unit in _collapse(list(range(len(layers))), tokens, [tuple(x.shape) for x in layers], 0):
        if isinstance(unit, int):
            nodes.append(_Node(f"L{unit}", [unit], layers[unit].name))
            continue
        depth = len(unit.prefix.split(".")) if unit.prefix else 0
        head = f"{unit.prefix}." if unit.prefix else ""
        for q in range(len(unit.blocks[0])):
            column = [block[q] for block in unit.blocks]
            rest = ".".join(tokens[column[0]][depth + 1 :])
            title = f"{head}{_index_text(unit.indices)}.{rest} (x{len(column)})"
            nodes.append(_Node(f"L{column[0]}", column, title, unit))
    return nodes


# ---- helpers -------------------------------------------------------------------------------------
def _label(lines: Sequence[str]) -> str:
    # graphviz.escape keeps user text literal (a backslash in a name is not a DOT escape);
    # the raw "\n" between lines is DOT's centred line break.
    return "\\n".join(graphviz.escape(line) for line in lines)


def _describe(layer: LayerPlan, bank_size: int | None) -> str:
    try:
        return str(layer.describe(bank_size))
    except Exception:  # a future generator kind without a label must still be drawn
        return str(layer.generator)


def _generator_text(layers: Sequence[LayerPlan], bank_size: int | None) -> str:
    counts = Counter(_describe(x, bank_size) for x in layers)
    if len(counts) == 1:
        return next(iter(counts))
    parts = [f"{kind} (x{n})" for kind, n in counts.most_common(3)]
    return "\n".join(parts + (["..."] if len(counts) > 3 else []))


def _score_colour(score: float, threshold: float) -> str:
    t = 1.0 if threshold >= 1 else min(1.0, max(0.0, (score - threshold) / (1 - threshold)))
    r, g, b = (round(lo + t * (hi - lo)) for lo, hi in zip(_LOW, _HIGH, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _opaque_path(layer: LayerPlan, plan: Plan) -> str | None:
    for item in plan.opaque:
        if item.path == "" or layer.module == item.path or layer.module.startswith(item.path + "."):
            return item.path or "<root>"
    return None


def _similarity(plan: Plan) -> tuple[list[int], list[list[float]]] | None:
    """Plan positions and scores from ``provenance["similarity"]``, or None when absent/malformed."""
    record = plan.provenance.get("similarity") if isinstance(plan.provenance, dict) else None
    if record is None:
        return None
    try:
        names = list(record["layers"])
        # None marks pairs that were never compared (different bins in swn): no edge.
        matrix = [[float("nan") if v is None else float(v) for v in row] for row in record["matrix"]]
        if len(matrix) != len(names) or any(len(row) != len(names) for row in matrix):
            raise ValueError(f"{len(names)} layers but a {len(matrix)}-row matrix")
    except (KeyError, TypeError, ValueError) as error:
        warnings.warn(
            f"plan provenance['similarity'] should be {{'layers': [...], 'matrix': [[...]]}} (square); "
            f"not drawing it: {error}",
            stacklevel=3,
        )
        return None
    where = {alias: p for p, x in enumerate(plan.layers) for alias in (x.name, *x.aliases)}
    return [where.get(name, -1) for name in names], matrix


def _as_plan(plan_or_gm: Any) -> Plan:
    if isinstance(plan_or_gm, Plan):
        return plan_or_gm
    if isinstance(plan_or_gm, (str, os.PathLike)):
        return Plan.from_json(os.fspath(plan_or_gm))
    from .compiler import plan_of  # late: drawing a saved plan needs no torch import chain

    return plan_of(plan_or_gm)


def _members(plan: Plan) -> list[tuple[int, str]]:
    """``(index, type)`` of each member of an ensemble plan (``provenance["ensemble"]``), else []."""
    record = plan.provenance.get("ensemble") if isinstance(plan.provenance, dict) else None
    try:
        return [(int(m["index"]), str(m["type"])) for m in record["members"]] if record else []
    except (KeyError, TypeError, ValueError):
        return []


def _member_fill(node: _Node, plan: Plan) -> str:
    """The member colour of a layer node of an ensemble plan; white outside one or across members."""
    from .ensemble import member_of  # late: ensemble imports the compiler

    owners = {member_of(plan.layers[p].name) for p in node.members}
    owner = owners.pop() if len(owners) == 1 else None
    return "white" if owner is None or not _members(plan) else _MEMBER_FILLS[owner % len(_MEMBER_FILLS)]


# ---- the picture ---------------------------------------------------------------------------------
def _darker(colour: str, factor: float = 0.6) -> str:
    """A darker shade of ``#rrggbb`` for lines and borders (pastel lines vanish on white)."""
    r, g, b = (round(int(colour[i : i + 2], 16) * factor) for i in (1, 3, 5))
    return f"#{r:02x}{g:02x}{b:02x}"


def _legend(plan: Plan, colours: dict[int, str], threshold: float, shown_similarity: bool) -> str:
    """The budget accounting as an HTML-like graphviz table."""
    acc = plan.accounting()
    esc = html.escape

    def cells(*texts: str, bold: bool = False, bg: str | None = None) -> str:
        colour = f' BGCOLOR="{bg}"' if bg else ""
        # graphviz rejects an empty <B></B>, so only non-empty cells are made bold
        texts = tuple(f"<B>{t}</B>" if bold and t else t for t in texts)
        return (
            "<TR>"
            + "".join(f'<TD ALIGN="{"LEFT" if i == 0 else "RIGHT"}"{colour}>{t}</TD>' for i, t in enumerate(texts))
            + "</TR>"
        )

    def budget_row(name: str, value: int, note: str = "") -> str:
        return (
            f'<TR><TD ALIGN="LEFT">{name}</TD><TD ALIGN="RIGHT">{value:,}</TD>'
            f'<TD COLSPAN="3" ALIGN="LEFT">{esc(note)}</TD></TR>'
        )

    def wide(text: str, bold: bool = False) -> str:
        inner = f"<B>{text}</B>" if bold else text
        return f'<TR><TD COLSPAN="5" ALIGN="LEFT" BORDER="0">{inner}</TD></TR>'

    reasons: Counter[str] = Counter()
    for kept in plan.kept:
        reasons[kept.reason] += kept.numel
    exact = "= requested" if acc["achieved"] == acc["requested"] else "DIFFERS from requested"
    ratio = f"achieved is x{acc['achieved'] / acc['original']:.3g} of it" if acc["original"] else ""
    rows = [
        wide(f"npas_fx plan: strategy {esc(str(plan.strategy))}, seed {plan.seed}", bold=True),
        budget_row("requested", acc["requested"]),
        budget_row("achieved", acc["achieved"], exact),
        budget_row("  banks", acc["banks"], f"{len(plan.groups)} group(s)"),
        budget_row("  generator overhead", acc["generator_overhead"], "coefficients, embeddings, masks"),
        budget_row("  kept dense", acc["kept_dense"], ", ".join(f"{n:,} {r}" for r, n in reasons.most_common())),
        budget_row("original model", acc["original"], ratio),
        cells("group", "bank", "layers", "weights", "bank/weights", bold=True),
    ]
    size = {x.name: x.numel for x in plan.layers}
    for g in plan.groups[:_LEGEND_GROUP_ROWS]:
        weights = sum(size.get(n, 0) for n in g.layers)
        bank = f"{g.bank_size:,}" + (f" +{g.overhead:,}" if g.overhead else "")
        share = f"x{g.bank_size / weights:.3g}" if weights else "-"
        rows.append(cells(f"g{g.index}", bank, str(len(g.layers)), f"{weights:,}", share, bg=colours.get(g.index)))
    if len(plan.groups) > _LEGEND_GROUP_ROWS:
        rows.append(wide(f"... and {len(plan.groups) - _LEGEND_GROUP_ROWS} more groups"))
    if _members(plan):
        from .ensemble import member_of  # late: ensemble imports the compiler

        owners = Counter(member_of(x.name) for x in plan.layers)
        for index, kind in _members(plan):
            fill = _MEMBER_FILLS[index % len(_MEMBER_FILLS)]
            rows.append(cells(f"member {index} (layer fill)", esc(kind), str(owners[index]), "", "", bg=fill))
    for item in plan.opaque:
        rows.append(wide(f"opaque (run as one leaf): {esc(item.path or '<root>')}: {esc(item.reason)}"))
    rows.append(wide("grey arrows: execution order; double border: tied parameter; dashed: inside an opaque module"))
    if shown_similarity:
        low, high = _score_colour(threshold, threshold), _score_colour(1.0, threshold)
        rows.append(
            wide(
                f"dashed lines: similarity &gt;= {threshold:g}, from "
                f'<FONT COLOR="{low}"><B>{threshold:g}</B></FONT> to <FONT COLOR="{high}"><B>1.0</B></FONT>'
            )
        )
    return f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3">{"".join(rows)}</TABLE>>'


def _node_label(node: _Node, plan: Plan) -> tuple[list[str], bool, set[str]]:
    """Label lines of a layer node, whether it is tied, and the opaque modules it sits in."""
    members = [plan.layers[p] for p in node.members]
    lines = [node.title, "x".join(map(str, members[0].shape))]
    tied = [a for x in members for a in x.aliases if a != x.name]
    if tied:
        lines.append("tied: " + ", ".join(tied[:2]) + (", ..." if len(tied) > 2 else ""))
    opaque = {o for x in members if (o := _opaque_path(x, plan)) is not None}
    if opaque:
        lines.append("opaque: " + ", ".join(sorted(opaque)))
    return lines, bool(tied), opaque


def _similarity_edges(dot: graphviz.Digraph, plan: Plan, nodes: list[_Node], threshold: float) -> bool:
    """Join node pairs whose (mean) similarity reaches ``threshold``; True when any was drawn."""
    similarity = _similarity(plan)
    if similarity is None:
        return False
    positions, matrix = similarity
    node_of = {p: k for k, n in enumerate(nodes) for p in n.members}
    scores: dict[tuple[int, int], list[float]] = {}
    for i, pi in enumerate(positions):
        for j, pj in enumerate(positions):
            if pi < 0 or pj < 0 or pi >= pj or not math.isfinite(matrix[i][j]):
                continue  # each unordered pair once, only layers of this plan
            a, b = sorted((node_of[pi], node_of[pj]))
            scores.setdefault((a, b), []).append(matrix[i][j])
    shown = False
    for (a, b), values in sorted(scores.items()):
        score = sum(values) / len(values)
        if score < threshold:
            continue
        shown = True
        colour = _score_colour(score, threshold)
        strength = (score - threshold) / max(1e-9, 1 - threshold)
        dot.edge(
            nodes[a].id,
            nodes[b].id,
            label=f"{score:.2f}",
            dir="none",
            style="dashed",
            color=colour,
            fontcolor=colour,
            penwidth=f"{1 + 2 * min(1.0, strength):.2f}",
            constraint="false",
            tooltip=f"similarity {score:.3f}" + (f" (mean of {len(values)} pairs)" if len(values) > 1 else ""),
        )
    return shown


def plan_graph(
    plan_or_gm: Any,
    *,
    collapse: bool | None = None,
    max_layers: int = 48,
    similarity_threshold: float = 0.5,
) -> graphviz.Digraph:
    """The picture of a plan as a :class:`graphviz.Digraph` (``.source`` is its DOT text).

    Args:
        plan_or_gm: a :class:`~npas_fx.plan.Plan`, a module made by ``npas_fx.compile``, or the
            path of a plan saved with ``Plan.to_json``.
        collapse: draw runs of identical blocks once; ``None`` (default) does so only when the plan
            has more than ``max_layers`` layers.
        similarity_threshold: layer pairs of ``provenance["similarity"]`` scoring at least this
            are joined (mean score for collapsed nodes). Learned strategies record scores as
            ``{"layers": [name, ...], "matrix": [[score, ...], ...]}`` (square, symmetric, cosine
            in [-1, 1]); names that are not layers of the plan are skipped.

    Example:
        >>> import torch, npas_fx
        >>> gm = npas_fx.compile(torch.nn.Linear(4, 4), 1.0)
        >>> "slice" in plan_graph(npas_fx.plan_of(gm)).source
        True
    """
    plan = _as_plan(plan_or_gm)
    if collapse is None:
        collapse = len(plan.layers) > max_layers
    nodes = _nodes(plan, collapse)
    layers = plan.layers
    group_ids = sorted({g.index for g in plan.groups} | {x.group for x in layers})
    fills = {g: _PALETTE[i % len(_PALETTE)] for i, g in enumerate(group_ids)}
    lines = {g: _darker(c) for g, c in fills.items()}
    banks = {g.index: g for g in plan.groups}

    dot = graphviz.Digraph("npas_plan", comment=f"npas_fx plan ({plan.strategy}, budget {plan.budget})")
    dot.attr(rankdir="TB", newrank="true", nodesep="0.25", ranksep="0.3", fontname=_FONT, fontsize="11")
    dot.attr("node", fontname=_FONT, fontsize="10", shape="box", style="rounded,filled", margin="0.08,0.03")
    dot.attr("edge", fontname=_FONT, fontsize="9")

    # A node whose layers all share one bank sits in that group's lane; a collapsed node whose
    # blocks use several banks (e.g. random groups) sits outside, fed by each of them.
    home: dict[int, list[_Node]] = {}
    outside: list[_Node] = []
    for node in nodes:
        groups = {layers[p].group for p in node.members}
        (home.setdefault(groups.pop(), []) if len(groups) == 1 else outside).append(node)

    def add_layer(graph: graphviz.Digraph, node: _Node, border: str) -> None:
        text, tied, opaque = _node_label(node, plan)
        graph.node(
            node.id,
            _label(text),
            fillcolor=_member_fill(node, plan),
            color="black" if opaque else border,
            penwidth="1.5",
            style="rounded,filled,dashed" if opaque else "rounded,filled",
            peripheries="2" if tied else "1",
            tooltip=graphviz.escape(", ".join(layers[p].name for p in node.members)),
        )

    for g in group_ids:
        members = [x for x in layers if x.group == g]
        bank = f"{banks[g].bank_size:,}" if g in banks else "?"
        weights = sum(x.numel for x in members)
        with dot.subgraph(name=f"cluster_g{g}") as lane:
            lane.attr(
                label=_label([f"g{g}: bank {bank}", f"{len(members)} layer(s), {weights:,} weights"]),
                style="rounded,filled",
                fillcolor=fills[g] + "55",  # translucent lane, opaque bank
                color=lines[g],
            )
            lane.node(f"G{g}", _label([f"g{g} bank", f"{bank} values"]), shape="cylinder", fillcolor=fills[g])
            for node in home.get(g, []):
                add_layer(lane, node, lines[g])
    for node in outside:
        add_layer(dot, node, "black")

    # Each layer's generator, on the edge from the bank it reads.
    bank_sizes = {group.index: group.bank_size for group in plan.groups}
    for node in nodes:
        by_group: dict[int, list[LayerPlan]] = {}
        for p in node.members:
            by_group.setdefault(layers[p].group, []).append(layers[p])
        for g, members in by_group.items():
            text = _generator_text(members, bank_sizes.get(g))
            if len(by_group) > 1 and "\n" not in text:
                text += f" (x{len(members)})"
            dot.edge(
                f"G{g}", node.id, label=_label(text.split("\n")), color=lines[g], fontcolor="gray15", penwidth="1.5"
            )

    # Execution order: a spine through the layers (it also ranks them top to bottom); a collapsed
    # run loops back from its last node to its first.
    for a, b in pairwise(nodes):
        dot.edge(a.id, b.id, color="gray45", arrowsize="0.6", weight="4")
    runs: dict[int, list[_Node]] = {}
    for node in nodes:
        if node.run is not None:
            runs.setdefault(id(node.run), []).append(node)
    for run_nodes in runs.values():
        dot.edge(
            run_nodes[-1].id,
            run_nodes[0].id,
            label=f"repeat x{len(run_nodes[0].members)}",
            style="dotted",
            color="gray45",
            fontcolor="gray30",
            constraint="false",
        )

    shown = _similarity_edges(dot, plan, nodes, similarity_threshold)
    # The legend is the graph's own label: it sits above the lanes without taking part in ranking.
    dot.attr(label=_legend(plan, fills, similarity_threshold, shown), labelloc="t", labeljust="l")
    return dot


def draw_plan(
    plan_or_gm: Any,
    path: str | os.PathLike,
    *,
    collapse: bool | None = None,
    max_layers: int = 48,
    similarity_threshold: float = 0.5,
) -> Path:
    """Write the picture of a plan to ``path``: svg, png or pdf by its extension, or DOT source (.dot/.gv).

    Options as in :func:`plan_graph`. Returns the path written. Rendering needs graphviz's ``dot``
    program (``apt-get install graphviz``); writing ``.dot`` does not.

    Example:
        >>> import tempfile, torch, npas_fx
        >>> gm = npas_fx.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), 0.5)
        >>> out = draw_plan(gm, tempfile.mkdtemp() + "/plan.svg")
        >>> "0.weight" in out.read_text()
        True
    """
    target = Path(path)
    fmt = target.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(
            f"cannot draw to {str(path)!r}: its extension should be one of {', '.join('.' + f for f in FORMATS)}."
        )
    graph = plan_graph(plan_or_gm, collapse=collapse, max_layers=max_layers, similarity_threshold=similarity_threshold)
    if fmt in ("dot", "gv"):
        target.write_text(graph.source, encoding="utf-8")
        return target
    try:
        data = graph.pipe(format=fmt)
    except graphviz.ExecutableNotFound as error:
        raise RuntimeError(
            f"drawing {str(path)!r} needs graphviz's `dot` program, which is not on PATH; install it "
            "(apt-get install graphviz / brew install graphviz) or write the source with a .dot path."
        ) from error
    target.write_bytes(data)
    return target
