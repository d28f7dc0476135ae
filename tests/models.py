"""A table of tiny in-repo models that the npas_fx test suite sweeps, and small test helpers.

Every :class:`Case` builds a fresh model (fixed seed) and its example inputs. The table covers
the module kinds npas_fx must handle: linear stacks, 1-D/2-D/3-D/transposed/grouped convolutions
with BatchNorm, Dropout and residual adds, embeddings with LayerNorm, ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer`` (a torch.nn leaf inside a model), a hand-written attention block
(traced through), parameters read directly in ``forward``, tied weights, frozen parameters with
buffers, and an unused submodule.

``nn.TransformerEncoderLayer`` as the *root* of tracing fails in torch.fx (its ``forward`` calls
``F._canonical_mask`` on proxies: "input to _none_or_dtype() must be None or torch.Tensor");
inside a model it is a torch.nn leaf, which is how real models use it, so the table holds it
wrapped (``transformer_layer``) plus the traced-through ``attention_block``;
``test_compile.py::test_transformer_encoder_layer_as_root`` pins what happens at the root.

Example:
    >>> case = CASES["mlp"]
    >>> model = case.build()
    >>> tuple(model(*case.inputs()).shape)
    (4, 5)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "Case",
    "CASES",
    "CASE_NAMES",
    "DISTINCT_SHAPE_CASES",
    "AttentionBlock",
    "loss_of",
    "npas_parameters",
    "snapshot",
    "assert_unchanged",
]


# ---- models -------------------------------------------------------------------------------------
class ResidualCNN(nn.Module):
    """Conv -> BN -> ReLU -> (Conv -> BN) + skip -> Dropout -> pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv(h)))  # residual add
        h = self.drop(h).mean(dim=(2, 3))  # (B, 8)
        return self.head(h)


class GroupedCNN(nn.Module):
    """A grouped conv, a depthwise conv (weight 8x1x3x3) and a pointwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8, padding=1)
        self.pointwise = nn.Conv2d(8, 6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(torch.relu(self.depthwise(torch.relu(self.grouped(x)))))


class EmbeddingClassifier(nn.Module):
    """Token embedding -> LayerNorm -> mean over tokens -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.embed(tokens)).mean(dim=1))


class MHABlock(nn.Module):
    """Pre-norm ``nn.MultiheadAttention`` block with a feed-forward layer."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Linear(dim, 24)
        self.out = nn.Linear(24, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        return x + self.out(torch.relu(self.ff(x)))


class TransformerLayerModel(nn.Module):
    """``nn.TransformerEncoderLayer`` (a torch.nn leaf here) followed by a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x))


class AttentionBlock(nn.Module):
    """Hand-written multi-head self-attention + MLP; torch.fx traces through all of it."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 24) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads), dim=-1)  # (B, h, T, T)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class DirectParams(nn.Module):
    """Parameters read directly in ``forward`` (``get_attr`` nodes, not leaf calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(10, 14) / math.sqrt(10))
        self.b_in = nn.Parameter(torch.zeros(14))
        self.w_out = nn.Parameter(torch.randn(6, 14) / math.sqrt(14))
        self.gain = nn.Parameter(torch.ones(6))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.w_in + self.b_in)
        return torch.nn.functional.linear(h, self.w_out) * self.gain


class TiedLM(nn.Module):
    """Embedding and output head share one Parameter (weight tying, as in language models)."""

    def __init__(self, vocab: int = 24, dim: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(torch.relu(self.mix(self.embed(tokens)))))  # (B, T, vocab)


class FrozenWithBuffers(nn.Module):
    """A frozen Linear, a frozen direct Parameter, BatchNorm1d statistics and custom buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 12)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.rand(12, 12) + 0.5, requires_grad=False)
        self.bn = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 40, bias=False)
        self.out = nn.Linear(40, 4, bias=False)
        self.register_buffer("shift", torch.linspace(-1, 1, 12))
        self.register_buffer("cache", torch.arange(4.0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.frozen(x) @ self.scale + self.shift)
        return self.out(torch.relu(self.fc(h))) + self.cache


class WithUnused(nn.Module):
    """A submodule that ``forward`` never calls (its parameters stay, dense, counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 5, bias=False)
        self.spare = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


