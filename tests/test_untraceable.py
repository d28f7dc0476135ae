"""Models torch.fx cannot trace whole: the untraceable parts run as leaves, the budget still holds.

A table of tiny in-repo models, each untraceable in a different way (data-dependent control flow
in a submodule, in the root, in a child *and* its parent, a traced forward that reads
``self.training``, optional arguments, a weight tied across the traced/opaque boundary), with
the modules that must end up opaque asserted, not skipped. For each: every data-free strategy at
budgets 0.1 and 2.0 hits the budget exactly, keeps the output structure and sends gradient to
every bank; the identity plan reproduces the original outputs. Then the failure paths: a model
that cannot be compiled at all is named, module path and reason.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import LEARNED_NAMES, STRATEGY_NAMES
from models import assert_unchanged, snapshot
from structured import (
    assert_compiled_like,
    assert_learned_plan_reapplies,
    assert_same_outputs,
    call,
    compiled_case,
    identity_compile,
)
from torch import Tensor, nn

import npas_fx
from npas_fx.passes.find_opaque import find_opaque
from npas_fx.passes.trace import trace

CONTROL_FLOW = "symbolically traced variables cannot be used as inputs to control flow"


# ---- models -------------------------------------------------------------------------------------
class Gate(nn.Module):
    """Applies its convolution only when the input is large enough: a branch on a tensor value."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.abs().mean() > 0.01:
            return x + self.conv(x)
        return x


class GatedCNN(nn.Module):
    """A small CNN (BatchNorm, stride) with two data-dependent gates: only the gates are opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gate1 = Gate(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.gate2 = Gate(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gate1(torch.relu(self.bn(self.stem(x))))
        h = self.gate2(torch.relu(self.down(h)))  # (B, 16, H/2, W/2)
        return self.head(h.mean(dim=(2, 3)))


class EarlyExit(nn.Module):
    """Exits early when confident: the root's own forward branches on data, so it is one leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.early = nn.Linear(32, 5)
        self.deep = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 5))

    def forward(self, x: Tensor, *, threshold: float = 0.99) -> dict[str, Any]:
        h = self.body(x)
        logits = self.early(h)
        if logits.softmax(-1).max() >= threshold:
            return {"logits": logits, "exited": True}
        return {"logits": logits + self.deep(h), "exited": False}


class Splitter(nn.Module):
    """Chunks its input into a number of pieces that depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.proj(x)
        pieces = 2 if int((h > 0).sum()) >= 0 else 1  # always 2, but only a value can tell
        return list(h.chunk(pieces, dim=-1))


class Mixer(nn.Module):
    """Iterates over its child's output: untraceable even with the child as a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.split = Splitter()
        self.mix = nn.Linear(8, 16)

    def forward(self, x: Tensor) -> Tensor:
        return sum(self.mix(part) for part in self.split(x))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(10, 16)
        self.block = Mixer()
        self.out = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.block(torch.relu(self.inp(x)))))


class NoisyBlock(nn.Module):
    """Traceable, but its graph would freeze ``self.training`` into the dropout call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 24)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(torch.relu(self.fc(x)), p=0.25, training=self.training)


class ModeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.block = NoisyBlock()
        self.out = nn.Linear(24, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.block(torch.tanh(self.inp(x))))


class Reconstruction(NamedTuple):
    hidden: Tensor
    recon: Tensor


class OptionalArgs(nn.Module):
    """An optional mask (``None`` by default), a float keyword and a NamedTuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 20)
        self.dec = nn.Linear(20, 8)

    def forward(self, x: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> Reconstruction:
        h = torch.tanh(self.enc(x))
        if mask is not None:
            h = h * mask
        return Reconstruction(hidden=h, recon=self.dec(h) * scale)


class Decoder(nn.Module):
    """Renormalises when its input is too large (data-dependent); its head is tied to an embedding."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed.embedding_dim)
        self.head = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False)
        self.head.weight = embed.weight

    def forward(self, h: Tensor) -> Tensor:
        if h.std() > 100:
            h = h / h.std()
        return self.head(self.norm(h))


class TiedAcross(nn.Module):
    """The embedding is traced through at the root, the tied head sits inside an opaque module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.mix = nn.Linear(16, 16)
        self.decoder = Decoder(self.embed)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(torch.relu(self.mix(self.embed(tokens))))  # (B, T, 40)


# ---- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Untraceable:
    """A model, its example inputs, and the modules that must be opaque (path -> reason part)."""

    factory: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple | dict]
    opaque: dict[str, str]

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.factory()

    def example(self, seed: int = 1) -> tuple | dict:
        return self.inputs(torch.Generator().manual_seed(seed))


