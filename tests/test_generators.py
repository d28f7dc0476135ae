"""Weight generators (npas_fx.generators): gradients, shapes and the documented formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from npas_fx.generators import (
    EmbeddingMix,
    Hash,
    Interpolate,
    Mask,
    Repeat,
    SignedRepeat,
    TemplateMix,
    WeightGenerator,
    interpolation_grid,
)
from npas_fx.plan import LayerPlan
from npas_fx.shared_params import make_generator

SHAPES = [(4, 3), (3, 2, 2), (2, 3, 2, 2), (2, 1, 2, 2, 2)]


def _bank(size: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gradcheck(gen: WeightGenerator, bank_size: int, extra: tuple[torch.Tensor, ...] = ()) -> None:
    """gradcheck wrt the bank, the group tensors in ``extra`` and every parameter of ``gen``."""
    gen = gen.double()
    names = [n for n, _ in gen.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in gen.named_parameters())
    bank = _bank(bank_size).requires_grad_(True)
    extra = tuple(t.detach().double().requires_grad_(True) for t in extra)
    k = len(extra)

    def fn(bank: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return functional_call(gen, dict(zip(names, rest[k:], strict=True)), (bank, *rest[:k]))

    assert torch.autograd.gradcheck(fn, (bank, *extra, *params), eps=1e-6, atol=1e-5)


# ---- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradcheck_every_generator(shape):
    n = math.prod(shape)
    torch.manual_seed(0)
    _gradcheck(TemplateMix(shape, offset=0, templates=1, gain=1.0), n)  # slice
    _gradcheck(TemplateMix(shape, offset=3, templates=3, gain=1.7), 3 * n + 5)  # wavg: bank, coefficients
    for normalize in ("none", "softmax"):  # emb: bank, map W, map b, embedding
        gen = EmbeddingMix(shape, offset=2, templates=3, embedding_dim=4, gain=0.8, normalize=normalize)
        _gradcheck(gen, 3 * n + 2, (torch.randn(5, 4), torch.randn(5)))
    _gradcheck(Repeat(shape, offset=4, gain=1.3), 5)
    _gradcheck(Interpolate(shape, offset=1, grid=(2, 2), gain=0.9), 6)
    _gradcheck(Mask(shape, offset=2, gain=1.1), 5)  # bank, mask
    _gradcheck(Hash(shape, salt=3, gain=1.2), 7)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_generator_output_has_the_layer_shape(shape):
    n = math.prod(shape)
    gens = [
        (TemplateMix(shape, 0, 1), ()),
        (TemplateMix(shape, 1, 2), ()),
        (EmbeddingMix(shape, 0, 2, 3), (torch.randn(2, 3), torch.randn(2))),
        (Repeat(shape, 1), ()),
        (Interpolate(shape, 0, interpolation_grid(shape, 5)), ()),
        (Mask(shape, 1), ()),
        (Hash(shape, 9), ()),
    ]
    for gen, extra in gens:
        out = gen(torch.randn(2 * n + 1), *extra)
        assert tuple(out.shape) == shape, type(gen).__name__
        assert gen.numel == n and gen.shape == shape
    for gen, extra in gens:  # .double() converts a generator with its bank (as gm.to(torch.float64) does)
        bank = torch.randn(2 * n + 1, dtype=torch.float64)
        assert gen.double()(bank, *(t.double() for t in extra)).dtype == torch.float64


# ---- formulas -----------------------------------------------------------------------------------
def test_slice_is_the_bank_slice_bit_exact():
    bank = _bank(30, dtype=torch.float32)
    out = TemplateMix((4, 5), offset=7, templates=1)(bank)
    assert torch.equal(out, bank[7:27].view(4, 5))
    assert out.data_ptr() == bank[7:].data_ptr()  # a view: gain 1 keeps copied weights exact
    assert TemplateMix((4, 5), offset=0, templates=1).coefficients is None  # hard sharing has no parameters
    doubled = TemplateMix((4, 5), offset=7, templates=1, gain=2.0)(bank)
    assert torch.equal(doubled, 2.0 * bank[7:27].view(4, 5))


def test_wavg_mixes_consecutive_templates():
    n, k, offset, gain = 6, 3, 4, 1.5
    bank = _bank(k * n + offset + 2)
    gen = TemplateMix((2, 3), offset=offset, templates=k, gain=gain).double()
    with torch.no_grad():
        gen.coefficients.copy_(torch.tensor([0.5, -2.0, 1.0]))
    templates = [bank[offset + i * n : offset + (i + 1) * n] for i in range(k)]
    expected = gain * (0.5 * templates[0] - 2.0 * templates[1] + 1.0 * templates[2])
    torch.testing.assert_close(gen(bank), expected.view(2, 3))
    assert torch.allclose(TemplateMix((2, 3), 0, 4).coefficients, torch.full((4,), 0.5))  # 1/sqrt(K)


@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_emb_coefficients_come_from_the_layer_embedding(normalize):
    n, k, e, offset, gain = 4, 3, 5, 1, 0.7
    bank, weight, bias = _bank(k * n + offset), _bank(k + 2, 1).repeat(e, 1).T, _bank(k + 2, 2)
    weight = weight + _bank((k + 2) * e, 3).view(k + 2, e)  # (K_max, E)
    gen = EmbeddingMix((2, 2), offset, k, e, gain, normalize).double()
    logits = weight[:k] @ gen.embedding + bias[:k]
    coefficients = torch.softmax(logits, 0) if normalize == "softmax" else logits
    torch.testing.assert_close(gen.coefficients(weight, bias), coefficients)
    expected = gain * coefficients @ bank[offset : offset + k * n].view(k, n)
    torch.testing.assert_close(gen(bank, weight, bias), expected.view(2, 2))


def _tiled(bank: torch.Tensor, numel: int, offset: int) -> torch.Tensor:
    """Reference tiling: copy c of the bank rotated by c places."""
    size = bank.numel()
    values = []
    for j in range(offset, offset + numel):
        copy, k = divmod(j, size)
        values.append(bank[(k + copy) % size])
    return torch.stack(values)


@pytest.mark.parametrize(("numel", "size", "offset"), [(7, 3, 0), (7, 3, 2), (12, 5, 4), (4, 10, 3), (9, 1, 0)])
def test_repeat_tiles_rotated_copies_with_offset(numel, size, offset):
    bank = _bank(size)
    out = Repeat((1, numel), offset=offset, gain=1.25)(bank).reshape(-1)
    torch.testing.assert_close(out, _tiled(bank, numel, offset) * 1.25, rtol=0, atol=0)


def test_repeat_rows_differ_when_the_bank_divides_the_row_length():
    # plain tiling of 16 values into 10 rows of 32 gives 10 identical rows (rank 1)
    weight = Repeat((10, 32))(torch.randn(16, dtype=torch.float64))
    assert torch.linalg.matrix_rank(weight) >= 8


@pytest.mark.parametrize(
    ("shape", "grid", "offset"), [((5, 7), (2, 3), 0), ((4, 2, 3, 3), (3, 4), 2), ((6, 1), (2, 1), 1)]
)
def test_interpolate_is_bilinear_on_the_grid(shape, grid, offset):
    bank = _bank(grid[0] * grid[1] + offset + 3)
    out = Interpolate(shape, offset=offset, grid=grid, gain=0.5)(bank)
    block = bank[offset : offset + grid[0] * grid[1]].view(1, 1, *grid)
    rest = math.prod(shape[1:])
    expected = F.interpolate(block, size=(shape[0], rest), mode="bilinear", align_corners=True) * 0.5
    torch.testing.assert_close(out, expected.reshape(shape))
    corners = out.reshape(shape[0], rest)[[0, 0, -1, -1], [0, -1, 0, -1]]
    torch.testing.assert_close(corners, 0.5 * block[0, 0][[0, 0, -1, -1], [0, -1, 0, -1]])  # align_corners


def test_mask_scales_each_row_of_the_tiled_bank():
    bank = _bank(5)
    gen = Mask((3, 4), offset=2, gain=2.0).double()
    assert set(gen.mask.tolist()) <= {-1.0, 1.0}  # starts at random signs
    with torch.no_grad():
        gen.mask.copy_(torch.tensor([0.5, -1.0, 3.0]))
    tiled = _tiled(bank, 12, 2).view(3, 4)
    torch.testing.assert_close(gen(bank), 2.0 * tiled * torch.tensor([[0.5], [-1.0], [3.0]], dtype=torch.float64))


def _hash_pattern(shape: tuple[int, ...], salt: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, sign) of every position, read off a bank holding 1..P."""
    out = Hash(shape, salt=salt)(torch.arange(1.0, size + 1, dtype=torch.float64)).reshape(-1)
    return out.abs().long() - 1, out.sign()


