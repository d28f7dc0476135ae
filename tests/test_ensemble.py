"""Shared ensembles: heterogeneous members (CNNs of different width and depth, an MLP, an untraceable
gated CNN) compiled into one exact budget, with banks shared across members.

For every data-free strategy: exact counts for int and float budgets, gradients from the summed
loss reach every bank, groups really span members, each member's own loss reaches exactly the banks
it uses, member views equal the ensemble's outputs. Then prediction (mean softmax, anytime order),
train/eval, plan round trips and re-application, pictures, and the refused inputs.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import assert_unchanged, snapshot
from torch import Tensor, nn

import npas_fx
from npas_fx.ensemble import ENSEMBLE_KEY, member_of

DATA_FREE = ("shape", "single", "random", "hash", "superweight")
SHARING = ("shape", "single", "superweight")  # strategies that must put layers of two members in one group


# ---- members ------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """``convs`` 3x3 convolutions of ``width`` channels (BatchNorm after the first) and a linear head."""

    def __init__(self, width: int, convs: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.body = nn.Sequential(*[nn.Conv2d(width, width, 3, padding=1) for _ in range(convs - 1)])
        self.head = nn.Linear(width * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(torch.relu(self.body(torch.relu(self.bn(self.stem(x))))), 2)  # (B, w, 4, 4)
        return self.head(h.flatten(1))


class GatedCNN(nn.Module):
    """Branches on a tensor value (untraceable: it runs as an opaque leaf); its stem has cnn_a's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        if h.mean() > 1e3:  # never true, but only a value can tell
            h = h / h.mean()
        return self.head(h.flatten(1))


def build_members(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Dropout(0.3), nn.Linear(24, 10))
    return [SmallCNN(4, 2), SmallCNN(8, 3), mlp, GatedCNN()]


X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.arange(6) % 10


def summed_count(models: list[nn.Module]) -> int:
    return sum(npas_fx.count_parameters(m) for m in models)


@pytest.fixture(scope="module")
def ensembles() -> dict:
    """One compiled ensemble per strategy (budget 0.5, example inputs given), built once."""
    cache: dict = {}

    def get(strategy: str) -> npas_fx.SharedEnsemble:
        if strategy not in cache:
            cache[strategy] = npas_fx.compile_ensemble(build_members(), 0.5, strategy=strategy, example_inputs=(X,))
        return copy.deepcopy(cache[strategy])

    return get


def minimum_in(error: BaseException) -> int:
    """The smallest feasible budget an infeasible-budget error names."""
    match = re.search(r"smallest feasible budget[^0-9]* is (\d+)", str(error))
    assert match, str(error)
    return int(match.group(1))


def bank_names(ens: nn.Module) -> dict[int, str]:
    return {g.index: f"compiled.npas.groups.g{g.index}.bank" for g in npas_fx.plan_of(ens).groups}


def groups_of_member(ens: nn.Module, index: int) -> set[int]:
    return {x.group for x in npas_fx.plan_of(ens).layers if member_of(x.name) == index}


# ---- budgets and sharing ------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", DATA_FREE)
@pytest.mark.parametrize("budget", [0.3, 1.0, 2.5, 3001])
def test_exact_count_for_int_and_float_budgets(strategy, budget):
    models = build_members()
    before = [snapshot(m) for m in models]
    ens = npas_fx.compile_ensemble(models, budget, strategy=strategy)
    expected = budget if isinstance(budget, int) else round(budget * summed_count(models))
    assert npas_fx.count_parameters(ens) == expected == npas_fx.plan_of(ens).budget
    assert [tuple(o.shape) for o in ens(X)] == [(6, 10)] * 4
    for model, snap in zip(models, before, strict=True):
        assert_unchanged(model, snap)


@pytest.mark.parametrize("strategy", DATA_FREE)
def test_summed_loss_reaches_every_bank(ensembles, strategy):
    ens = ensembles(strategy)
    sum(F.cross_entropy(out, Y) for out in ens(X)).backward()
    params = dict(ens.named_parameters())
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
    for name in bank_names(ens).values():
        assert params[name].grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("strategy", SHARING)
def test_layers_of_different_members_share_a_bank(ensembles, strategy):
    plan = npas_fx.plan_of(ensembles(strategy))
    spans = [{member_of(name) for name in g.layers} for g in plan.groups]
    assert None not in set().union(*spans)
    assert any(len(s) >= 2 for s in spans), spans
    if strategy == "shape":  # cnn_a's stem and the opaque GatedCNN's stem are both 4x1x3x3
        stem = plan.layer("members.0.stem.weight").group
        assert plan.layer("members.3.stem.weight").group == stem