CASES: dict[str, Untraceable] = {
    "gated_cnn": Untraceable(
        GatedCNN,
        lambda g: (torch.randn(2, 3, 8, 8, generator=g),),
        {"gate1": CONTROL_FLOW, "gate2": CONTROL_FLOW},
    ),
    "early_exit": Untraceable(EarlyExit, lambda g: (torch.randn(4, 12, generator=g),), {"": CONTROL_FLOW}),
    "nested": Untraceable(
        Nested, lambda g: (torch.randn(3, 10, generator=g),), {"block": "Proxy object cannot be iterated"}
    ),
    "mode_dependent": Untraceable(
        ModeDependent, lambda g: (torch.randn(5, 6, generator=g),), {"block": "depends on self.training"}
    ),
    "optional_args": Untraceable(OptionalArgs, lambda g: (torch.randn(3, 8, generator=g),), {}),
    "tied_across": Untraceable(
        TiedAcross, lambda g: {"tokens": torch.randint(0, 40, (2, 5), generator=g)}, {"decoder": CONTROL_FLOW}
    ),
}
NAMES = tuple(CASES)


@pytest.fixture(scope="module")
def compiled_cache() -> dict:
    return {}


def _compiled(cache: dict, name: str, strategy: str, budget: float) -> tuple[nn.Module, Any]:
    return compiled_case(cache, CASES, name, strategy, budget)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strategy", LEARNED_NAMES)
def test_learned_plans_name_the_final_models_parameters_and_reapply(compiled_cache, name, strategy):
    model, gm = _compiled(compiled_cache, name, strategy, 0.1)
    assert_learned_plan_reapplies(model, gm, CASES[name].example())


# ---- the sweep ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_tracing_finds_exactly_the_opaque_modules(name):
    case = CASES[name]
    result = trace(case.build(), example_inputs=case.example())
    assert set(result.opaque) == set(case.opaque)
    for path, reason in case.opaque.items():
        assert reason in result.opaque[path]
    # The root is traced unless it is the opaque one; opaque modules are never traced through.
    assert ("" in result.traced) == ("" not in case.opaque)
    assert not any(t == p or t.startswith(p + ".") for p in case.opaque if p for t in result.traced)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strategy", STRATEGY_NAMES + LEARNED_NAMES)
@pytest.mark.parametrize("budget", [0.1, 2.0])
def test_exact_budget_structure_and_gradients(compiled_cache, name, strategy, budget):
    model, gm = _compiled(compiled_cache, name, strategy, budget)
    assert {o.path for o in npas_fx.plan_of(gm).opaque} == set(CASES[name].opaque)
    assert_compiled_like(model, gm, CASES[name].example(), budget)


@pytest.mark.parametrize("name", NAMES)
def test_identity_plan_reproduces_the_model(name):
    case = CASES[name]
    model = case.build()
    before = snapshot(model)
    gm = identity_compile(model, case.example())
    model.eval(), gm.eval()
    for seed in (1, 2):
        assert_same_outputs(call(gm, case.example(seed)), call(model, case.example(seed)))
    assert_unchanged(model.train(), before)


# ---- what each kind of model must keep ----------------------------------------------------------
def test_opaque_modules_keep_train_eval_behaviour():
    model = ModeDependent()
    gm = identity_compile(model)
    x = torch.randn(5, 6)
    for mode in (True, False):
        torch.manual_seed(7)
        expected = model.train(mode)(x)
        torch.manual_seed(7)
        assert torch.equal(gm.train(mode)(x), expected)
    gm.train()
    assert not torch.equal(gm(x), gm(x))  # dropout is live in train mode, not frozen either way


def test_keyword_and_non_tensor_inputs_pass_through_a_root_leaf():
    model = EarlyExit()
    gm = identity_compile(model)
    x = torch.randn(4, 12)
    assert gm(x, threshold=0.0)["exited"] is True  # the keyword reaches the original forward
    assert gm(x)["exited"] is False
    assert_same_outputs(gm(x, threshold=0.5), model(x, threshold=0.5))

    # the wrapper's forward repeats the model's own signature (names and defaults; torch.fx code
    # has no bare `*`, so a keyword-only argument becomes an ordinary one with its default)
    def described(function: Any) -> list[tuple[str, Any]]:
        return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]

    assert described(gm.forward) == described(model.forward) == [("x", inspect.Parameter.empty), ("threshold", 0.99)]


def test_optional_arguments_follow_the_example():
    model = OptionalArgs()
    x, mask = torch.randn(3, 8), (torch.rand(3, 20) > 0.5).float()
    # Without the mask in the example, tracing fixes it to None and torch.fx guards that.
    result = trace(copy.deepcopy(model), example_inputs=(x,))
    assert dict(result.specialized) == {"mask": None}
    gm = identity_compile(model, (x,))
    assert_same_outputs(gm(x), model(x))
    with pytest.raises(AssertionError, match="mask has been specialized"):
        gm(x, mask)
    # With it, the mask stays an input, passed by position or keyword.
    gm = identity_compile(model, {"x": x, "mask": mask})
    assert_same_outputs(gm(x, mask=mask), model(x, mask=mask))
    assert_same_outputs(gm(x, mask, 2.0), model(x, mask, 2.0))


