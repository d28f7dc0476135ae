"""Nothing silently wrong: each class of hostile input found by a sweep, pinned by a table of cases.

Silent wrong results (TorchScript parts, root hooks, complex and mixed dtypes, the input model on a
failure path), crashes that must be clear errors (meta tensors, zero-size weights, NaN search
losses, bad arguments, corrupted plans), and a newcomer's papercuts (networkx export of real swn
plans, the CLI's data arguments, budget strings, non-persistent buffers, summary wording).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import npas_fx
from npas_fx import Plan
from npas_fx.cli import main as cli_main
from npas_fx.plan_checks import PlanError


def _mlp() -> nn.Module:
    """Distinct shapes everywhere, so the identity plan copies every weight (outputs equal exactly)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


# ---- TorchScript parts are refused before anything is built ---------------------------------------------
def _scripted(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in 2.13
        return torch.jit.script(module)


SCRIPTED = {
    "scripted Linear inside": (lambda: nn.Sequential(nn.Linear(4, 4), _scripted(nn.Linear(4, 4))), "'1'"),
    "scripted Sequential inside": (lambda: nn.Sequential(_scripted(nn.Sequential(nn.Linear(4, 4)))), "'0'"),
    "scripted nested deeper": (
        lambda: nn.Sequential(nn.Sequential(nn.ReLU(), _scripted(nn.Linear(4, 2)))),
        "'0.1'",
    ),
    "scripted root": (lambda: _scripted(nn.Sequential(nn.Linear(4, 4))), "the model itself"),
}


@pytest.mark.parametrize("name", SCRIPTED)
def test_torchscript_parts_are_refused_naming_the_module(name):
    build, where = SCRIPTED[name]
    model = build()
    before = _state(model)
    with pytest.raises(ValueError, match="TorchScript") as info:
        npas_fx.compile(model, 0.5)
    assert where in str(info.value) and "eager module" in str(info.value)
    _assert_same_state(model, before)


# ---- hooks on the root survive ------------------------------------------------------------------------
def _with_hook(kind: str) -> nn.Module:
    model = _mlp()
    if kind == "forward":
        model.register_forward_hook(lambda m, args, out: out * 2 + 1)
    elif kind == "forward pre":
        model.register_forward_pre_hook(lambda m, args: (args[0] - 0.5,))
    elif kind == "forward with_kwargs":
        model.register_forward_hook(lambda m, args, kwargs, out: out.flip(-1), with_kwargs=True)
    elif kind == "forward pre with_kwargs":
        model.register_forward_pre_hook(lambda m, args, kwargs: ((args[0] * 3,), kwargs), with_kwargs=True)
    elif kind == "two hooks":
        model.register_forward_pre_hook(lambda m, args: (args[0].abs(),))
        model.register_forward_hook(lambda m, args, out: out.softmax(-1))
    elif kind == "backward":
        model.register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0] * 7,))
    elif kind == "state_dict":
        model._register_state_dict_hook(lambda m, state, prefix, local: state.update({prefix + "extra": 1}))
    elif kind == "backward pre":
        model.register_full_backward_pre_hook(lambda m, grad_out: (grad_out[0] * -2,))
    return model


ROOT_HOOKS = ("forward", "forward pre", "forward with_kwargs", "forward pre with_kwargs", "two hooks")


@pytest.mark.parametrize("kind", ROOT_HOOKS)
def test_root_forward_hooks_survive_the_identity_plan(kind):
    model = _with_hook(kind)
    x = torch.randn(4, 6)
    gm = npas_fx.compile(model, 1.0)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert "hooks" in npas_fx.plan_of(gm).opaque[0].reason
    again = npas_fx.compile(model, plan=npas_fx.plan_of(gm))  # the saved plan re-applies the same way
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_root_state_dict_hooks_survive():
    model = _with_hook("state_dict")
    gm = npas_fx.compile(model, 0.5)
    assert model.state_dict()["extra"] == 1 and gm.state_dict()["model.extra"] == 1


@pytest.mark.parametrize("kind", ["backward", "backward pre"])
def test_root_backward_hooks_survive(kind):
    model = _with_hook(kind)
    gm = npas_fx.compile(model, 1.0)
    grads = []
    for net in (model, gm):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
        net(x).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert not torch.equal(grads[0], _without_hooks_grad())  # the hook does change the gradient


