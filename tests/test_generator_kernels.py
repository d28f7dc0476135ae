"""O(numel) generator kernels (npas_fx.kernels): equal to the formulas they replace, exact gradients,
chunked hashing's coverage and determinism, and plans written before ``chunk`` existed.

The reference implementations below are the formulas npas_fx used before the kernels (a gather of
``(j + j // P) mod P`` for tiling, per-element hashing recomputed at every forward), kept here so
that saved plans and state dicts keep giving the same weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CASES

import npas_fx
import npas_fx.kernels
from npas_fx.budget import GeneratorConfig
from npas_fx.generators import Hash, Interpolate, Mask, Repeat, TemplateMix
from npas_fx.hash_kernels import _HashBlocks, hash_rows, hashed_blocks, slot_count
from npas_fx.kernels import _MaskedTile, _SkewTile, masked_tile, skew_tile
from npas_fx.plan import LayerPlan, Plan, _load
from npas_fx.shared_params import make_generator

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
M32 = 0xFFFFFFFF


# ---- reference implementations ----------------------------------------------------------------
def old_tile(bank: torch.Tensor, numel: int, offset: int) -> torch.Tensor:
    """``_tile`` before the kernels: ``t[j] = bank[(k + c) mod P]`` for ``j + offset = c * P + k``."""
    size = bank.numel()
    position = torch.arange(offset, offset + numel, device=bank.device)
    return bank[torch.remainder(position + torch.div(position, size, rounding_mode="floor"), size)]


def mix32(x: int) -> int:
    """lowbias32 on Python integers (independent of the tensor implementation)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def old_hash(bank: torch.Tensor, numel: int, salt: int) -> torch.Tensor:
    """``Hash`` before chunks: ``w[j] = s(j) bank[h(j) mod P]``, per element."""
    position = torch.arange(numel, dtype=torch.int64)
    x = (position + salt * 0x9E3779B1) & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    h = x ^ (x >> 16)
    sign = torch.tensor([1.0 if mix32(int(v) + 0x68E31DA4) & 1 else -1.0 for v in h], dtype=bank.dtype)
    return bank[torch.remainder(h, bank.numel())] * sign


