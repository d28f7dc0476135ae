"""``compile(model, budget, init="fit")``: banks start as the least-squares fit of the trained weights.

The fit is exact where the plan is the identity (and wherever the banks can hold the weights),
never worse than the random start (per layer and in total) across strategies and budgets on the
table of tiny models, optimal where its answer has a closed form (generated weights equal the
projection of the trained weights onto what the generator can produce), keeps gradients flowing to
every bank, keeps the plan of ``init="random"`` (so it re-applies exactly), is deterministic, and
refuses bad ``init`` values before anything is built.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CASE_NAMES, CASES, DISTINCT_SHAPE_CASES, assert_unchanged, loss_of, npas_parameters, snapshot

import npas_fx
from npas_fx.fit import fit_shared, weight_errors
from npas_fx.plan import GroupPlan, LayerPlan
from npas_fx.shared_params import SharedParameters

STRATEGIES = ("shape", "single", "random", "hash", "superweight")
BUDGETS = (0.1, 0.5, 2.0)
SLACK = 1e-9  # the fit keeps a block step only if it lowers the objective: no room beyond rounding


def _generated(gm: torch.nn.Module) -> list[torch.Tensor]:
    shared = gm.get_submodule("npas")
    return [shared.generate(i).detach() for i in range(len(npas_fx.plan_of(gm).layers))]


def _originals(gm: torch.nn.Module, model: torch.nn.Module) -> list[torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return [params[layer.name].detach() for layer in npas_fx.plan_of(gm).layers]


# ---- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DISTINCT_SHAPE_CASES)
def test_identity_plan_is_reproduced_exactly(name):
    case = CASES[name]
    model = case.build().eval()
    gm = npas_fx.compile(model, 1.0, init="fit").eval()
    assert all(len(g.layers) == 1 for g in npas_fx.plan_of(gm).groups)
    for got, want in zip(_generated(gm), _originals(gm, model), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(gm(*case.inputs()), model(*case.inputs()))


@pytest.mark.parametrize("name", DISTINCT_SHAPE_CASES)
def test_identity_plan_is_fitted_without_copying(name):
    # copy_weights=False: the banks start random at a calibrated gain; the fit alone recovers the weights.
    case = CASES[name]
    model = case.build().eval()
    gm = npas_fx.compile(model, 1.0, init="fit", copy_weights=False).eval()
    assert not any(layer.copied for layer in npas_fx.plan_of(gm).layers)
    for got, want in zip(_generated(gm), _originals(gm, model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm(*case.inputs()), model(*case.inputs()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["shape", "single", "random", "superweight"])
@pytest.mark.parametrize("name", ["mlp", "residual_cnn", "attention_block", "tied_weights"])
def test_banks_larger_than_the_weights_fit_exactly(name, strategy):
    # At twice the parameters every layer mixes templates that span its weight: the fit is exact.
    model = CASES[name].build()
    gm = npas_fx.compile(model, 2.0, strategy=strategy, init="fit")
    assert weight_errors(gm, model)["total"] < 1e-4


# ---- never worse than the random start -----------------------------------------------------------
@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_fit_is_never_worse_than_random(name, strategy, budget):
    model = CASES[name].build()
    before = snapshot(model)
    random = weight_errors(npas_fx.compile(model, budget, strategy=strategy, seed=3), model)
    fitted = weight_errors(npas_fx.compile(model, budget, strategy=strategy, seed=3, init="fit"), model)
    assert_unchanged(model, before)
    assert random.keys() == fitted.keys()
    for layer in random:
        assert fitted[layer] <= random[layer] + SLACK, layer
    assert fitted["total"] < random["total"]


GENERATOR_CONFIGS = {
    "emb": npas_fx.GeneratorConfig(downsample="emb"),
    "interpolate": npas_fx.GeneratorConfig(upsample="interpolate"),
    "mask": npas_fx.GeneratorConfig(upsample="mask"),
    "hash_per_element": npas_fx.GeneratorConfig(upsample="hash", hash_chunk=1),
    "softmax_emb": npas_fx.GeneratorConfig(downsample="emb", normalize="softmax"),
}


@pytest.mark.parametrize("budget", [0.3, 2.0], ids=str)
@pytest.mark.parametrize("config", GENERATOR_CONFIGS)
@pytest.mark.parametrize("name", ["mlp", "residual_cnn", "mha_block"])
def test_every_generator_is_fitted(name, config, budget):
    model = CASES[name].build()
    generators = GENERATOR_CONFIGS[config]
    random = weight_errors(npas_fx.compile(model, budget, generators=generators, strategy="single"), model)
    fitted = weight_errors(npas_fx.compile(model, budget, generators=generators, strategy="single", init="fit"), model)
    for layer in random:
        assert fitted[layer] <= random[layer] + SLACK, layer
    assert fitted["total"] < random["total"]


# ---- optimality where the answer has a closed form -----------------------------------------------
def _jacobian(shared: SharedParameters, size: int) -> torch.Tensor:
    """Columns: the weight generated from each unit bank (the generator is linear in its bank)."""
    columns = []
    for j in range(size):
        with torch.no_grad():
            shared.groups["g0"].bank.zero_()
            shared.groups["g0"].bank[j] = 1.0
            columns.append(shared.generate(0).reshape(-1).double())
    return torch.stack(columns, 1)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["repeat", "hash", "interpolate", "slice"]),
    rows=st.integers(2, 7),
    cols=st.integers(2, 7),
    fraction=st.floats(0.15, 1.0),
    gain=st.floats(0.2, 3.0),
)
def test_bank_is_the_least_squares_solution(kind, rows, cols, fraction, gain):
    n = rows * cols
    size = max(1, round(fraction * n)) if kind != "slice" else n
    fields = {"gain": gain, "chunk": 2, "salt": 5} if kind == "hash" else {"gain": gain}
    if kind == "interpolate":
        fields["grid"] = npas_fx.generators.interpolation_grid((rows, cols), size)
    if kind == "slice":
        fields["templates"] = 1
    layer = LayerPlan("w", (rows, cols), "", "Linear", 0, kind, **fields)
    shared = SharedParameters([layer], [GroupPlan(0, ("w",), size)], embedding_dim=4)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 31 + cols))
    jacobian = _jacobian(shared, size)
    best = jacobian @ torch.linalg.pinv(jacobian) @ weight.reshape(-1, 1).double()  # the projection
    with torch.no_grad():
        shared.groups["g0"].bank.normal_()
    fit_shared(shared, [weight])
    got = shared.generate(0).detach().reshape(-1, 1).double()
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-5)


def test_gather_bank_value_is_the_mean_of_its_readers():
    # repeat with a gain: each bank value is the mean of (weight / gain) over the positions reading it.
    layer = LayerPlan("w", (3, 5), "", "Linear", 0, "repeat", gain=0.5)
    shared = SharedParameters([layer], [GroupPlan(0, ("w",), 4)], embedding_dim=4)
    weight = torch.arange(15.0).view(3, 5)
    reads = _jacobian(shared, 4).argmax(1)  # which bank value each weight reads
    fit_shared(shared, [weight])
    bank = shared.groups["g0"].bank.detach()
    for j in range(4):
        want = (weight.reshape(-1)[reads == j] / 0.5).mean()
        torch.testing.assert_close(bank[j], want)


# ---- training, plans, determinism ----------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["residual_cnn", "mha_block", "tied_weights", "embedding_layernorm"])
def test_gradients_reach_every_bank(name, strategy):
    case = CASES[name]
    gm = npas_fx.compile(case.build(), 0.3, strategy=strategy, init="fit")
    loss_of(gm(*case.inputs())).backward()
    for key, param in npas_parameters(gm).items():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_is_the_random_init_plan_and_re_applies(strategy, tmp_path):
    case = CASES["attention_block"]
    model = case.build()
    fitted = npas_fx.compile(model, 0.3, strategy=strategy, seed=2, init="fit")
    random = npas_fx.compile(model, 0.3, strategy=strategy, seed=2)
    plan = npas_fx.plan_of(fitted)
    assert plan.layers == npas_fx.plan_of(random).layers and plan.groups == npas_fx.plan_of(random).groups
    assert plan.provenance["init"] == "fit" and 0 <= plan.provenance["fit_error"] < 1
    plan.to_json(tmp_path / "plan.json")
    loaded = npas_fx.Plan.from_json(tmp_path / "plan.json")
    assert loaded == plan
    again = npas_fx.compile(model, plan=loaded)  # same structure; values come from the state dict
    assert npas_fx.plan_of(again).layers == plan.layers
    again.load_state_dict(fitted.state_dict())
    x = case.inputs()
    assert torch.equal(again.eval()(*x), fitted.eval()(*x))
    refit = npas_fx.compile(model, plan=loaded, init="fit")  # a saved plan can be fitted again
    for a, b in zip(_generated(refit), _generated(fitted), strict=True):
        assert torch.equal(a, b)


def test_fit_is_deterministic_for_a_seed():
    model = CASES["mha_block"].build()
    a = npas_fx.compile(model, 0.2, strategy="single", seed=5, init="fit").state_dict()
    b = npas_fx.compile(model, 0.2, strategy="single", seed=5, init="fit").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_follows_the_weights_dtype():
    model = CASES["attention_block"].build().double()
    gm = npas_fx.compile(model, 1.0, init="fit", copy_weights=False)
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    assert weight_errors(gm, model)["total"] < 1e-10


def test_fit_in_low_precision_runs_in_float32():
    model = CASES["mlp"].build().to(torch.bfloat16)
    random = weight_errors(npas_fx.compile(model, 0.5), model)["total"]
    fitted = npas_fx.compile(model, 0.5, init="fit")
    assert all(p.dtype == torch.bfloat16 for p in fitted.parameters())
    assert weight_errors(fitted, model)["total"] < 0.8 * random


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("init", "error", "words"),
    [
        ("Fit", ValueError, ["`init`", "'Fit'", "'random'", "'fit'"]),
        ("", ValueError, ["`init`", "''"]),
        ("pretrained", ValueError, ["`init`", "'pretrained'"]),
        (None, TypeError, ["`init`", "None"]),
        (True, TypeError, ["`init`", "True"]),
        (1, TypeError, ["`init`", "int 1"]),
    ],
)
def test_bad_init_is_refused_before_anything_is_built(init, error, words):
    model = CASES["mlp"].build()
    before = snapshot(model)
    with pytest.raises(error) as raised:
        npas_fx.compile(model, 0.5, init=init)
    assert all(w in str(raised.value) for w in words), str(raised.value)
    assert_unchanged(model, before)
