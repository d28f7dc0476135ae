"""Learned sharing (``ssn``, ``swn``), SuperWeights, gradient similarity and the search data API.

Searches here are tiny (a few steps on tiny models); what is asserted is behaviour: exact budgets,
determinism, re-application without search, the batch convention, the similarity maths against
a naive reference, union semantics of the grouping, and what SuperWeights share.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CASE_NAMES, CASES, loss_of, npas_parameters
from torch import Tensor, nn

import npas_fx
from npas_fx.plan import Plan
from npas_fx.search import common, ssn, swn
from npas_fx.search.pretrain import batch_loss, cycle_batches
from npas_fx.search.similarity import cropped_cosine_similarity, naive_cropped_cosine_similarity, threshold_groups
from npas_fx.superweights import allocate_superweights, bins_of

LEARNED = ("ssn", "swn")


# ---- tiny models and data -----------------------------------------------------------------------
class TinyCNN(nn.Module):
    """Two conv widths (one 3x3 bin of 3 layers) and a two-layer head (one linear bin)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 8, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.f1 = nn.Linear(8 * 4 * 4, 16)
        self.f2 = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.c1(x))
        h = h + torch.relu(self.c2(h))
        h = torch.relu(self.bn(self.c3(h)))
        return self.f2(torch.relu(self.f1(h.flatten(1))))


