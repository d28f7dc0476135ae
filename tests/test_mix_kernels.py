"""Mixing kernels (npas_fx.kernels ``template_mix``, ``bilinear``): equal to the formulas they replace
(``coefficients @ templates * gain``, ``F.interpolate`` bilinear with ``align_corners=True``) in
value and gradient, gradcheck in float64, and the same under ``torch.compile``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from npas_fx.generators import EmbeddingMix, Interpolate, TemplateMix
from npas_fx.mix_kernels import bilinear, lerp_plan, template_mix


def _bank(size: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def old_template_mix(bank, coefficients, offset, numel, gain):
    k = coefficients.numel()
    return (coefficients @ bank.narrow(0, offset, k * numel).view(k, numel)) * gain


def old_interpolate(block, size):
    return F.interpolate(block[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]


def _grads(fn, inputs, upstream):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, upstream)


# ---- template mix -------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 5),
    numel=st.integers(1, 40),
    offset=st.integers(0, 7),
    spare=st.integers(0, 5),
    gain=st.sampled_from([1.0, 0.7, 2.5]),
)
def test_template_mix_equals_the_old_formula_with_its_gradients(k, numel, offset, spare, gain):
    bank, coefficients = _bank(offset + k * numel + spare), _bank(k, seed=1)
    upstream = _bank(numel, seed=2)
    new, new_grads = _grads(lambda b, c: template_mix(b, c, offset, numel, gain), (bank, coefficients), upstream)
    old, old_grads = _grads(lambda b, c: old_template_mix(b, c, offset, numel, gain), (bank, coefficients), upstream)
    torch.testing.assert_close(new, old)
    for a, b in zip(new_grads, old_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("k", "numel", "offset", "size"), [(3, 4, 2, 16), (2, 5, 0, 10), (1, 3, 1, 4)])
def test_template_mix_gradcheck(k, numel, offset, size):
    bank, coefficients = _bank(size).requires_grad_(True), _bank(k, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b, c: template_mix(b, c, offset, numel, 1.3), (bank, coefficients))


def test_template_mix_rejects_windows_outside_the_bank():
    with pytest.raises(ValueError, match="do not fit a bank of 10"):
        template_mix(torch.zeros(10), torch.ones(3), 2, 3)
    with pytest.raises(ValueError, match="1-D"):
        template_mix(torch.zeros(10), torch.ones(1, 2), 0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wavg_and_emb_keep_the_dtype(dtype):
    bank = _bank(30, dtype)
    assert TemplateMix((2, 3), 1, 4).to(dtype)(bank).dtype == dtype
    out = EmbeddingMix((2, 3), 1, 4, 5).to(dtype)(bank, torch.randn(4, 5, dtype=dtype), torch.zeros(4, dtype=dtype))
    assert out.dtype == dtype


# ---- bilinear -----------------------------------------------------------------------------------
GRIDS = [((5, 7), (2, 3)), ((9, 4), (9, 4)), ((1, 6), (1, 2)), ((6, 1), (2, 1)), ((1, 1), (1, 1)), ((40, 33), (7, 5))]


@pytest.mark.parametrize(("size", "grid"), GRIDS, ids=str)
def test_bilinear_equals_f_interpolate_with_its_gradient(size, grid):
    block = _bank(math.prod(grid)).view(grid)
    upstream = _bank(math.prod(size), seed=3).view(size)
    new, (new_grad,) = _grads(
        lambda b: bilinear(b, lerp_plan(size[0], grid[0]), lerp_plan(size[1], grid[1])), (block,), upstream
    )
    old, (old_grad,) = _grads(lambda b: old_interpolate(b, size), (block,), upstream)
    torch.testing.assert_close(new, old)
    torch.testing.assert_close(new_grad, old_grad)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), grow_rows=st.integers(0, 20), grow_cols=st.integers(0, 20))
def test_bilinear_equals_f_interpolate_property(rows, cols, grow_rows, grow_cols):
    size, grid = (rows + grow_rows, cols + grow_cols), (rows, cols)
    block = _bank(rows * cols).view(grid)
    out = bilinear(block, lerp_plan(size[0], rows, 0.5), lerp_plan(size[1], cols))
    torch.testing.assert_close(out, 0.5 * old_interpolate(block, size))


@pytest.mark.parametrize(("size", "grid"), GRIDS[:4], ids=str)
def test_bilinear_gradcheck(size, grid):
    block = _bank(math.prod(grid)).view(grid).requires_grad_(True)
    plans = lerp_plan(size[0], grid[0], 1.7), lerp_plan(size[1], grid[1])
    assert torch.autograd.gradcheck(lambda b: bilinear(b, *plans), (block,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_interpolate_generator_dtypes_and_device_buffers(dtype):
    gen = Interpolate((6, 2, 3), offset=1, grid=(3, 4), gain=0.5).to(dtype)
    bank = _bank(14, dtype)
    expected = 0.5 * old_interpolate(bank[1:13].view(3, 4).double(), (6, 6))
    out = gen(bank)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.double().view(6, 6), expected, **({} if dtype != torch.bfloat16 else {"atol": 0.05, "rtol": 0.05})
    )
    assert not any(name.startswith("_rows") for name in gen.state_dict())  # plans are rebuilt, not saved


# ---- SuperWeights that share one window ---------------------------------------------------------
def test_shared_window_superweights_equal_the_batched_formula_with_gradients():
    from npas_fx.superweights import SuperWeightMix

    k, block = 3, (2, 2)
    gen = SuperWeightMix(
        (4, 4), block, k, window_index=[0] * 4, stride=0, coefficient_rows=[0, 1, 2, 3], coefficient_name="c", gain=1.5
    ).double()
    bank, coefficients = _bank(k * 4 + 3), _bank(4 * k, seed=1).view(4, k)
    upstream = _bank(16, seed=2).view(4, 4)

    def old(b, c):  # the batched product over the expanded window (the formula before one mm)
        chosen = b.narrow(0, 0, k * 4).unsqueeze(0).expand(4, k * 4).reshape(4, k, 4)
        blocks = torch.bmm(c.unsqueeze(1), chosen).squeeze(1)  # (N, m)
        return 1.5 * blocks.view(2, 2, 2, 2).transpose(1, 2).reshape(4, 4)

    new, new_grads = _grads(gen, (bank, coefficients), upstream)
    ref, old_grads = _grads(old, (bank, coefficients), upstream)
    torch.testing.assert_close(new, ref)
    for a, b in zip(new_grads, old_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_interpolate_builds_under_the_meta_device():
    # plan checks build generators under torch.device("meta"), where bincount has no kernel
    with torch.device("meta"):
        gen = Interpolate((6, 4), offset=0, grid=(2, 2))
    torch.testing.assert_close(
        gen(_bank(4, torch.float32)), old_interpolate(_bank(4, torch.float32).view(2, 2), (6, 4))
    )