def chunked_reference(bank: torch.Tensor, numel: int, chunk: int, salt: int) -> torch.Tensor:
    """The documented chunked formula, element by element in Python (see ``hash_rows``)."""
    size = bank.numel()
    slots, blocks = -(-size // chunk), -(-numel // chunk)
    hashes = [mix32(b + salt * 0x9E3779B1) for b in range(-(-blocks // slots) * slots)]
    slot = []
    for start in range(0, blocks, slots):  # each round: its blocks in the order of their hashes
        order = sorted(range(slots), key=lambda i: hashes[start + i])
        slot += order[: min(slots, blocks - start)]
    if numel % chunk and slots > 1:
        first = (blocks - 1) // slots * slots
        mine = slot[-1]
        slot[first:] = [mine if s == slots - 1 else s for s in slot[first:]]
        slot[-1] = slots - 1
    values = []
    for j in range(numel):
        b, i = divmod(j, chunk)
        sign = 1.0 if mix32(hashes[b] + 0x68E31DA4) & 1 else -1.0
        values.append(sign * bank[(slot[b] * chunk + i) % size])
    return torch.stack(values)


def _bank(size: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- skewed tiling ------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    size=st.one_of(st.integers(1, 12), st.integers(1, 400)),
    numel=st.integers(1, 3000),
    offset_share=st.floats(0, 1, exclude_max=True),
    dtype=st.sampled_from(DTYPES),
)
def test_skew_tile_equals_the_old_gather(size, numel, offset_share, dtype):
    offset = int(offset_share * size)
    bank = _bank(size, dtype)
    assert torch.equal(skew_tile(bank, numel, offset), old_tile(bank, numel, offset))
    gen = Repeat((1, numel), offset=offset, gain=1.37).to(dtype)
    assert torch.equal(gen(bank).view(-1), old_tile(bank, numel, offset) * 1.37)  # gain on the bank: same values


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 60),
    numel=st.integers(1, 1500),
    offset_share=st.floats(0, 1, exclude_max=True),
    gain=st.sampled_from([1.0, 1.3]),
)
def test_skew_tile_gradient_equals_the_old_gather(size, numel, offset_share, gain):
    offset = int(offset_share * size)
    upstream = _bank(numel, seed=1)
    grads = []
    for tile in (lambda b, n, o: skew_tile(b, n, o, gain), lambda b, n, o: old_tile(b * gain, n, o)):
        bank = _bank(size).requires_grad_(True)
        (tile(bank, numel, offset) * upstream).sum().backward()
        grads.append(bank.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


# (P, numel, offset): a wrap in the head only, fewer copies than P, whole circulants and extra rows,
# tails, P = 1, a bank larger than the layer, more than 32 rows to un-skew.
TILE_LAYOUTS = [
    (5, 3, 4),
    (5, 12, 2),
    (4, 40, 1),
    (3, 31, 2),
    (1, 7, 0),
    (7, 7, 6),
    (6, 100, 0),
    (50, 20, 45),
    (40, 2000, 3),
    (45, 1700, 7),
]


@pytest.mark.parametrize("few_ops_below", [0, 1 << 18], ids=["per-copy-adds", "few-ops"])
@pytest.mark.parametrize(("size", "numel", "offset"), TILE_LAYOUTS)
def test_skew_tile_gradcheck(size, numel, offset, few_ops_below, monkeypatch):
    monkeypatch.setattr(npas_fx.kernels, "FEW_OPS_BELOW", few_ops_below)  # both backward paths
    bank = _bank(size).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: _SkewTile.apply(b, numel, offset, 1.0), (bank,))
    assert torch.autograd.gradcheck(lambda b: skew_tile(b, numel, offset), (bank,))
    assert torch.autograd.gradcheck(lambda b: skew_tile(b, numel, offset, 1.3), (bank,))  # the gain folded in


def test_skew_tile_without_wrap_is_a_view_and_rejects_bad_offsets():
    bank = _bank(10)
    assert skew_tile(bank, 4, 3).data_ptr() == bank[3:].data_ptr()
    for offset in (-1, 10):
        with pytest.raises(ValueError, match=rf"`offset` should be in \[0, 10\).*got {offset}"):
            skew_tile(bank, 4, offset)


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 80),
    rows=st.integers(1, 12),
    cols=st.integers(1, 200),
    offset_share=st.floats(0, 1, exclude_max=True),
    dtype=st.sampled_from(DTYPES),
)
def test_masked_tile_equals_the_old_tile_times_the_mask(size, rows, cols, offset_share, dtype):
    offset = int(offset_share * size)
    bank, mask = _bank(size, dtype), _bank(rows, dtype, seed=2)
    expected = (old_tile(bank, rows * cols, offset).view(rows, cols) * mask.unsqueeze(1)).view(-1)
    assert torch.equal(masked_tile(bank, mask, rows * cols, offset), expected)
    scaled = (old_tile(bank * 1.3, rows * cols, offset).view(rows, cols) * mask.unsqueeze(1)).view(-1)
    assert torch.equal(masked_tile(bank, mask, rows * cols, offset, 1.3), scaled)  # gain on the bank: same values


@pytest.mark.parametrize(("size", "numel", "offset"), TILE_LAYOUTS)
def test_masked_tile_gradcheck(size, numel, offset):
    rows = next(r for r in (5, 4, 3, 2, 1) if numel % r == 0)
    bank, mask = _bank(size).requires_grad_(True), _bank(rows, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b, m: _MaskedTile.apply(b, m, numel, offset, 1.0), (bank, mask))
    assert torch.autograd.gradcheck(lambda b, m: masked_tile(b, m, numel, offset, 0.7), (bank, mask))


def test_mask_equals_the_old_formula_up_to_rounding():
    bank, gen = _bank(7), Mask((6, 5), offset=3, gain=1.3).double()
    expected = (old_tile(bank, 30, 3).view(6, 5) * gen.mask.unsqueeze(1)).reshape(-1) * 1.3
    torch.testing.assert_close(gen(bank).reshape(-1), expected, rtol=1e-15, atol=0)


# ---- hashing: the per-element formula of older plans ----------------------------------------------
@pytest.mark.parametrize("salt", [0, 5, 2**31 - 1])
@pytest.mark.parametrize(("shape", "size"), [((6, 10), 17), ((3, 4, 5), 1), ((7,), 100)])
def test_hash_chunk_1_equals_the_old_per_element_formula(shape, size, salt):
    bank, numel = _bank(size), math.prod(shape)
    expected = old_hash(bank, numel, salt) * 1.5
    for bank_size in (None, size):  # index computed at each forward, or once into a buffer
        gen = Hash(shape, salt=salt, gain=1.5, chunk=1, bank_size=bank_size)
        assert torch.equal(gen(bank).reshape(-1), expected)