def _without_hooks_grad() -> torch.Tensor:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    _mlp()(x).sum().backward()
    return x.grad


# ---- dtypes and devices: a bank never mixes them -------------------------------------------------------
class _Mixed(nn.Module):
    """Three same-shape layers of different dtypes (the model casts between them)."""

    def __init__(self, dtypes: tuple[torch.dtype, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6, dtype=d) for d in dtypes)
        self.dtypes = dtypes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, dtype in zip(self.layers, self.dtypes, strict=True):
            x = layer((x if dtype.is_complex else x.real).to(dtype))
        return x


DTYPES = {
    "complex64 only": (torch.cfloat, torch.cfloat),
    "float32 and float64": (torch.float32, torch.float64, torch.float32),
    "complex and real": (torch.float32, torch.cfloat, torch.float32),
    "three dtypes": (torch.float64, torch.cfloat, torch.float32),
}


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("strategy", ["shape", "single", "random", "hash", "superweight"])
@pytest.mark.parametrize("name", DTYPES)
def test_groups_never_mix_dtypes_and_budgets_stay_exact(name, strategy):
    torch.manual_seed(0)
    model = _Mixed(DTYPES[name])
    x = torch.randn(3, 6)
    gm = npas_fx.compile(model, 0.6, strategy=strategy)
    assert npas_fx.count_parameters(gm) == round(0.6 * npas_fx.count_parameters(model))
    out = gm(x)
    assert out.dtype == model(x).dtype and torch.isfinite(torch.view_as_real(out) if out.is_complex() else out).all()
    plan = npas_fx.plan_of(gm)
    for group in plan.groups:
        dtypes = {model.get_parameter(n).dtype for n in group.layers}
        assert dtypes == {getattr(gm.npas.groups, f"g{group.index}").bank.dtype}
    out.real.sum().backward()
    for key, bank in gm.npas.groups.items():
        assert bank.bank.grad is not None and bank.bank.grad.abs().sum() > 0, key


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_a_plan_whose_group_mixes_dtypes_is_refused():
    model = _Mixed((torch.float32, torch.float64))
    data = json.loads(npas_fx.plan_of(npas_fx.compile(model, 0.6, strategy="single")).to_json())
    assert len(data["groups"]) == 2  # split by dtype
    merged = {"index": 0, "layers": [x["name"] for x in data["layers"]], "overhead": 0}
    merged["bank_size"] = sum(g["bank_size"] for g in data["groups"])
    data["groups"] = [merged]
    for layer in data["layers"]:
        layer.update(group=0, offset=0)
    with pytest.raises(PlanError, match=r"plan\.groups\[0\]\.layers=.* mix torch\.float32 on cpu and torch\.float64"):
        npas_fx.compile(model, plan=Plan.from_dict(data))


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("budget", [0.3, 1.0, 3.0])
def test_complex_banks_start_with_both_parts(budget):
    torch.manual_seed(0)
    model = _Mixed((torch.cfloat, torch.cfloat, torch.cdouble))
    gm = npas_fx.compile(model, budget, copy_weights=False)
    for key, group in gm.npas.groups.items():
        bank = group.bank
        assert bank.is_complex()
        assert bank.real.abs().sum() > 0 and bank.imag.abs().sum() > 0, key
        assert 0.2 < float(bank.detach().imag.std() / bank.detach().real.std()) < 5, (
            key
        )  # comparable parts, not a zero one