class KeywordModel(nn.Module):
    """Keyword inputs, structured (dict) output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(10, 10)
        self.c = nn.Linear(10, 3)

    def forward(self, features: Tensor, mask: Tensor) -> dict[str, Tensor]:
        h = torch.relu(self.a(features * mask))
        h = torch.relu(self.b(h))
        return {"logits": self.c(h), "hidden": h}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)
    )


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


def _batches(shape: tuple[int, ...], count: int = 3, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(count)]


MODELS = {"mlp": (_mlp, (6,)), "cnn": (_cnn, (1, 8, 8))}
FAST = {"search_steps": 3, "options": {"grad_batches": 2}}


def _search(name: str, strategy: str, budget: float | int, seed: int = 0, **extra) -> tuple[nn.Module, nn.Module]:
    build, shape = MODELS[name]
    model = build()
    kwargs = {"search_steps": 3, "options": {"grad_batches": 2} if strategy == "swn" else {}}
    kwargs.update(extra)
    gm = npas_fx.compile(
        model, budget, strategy=strategy, seed=seed, data=_batches(shape), loss_fn=F.cross_entropy, **kwargs
    )
    return model, gm


# ---- both strategies end to end -----------------------------------------------------------------
@pytest.mark.parametrize("strategy", LEARNED)
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("budget", [0.1, 2.0, 777])
def test_exact_budget_trains_and_reapplies_without_search(strategy, name, budget, monkeypatch):
    model, gm = _search(name, strategy, budget)
    plan = npas_fx.plan_of(gm)
    target = budget if isinstance(budget, int) else round(budget * npas_fx.count_parameters(model))
    assert npas_fx.count_parameters(gm) == plan.trainable_params == plan.budget == target
    assert plan.strategy == strategy and plan.provenance["search"] == strategy
    assert plan.provenance["search_steps"] == 3

    _, shape = MODELS[name]
    x, y = _batches(shape, 1, seed=5)[0]
    F.cross_entropy(gm.train()(x), y).backward()
    for key, param in npas_parameters(gm).items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{key} got no gradient"

    # Re-applying the saved plan must not search: any pre-training would now fail loudly.
    def no_search(*args, **kwargs):
        raise AssertionError("re-applying a plan ran a search")

    monkeypatch.setattr(ssn, "pretrain", no_search)
    monkeypatch.setattr(swn, "pretrain", no_search)
    again = npas_fx.compile(model, plan=Plan.from_json(plan.to_json()))
    assert npas_fx.plan_of(again) == plan
    again.load_state_dict(gm.state_dict())
    gm.eval(), again.eval()
    assert torch.allclose(again(x), gm(x))


@pytest.mark.parametrize("strategy", LEARNED)
def test_same_seed_same_plan_other_seed_may_differ(strategy):
    _, a = _search("cnn", strategy, 0.3, seed=1)
    _, b = _search("cnn", strategy, 0.3, seed=1)
    assert npas_fx.plan_of(a).to_json() == npas_fx.plan_of(b).to_json()
    x = _batches((1, 8, 8), 1)[0][0]
    assert torch.equal(a.eval()(x), b.eval()(x))
    _, c = _search("cnn", strategy, 0.3, seed=2)
    assert npas_fx.plan_of(c).provenance != npas_fx.plan_of(a).provenance  # the search saw other inits


@pytest.mark.parametrize("strategy", LEARNED)
def test_learned_strategies_without_data_raise_a_clear_error(strategy):
    with pytest.raises(ValueError, match=r"needs data: pass `data=`.*loss_fn"):
        npas_fx.compile(_mlp(), 0.5, strategy=strategy)
    with pytest.raises(TypeError, match="iterable of batches"):
        npas_fx.compile(_mlp(), 0.5, strategy=strategy, data=torch.randn(4, 6), loss_fn=F.cross_entropy)


@pytest.mark.parametrize(("strategy", "groups"), [("ssn", 2), ("swn", 2)])
def test_learned_strategies_refuse_infeasible_budgets_before_searching(strategy, groups, monkeypatch):
    model = _cnn()
    kept = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    minimum = kept + groups  # ssn: 2 groups (sqrt of 5 layers); swn: the 2 bins (3x3 convs, linears)

    def no_search(*args, **kwargs):
        raise AssertionError("searched for an infeasible budget")

    monkeypatch.setattr(ssn, "pretrain", no_search)
    monkeypatch.setattr(swn, "pretrain", no_search)
    with pytest.raises(ValueError, match=f"smallest feasible budget .* is {minimum}"):
        npas_fx.compile(model, minimum - 1, strategy=strategy, data=_batches((1, 8, 8)), loss_fn=F.cross_entropy)
    monkeypatch.undo()
    _, gm = _search("cnn", strategy, minimum)
    assert npas_fx.count_parameters(gm) == minimum


@pytest.mark.parametrize("strategy", LEARNED)
def test_keyword_inputs_and_structured_outputs(strategy):
    torch.manual_seed(0)
    model = KeywordModel()
    g = torch.Generator().manual_seed(0)
    batches = [
        ({"features": torch.randn(8, 6, generator=g), "mask": torch.ones(8, 6)}, torch.randint(0, 3, (8,), generator=g))
        for _ in range(2)
    ]
    gm = npas_fx.compile(
        model,
        0.5,
        strategy=strategy,
        data=batches,
        loss_fn=lambda out, target: F.cross_entropy(out["logits"], target),
        search_steps=2,
        options={"grad_batches": 2} if strategy == "swn" else {},
    )
    assert npas_fx.count_parameters(gm) == round(0.5 * npas_fx.count_parameters(model))
    assert gm(**batches[0][0])["logits"].shape == (8, 3)

    # A dict batch is keyword inputs only; without loss_fn the output's own "loss" is used.
    class WithLoss(KeywordModel):
        def forward(self, features: Tensor, mask: Tensor, labels: Tensor) -> dict[str, Tensor]:
            out = super().forward(features, mask)
            return {"loss": F.cross_entropy(out["logits"], labels), **out}

    dict_batches = [{**inputs, "labels": target} for inputs, target in batches]
    gm = npas_fx.compile(WithLoss(), 0.5, strategy=strategy, data=dict_batches, search_steps=2)
    assert npas_fx.plan_of(gm).provenance["search_steps"] == 2


def test_batch_convention_errors_are_actionable():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"\(inputs, target\) pair.*length 3"):
        batch_loss(model, (torch.randn(2, 3), torch.zeros(2), torch.zeros(2)), F.mse_loss)
    with pytest.raises(ValueError, match="carries no 'loss'"):
        batch_loss(model, (torch.randn(2, 3), torch.zeros(2, 2)), None)
    with pytest.raises(ValueError, match="scalar tensor"):
        batch_loss(model, (torch.randn(2, 3), torch.zeros(2, 2)), lambda out, t: out - t)
    with pytest.raises(ValueError, match="no batches"):
        next(cycle_batches([]))
    one_shot = cycle_batches(iter([1, 2]))  # an iterator is replayed, not exhausted
    assert [next(one_shot) for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match=r"unknown `options` \['nope'\] for strategy 'swn'"):
        _search("mlp", "swn", 0.5, options={"nope": 1})
    with pytest.raises(ValueError, match="search_steps"):
        npas_fx.compile(_mlp(), 0.5, strategy="swn", data=_batches((6,)), loss_fn=F.cross_entropy, search_steps=0)


def test_progress_bar_counts_search_steps(capsys):
    _search("mlp", "swn", 0.5, options={"grad_batches": 2, "progress": True, "refine_steps": 1})
    err = capsys.readouterr().err
    assert "npas_fx swn search" in err
    assert re.search(r"\b8/8\b", err)  # 3 steps + 2 gradient batches + 1 refine step + 2 batches


# ---- SSN ----------------------------------------------------------------------------------------
def test_ssn_clusters_softmax_coefficients_into_num_groups():
    _, gm = _search("mlp", "ssn", 0.5, num_groups=3)
    plan = npas_fx.plan_of(gm)
    prov = plan.provenance
    vectors = torch.tensor(prov["coefficients"]["vectors"])
    assert vectors.shape == (4, 4)  # 4 layers x K = 4 templates
    assert torch.allclose(vectors.sum(1), torch.ones(4, dtype=vectors.dtype))  # softmax-normalised
    assert len(plan.groups) == prov["num_groups"] == 3
    # the search model held all layers in one bank with K = 4 each
    assert prov["search_budget"] == ssn.ssn_search_budget([(12, 6), (12, 12), (8, 12), (3, 8)], 35, 4, 24)
    with pytest.raises(ValueError, match="num_groups"):
        _search("mlp", "ssn", 0.5, num_groups=5)


def test_ssn_groups_are_the_kmeans_clusters_of_the_recorded_vectors():
    from sklearn.cluster import KMeans

    _, gm = _search("cnn", "ssn", 0.5, num_groups=2, seed=4)
    plan = npas_fx.plan_of(gm)
    vectors = plan.provenance["coefficients"]["vectors"]
    labels = KMeans(n_clusters=2, random_state=4, n_init=10).fit(vectors).labels_.tolist()
    names = plan.provenance["coefficients"]["layers"]
    expected = {frozenset(n for n, lab in zip(names, labels, strict=True) if lab == k) for k in set(labels)}
    assert {frozenset(g.layers) for g in plan.groups} == expected


# ---- SWN ----------------------------------------------------------------------------------------
def test_swn_similarity_matrix_and_groups():
    _, gm = _search("cnn", "swn", 0.5)
    plan = npas_fx.plan_of(gm)
    record = plan.provenance["similarity"]
    names = record["layers"]
    matrix = record["matrix"]
    assert names == [x.name for x in plan.layers]
    bins = bins_of([x.shape for x in plan.layers])
    same_bin = {(i, j) for b in bins for i in b for j in b}
    for i in range(len(names)):
        assert matrix[i][i] == 1.0
        for j in range(len(names)):
            assert matrix[i][j] == matrix[j][i]
            assert (matrix[i][j] is None) == ((i, j) not in same_bin)
            if matrix[i][j] is not None:
                assert -1.0 <= matrix[i][j] <= 1.0
    # groups never cross a bin; every layer is a SuperWeight layer
    for group in plan.groups:
        assert len({tuple(plan.layer(n).shape[2:]) + (len(plan.layer(n).shape),) for n in group.layers}) == 1
    assert all(x.generator == "superweight" for x in plan.layers)
    assert isinstance(plan.provenance["threshold"], float)
    assert plan.provenance["threshold"] <= plan.provenance["threshold_start"]


def test_swn_concat_weights_mixes_gradient_and_weight_agreement():
    # The paper's optional similarity: [g/|g|, w/|w|] per layer; its cosine is the mean of the
    # gradients' and the weights' cosines when both crops are the whole tensors (same shapes).
    g = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    w = [torch.randn(4, 3, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    both = cropped_cosine_similarity([swn.with_weights(a, b) for a, b in zip(g, w, strict=True)])
    mean = (cropped_cosine_similarity(g) + cropped_cosine_similarity(w)) / 2
    torch.testing.assert_close(both, mean)
    _, plain = _search("cnn", "swn", 0.5)
    _, gm = _search("cnn", "swn", 0.5, options={"grad_batches": 2, "concat_weights": True})
    record, base = npas_fx.plan_of(gm).provenance, npas_fx.plan_of(plain).provenance
    assert record["concat_weights"] is True and base["concat_weights"] is False
    assert record["similarity"]["matrix"] != base["similarity"]["matrix"]
    assert npas_fx.count_parameters(gm) == npas_fx.plan_of(gm).budget
    with pytest.raises(ValueError, match="concat_weights"):
        _search("cnn", "swn", 0.5, options={"concat_weights": 1})


def test_swn_threshold_is_lowered_until_the_groups_fit():
    # Pairwise similarities 0.5 (a-b) and 0.0 (others); budgets decide how far the threshold falls.
    shapes = [(4, 4), (4, 4), (4, 4)]
    sim = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)

    def allocation(budget):
        return lambda groups: allocate_superweights(shapes, groups, [0, 0, 0], 0, budget, 1)

    groups, threshold, alloc = swn.fit_threshold(sim, [[0, 1, 2]], allocation(48), 0.1, 0.05)
    assert groups == [[0, 1], [2]] and threshold == 0.1 and alloc.fits  # 3 groups would need 48 + 0
    groups, threshold, alloc = swn.fit_threshold(sim, [[0, 1, 2]], allocation(16), 0.1, 0.05)
    assert groups == [[0, 1, 2]] and threshold == -0.05 and alloc.fits  # 0.0 > -0.05 merges all
    groups, threshold, alloc = swn.fit_threshold(sim, [[0, 1, 2]], allocation(8), 0.1, 0.05)
    assert groups == [[0, 1, 2]] and not alloc.fits  # nothing left to merge: bins returned
    groups, threshold, alloc = swn.fit_threshold(sim, [[0, 1, 2]], allocation(48), 0.1, 0.05, max_groups=1)
    assert groups == [[0, 1, 2]] and threshold == -0.05  # num_groups caps the groups too


def test_swn_num_groups_caps_the_groups():
    _, gm = _search("cnn", "swn", 4.0, num_groups=2)
    assert len(npas_fx.plan_of(gm).groups) == 2  # the two bins, whatever the similarities
    with pytest.raises(ValueError, match="between the 2 bin"):
        _search("cnn", "swn", 4.0, num_groups=1)


@pytest.mark.parametrize(("refine_threshold", "split"), [(1.5, True), (-2.0, False)])
def test_swn_refinement_gives_disagreeing_layers_their_own_coefficients(refine_threshold, split):
    # A budget where groups form and every SuperWeight mixes several templates.
    options = {"grad_batches": 2, "threshold": -2.0, "refine_threshold": refine_threshold}
    _, gm = _search("cnn", "swn", 4.0, options=options)
    plan = npas_fx.plan_of(gm)
    refinement = plan.provenance["refinement"]
    multi = [g for g in plan.groups if len(g.layers) > 1]
    assert multi and all(plan.layer(n).templates >= 2 for g in multi for n in g.layers)
    sets = [{plan.layer(n).coefficient_set for n in g.layers} for g in multi]
    if split:  # nobody agrees above 1.5: every layer of a group gets its own coefficients
        assert all(len(s) == len(g.layers) for s, g in zip(sets, multi, strict=True))
        assert len(refinement["split"]) == len(multi)
    else:  # everybody agrees: coefficients stay shared (hard)
        assert all(s == {0} for s in sets) and refinement["split"] == []
    assert npas_fx.count_parameters(gm) == plan.budget
    matrix = refinement["coefficient_similarity"]["matrix"]
    assert all(matrix[i][i] in (1.0, None) for i in range(len(matrix)))


def test_gradients_are_summed_over_several_batches():
    model = _cnn()
    gm = npas_fx.compile(model, 0.5, strategy="superweight")
    batches = _batches((1, 8, 8), 2)
    gm.eval()  # BatchNorm in eval: each batch's gradient is independent of the others
    both = common.weight_gradients(gm, iter(batches), F.cross_entropy, 2)
    first = common.weight_gradients(gm, iter(batches[:1]), F.cross_entropy, 1)
    second = common.weight_gradients(gm, iter(batches[1:]), F.cross_entropy, 1)
    for total, a, b in zip(both, first, second, strict=True):
        assert torch.allclose(total, a + b, atol=1e-6)
        assert total.abs().sum() > 0
    assert all(p.grad is None for p in gm.parameters())  # no parameter gradient was touched


# ---- similarity and grouping --------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=5),
    st.sampled_from([(), (3,), (2, 2)]),
    st.integers(0, 2**16),
)
def test_vectorised_similarity_equals_naive_reference(sizes, trailing, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(r, c, *trailing, generator=g) for r, c in sizes]
    if len(tensors) > 1:
        tensors[-1] = torch.zeros_like(tensors[-1])  # a layer with no gradient: similarity 0
    fast = cropped_cosine_similarity(tensors)
    assert torch.allclose(fast, naive_cropped_cosine_similarity(tensors), atol=1e-10)
    assert torch.equal(fast, fast.T) and torch.equal(fast.diagonal(), torch.ones(len(tensors), dtype=torch.float64))


def test_similarity_crops_to_the_common_top_left_block():
    big = torch.randn(6, 5, 3, 3)
    small = big[:2, :4].clone()
    sim = cropped_cosine_similarity([big, small, -small])
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(-1.0)
    other_kernel = cropped_cosine_similarity([torch.ones(2, 2, 3, 3), torch.ones(2, 2, 1, 1)])
    assert other_kernel[0, 1] == pytest.approx(1.0)  # trailing dims are cropped as well


def test_grouping_is_a_transitive_merge_within_bins():
    sim = torch.tensor(
        [[1.0, 0.9, 0.0, 0.9], [0.9, 1.0, 0.8, 0.0], [0.0, 0.8, 1.0, 0.0], [0.9, 0.0, 0.0, 1.0]], dtype=torch.float64
    )
    assert threshold_groups(sim, 0.5) == [[0, 1, 2, 3]]  # 2~1~0~3: one component, though 2 !~ 0
    assert threshold_groups(sim, 0.85) == [[0, 1, 3], [2]]
    assert threshold_groups(sim, 0.5, bins=[[0, 2], [1, 3]]) == [[0], [1], [2], [3]]  # no edge crosses a bin


# ---- SuperWeights -------------------------------------------------------------------------------
def test_superweights_share_the_top_left_blocks_of_layers_of_different_sizes():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6))
    gm = npas_fx.compile(model, 0.6, strategy="superweight", options={"hard": True})
    plan = npas_fx.plan_of(gm)
    assert [g.layers for g in plan.groups] == [("0.weight", "2.weight", "4.weight")]
    assert {x.block for x in plan.layers} == {(4, 3)}
    shared = gm.npas
    weights = [shared.generate(i).detach() / x.gain for i, x in enumerate(plan.layers)]
    # hard sharing: where two layers both have a SuperWeight, they have the same one
    # shapes (4, 3), (6, 4), (6, 6): grids of 1x1, 2x2 and 2x2 blocks of (4, 3), cropped
    assert torch.allclose(weights[1][:4, :3], weights[0])
    assert torch.allclose(weights[2][:, :4], weights[1])
    # blocks at different positions differ (their windows differ)
    assert not torch.allclose(weights[2][:4, :3], weights[2][:4, 3:6])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4000), st.booleans(), st.sampled_from([1, 2, 8]))
def test_superweight_allocation_is_exact_or_names_its_feasible_minimum(budget, hard, max_templates):
    shapes = [(4, 2, 3, 3), (8, 4, 3, 3), (8, 8, 3, 3), (10, 32), (3, 10)]
    groups = [[0, 1, 2], [3, 4]]
    shares = [0] * 5 if hard else None
    try:
        alloc = allocate_superweights(shapes, groups, shares, 7, budget, max_templates)
    except ValueError as error:
        minimum = int(re.search(r"smallest feasible budget is (\d+)", str(error)).group(1))
        assert budget < minimum
        assert allocate_superweights(shapes, groups, shares, 7, minimum, max_templates).total == minimum
        return
    assert alloc.total == budget
    for size, k, geometry in zip(alloc.bank_sizes, alloc.templates, alloc.geometries, strict=True):
        assert size >= 1 and 1 <= k <= max_templates
        assert k == 1 or size >= k * geometry.block_numel


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("budget", [0.1, 3.0])
def test_superweight_strategy_on_the_model_table(name, budget):
    case = CASES[name]
    model = case.build()
    gm = npas_fx.compile(model, budget, strategy="superweight", seed=1)
    plan = npas_fx.plan_of(gm)
    assert npas_fx.count_parameters(gm) == plan.trainable_params == round(budget * npas_fx.count_parameters(model))
    loss_of(gm.train()(*case.inputs())).backward()
    for key, param in npas_parameters(gm).items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{key} got no gradient"
    again = npas_fx.compile(case.build(), plan=Plan.from_json(plan.to_json()))
    again.load_state_dict(gm.state_dict())
    x = case.inputs()
    assert torch.allclose(again.eval()(*x), gm.eval()(*x), atol=1e-6)


def test_superweight_groups_must_stay_in_one_bin_and_old_plans_still_load():
    with pytest.raises(ValueError, match="one bin"):
        npas_fx.compile(
            TinyCNN(),
            0.5,
            strategy="superweight",
            options={"groups": [["c1.weight", "f1.weight"], ["c2.weight", "c3.weight", "f2.weight"]]},
        )
    plan = npas_fx.plan_of(npas_fx.compile(_mlp(), 0.5, strategy="shape")).to_dict()
    for layer in plan["layers"]:  # a plan written before SuperWeights existed
        del layer["block"], layer["coefficient_set"]
    assert npas_fx.count_parameters(npas_fx.compile(_mlp(), plan=Plan.from_dict(plan))) == plan["budget"]


def test_superweight_minimum_budget_is_one_value_per_group():
    model = _cnn()
    kept = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    gm = npas_fx.compile(model, kept + 2, strategy="superweight")
    assert npas_fx.count_parameters(gm) == kept + 2
    with pytest.raises(ValueError, match=f"smallest feasible budget is {kept + 2}"):
        npas_fx.compile(model, kept + 1, strategy="superweight")
    assert math.isfinite(float(gm(torch.randn(2, 1, 8, 8)).detach().sum()))


@pytest.mark.slow
@pytest.mark.parametrize("hard", [False, True])
def test_superweight_model_runs_under_torch_compile_fullgraph(hard):
    gm = npas_fx.compile(_mlp(), 0.5, strategy="superweight", options={"hard": hard})
    assert any(x.templates >= 2 for x in npas_fx.plan_of(gm).layers)  # the coefficient path is compiled
    compiled = torch.compile(gm, fullgraph=True)
    x = torch.randn(4, 6)
    assert torch.allclose(compiled(x), gm(x), atol=1e-5)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in npas_parameters(gm).values())