OLD_LAYER_JSON = """{"name": "fc.weight", "shape": [6, 10], "module": "fc", "module_type": "Linear", "group": 0,
 "generator": "hash", "templates": 0, "offset": 0, "gain": 0.75, "overhead": 0, "aliases": ["fc.weight"],
 "copied": false, "grid": [], "salt": 3, "block": [], "coefficient_set": 0}"""


def test_a_layer_plan_without_chunk_hashes_per_element_as_before():
    layer = _load(LayerPlan, json.loads(OLD_LAYER_JSON), "plan.layers[0]")
    assert layer.chunk == 1
    bank = _bank(23)
    gen = make_generator(layer, embedding_dim=4, bank_size=23)
    assert torch.equal(gen(bank).reshape(-1), old_hash(bank, 60, 3) * 0.75)


def test_an_old_plan_json_recompiles_to_the_old_hashed_weights():
    case = CASES["mlp"]
    new = npas_fx.plan_of(npas_fx.compile(case.build(), 0.3, strategy="hash"))
    assert {x.chunk for x in new.layers} == {3, 4}  # the default for new plans: a quarter of rows of 12 and 16
    data = json.loads(new.to_json())
    for layer in data["layers"]:
        del layer["chunk"]  # as written before the field existed
    old = Plan.from_dict(data)
    gm = npas_fx.compile(case.build(), plan=old)
    assert npas_fx.count_parameters(gm) == old.budget
    for i, layer in enumerate(old.layers):
        assert layer.chunk == 1
        bank = gm.npas.groups[f"g{layer.group}"].bank.detach()
        expected = old_hash(bank, layer.numel, layer.salt) * layer.gain
        assert torch.equal(gm.npas.generate(i).detach().reshape(-1), expected), layer.name


# ---- chunked hashing ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 300),
    numel=st.integers(1, 1200),
    chunk=st.sampled_from([2, 3, 8, 64, 100]),
    salt=st.integers(0, 1000),
)
def test_chunked_hash_equals_the_documented_formula(size, numel, chunk, salt):
    bank = _bank(size)
    out = Hash((numel,), salt=salt, chunk=chunk, bank_size=size)(bank)
    assert torch.equal(out, chunked_reference(bank, numel, chunk, salt))


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 400),
    extra=st.integers(0, 2000),
    chunk=st.sampled_from([1, 2, 5, 16, 64, 500]),
    salt=st.integers(0, 2**32 - 1),
)
def test_chunked_hash_reads_every_bank_value_when_the_layer_is_as_large(size, extra, chunk, salt):
    numel = size + extra
    bank = torch.ones(size, dtype=torch.float64, requires_grad=True)
    out = Hash((numel,), salt=salt, chunk=chunk)(bank)
    assert set(out.abs().tolist()) == {1.0}  # every weight is one signed bank value
    (out.square().sum() / 2).backward()  # d/dbank = how many weights read each value
    reads = bank.grad
    assert reads.sum() == numel
    if chunk > 1:
        assert reads.min() >= 1, f"unread bank values: {(reads == 0).nonzero().view(-1).tolist()}"


