"""Pictures of plans (npas_fx.draw) and the networkx export (Plan.to_networkx).

Layout facts are read back from graphviz itself (``dot -Tjson``): which lane a layer sits in,
which bank edge feeds it and with what label, where it is drawn.
"""

from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace

import networkx as nx
import pytest
import torch
from torch import nn

import npas_fx
from npas_fx.draw import draw_plan, plan_graph
from npas_fx.plan import Plan


# ---- tiny models ---------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 2 * 2, 5)
    )


class TiedLM(nn.Module):
    """An embedding tied to the output head, like a language model's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.emb(x)))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so it runs as an opaque leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else self.a(-x)


class WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.u = Branchy()
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.u(x))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.up(x).relu())


class Deep(nn.Module):
    """``depth`` identical blocks between an input and an output layer: 2 * depth + 2 weights."""

    def __init__(self, depth: int, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Stages(nn.Module):
    """Stages of identical blocks, each ending in a link; stages differ unless ``widths`` are equal."""

    def __init__(self, widths: tuple[int, ...] = (4, 6), depth: int = 3) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.ModuleDict({"blocks": nn.ModuleList(Block(w) for _ in range(depth)), "link": nn.Linear(w, out)})
            for w, out in zip(widths, widths[1:] + widths[-1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            for block in stage["blocks"]:
                x = block(x)
            x = stage["link"](x)
        return x


# ---- reading a layout back from graphviz ---------------------------------------------------------
@dataclass
class Layout:
    nodes: dict[str, dict]  # graphviz node name -> attributes (pos as floats)
    clusters: dict[str, dict]  # cluster name -> attributes, "members" = node names
    edges: list[tuple[str, str, dict]]

    def layer_node(self, name: str) -> tuple[str, dict]:
        found = [(k, v) for k, v in self.nodes.items() if name in v.get("tooltip", "").split(", ")]
        assert len(found) == 1, f"{name} drawn {len(found)} times"
        return found[0]

    def lines(self, node: str) -> list[str]:
        return self.nodes[node]["label"].split("\\n")

    def into(self, node: str) -> list[tuple[str, dict]]:
        return [(tail, attrs) for tail, head, attrs in self.edges if head == node]

    def cluster_of(self, node: str) -> str | None:
        owners = [name for name, c in self.clusters.items() if node in c["members"]]
        return owners[0] if owners else None


def layout(graph) -> Layout:
    run = subprocess.run(["dot", "-Tjson"], input=graph.source.encode(), capture_output=True, check=True)
    data = json.loads(run.stdout)
    objects = data.get("objects", [])
    by_id = {o["_gvid"]: o for o in objects}
    nodes = {}
    for o in objects:
        if "nodes" not in o:  # clusters list their nodes, plain nodes do not
            attrs = dict(o)
            attrs["pos"] = tuple(float(v) for v in o["pos"].split(","))
            nodes[o["name"]] = attrs
    clusters = {
        o["name"]: {**o, "members": {by_id[i]["name"] for i in o["nodes"]}}
        for o in objects
        if o["name"].startswith("cluster")
    }
    edges = [(by_id[e["tail"]]["name"], by_id[e["head"]]["name"], e) for e in data.get("edges", [])]
    return Layout(nodes, clusters, edges)


def bank_edges(lay: Layout, node: str) -> list[tuple[str, dict]]:
    return [(t, a) for t, a in lay.into(node) if lay.lines(t)[0].endswith(" bank")]


def svg_texts(data: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(data).iter("{http://www.w3.org/2000/svg}text")]


CASES = [
    (mlp, "shape", 0.5),
    (mlp, "single", 2.0),
    (mlp, "random", 0.3),
    (cnn, "shape", 0.1),
    (cnn, "hash", 0.2),
    (TiedLM, "shape", 0.5),
]


@pytest.mark.parametrize(("factory", "strategy", "budget"), CASES)
def test_every_layer_sits_in_its_group_lane_in_execution_order(factory, strategy, budget):
    plan = npas_fx.plan_of(npas_fx.compile(factory(), budget, strategy=strategy))
    lay = layout(plan_graph(plan))
    heights = []
    for layer in plan.layers:
        node, attrs = lay.layer_node(layer.name)
        assert lay.lines(node)[:2] == [layer.name, "x".join(map(str, layer.shape))]
        bank = next(g.bank_size for g in plan.groups if g.index == layer.group)
        assert lay.clusters[lay.cluster_of(node)]["label"].split("\\n")[0] == f"g{layer.group}: bank {bank:,}"
        (tail, edge), *others = bank_edges(lay, node)
        assert not others and lay.lines(tail)[0] == f"g{layer.group} bank"
        assert edge["label"] == layer.describe(bank)
        heights.append(attrs["pos"][1])
    # graphviz's y grows upwards: execution order reads top to bottom
    assert heights == sorted(heights, reverse=True) and len(set(heights)) == len(heights)


@pytest.mark.parametrize(("factory", "strategy", "budget"), CASES[:4])
def test_svg_names_every_layer_group_and_the_budget(tmp_path, factory, strategy, budget):
    plan = npas_fx.plan_of(npas_fx.compile(factory(), budget, strategy=strategy))
    texts = svg_texts(draw_plan(plan, tmp_path / "plan.svg").read_text())
    for layer in plan.layers:
        assert layer.name in texts
    for g in plan.groups:
        assert f"g{g.index}: bank {g.bank_size:,}" in texts
    assert f"{plan.budget:,}" in texts and "requested" in texts and "achieved" in texts


def test_dot_source_renders_with_dot_and_every_format_is_written(tmp_path):
    gm = npas_fx.compile(cnn(), 0.25)
    plan = npas_fx.plan_of(gm)
    plan.to_json(str(tmp_path / "plan.json"))
    source = draw_plan(gm, tmp_path / "plan.dot").read_text()
    # a Plan, a compiled module and a saved plan file draw the same picture
    assert source == plan_graph(plan).source == plan_graph(str(tmp_path / "plan.json")).source
    run = subprocess.run(["dot", "-Tsvg", str(tmp_path / "plan.dot")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert all(x.name in svg_texts(run.stdout) for x in plan.layers)
    assert draw_plan(plan, tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert draw_plan(plan, tmp_path / "plan.pdf").read_bytes()[:5] == b"%PDF-"
    assert draw_plan(plan, tmp_path / "plan.gv").read_text() == source
    with pytest.raises(ValueError, match=r"\.svg"):
        draw_plan(plan, tmp_path / "plan.jpg")
    assert not (tmp_path / "plan.jpg").exists()


def test_tied_parameters_have_a_double_border():
    plan = npas_fx.plan_of(npas_fx.compile(TiedLM(), 0.5))
    lay = layout(plan_graph(plan))
    emb, mid = lay.layer_node("emb.weight")[0], lay.layer_node("mid.weight")[0]
    assert lay.nodes[emb]["peripheries"] == "2" and "tied: head.weight" in lay.lines(emb)
    assert lay.nodes[mid]["peripheries"] == "1" and not any(x.startswith("tied") for x in lay.lines(mid))


def test_layers_inside_opaque_modules_are_dashed_and_the_reason_is_in_the_legend(tmp_path):
    plan = npas_fx.plan_of(npas_fx.compile(WithOpaque(), 0.5, example_inputs=(torch.randn(2, 4),)))
    assert [o.path for o in plan.opaque] == ["u"]
    lay = layout(plan_graph(plan))
    inside, outside = lay.layer_node("u.a.weight")[0], lay.layer_node("b.weight")[0]
    assert "dashed" in lay.nodes[inside]["style"] and "opaque: u" in lay.lines(inside)
    assert "dashed" not in lay.nodes[outside]["style"]
    legend = " ".join(svg_texts(draw_plan(plan, tmp_path / "p.svg").read_text()))
    assert "opaque (run as one leaf): u:" in legend and "TraceError" in legend


def test_an_unknown_generator_kind_is_drawn_by_its_label():
    plan = npas_fx.plan_of(npas_fx.compile(mlp(), 0.5))
    # A kind this version does not know (a plan from a newer npas_fx): Plan() would refuse it, so the
    # layers are swapped in after construction; the drawing must still label it.
    odd = replace(plan)
    odd.layers = (replace(plan.layers[0], generator="superfancy"), *plan.layers[1:])
    lay = layout(plan_graph(odd))
    node = lay.layer_node(plan.layers[0].name)[0]
    assert [a["label"] for _, a in bank_edges(lay, node)] == ["superfancy"]


def similarity_plan(scores: dict[tuple[int, int], float]) -> Plan:
    plan = npas_fx.plan_of(npas_fx.compile(mlp(), 0.5))
    names = [x.name for x in plan.layers] + ["not.in.this.model"]
    matrix = [[1.0 if i == j else 0.0 for j in range(len(names))] for i in range(len(names))]
    for (i, j), s in scores.items():
        matrix[i][j] = matrix[j][i] = s
    return replace(plan, provenance={"similarity": {"layers": names, "matrix": matrix}})


def test_similar_layer_pairs_are_joined_and_coloured_by_score():
    # the last name is not a layer of this plan: its (high) scores must not be drawn
    plan = similarity_plan({(0, 1): 0.9, (1, 2): 0.6, (0, 3): 0.2, (2, 3): -0.8, (0, 4): 0.99})
    lay = layout(plan_graph(plan, similarity_threshold=0.5))
    name_of = {node: attrs.get("tooltip") for node, attrs in lay.nodes.items()}
    drawn = {
        frozenset((name_of[t], name_of[h])): a for t, h, a in lay.edges if a.get("dir") == "none"
    }  # similarity edges are the undirected ones
    names = [x.name for x in plan.layers]
    assert set(drawn) == {frozenset(names[:2]), frozenset(names[1:3])}
    strong, weak = drawn[frozenset(names[:2])], drawn[frozenset(names[1:3])]
    assert (strong["label"], weak["label"]) == ("0.90", "0.60")

    def darkness(colour: str) -> int:
        return -sum(int(colour[i : i + 2], 16) for i in (1, 3, 5))

    assert darkness(strong["color"]) > darkness(weak["color"])
    assert not any(a.get("dir") == "none" for *_, a in layout(plan_graph(plan, similarity_threshold=0.95)).edges)


def test_malformed_similarity_warns_and_still_draws():
    plan = similarity_plan({})
    bad = replace(plan, provenance={"similarity": {"layers": ["0.weight"], "matrix": [[1.0, 0.5]]}})
    with pytest.warns(UserWarning, match="square"):
        source = plan_graph(bad).source
    assert "0.weight" in source and "similarity" not in source


def test_a_plan_of_hundreds_of_layers_collapses_its_repeated_blocks(tmp_path):
    depth = 120
    plan = npas_fx.plan_of(npas_fx.compile(Deep(depth), 0.5))
    assert len(plan.layers) == 2 * depth + 2
    lay = layout(plan_graph(plan))
    drawn = [a["tooltip"].split(", ") for a in lay.nodes.values() if a.get("tooltip")]
    assert len(drawn) == 4  # embed, the up and down of every block, head
    assert sorted(n for names in drawn for n in names) == sorted(x.name for x in plan.layers)
    up = lay.layer_node("blocks.77.up.weight")[0]
    assert lay.lines(up)[:2] == [f"blocks.[0..{depth - 1}].up.weight (x{depth})", "8x4"]
    assert any(a.get("label") == f"repeat x{depth}" for *_, a in lay.edges)
    assert "blocks.[0..119].down.weight (x120)" in svg_texts(draw_plan(plan, tmp_path / "deep.svg").read_text())
    assert plan_graph(plan, collapse=False).source.count("tooltip=") == len(plan.layers)


def test_collapsed_blocks_with_several_banks_count_every_layer_on_their_edges():
    depth = 60
    plan = npas_fx.plan_of(npas_fx.compile(Deep(depth), 0.5, strategy="random", num_groups=5, seed=1))
    lay = layout(plan_graph(plan))
    node = lay.layer_node("blocks.0.up.weight")[0]
    members = lay.nodes[node]["tooltip"].split(", ")
    per_bank = {}
    for tail, attrs in bank_edges(lay, node):
        group = int(lay.lines(tail)[0].split()[0][1:])
        # "wavg K=8 (x7)", or one "kind (xN)" line per generator kind when they differ
        per_bank[group] = sum(int(n) for n in re.findall(r"\(x(\d+)\)", attrs["label"])) or 1
    want: dict[int, int] = {}
    for name in members:
        want[plan.layer(name).group] = want.get(plan.layer(name).group, 0) + 1
    assert len(members) == depth and per_bank == want and len(want) > 1


@pytest.mark.parametrize(
    ("widths", "titles"),
    [
        (
            (4, 6),
            {
                "stages.0.blocks.[0..2].up.weight (x3)",
                "stages.1.blocks.[0..2].down.weight (x3)",
                "stages.0.link.weight",
            },
        ),
        (
            (4, 4),
            {
                "stages.[0,1].blocks.0.up.weight (x2)",
                "stages.[0,1].blocks.2.down.weight (x2)",
                "stages.[0,1].link.weight (x2)",
            },
        ),
    ],
)
def test_blocks_collapse_at_the_outermost_level_that_repeats(widths, titles):
    plan = npas_fx.plan_of(npas_fx.compile(Stages(widths), 0.5))
    lay = layout(plan_graph(plan, collapse=True))
    shown = {lay.lines(n)[0] for n, a in lay.nodes.items() if a.get("tooltip")}
    assert titles <= shown
    assert sum(len(a["tooltip"].split(", ")) for a in lay.nodes.values() if a.get("tooltip")) == len(plan.layers)


def test_a_layer_between_blocks_is_never_folded_into_them():
    model = nn.Sequential(Block(4), Block(4), nn.Linear(4, 4), Block(4), Block(4))
    plan = npas_fx.plan_of(npas_fx.compile(model, 0.5))
    lay = layout(plan_graph(plan, collapse=True))
    order = [
        lay.lines(n)[0]
        for n, _ in sorted(lay.nodes.items(), key=lambda kv: -kv[1]["pos"][1])
        if lay.nodes[n].get("tooltip")
    ]
    assert order == [
        "[0,1].up.weight (x2)",
        "[0,1].down.weight (x2)",
        "2.weight",
        "[3,4].up.weight (x2)",
        "[3,4].down.weight (x2)",
    ]


def test_small_plans_are_not_collapsed_unless_asked():
    plan = npas_fx.plan_of(npas_fx.compile(Deep(3), 0.5))
    assert plan_graph(plan).source.count("tooltip=") == len(plan.layers)
    assert plan_graph(plan, collapse=True).source.count("tooltip=") == 4
    assert plan_graph(plan, max_layers=4).source.count("tooltip=") == 4


# ---- networkx export -----------------------------------------------------------------------------
def test_to_networkx_holds_groups_layers_kept_params_and_the_accounting():
    plan = npas_fx.plan_of(npas_fx.compile(TiedLM(), 0.5))
    graph = plan.to_networkx()
    kinds = nx.get_node_attributes(graph, "kind")
    assert sorted(n for n, k in kinds.items() if k == "layer") == sorted(x.name for x in plan.layers)
    assert sorted(n for n, k in kinds.items() if k == "kept") == sorted(k.name for k in plan.kept)
    for g in plan.groups:
        assert set(graph.successors(g.index)) == set(g.layers)
    banks = sum(d["bank_size"] + d["overhead"] for _, d in graph.nodes(data=True) if d["kind"] == "group")
    layers = sum(d["overhead"] for _, d in graph.nodes(data=True) if d["kind"] == "layer")
    kept = sum(d["numel"] for _, d in graph.nodes(data=True) if d["kind"] == "kept")
    assert banks + layers + kept == graph.graph["achieved"] == plan.budget
    assert graph.nodes["emb.weight"]["aliases"] == ("emb.weight", "head.weight")
    assert [graph.nodes[x.name]["order"] for x in plan.layers] == list(range(len(plan.layers)))
    assert nx.number_weakly_connected_components(graph.subgraph(n for n, k in kinds.items() if k != "kept")) == len(
        plan.groups
    )


def test_to_networkx_carries_similarity_scores_both_ways():
    plan = similarity_plan({(0, 1): 0.9, (2, 3): -0.4, (0, 4): 0.7})
    graph = plan.to_networkx()
    a, b, c, d = (x.name for x in plan.layers)
    assert graph[a][b]["weight"] == graph[b][a]["weight"] == 0.9 and graph[a][b]["kind"] == "similarity"
    assert graph[c][d]["weight"] == -0.4
    assert "not.in.this.model" not in graph
    assert not any(graph.has_edge(n, n) for n in graph)
