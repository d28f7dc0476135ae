"""Property tests: random tiny architectures, budgets, strategies and generator configurations.

Hypothesis draws an architecture (MLP, CNN with residual adds and BatchNorm, attention block,
embedding model with or without tied weights; random widths and depths), a strategy, a generator
configuration and a budget between the smallest feasible one (read from the ValueError of an
infeasible request, which the test also checks) and 8x the original. Every draw must compile to
exactly that budget, keep the output shape, give finite outputs and gradient on every bank, and
round-trip through its JSON plan and its state_dict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import AttentionBlock, MHABlock, loss_of, npas_parameters
from torch import Tensor, nn

import npas_fx
from npas_fx.budget import DOWNSAMPLERS, UPSAMPLERS

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}  # no dead zones: gradients flow


class RandomCNN(nn.Module):
    """Stem conv, ``blocks`` convs (optional BatchNorm, optional residual add), pool, linear head."""

    def __init__(self, cin: int, width: int, blocks: int, kernel: int, norm: bool, residual: bool, act: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(cin, width, kernel, padding=kernel // 2)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, kernel, padding=kernel // 2) for _ in range(blocks))
        self.norms = nn.ModuleList((nn.BatchNorm2d(width) if norm else nn.Identity()) for _ in range(blocks))
        self.act = ACTIVATIONS[act]()
        self.residual = residual
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.stem(x))
        for conv, norm in zip(self.convs, self.norms, strict=True):
            y = norm(conv(h))
            h = self.act(h + y) if self.residual else self.act(y)
        return self.head(h.mean(dim=(2, 3)))


class RandomLM(nn.Module):
    """Embedding -> Linear -> activation -> output head, the head optionally tied to the embedding."""

    def __init__(self, vocab: int, dim: int, tie: bool, act: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.act = ACTIVATIONS[act]()
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.act(self.mix(self.embed(tokens))))


@dataclass(frozen=True)
class Arch:
    """A drawn architecture: its kind and constructor arguments (readable in a failing example)."""

    kind: str
    args: tuple

    def build(self) -> tuple[nn.Module, tuple[Tensor, ...]]:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        if self.kind == "mlp":
            widths, act, bias, norm = self.args
            layers: list[nn.Module] = [nn.LayerNorm(widths[0])] if norm else []  # pre-norm on the input
            for a, b in zip(widths, widths[1:], strict=False):
                layers += [nn.Linear(a, b, bias=bias), ACTIVATIONS[act]()]
            return nn.Sequential(*layers[:-1]), (torch.randn(3, widths[0], generator=g),)
        if self.kind == "cnn":
            cin = self.args[0]
            return RandomCNN(*self.args), (torch.randn(2, cin, 5, 5, generator=g),)
        if self.kind == "attention":
            handwritten, dim, heads, hidden = self.args
            model = AttentionBlock(dim, heads, hidden) if handwritten else MHABlock(dim, heads)
            return model, (torch.randn(2, 3, dim, generator=g),)
        vocab = self.args[0]
        return RandomLM(*self.args), (torch.randint(0, vocab, (2, 4), generator=g),)


acts = st.sampled_from(sorted(ACTIVATIONS))
mlps = st.tuples(st.lists(st.integers(2, 20), min_size=2, max_size=5), acts, st.booleans(), st.booleans())
cnns = st.tuples(
    st.integers(1, 4), st.integers(2, 8), st.integers(0, 3), st.sampled_from([1, 3]), st.booleans(), st.booleans(), acts
)
# (hand-written?, width, heads, hidden): every head count divides every width
attentions = st.tuples(st.booleans(), st.sampled_from([4, 8, 12]), st.sampled_from([1, 2, 4]), st.integers(2, 16))
lms = st.tuples(st.integers(3, 20), st.integers(2, 12), st.booleans(), acts)
archs = st.one_of(
    mlps.map(lambda a: Arch("mlp", a)),
    cnns.map(lambda a: Arch("cnn", a)),
    attentions.map(lambda a: Arch("attention", a)),
    lms.map(lambda a: Arch("lm", a)),
)
configs = st.builds(
    npas_fx.GeneratorConfig,
    downsample=st.sampled_from(DOWNSAMPLERS),
    upsample=st.sampled_from(UPSAMPLERS),
    max_templates=st.integers(1, 8),
    embedding_dim=st.integers(1, 8),
)


def _smallest_feasible(model: nn.Module, **kwargs: object) -> int:
    """The minimum budget, as the error for an infeasible one states it (1 when 1 is feasible)."""
    try:
        npas_fx.compile(model, 1, **kwargs)
    except ValueError as error:
        found = re.search(r"smallest feasible budget for this model and strategy is (\d+)", str(error))
        assert found, str(error)
        minimum = int(found.group(1))
        assert minimum > 1 and f"at least {minimum}" in str(error)
        return minimum
    return 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=archs,
    strategy=st.sampled_from(["shape", "single", "random", "hash"]),
    config=configs,
    fraction=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_random_architectures_compile_exactly_and_round_trip(arch, strategy, config, fraction, seed):
    model, x = arch.build()
    original = npas_fx.count_parameters(model)
    options = {"strategy": strategy, "generators": config, "seed": seed}
    minimum = _smallest_feasible(model, **options)
    budget = minimum + round(fraction * max(0, 8 * original - minimum))

    gm = npas_fx.compile(model, budget, **options)
    plan = npas_fx.plan_of(gm)
    assert npas_fx.count_parameters(gm) == budget == plan.trainable_params
    out = gm(*x)
    assert out.shape == model(*x).shape
    assert torch.isfinite(out).all()

    loss_of(out).backward()
    shared = npas_parameters(gm)
    for key, param in shared.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), key
    for g in (group.index for group in plan.groups):
        # A bank too small to vary along a row (e.g. 1 value) gives row-constant weights, and a
        # row-constant weight sees only the sum of its input, which is 0 after a LayerNorm: then a
        # zero gradient is the right answer. Any bank that makes a varying row must get gradient.
        weights = [gm.npas.generate(i).detach() for i, x in enumerate(plan.layers) if x.group == g]
        if any((w.reshape(w.shape[0], -1).diff(dim=1) != 0).any() for w in weights):
            assert shared[f"npas.groups.g{g}.bank"].grad.abs().sum() > 0, f"bank of g{g} got no gradient"

    # the JSON plan re-applies exactly; a trained state loads exactly into the re-applied model
    again = npas_fx.Plan.from_json(plan.to_json())
    assert again == plan
    twin = npas_fx.compile(model, plan=again)
    with torch.no_grad():
        for p in gm.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    gm.eval(), twin.eval()
    twin.load_state_dict(gm.state_dict())
    torch.testing.assert_close(twin(*x), gm(*x), rtol=0, atol=0)
    assert npas_fx.count_parameters(twin) == budget
