"""Compile that scales: the weights generators replace are never copied, and checks hold one at a time.

``benchmarks/scale.py`` measures the time and peak memory; these tests pin the behaviour behind
them: the working copy shares (never copies) the weights it replaces and never writes them, the
compiled model shares nothing with the input, the no-autograd hash path gives the kernel's
values bit for bit, and the example check does not materialise every weight of an opaque root.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import npas_fx
from npas_fx.generators import Hash
from npas_fx.hash_kernels import hashed_blocks
from npas_fx.runtime import CACHE_ATTR
from npas_fx.workcopy import SharedWeightWrite, working_copy


class _Copies(TorchDispatchMode):
    """Records every operator that makes a tensor as large as one of ``watched`` from its values."""

    def __init__(self, watched: list[torch.Tensor]) -> None:
        super().__init__()
        self.storages = {w.untyped_storage().data_ptr(): w.numel() for w in watched}
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
        out = func(*args, **(kwargs or {}))
        reads = [a for a in args if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for a in reads:
            storage = a.untyped_storage().data_ptr()
            made = [o for o in outs if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() != storage]
            if any(o.numel() >= self.storages[storage] for o in made):  # views and detach() are not copies
                self.copies.append(str(func))
        return out


class _Stack(nn.Module):
    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.norm(x)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() >= 2]


def _storages(module: nn.Module) -> set[int]:
    tensors = [*module.parameters(), *module.buffers(), *module.state_dict().values()]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


@pytest.mark.parametrize("strategy", ["shape", "hash", "single"])
@pytest.mark.parametrize("example", [False, True])
def test_compile_never_copies_the_weights_it_replaces(strategy: str, example: bool) -> None:
    model = _Stack(width=1040, depth=3)  # weights above SAMPLE values: their scale is estimated from a sample
    inputs = {"example_inputs": (torch.randn(2, 1040),)} if example else {}
    with _Copies(_weights(model)) as spy:
        gm = npas_fx.compile(model, 0.1, strategy=strategy, **inputs)
    assert spy.copies == []
    assert npas_fx.count_parameters(gm) == round(0.1 * npas_fx.count_parameters(model))
    # ... and the watcher does see a copy when there is one
    with _Copies(_weights(model)) as spy:
        copy.deepcopy(model)
    assert len(spy.copies) == len(_weights(model))


@pytest.mark.parametrize("keep", [None, ["layers.0.weight"]])
def test_compiled_model_shares_no_storage_with_the_input(keep: list[str] | None) -> None:
    model = _Stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = npas_fx.compile(model, 0.5, keep=keep, example_inputs=(torch.randn(2, 32),))
    assert not _storages(gm) & _storages(model)
    if keep:  # the kept weight is an equal copy of its own
        assert torch.equal(gm.get_parameter("layers.0.weight"), model.layers[0].weight)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class _WritesItsWeight(nn.Module):
    """A forward that scales its own weight in place (under no_grad, as some old code does)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.a.weight.data.mul_(1.0)
        return self.b(self.a(x))


def test_a_forward_that_writes_its_weights_gets_a_full_copy() -> None:
    model = _WritesItsWeight()
    before = {k: (v.clone(), v._version) for k, v in model.state_dict().items()}
    gm = npas_fx.compile(model, 0.5, example_inputs=(torch.randn(3, 8),))
    assert npas_fx.count_parameters(gm) == 72
    assert all(
        torch.equal(model.state_dict()[k], v) and model.state_dict()[k]._version == n for k, (v, n) in before.items()
    )
    assert not _storages(gm) & _storages(model)


def test_working_copy_refuses_writes_to_shared_weights() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    work = working_copy(model)
    shared = work.module[0].weight
    assert shared is not model[0].weight and shared.data_ptr() == model[0].weight.data_ptr()
    assert work.module[0].bias.data_ptr() != model[0].bias.data_ptr()
    with work.read_only():
        work.module[0].bias.data.add_(1.0)  # a copy of its own: writes are fine
        for write in (
            lambda: shared.data.add_(1.0),
            lambda: torch.add(shared.data, 1, out=shared.data),
            lambda: shared.data.copy_(torch.zeros(4, 4)),
        ):
            with pytest.raises(SharedWeightWrite):
                write()
    assert torch.equal(model[0].weight, shared)