# ---- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A model factory, its example-input factory, and what the table knows about it.

    ``distinct_shapes``: every generated weight has its own shape, so ``strategy="shape"`` with
    ``budget=1.0`` is the identity plan (compiled outputs equal the original's).
    """

    name: str
    factory: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator], tuple[Tensor, ...]]
    distinct_shapes: bool
    dropout: bool = False
    batchnorm: bool = False

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory()

    def inputs(self, seed: int = 1) -> tuple[Tensor, ...]:
        return self.make_inputs(torch.Generator().manual_seed(seed))


def _randn(*shape: int) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    return lambda g: (torch.randn(*shape, generator=g),)


def _tokens(vocab: int, *shape: int) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    return lambda g: (torch.randint(0, vocab, shape, generator=g),)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    )


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 4)
    )


def _conv3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 4, 2, stride=2))


def _conv_transpose() -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.ReLU(), nn.ConvTranspose2d(6, 3, 2))


_TABLE = (
    Case("mlp", _mlp, _randn(4, 12), distinct_shapes=False),
    Case("residual_cnn", ResidualCNN, _randn(4, 3, 6, 6), distinct_shapes=True, dropout=True, batchnorm=True),
    Case("conv1d", _conv1d, _randn(3, 3, 12), distinct_shapes=True),
    Case("conv3d", _conv3d, _randn(2, 2, 4, 4, 4), distinct_shapes=True),
    Case("conv_transpose2d", _conv_transpose, _randn(2, 4, 4, 4), distinct_shapes=True),
    Case("grouped_conv", GroupedCNN, _randn(2, 4, 7, 7), distinct_shapes=True),
    Case("embedding_layernorm", EmbeddingClassifier, _tokens(30, 3, 7), distinct_shapes=True),
    Case("mha_block", MHABlock, _randn(2, 5, 16), distinct_shapes=True),
    Case("transformer_layer", TransformerLayerModel, _randn(2, 5, 16), distinct_shapes=False, dropout=True),
    Case("attention_block", AttentionBlock, _randn(2, 5, 16), distinct_shapes=True),
    Case("direct_params", DirectParams, _randn(4, 10), distinct_shapes=True),
    Case("tied_weights", TiedLM, _tokens(24, 2, 6), distinct_shapes=True),
    Case("frozen_buffers", FrozenWithBuffers, _randn(5, 8), distinct_shapes=True, batchnorm=True),
    Case("unused_submodule", WithUnused, _randn(4, 12), distinct_shapes=True),
)
CASES: dict[str, Case] = {case.name: case for case in _TABLE}
CASE_NAMES: tuple[str, ...] = tuple(CASES)
DISTINCT_SHAPE_CASES: tuple[str, ...] = tuple(c.name for c in _TABLE if c.distinct_shapes)


# ---- helpers ------------------------------------------------------------------------------------
def loss_of(output: Tensor) -> Tensor:
    """A loss whose gradient reaches every output element with a fixed, non-uniform weight."""
    weight = torch.linspace(-1.0, 2.0, output.numel(), dtype=output.dtype, device=output.device).view(output.shape)
    return (output * weight).sum() + 0.1 * (output**2).sum()


def npas_parameters(gm: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable tensor npas_fx added (banks, coefficient maps, generator parameters)."""
    return {f"npas.{name}": p for name, p in gm.get_submodule("npas").named_parameters()}


def snapshot(model: nn.Module) -> dict:
    """What must not change when npas_fx reads ``model``: values, identities, flags, structure."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": [(name, id(p), p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(name, id(b)) for name, b in model.named_buffers()],
        "modules": [(name, type(m).__name__, m.training) for name, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Fail unless ``model`` still matches its :func:`snapshot`."""
    after = snapshot(model)
    assert after["params"] == before["params"]
    assert after["buffers"] == before["buffers"]
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