def test_tied_weight_across_the_opaque_boundary_is_one_generated_tensor():
    model = TiedAcross()
    gm = npas_fx.compile(model, 0.5)
    plan = npas_fx.plan_of(gm)
    tied = plan.layer("embed.weight")
    assert set(tied.aliases) == {"embed.weight", "decoder.head.weight"}
    assert "embed.weight" not in dict(gm.named_parameters(remove_duplicate=False))
    assert torch.equal(gm.embed.weight, gm.decoder.head.weight)  # both read the one generated tensor
    seen: dict[str, Tensor] = {}
    hooks = [
        gm.get_submodule(path).register_forward_pre_hook(lambda m, a, path=path: seen.__setitem__(path, m.weight))
        for path in ("embed", "decoder.head")
    ]
    gm(torch.randint(0, 40, (2, 5)))
    for hook in hooks:
        hook.remove()
    assert seen["embed"] is seen["decoder.head"]


def test_root_leaf_round_trips_deepcopy_save_and_plan():
    model = EarlyExit()
    gm = npas_fx.compile(model, 0.3, strategy="random", seed=2)
    x = torch.randn(4, 12)
    expected = gm(x)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(gm), torch.load(buffer, weights_only=False)):
        assert_same_outputs(copied(x), expected)
    plan = npas_fx.plan_of(gm)
    assert plan.opaque[0].path == "" and plan.traced == ()
    assert all(layer.name.startswith("model.") for layer in plan.layers)  # the root lives at gm.model
    again = npas_fx.compile(model, plan=npas_fx.Plan.from_json(plan.to_json()))
    assert npas_fx.plan_of(again) == plan
    assert_same_outputs(again(x), expected)


def test_plan_records_traced_and_opaque_modules():
    model = Nested()
    plan = npas_fx.plan_of(npas_fx.compile(model, 0.5))
    assert plan.traced == ("",)
    assert [o.path for o in plan.opaque] == ["block"]
    assert "Proxy object cannot be iterated" in plan.opaque[0].reason
    assert "opaque (run as leaves): block" in plan.summary()
    assert npas_fx.Plan.from_json(plan.to_json()) == plan


# ---- failures -----------------------------------------------------------------------------------
class StrictLinear(nn.Linear):
    """A layer that insists on a registered Parameter, as some libraries check."""

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(self.weight, nn.Parameter):
            raise TypeError("StrictLinear.weight must be an nn.Parameter")
        return super().forward(x)


def _strict_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Sequential(StrictLinear(16, 16), nn.ReLU()), nn.Linear(16, 2))


def test_a_model_that_cannot_be_compiled_is_named_with_path_and_reason():
    model = _strict_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"module '1\.0' \(StrictLinear\).*must be an nn\.Parameter") as info:
        npas_fx.compile(model, 0.5, example_inputs=(torch.randn(2, 8),))
    assert "keep=['1.0.weight'" in str(info.value)
    assert_unchanged(model, before)
    # The fix the message gives works.
    gm = npas_fx.compile(model, 0.9, keep=["1.0.weight"], example_inputs=(torch.randn(2, 8),))
    assert npas_fx.count_parameters(gm) == round(0.9 * npas_fx.count_parameters(model))


def test_the_same_failure_inside_a_root_leaf_names_the_original_path():
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _strict_model()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x) if x.sum() > -math.inf else x  # the root is opaque

    with pytest.raises(RuntimeError, match=r"module 'net\.1\.0' \(StrictLinear\)"):
        npas_fx.compile(Root(), 0.5, example_inputs=(torch.randn(2, 8),))


def test_strict_tracing_names_why_the_root_fails():
    with pytest.raises(RuntimeError, match=f"could not trace EarlyExit: TraceError: {CONTROL_FLOW}"):
        trace(EarlyExit(), fallback=False)
    search = find_opaque(Nested())
    assert search.graph is not None and list(search.opaque) == ["block"]


@pytest.mark.parametrize(
    ("example", "error", "match"),
    [
        (torch.randn(3, 10), TypeError, "wrap a single tensor as"),
        ({"y": torch.randn(3, 10)}, TypeError, r"do not fit Nested\.forward\(x"),
        ((torch.randn(3, 7),), ValueError, "Nested itself fails on `example_inputs`"),
    ],
)
def test_bad_example_inputs_are_user_errors(example, error, match):
    with pytest.raises(error, match=match):
        npas_fx.compile(Nested(), 0.5, example_inputs=example)