def test_chunked_hash_blocks_read_contiguous_signed_slots():
    size, chunk, numel = 50, 8, 203
    out = Hash((numel,), salt=9, chunk=chunk)(torch.arange(1.0, size + 1, dtype=torch.float64))
    for b in range(-(-numel // chunk)):
        block = out[b * chunk : (b + 1) * chunk]
        assert len(set(block.sign().tolist())) == 1  # one sign per block
        index = block.abs().long() - 1
        start = int(index[0])
        assert start % chunk == 0  # a slot
        assert index.tolist() == [(start + i) % size for i in range(len(index))]  # contiguous, wrapping


def test_chunked_hash_is_deterministic_and_salted():
    bank = _bank(1000)
    a, b = (Hash((64, 64), salt=5, chunk=64, bank_size=1000)(bank) for _ in range(2))
    assert torch.equal(a, b)
    assert torch.equal(a, Hash((64, 64), salt=5, chunk=64)(bank))  # buffer or per-forward: same rows
    assert not torch.equal(a, Hash((64, 64), salt=6, chunk=64)(bank))
    assert not torch.equal(a, Hash((64, 64), salt=5, chunk=32)(bank))


@pytest.mark.parametrize(
    ("size", "numel", "chunk"), [(7, 20, 1), (7, 20, 3), (5, 21, 8), (30, 10, 4), (12, 12, 4), (2, 30, 16)]
)
def test_hashed_blocks_gradcheck(size, numel, chunk):
    rows = hash_rows(numel, chunk, 3, size)
    bank = _bank(size).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: _HashBlocks.apply(b, rows, numel, chunk, 1.0), (bank,))
    assert torch.autograd.gradcheck(lambda b: hashed_blocks(b, rows, numel, chunk, 0.6), (bank,))
    gen = Hash((numel,), salt=3, gain=1.4, chunk=chunk, bank_size=size).double()
    assert torch.autograd.gradcheck(gen, (bank,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 16])
def test_hash_dtypes(dtype, chunk):
    bank = _bank(40, dtype)
    out = Hash((9, 11), salt=2, chunk=chunk, bank_size=40).to(dtype)(bank)
    assert out.dtype == dtype
    reference = chunked_reference(bank.double(), 99, chunk, 2) if chunk > 1 else old_hash(bank.double(), 99, 2)
    assert torch.equal(out.reshape(-1).double(), reference)


def test_hash_index_buffer_is_small_and_not_saved():
    gen = Hash((512, 784), salt=1, chunk=64, bank_size=40_000)
    assert gen.rows.dtype == torch.int32 and gen.rows.numel() == -(-512 * 784 // 64)
    assert "rows" not in gen.state_dict()
    assert slot_count(40_000, 64) == 625 and int(gen.rows.max()) < 2 * 625
    with pytest.raises(ValueError, match="built for a bank of 40000 values, got 39999"):
        gen(torch.randn(39_999))


def test_hash_argument_errors():
    for chunk in (0, -3, 1.5, True, "64"):
        with pytest.raises(ValueError, match=r"`chunk` should be an integer >= 1"):
            Hash((2, 2), salt=0, chunk=chunk)
    with pytest.raises(ValueError, match=r"`bank_size` should be an integer >= 1 or None, got 0"):
        Hash((2, 2), salt=0, bank_size=0)
    with pytest.raises(ValueError, match=r"`rows` should hold 2 block indices"):
        hashed_blocks(torch.ones(4), torch.zeros(3, dtype=torch.int64), 7, 4)


# ---- configuration and plans ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "64", None])
def test_hash_chunk_is_validated(bad):
    with pytest.raises(ValueError, match=rf"`hash_chunk` should be an integer >= 1.*got {bad!r}"):
        GeneratorConfig(hash_chunk=bad)


@pytest.mark.parametrize("chunk", [1, 16])
def test_plan_round_trip_keeps_the_chunk(chunk):
    case = CASES["mlp"]
    gm = npas_fx.compile(case.build(), 0.2, strategy="hash", generators=GeneratorConfig(hash_chunk=chunk))
    plan = npas_fx.plan_of(gm)
    # at most a quarter of a row: the MLP's rows hold 12 and 16 weights
    assert [x.chunk for x in plan.layers] == [min(chunk, x.numel // x.shape[0] // 4) for x in plan.layers]
    assert plan.generator_config["hash_chunk"] == chunk
    again = Plan.from_json(plan.to_json())
    assert again == plan
    twin = npas_fx.compile(case.build(), plan=again)
    twin.load_state_dict(gm.state_dict())
    x = case.inputs()
    torch.testing.assert_close(twin.eval()(*x), gm.eval()(*x), rtol=0, atol=0)
    assert [g.chunk for g in twin.npas.generators.values()] == [x.chunk for x in plan.layers]


# ---- torch.compile -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: (Repeat((9, 7), offset=2, gain=1.2), 4),  # whole circulants, extra rows and a tail
        lambda: (Mask((6, 5), offset=3, gain=0.9), 7),
        lambda: (Hash((10, 13), salt=4, gain=1.1, chunk=8, bank_size=20), 20),
        lambda: (Hash((10, 13), salt=4, chunk=1, bank_size=20), 20),
        lambda: (TemplateMix((5, 3), offset=2, templates=3, gain=1.2), 50),
        lambda: (Interpolate((7, 2, 3), offset=1, grid=(3, 4), gain=0.8), 20),
    ],
    ids=["repeat", "mask", "hash-c8", "hash-c1", "wavg", "interpolate"],
)
def test_kernels_compile_fullgraph(make):
    torch._dynamo.reset()
    gen, size = make()
    compiled = torch.compile(gen, fullgraph=True)
    banks = [_bank(size, torch.float32).requires_grad_(True) for _ in range(2)]
    outs = [gen(banks[0]), compiled(banks[1])]
    torch.testing.assert_close(outs[1], outs[0])
    upstream = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(out, bank, upstream)[0] for out, bank in zip(outs, banks, strict=True)]
    torch.testing.assert_close(grads[1], grads[0])