# ---- the input model is never modified ---------------------------------------------------------------
class _SelfEditing(nn.Module):
    """Edits its own dense parameter in place each forward, and needs a real Parameter as fc.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale.mul_(2)
        if not isinstance(self.fc.weight, nn.Parameter):
            raise TypeError("fc.weight should be a Parameter")
        return self.fc(x) * self.scale


@pytest.mark.parametrize("budget", [0.5, 1.0])
def test_a_failing_compiled_model_does_not_touch_the_input(budget):
    model = _SelfEditing()
    before = _state(model)
    with pytest.raises(RuntimeError, match="fails when run with generated parameters"):
        npas_fx.compile(model, budget, example_inputs=(torch.randn(2, 4),))
    _assert_same_state(model, before)


# ---- meta tensors, zero-size weights -------------------------------------------------------------------
META = {
    "meta Linear": lambda: nn.Linear(4, 4, device="meta"),
    "meta inside": lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta")),
    "meta buffer": lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, device="meta")),
}


@pytest.mark.parametrize("name", META)
def test_meta_models_are_refused_clearly(name):
    with pytest.raises(ValueError, match="'meta' device.*to_empty"):
        npas_fx.compile(META[name](), 0.5)


ZERO_SIZE = {
    "Linear(8, 0)": lambda: nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 6), nn.Linear(6, 0)),
    "Linear(0, 4)": lambda: nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 4), nn.Linear(4, 3)),
    "Linear(8, 0) twice": lambda: nn.Sequential(nn.Linear(8, 5), nn.Linear(5, 5), nn.Linear(5, 0), nn.Linear(0, 0)),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element")
@pytest.mark.parametrize("name", ZERO_SIZE)
@pytest.mark.parametrize("strategy", ["shape", "hash", "superweight"])
def test_zero_size_weights_stay_dense_and_cost_nothing(name, strategy):
    torch.manual_seed(0)
    model = ZERO_SIZE[name]()
    gm = npas_fx.compile(model, 0.5, strategy=strategy)
    assert npas_fx.count_parameters(gm) == round(0.5 * npas_fx.count_parameters(model))
    plan = npas_fx.plan_of(gm)
    assert {k.reason for k in plan.kept if k.numel == 0 and k.name.endswith("weight")} == {"empty"}
    x = torch.randn(2, 8 if "8" in name else 0)
    assert gm(x).shape == model(x).shape


# ---- NaN / inf during search --------------------------------------------------------------------------
def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.Linear(8, 3)
    )


def _batches(bad: float | None = None) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        x = torch.randn(6, 1, 8, 8, generator=g)
        if bad is not None:
            x[0, 0, 0, 0] = bad
        out.append((x, torch.randint(0, 3, (6,), generator=g)))
    return out


@pytest.mark.parametrize("strategy", ["ssn", "swn"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_search_losses_raise_naming_the_step(strategy, bad):
    with pytest.raises(ValueError, match=r"loss is (nan|inf) at pre-training step 1 of 3.*options=\{'lr'"):
        npas_fx.compile(_cnn(), 0.5, strategy=strategy, data=_batches(bad), loss_fn=F.cross_entropy, search_steps=3)


@pytest.mark.parametrize(
    "provenance",
    [{"score": float("nan")}, {"m": [[1.0, float("inf")], [float("-inf"), None]]}, {"deep": {"x": (float("nan"),)}}],
)
def test_plan_json_is_strict_json(provenance, tmp_path):
    plan = replace(npas_fx.plan_of(npas_fx.compile(_mlp(), 0.5)), provenance=provenance)
    text = plan.to_json(tmp_path / "p.json")

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(text, parse_constant=refuse)
    assert "NaN" not in text and "Infinity" not in text
    assert Plan.from_json(tmp_path / "p.json").provenance == data["provenance"]


# ---- arguments ------------------------------------------------------------------------------------------
ARGUMENTS = [
    ({"strategy": ["shape"]}, TypeError, ["`strategy`", "['shape']"]),
    ({"strategy": "shapes"}, ValueError, ["`strategy`", "'shapes'", "available"]),
    ({"seed": 2**64}, ValueError, ["`seed`", str(2**64)]),
    ({"seed": -1}, ValueError, ["`seed`", "-1"]),
    ({"seed": 1.0}, TypeError, ["`seed`", "1.0"]),
    ({"keep": "("}, ValueError, ["`keep`", "'('", "re.escape"]),
    ({"keep": 123}, TypeError, ["`keep`", "123"]),
    ({"keep": ["a", 1]}, TypeError, ["`keep`"]),
    ({"num_groups": 1.5, "strategy": "random"}, TypeError, ["`num_groups`", "1.5"]),
    ({"num_groups": True, "strategy": "random"}, TypeError, ["`num_groups`", "True"]),
    ({"num_groups": -2, "strategy": "random"}, ValueError, ["`num_groups`", "-2"]),
    ({"options": "abc"}, TypeError, ["`options`", "'abc'"]),
    ({"options": {"lr": 0.1}}, ValueError, ["`options`", "'lr'", "'auto'", "drop"]),
    ({"options": {"lr": 0.1}, "strategy": "hash"}, ValueError, ["`options`", "'lr'", "'hash'"]),
    ({"options": {"threshold": 0.1}, "strategy": "superweight"}, ValueError, ["'threshold'", "groups", "hard"]),
    ({"options": {"thresold": 0.1}, "strategy": "swn"}, ValueError, ["'thresold'", "threshold"]),
    ({"options": {"threshold": 0.1}, "strategy": "ssn"}, ValueError, ["'threshold'", "templates"]),
    ({"loss_fn": "cross_entropy", "strategy": "swn"}, TypeError, ["`loss_fn`", "torch.nn.functional.cross_entropy"]),
    ({"loss_fn": F.cross_entropy}, ValueError, ["'auto'", "data-free", "`loss_fn`"]),
    ({"data": torch.randn(3, 4), "strategy": "ssn"}, TypeError, ["`data`", "Tensor"]),
    ({"search_steps": 0, "strategy": "swn"}, ValueError, ["`search_steps`", "0"]),
    ({"copy_weights": "yes"}, TypeError, ["`copy_weights`", "'yes'"]),
    ({"example_inputs": torch.randn(2, 6)}, TypeError, ["`example_inputs`", "(x,)"]),
    ({"generators": {"upsample": "hash"}}, TypeError, ["`generators`", "GeneratorConfig"]),
    ({"budget": "abc"}, ValueError, ["`budget`", "'abc'", "10%"]),
    ({"budget": "0%"}, ValueError, ["`budget`"]),
    ({"budget": [0.5]}, TypeError, ["`budget`", "list"]),
    ({"budget": 10**9}, ValueError, ["`budget`", "1,000,000,000", "allow_large_budget=True"]),
    ({"allow_large_budget": 1}, TypeError, ["`allow_large_budget`"]),
    ({"num_groups": 2}, ValueError, ["'auto'", "`num_groups`", "'random'"]),
    ({"num_groups": 2, "strategy": "hash"}, ValueError, ["'hash'", "`num_groups`"]),
]


def _case_id(kwargs: dict) -> str:
    """A test id that is the same in every process (pytest-xdist): no reprs of random tensors."""
    scalar = (str, int, float, bool, type(None))
    return ",".join(
        f"{k}={v!r}"[:40] if isinstance(v, scalar) else f"{k}=<{type(v).__name__}>" for k, v in kwargs.items()
    )


@pytest.mark.parametrize("kwargs, error, words", ARGUMENTS, ids=[_case_id(a[0]) for a in ARGUMENTS])
def test_bad_arguments_name_the_argument_the_value_and_the_fix(kwargs, error, words):
    model = _mlp()
    before = _state(model)
    kwargs = {"budget": 0.5, **kwargs}
    with pytest.raises(error) as info:
        npas_fx.compile(model, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    _assert_same_state(model, before)


@pytest.mark.parametrize("budget, same", [("40%", 0.4), ("0.5", 0.5), ("100", 100), ("1_000", 1000), (" 250% ", 2.5)])
def test_budget_strings_read_as_the_command_line_reads_them(budget, same):
    from npas_fx.cli import parse_budget

    assert parse_budget(budget) == same
    counts = [npas_fx.count_parameters(npas_fx.compile(_mlp(), b)) for b in (budget, same)]
    assert counts[0] == counts[1] == (same if isinstance(same, int) else round(same * 119))


def test_a_large_budget_needs_opting_in():
    model = nn.Linear(2, 2)
    gm = npas_fx.compile(model, 1001 * 6, allow_large_budget=True)
    assert npas_fx.count_parameters(gm) == 6006
    assert npas_fx.count_parameters(npas_fx.compile(model, 1000 * 6)) == 6000  # the threshold itself is allowed


PLAN_CONFLICTS = [
    {"strategy": "hash"},
    {"seed": 3},
    {"keep": ["0.weight"]},
    {"num_groups": 2},
    {"generators": npas_fx.GeneratorConfig(upsample="mask")},
    {"options": {}},
    {"copy_weights": False},
    {"loss_fn": F.mse_loss},
]


@pytest.mark.parametrize("kwargs", PLAN_CONFLICTS, ids=lambda k: next(iter(k)))
def test_arguments_a_saved_plan_would_ignore_are_refused(kwargs):
    plan = npas_fx.plan_of(npas_fx.compile(_mlp(), 0.5))
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}`=.*would be ignored"):
        npas_fx.compile(_mlp(), plan=plan, **kwargs)


# ---- corrupted plans --------------------------------------------------------------------------------------
def _plan_dict(budget: float = 2.0) -> dict:
    return json.loads(npas_fx.plan_of(npas_fx.compile(_mlp(), budget)).to_json())


def _set(path: str, value: object):
    def edit(d: dict) -> None:
        *head, last = path.split(".")
        for key in head:
            d = d[int(key)] if isinstance(d, list) else d[key]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value

    return edit


def _drop(key: str):
    return lambda d: d.pop(key)


def _shift(key: str, delta: int):
    """Change a group's bank and the budget together, so that only the geometry is wrong."""

    def edit(d: dict) -> None:
        d["groups"][0][key] += delta
        d["budget"] += delta

    return edit