def test_hash_reads_a_signed_bank_position_fixed_by_position_and_salt():
    shape, size, salt = (6, 10), 17, 5
    index, sign = _hash_pattern(shape, salt, size)
    assert index.min() >= 0 and index.max() < size
    assert set(sign.tolist()) == {-1.0, 1.0}
    assert len(set(index.tolist())) > size // 2  # spreads over the bank
    bank = _bank(size)
    plain = sign * bank[index]  # w_j = s(j) bank[h(j)]
    torch.testing.assert_close(Hash(shape, salt=salt, gain=1.5)(bank).reshape(-1), 1.5 * plain)
    # deterministic: a new instance, another layer shape of the same size, same positions
    for other in [(6, 10), (60,), (3, 4, 5)]:
        torch.testing.assert_close(Hash(other, salt=salt)(bank).reshape(-1), plain, rtol=0, atol=0)
    # the first positions of a larger layer hash as in the smaller one: position only, not numel
    torch.testing.assert_close(Hash((100,), salt=salt)(bank)[:60], plain, rtol=0, atol=0)
    # another salt is another pattern
    assert not torch.equal(_hash_pattern(shape, salt + 1, size)[0], index)


def test_hash_with_a_one_value_bank():
    out = Hash((4, 4), salt=0)(torch.tensor([2.0]))
    assert set(out.abs().reshape(-1).tolist()) == {2.0}