@pytest.mark.parametrize("strategy", DATA_FREE)
def test_each_member_loss_reaches_exactly_its_banks(ensembles, strategy):
    ens = ensembles(strategy)
    for index in range(len(ens)):
        ens.zero_grad(set_to_none=True)
        F.cross_entropy(ens.member(index)(X), Y).backward()
        params = dict(ens.named_parameters())
        used = groups_of_member(ens, index)
        for group, name in bank_names(ens).items():
            grad = params[name].grad
            if group in used:
                assert grad is not None and grad.abs().sum() > 0, f"member {index}: {name} got no gradient"
            else:
                assert grad is None, f"member {index} does not use {name} but sent it gradient"


@pytest.mark.parametrize("strategy", DATA_FREE)
def test_member_views_equal_forward_and_share_parameters(ensembles, strategy):
    ens = ensembles(strategy)
    for mode in (True, False):
        ens.train(mode)
        torch.manual_seed(0)
        outputs = ens(X)
        for index in range(len(ens)):
            view = ens.member(index)
            torch.manual_seed(0)  # dropout (member 2) draws the same mask when it runs first
            got = view(X)
            if mode and index == 2:
                continue  # in training, dropout's mask depends on what ran before it
            torch.testing.assert_close(got, outputs[index], rtol=0, atol=0)
            ids = {id(p) for p in ens.parameters()}
            assert all(id(p) in ids for p in view.parameters())  # a view, not a copy
    ens.eval()
    view = ens.member(1)
    bank = dict(ens.named_parameters())[bank_names(ens)[next(iter(groups_of_member(ens, 1)))]]
    before = view(X)
    with torch.no_grad():
        bank.add_(1.0)
    assert not torch.equal(view(X), before)  # the view reads the ensemble's own banks


def test_untraceable_member_is_an_opaque_leaf(ensembles):
    plan = npas_fx.plan_of(ensembles("shape"))
    assert [o.path for o in plan.opaque] == ["members.3"]
    assert isinstance(ensembles("shape").member(0), torch.fx.GraphModule)