def _duplicate_layer(d: dict) -> None:
    d["layers"].append(dict(d["layers"][0]))


def _offset_past(d: dict) -> None:
    d["layers"][0]["offset"] = 10**6


CORRUPTIONS = {
    "budget off by one": (_set("budget", None), "plan.budget"),
    "budget larger": (lambda d: d.update(budget=d["budget"] + 1), "plan.budget="),
    "budget a string": (lambda d: d.update(budget=str(d["budget"])), "plan.budget="),
    "bank size off": (lambda d: d["groups"][0].update(bank_size=d["groups"][0]["bank_size"] + 3), "plan.budget="),
    "bank too small for its templates": (_shift("bank_size", -100), "plan.layers[0].offset"),
    "negative bank": (lambda d: d["groups"][0].update(bank_size=-5), "plan.groups[0].bank_size=-5"),
    "kept count off": (lambda d: d["kept"][0].update(numel=d["kept"][0]["numel"] + 1), "plan.budget="),
    "kept count negative": (_set("kept.0.numel", -1), "plan.kept[0].numel=-1"),
    "group index unknown": (_set("layers.1.group", 7), "plan.layers[1].group=7"),
    "group index a string": (_set("layers.1.group", "g1"), "plan.layers[1].group='g1'"),
    "groups missing": (_drop("groups"), "plan.groups is missing"),
    "layers missing": (_drop("layers"), "plan.layers is missing"),
    "layers not a list": (_set("layers", {"a": 1}), "plan.layers="),
    "layer not an object": (_set("layers.0", 3), "plan.layers="),
    "layer field missing": (lambda d: d["layers"][0].pop("shape"), "plan.layers[0] is incomplete"),
    "negative shape": (_set("layers.0.shape", [-8, 6]), "plan.layers[0].shape[0]=-8"),
    "shape a string": (_set("layers.0.shape", "8x6"), "plan.layers[0].shape="),
    "negative offset": (_set("layers.0.offset", -1), "plan.layers[0].offset=-1"),
    "offset past the bank": (_offset_past, "plan.layers[0].offset=1000000"),
    "templates past the bank": (_set("layers.0.templates", 50), "plan.layers[0].offset"),
    "NaN gain": (_set("layers.0.gain", float("nan")), "plan.layers[0].gain=nan"),
    "infinite gain": (_set("layers.0.gain", float("inf")), "plan.layers[0].gain=inf"),
    "gain a string": (_set("layers.0.gain", "1"), "plan.layers[0].gain='1'"),
    "duplicated layer": (_duplicate_layer, "plan.groups[0].layers"),
    "unknown generator": (_set("layers.0.generator", "magic"), "plan.layers[0].generator='magic'"),
    "copied not a bool": (_set("layers.0.copied", "no"), "plan.layers[0].copied='no'"),
    "seed a float": (_set("seed", 0.5), "plan.seed=0.5"),
    "generator_config bad": (_set("generator_config.upsample", "zoom"), "plan.generator_config="),
    "provenance a list": (_set("provenance", [1]), "plan.provenance="),
    "no layers": (lambda d: d.update(layers=[], groups=[]), "plan.layers=[]"),
    "top level a list": (lambda d: None, None),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupted_plans_are_refused_naming_the_field(name, tmp_path):
    edit, field = CORRUPTIONS[name]
    data = _plan_dict()
    edit(data)
    payload = [data] if field is None else data
    field = field or "plan="
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(PlanError) as info:
        Plan.from_json(path)
    assert field in str(info.value), str(info.value)


def test_duplicated_layer_names_are_refused_even_in_one_group():
    data = _plan_dict()
    data["groups"][0]["layers"].append(data["layers"][0]["name"])
    data["layers"].append(dict(data["layers"][0]))
    data["layers"][-1]["overhead"] = 0
    with pytest.raises(ValueError, match=r"plan\.layers\[3\]\.name='0\.weight' names parameter '0\.weight'"):
        Plan.from_dict(data)


def _generator_plan(strategy: str, config: dict, budget: float) -> dict:
    gm = npas_fx.compile(_mlp(), budget, strategy=strategy, generators=npas_fx.GeneratorConfig(**config))
    return json.loads(npas_fx.plan_of(gm).to_json())


GENERATOR_CORRUPTIONS = {
    "superweight block": ("superweight", {}, 0.6, _set("layers.0.block", [1, 1]), "plan.layers do not build"),
    "superweight templates": ("superweight", {}, 0.6, _set("layers.0.templates", 5), "plan.layers do not build"),
    "superweight mixed with repeat": ("superweight", {}, 0.6, _set("layers.0.generator", "repeat"), "mixes"),
    "interpolate grid past bank": ("shape", {"upsample": "interpolate"}, 0.3, _set("layers.0.grid", [50, 50]), "grid"),
    "interpolate grid of 1": ("shape", {"upsample": "interpolate"}, 0.3, _set("layers.0.grid", [2]), "grid=(2,)"),
    "mask without its mask": ("shape", {"upsample": "repeat"}, 0.3, _set("layers.0.generator", "mask"), "overhead"),
    "emb as repeat": ("shape", {"downsample": "emb"}, 3.0, _set("layers.0.generator", "repeat"), "overhead=24"),
    "emb templates past bank": ("shape", {"downsample": "emb"}, 3.0, _set("layers.0.templates", 3), "offset"),
    "emb with one template": ("hash", {}, 0.5, _set("layers.0.generator", "emb"), "templates=0"),
}


@pytest.mark.parametrize("name", GENERATOR_CORRUPTIONS)
def test_corrupted_generator_fields_are_refused_before_building(name):
    strategy, config, budget, edit, field = GENERATOR_CORRUPTIONS[name]
    data = _generator_plan(strategy, config, budget)
    edit(data)
    with pytest.raises(PlanError) as info:
        npas_fx.compile(_mlp(), plan=Plan.from_dict(data))
    assert field in str(info.value), str(info.value)


MISFITS = {
    "kept name unknown": (lambda d: d["kept"][0].update(name="nope"), "plan.kept[0].name='nope'"),
    "overhead miscounted": (
        lambda d: (d["layers"][0].update(overhead=d["layers"][0]["overhead"] + 1), d.update(budget=d["budget"] + 1)),
        "plan.layers[0].overhead",
    ),
    "group overhead miscounted": (
        lambda d: (d["groups"][0].update(overhead=2), d.update(budget=d["budget"] + 2)),
        "plan.groups[0].overhead=2",
    ),
    "original count off": (lambda d: d.update(original_params=d["original_params"] + 1), "plan.original_params"),
    "shape of another model": (lambda d: d["layers"][0].update(shape=[6, 8]), "of shape (6, 8)"),
}


@pytest.mark.parametrize("name", MISFITS)
def test_plans_that_do_not_fit_the_model_are_refused_before_building(name):
    edit, field = MISFITS[name]
    data = _plan_dict()
    edit(data)
    model = _mlp()
    before = _state(model)
    with pytest.raises(ValueError) as info:
        npas_fx.compile(model, plan=Plan.from_dict(data))
    assert field in str(info.value), str(info.value)
    _assert_same_state(model, before)


@pytest.mark.parametrize("kind", ["str path", "Path", "text"])
def test_plans_load_from_paths_and_text(kind, tmp_path):
    plan = npas_fx.plan_of(npas_fx.compile(_mlp(), 0.5))
    path = tmp_path / "plan.json"
    text = plan.to_json(path)
    source = {"str path": str(path), "Path": path, "text": text}[kind]
    assert Plan.from_json(source) == plan


@pytest.mark.parametrize("bad, error", [("{not json", ValueError), (b"{}", TypeError), ("[1, 2]", ValueError)])
def test_plan_text_that_is_not_a_plan(bad, error):
    with pytest.raises(error):
        Plan.from_json(bad)


# ---- papercuts ----------------------------------------------------------------------------------------
def test_networkx_export_of_a_real_swn_plan_with_conv_and_linear_layers():
    gm = npas_fx.compile(_cnn(), 0.5, strategy="swn", data=_batches(), loss_fn=F.cross_entropy, search_steps=3)
    plan = npas_fx.plan_of(gm)
    matrix = plan.provenance["similarity"]["matrix"]
    assert any(v is None for row in matrix for v in row)  # conv and linear bins are never compared
    graph = plan.to_networkx()
    edges = [(a, b, d["weight"]) for a, b, d in graph.edges(data=True) if d["kind"] == "similarity"]
    assert {(a, b) for a, b, _ in edges} == {("0.weight", "2.weight"), ("2.weight", "0.weight"), *_linear_pairs()}
    assert all(math.isfinite(w) for _, _, w in edges)
    assert Plan.from_json(plan.to_json()).layers == plan.layers


def _linear_pairs() -> set[tuple[str, str]]:
    return {("5.weight", "6.weight"), ("6.weight", "5.weight")}


def test_state_dict_keys_are_the_originals_less_the_generated_weights():
    class Buffered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
            self.register_buffer("shift", torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale + self.shift

    model = nn.Sequential(Buffered(), nn.Linear(4, 3))
    model.register_buffer("top", torch.zeros(1), persistent=False)
    for gm in _compiled_variants(model):
        plan = npas_fx.plan_of(gm)
        prefix = "model." if any(o.path == "" for o in plan.opaque) else ""  # the root ran as one leaf
        generated = {a.removeprefix(prefix) for x in plan.layers for a in x.aliases}
        keys = {k.removeprefix(prefix) for k in gm.state_dict() if not k.startswith("npas.")}
        assert keys == set(model.state_dict()) - generated


def _compiled_variants(model: nn.Module) -> list[nn.Module]:
    gm = npas_fx.compile(model, 0.5)
    root_leaf = copy.deepcopy(model)
    root_leaf.register_forward_hook(lambda m, a, o: o)  # the root then runs as one leaf
    return [gm, copy.deepcopy(gm), npas_fx.compile(root_leaf, 0.5)]


def test_summary_says_how_many_weights_in_all():
    plan = npas_fx.plan_of(
        npas_fx.compile(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)), 0.5, strategy="shape")
    )
    lines = plan.summary().splitlines()
    assert any(line.startswith("g0: bank ") and " for 2 layers, 128 weights in all (x" in line for line in lines)
    assert any(line.startswith("g1: bank ") and " for 1 layer, 16 weights in all (x" in line for line in lines)