def test_tied_weights_stay_one_shared_parameter() -> None:
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10))
    model[1].weight = model[0].weight
    work = working_copy(model)
    assert work.module[0].weight is work.module[1].weight
    assert work.module[0].weight.data_ptr() == model[0].weight.data_ptr()


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 300),
    chunk=st.integers(1, 70),
    numel=st.integers(1, 600),
    gain=st.sampled_from([1.0, 0.37, -2.5]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.complex64]),
)
def test_hash_without_autograd_is_the_kernel_bit_for_bit(
    size: int, chunk: int, numel: int, gain: float, dtype: torch.dtype
) -> None:
    bank = torch.randn(size, dtype=dtype) if dtype.is_complex else torch.randn(size).to(dtype)
    generator = Hash((numel,), salt=size + chunk, gain=gain, chunk=chunk, bank_size=size)
    with torch.no_grad():
        fast = generator(bank)
    expected = hashed_blocks(generator._scaled(bank), generator.rows, numel, chunk)
    assert fast.dtype == expected.dtype
    assert torch.equal(fast, expected)


class _Biggest(TorchDispatchMode):
    """Most tensors of ``sizes`` (2+ dims) alive at once among those ops make (``model``'s own aside)."""

    def __init__(self, sizes: set[int], model: nn.Module) -> None:
        super().__init__()
        self.sizes = sizes
        self.own = _storages(model)
        self.live: list = []
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
        import weakref

        out = func(*args, **(kwargs or {}))
        made = isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in self.own
        if made and out.numel() in self.sizes and out.dim() >= 2:
            self.live.append(weakref.ref(out))
        self.live = [r for r in self.live if r() is not None]
        self.most = max(self.most, len({r().untyped_storage().data_ptr() for r in self.live}))
        return out


class _Opaque(nn.Module):
    """Cannot be traced (data-dependent branch): compiled as one leaf around the root."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(24, 24) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) if x.sum() > -1e9 else x
        return x


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_example_check_holds_about_one_generated_weight_at_a_time(mode: str) -> None:
    model = getattr(_Opaque(), mode)()
    with _Biggest({24 * 24}, model) as watch:
        gm = npas_fx.compile(model, 0.2, strategy="hash", example_inputs=(torch.randn(2, 24),))
    assert npas_fx.plan_of(gm).opaque[0].path == ""
    assert watch.most <= 2  # every forward of gm itself binds all six
    assert not any(CACHE_ATTR in m.__dict__ for m in gm.modules())  # the check cached nothing
    with _Biggest({24 * 24}, model) as watch, torch.no_grad():
        gm(torch.randn(2, 24))
    assert watch.most >= 6


@pytest.mark.parametrize("limit", [1000, 5000, 10**6])
def test_generate_sample_is_the_even_sample_of_the_generated_weight(limit: int) -> None:
    from npas_fx.plan import GroupPlan, LayerPlan
    from npas_fx.shared_params import SharedParameters, _spread_sample

    torch.manual_seed(0)
    layers = [
        LayerPlan("a", (300, 70), "", "Linear", 0, "slice", templates=1, offset=5),
        LayerPlan("b", (300, 70), "", "Linear", 0, "wavg", templates=3, offset=11, gain=0.7),
        LayerPlan("c", (310, 77), "", "Linear", 1, "hash", templates=0, salt=3, chunk=64, gain=1.3),  # slot wraps
        LayerPlan("d", (310, 77), "", "Linear", 1, "hash", templates=0, salt=4, chunk=1),
        LayerPlan("e", (310, 77), "", "Linear", 1, "repeat", templates=0, offset=4),  # generated whole
    ]
    groups = [GroupPlan(0, ("a", "b"), 300 * 70 * 3 + 40), GroupPlan(1, ("c", "d", "e"), 1001)]
    shared = SharedParameters(layers, groups, embedding_dim=8)
    for i in range(len(layers)):
        sample = shared.generate_sample(i, limit)
        expected = _spread_sample(shared.generate(i).detach(), limit)
        assert sample.shape == expected.shape
        torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-6)