class VarArgs(nn.Module):
    """Takes ``*args``: the container gets no fixed signature, so it runs as one opaque leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, *args: Tensor) -> Tensor:
        return self.fc(args[0].flatten(1))


@pytest.mark.parametrize(
    ("first", "example", "opaque_root"),
    [(SmallCNN(4, 2), {"x": X}, False), (VarArgs(), None, True), (VarArgs(), (X,), False)],
)
def test_signatures_keywords_and_an_opaque_container(first, example, opaque_root):
    models = [copy.deepcopy(first), SmallCNN(8, 2)]
    ens = npas_fx.compile_ensemble(models, 0.5, strategy="shape", example_inputs=example).eval()
    outputs = ens(**example) if isinstance(example, dict) else ens(X)
    assert ("" in {o.path for o in npas_fx.plan_of(ens).opaque}) == opaque_root
    for index in range(2):
        view = ens.member(index)
        assert isinstance(view, torch.fx.GraphModule) != opaque_root  # an opaque root cannot be split
        got = view(**example) if isinstance(example, dict) else view(X)
        torch.testing.assert_close(got, outputs[index], rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(ens, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False).predict(X), ens.predict(X), rtol=0, atol=0)


# ---- prediction ---------------------------------------------------------------------------------
def test_predict_averages_softmaxes_in_order(ensembles):
    ens = ensembles("superweight").eval()
    flops = ens.flops
    assert list(ens.order) == sorted(range(4), key=lambda i: (flops[i], i))
    assert flops[2] < flops[0] < flops[1]  # the MLP is cheapest, the wider deeper CNN dearest
    with torch.no_grad():
        outputs = ens(X)
        steps = list(ens.anytime(X))
        assert len(steps) == 4
        for k in range(1, 5):
            manual = torch.stack([outputs[i].softmax(-1) for i in ens.order[:k]]).mean(0)
            torch.testing.assert_close(ens.predict(X, k=k), manual)
            torch.testing.assert_close(steps[k - 1], manual)
        torch.testing.assert_close(ens.predict(X), steps[-1])


@pytest.mark.parametrize(
    ("order", "example", "expected"),
    [((3, 1, 0, 2), True, (3, 1, 0, 2)), ("given", True, (0, 1, 2, 3)), (None, False, (0, 1, 2, 3))],
)
def test_order_can_be_given(order, example, expected):
    ens = npas_fx.compile_ensemble(build_members(), 0.5, order=order, example_inputs=(X,) if example else None)
    assert ens.order == expected
    assert npas_fx.plan_of(ens).provenance[ENSEMBLE_KEY]["order"] == list(expected)


def test_train_and_eval_reach_every_member(ensembles):
    ens = ensembles("shape")
    ens.eval()
    assert not any(m.training for m in ens.modules())
    assert not any(m.training for i in range(len(ens)) for m in ens.member(i).modules())
    torch.testing.assert_close(ens(X)[2], ens(X)[2], rtol=0, atol=0)  # dropout off
    ens.train()
    assert all(m.training for m in ens.modules())
    assert all(m.training for i in range(len(ens)) for m in ens.member(i).modules())
    assert not torch.equal(ens(X)[2], ens(X)[2])  # dropout on


# ---- plans --------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["shape", "superweight", "hash"])
def test_plan_round_trip_and_reapplication(ensembles, strategy):
    ens = ensembles(strategy).eval()
    plan = npas_fx.plan_of(ens)
    again = npas_fx.Plan.from_json(plan.to_json())
    assert again == plan
    twin = npas_fx.compile_ensemble(build_members(), plan=again).eval()
    assert npas_fx.plan_of(twin) == plan
    assert twin.order == ens.order  # kept from the plan without example inputs
    for a, b in zip(twin(X), ens(X), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(twin.predict(X, k=2), ens.predict(X, k=2), rtol=0, atol=0)
    twin.load_state_dict(ens.state_dict())


def test_summary_and_picture_name_members(ensembles, tmp_path):
    ens = ensembles("superweight")
    text = ens.summary()
    assert "members (prediction order" in text and "member 3: GatedCNN" in text
    assert npas_fx.plan_of(ens).summary() in text
    source = npas_fx.draw_plan(ens, tmp_path / "ens.dot").read_text()
    assert all(f"member {i}" in source for i in range(4))


def test_deepcopy_and_torch_save_keep_predictions(ensembles):
    ens = ensembles("shape").eval()
    expected = ens.predict(X)
    buffer = io.BytesIO()
    torch.save(ens, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(ens), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(other.eval().predict(X), expected, rtol=0, atol=0)
        assert npas_fx.plan_of(other) == npas_fx.plan_of(ens)


def test_learned_strategy_sums_member_losses():
    ens = npas_fx.compile_ensemble(
        build_members(),
        0.4,
        strategy="swn",
        data=[(X, Y)],
        loss_fn=F.cross_entropy,
        search_steps=2,
        options={"progress": False},
    )
    assert npas_fx.count_parameters(ens) == round(0.4 * summed_count(build_members()))
    assert "similarity" in npas_fx.plan_of(ens).provenance


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.integers(0, 20_000), strategy=st.sampled_from(["superweight", "hash"]))
def test_any_feasible_budget_is_exact(extra, strategy):
    models = build_members()
    with pytest.raises(ValueError, match="smallest feasible budget") as error:
        npas_fx.compile_ensemble(models, 1, strategy=strategy)
    minimum = minimum_in(error.value)
    ens = npas_fx.compile_ensemble(models, minimum + extra, strategy=strategy)
    assert npas_fx.count_parameters(ens) == minimum + extra


# ---- refused inputs -----------------------------------------------------------------------------
def test_infeasible_budget_names_the_minimum():
    with pytest.raises(ValueError, match="smallest feasible budget") as error:
        npas_fx.compile_ensemble(build_members(), 10, strategy="shape")
    minimum = minimum_in(error.value)
    assert npas_fx.count_parameters(npas_fx.compile_ensemble(build_members(), minimum, strategy="shape")) == minimum


def _shared_weight_pair() -> list[nn.Module]:
    a, b = SmallCNN(4, 2), SmallCNN(4, 2)
    b.head = a.head
    return [a, b]


@pytest.mark.parametrize(
    ("models", "kwargs", "error", "words"),
    [
        (lambda: SmallCNN(4, 2), {}, TypeError, ["sequence", "list"]),
        (lambda: [], {}, ValueError, ["empty"]),
        (lambda: [SmallCNN(4, 2), "cnn"], {}, TypeError, ["models[1]", "str"]),
        (lambda: [m := SmallCNN(4, 2), m], {}, ValueError, ["passed twice", "deepcopy"]),
        (_shared_weight_pair, {}, ValueError, ["share a parameter"]),
        (build_members, {"order": (0, 1, 1, 2)}, ValueError, ["order", "once"]),
        (build_members, {"order": "fast"}, ValueError, ["order", "flops"]),
        (build_members, {"order": "flops"}, ValueError, ["example_inputs"]),
        (build_members, {"budget": True}, TypeError, ["budget"]),
        (build_members, {"budget": -0.5}, ValueError, ["positive"]),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_built(models, kwargs, error, words):
    kwargs = {"budget": 0.5, **kwargs}
    budget = kwargs.pop("budget")
    with pytest.raises(error) as info:
        npas_fx.compile_ensemble(models(), budget, **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_plan_for_another_ensemble_is_refused(ensembles):
    plan = npas_fx.plan_of(ensembles("shape"))
    with pytest.raises(ValueError, match="ensemble of 4 members, not for these 3"):
        npas_fx.compile_ensemble(build_members()[:3], plan=plan)
    single = npas_fx.plan_of(npas_fx.compile(SmallCNN(4, 2), 0.5))
    with pytest.raises(ValueError, match="single model"):
        npas_fx.compile_ensemble(build_members(), plan=single)


def test_predict_and_member_refuse_bad_indices(ensembles):
    ens = ensembles("shape")
    with pytest.raises(ValueError, match="`k`"):
        ens.predict(X, k=0)
    with pytest.raises(IndexError, match="0..3"):
        ens.member(4)