CLI_MODULE = """
import torch

def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))

def batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]

def loss(output, target):
    return torch.nn.functional.cross_entropy(output, target)
"""


@pytest.mark.parametrize("strategy", ["ssn", "swn"])
@pytest.mark.parametrize("loss", ["cross_entropy", "clidata:loss"])
def test_cli_passes_data_and_loss_to_learned_strategies(strategy, loss, tmp_path, monkeypatch, capsys):
    (tmp_path / "clidata.py").write_text(CLI_MODULE)
    monkeypatch.chdir(tmp_path)
    argv = ["plan", "clidata:net", "--budget", "50%", "--strategy", strategy, "--num-groups", "2"]
    argv += ["--data", "clidata:batches", "--loss", loss, "--search-steps", "2", "--out", "p.json"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    plan = Plan.from_json(Path("p.json"))
    assert plan.strategy == strategy and plan.provenance["search_steps"] == 2
    assert plan.budget == round(0.5 * plan.original_params)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strategy", "swn"], "--data MODULE:CALLABLE"),
        (["--data", "clidata:batches"], "only serve the learned strategies"),
        (["--strategy", "ssn", "--data", "clidata:batches", "--loss", "no_such_loss"], "torch.nn.functional"),
        (["--strategy", "ssn", "--data", "clidata:nothing"], "has no 'nothing'"),
    ],
)
def test_cli_data_mistakes_exit_2_with_a_message(extra, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "clidata.py").write_text(CLI_MODULE)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plan", "clidata:net", "--budget", "0.5", *extra]) == 2
    assert message in capsys.readouterr().err