# ---- interpolation_grid, make_generator, errors ----------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(1, 12), min_size=2, max_size=4), size=st.integers(1, 3000))
def test_interpolation_grid_fits_bank_and_layer(shape, size):
    rows, cols = interpolation_grid(shape, size)
    assert 1 <= rows <= shape[0] and 1 <= cols <= math.prod(shape[1:])
    assert rows * cols <= size


def test_interpolation_grid_documented_example():
    assert interpolation_grid((8, 4, 3, 3), 36) == (3, 12)
    assert interpolation_grid((8, 4), 32) == (8, 4)  # a bank that holds the layer: the layer itself


@pytest.mark.parametrize(
    ("fields", "cls"),
    [
        ({"generator": "slice", "templates": 1}, TemplateMix),
        ({"generator": "wavg", "templates": 3}, TemplateMix),
        ({"generator": "emb", "templates": 2}, EmbeddingMix),
        ({"generator": "repeat"}, Repeat),
        ({"generator": "interpolate", "grid": (2, 2)}, Interpolate),
        ({"generator": "mask"}, Mask),
        ({"generator": "signed"}, SignedRepeat),
        ({"generator": "hash", "salt": 4}, Hash),
    ],
)
def test_make_generator_builds_what_the_plan_says(fields, cls):
    layer = LayerPlan("w", (4, 6), "", "Linear", 0, gain=1.5, offset=1, **fields)
    gen = make_generator(layer, embedding_dim=3)
    assert type(gen) is cls and gen.shape == (4, 6) and gen.gain == 1.5 and gen.kind in (fields["generator"], "wavg")


def test_generator_argument_errors():
    with pytest.raises(ValueError, match="`templates` should be >= 1, got 0"):
        TemplateMix((2, 2), 0, 0)
    with pytest.raises(ValueError, match="`templates` should be >= 2 for an embedding mix, got 1"):
        EmbeddingMix((2, 2), 0, 1, 4)
    with pytest.raises(ValueError, match="`normalize`.*'sum'"):
        EmbeddingMix((2, 2), 0, 2, 4, normalize="sum")
    with pytest.raises(ValueError, match="unknown generator 'warp'"):
        make_generator(LayerPlan("w", (2, 2), "", "Linear", 0, "warp"), 4)


@pytest.mark.parametrize(("shape", "bank_size"), [((32, 256), 315), ((16, 16, 3, 3), 101), ((10, 32), 50)])
def test_signed_repeat_decorrelates_the_rows_at_no_cost(shape, bank_size):
    # Tiling a bank a little larger than a row gives every row about the same sum: after a ReLU,
    # the response to the inputs' mean then has one sign in every unit (all dead half the time).
    bank = torch.ones(bank_size)  # the worst case: a bank whose mean dominates
    plain, signed = Repeat(shape, offset=3)(bank), SignedRepeat(shape, offset=3)(bank)
    plain_sums, signed_sums = plain.flatten(1).sum(1), signed.flatten(1).sum(1)
    assert bool((plain_sums > 0).all())
    assert bool((signed_sums > 0).any()) and bool((signed_sums < 0).any())
    torch.testing.assert_close(signed.abs(), plain.abs(), rtol=0, atol=0)  # the same values, signs flipped per row
    flips = (signed.flatten(1)[:, 0] / plain.flatten(1)[:, 0]).view(-1, *[1] * (len(shape) - 1))
    torch.testing.assert_close(signed, plain * flips, rtol=0, atol=0)
    assert not list(SignedRepeat(shape).parameters())  # the signs are fixed: no budget spent
    torch.testing.assert_close(SignedRepeat(shape, offset=3).signs, SignedRepeat(shape, offset=3).signs)  # rebuilt
