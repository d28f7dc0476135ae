"""Hashed sharing keeps its exact values while its index computation gets faster.

A saved plan re-applies by recomputing each layer's hashed rows, so ``hash_rows`` must return the
same indices for ever: digests of the rows the first implementation (full keys, full sort) gave
for layers up to BERT-large's, a vectorised reference of the documented formula at sizes where
the selection works in several pieces, and bit-for-bit equality of the no-grad generation and
the calibration sample with the autograd kernel.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import npas_fx
from npas_fx.generators import Hash
from npas_fx.hash_kernels import hash_rows, hashed_blocks, slot_count
from npas_fx.shared_params import _hash_sample, sample_step

M32 = 0xFFFFFFFF

# (numel, chunk, salt, bank size, dtype, sha256 prefix of the rows) from the first implementation:
# BERT-large's FFN, attention and embedding at budget 0.1, layers smaller than half a round, layers
# of several rounds, partial last blocks, a wrapping last slot, per-element hashing, high salts.
DIGESTS = [
    (4194304, 64, 5, 33517446, "torch.int32", "15791fc378ee78eecc858f4c3b68ac65"),
    (1048576, 64, 7, 33517446, "torch.int32", "249c54e0fdbd539ab8698f76e20f13f4"),
    (31254528, 64, 0, 33517446, "torch.int32", "31c87d7415ca9e56180423c02a2a2cba"),
    (100003, 16, 4294967295, 2000000, "torch.int32", "b8cc1c538f4e79915395ea382f38c424"),
    (5000000, 16, 3, 2000000, "torch.int32", "8b314aa176db66a1e963237796ea8048"),
    (1000000, 1, 11, 999983, "torch.int32", "d0c0d1e3b44cc78904551d360fe343bd"),
    (3000001, 64, 123456789, 1048577, "torch.int32", "93b7b651bb14659a50ec665f4797fc79"),
    (4480000, 64, 1, 40000000, "torch.int32", "e712f56036fab55dc935ad8094a9c911"),
    (777, 4, 2147483653, 10000000, "torch.int32", "297cdb2490be8692cecc31fd8b6ad698"),
]


@pytest.mark.parametrize(("numel", "chunk", "salt", "size", "dtype", "digest"), DIGESTS)
def test_hash_rows_are_those_of_the_first_implementation(numel, chunk, salt, size, dtype, digest):
    rows = hash_rows(numel, chunk, salt, size)
    assert str(rows.dtype) == dtype
    assert hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:32] == digest


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def reference_rows(numel: int, chunk: int, salt: int, size: int) -> torch.Tensor:
    """The documented formula with every key of every round computed and fully sorted."""
    slots, blocks = slot_count(size, chunk), -(-numel // chunk)
    rounds = -(-blocks // slots) if chunk > 1 else 1
    h = _mix(torch.arange(rounds * slots if chunk > 1 else blocks) + ((salt * 0x9E3779B1) & M32))
    if chunk == 1:
        slot = h % size
    else:
        slot = torch.argsort(h.view(rounds, slots), dim=1).view(-1)[:blocks]
        if numel % chunk and slots > 1:
            first = (blocks - 1) // slots * slots
            mine = slot[-1].clone()
            tail = slot[first:]
            tail[tail == slots - 1] = mine
            slot[-1] = slots - 1
    negative = 1 - (_mix(h[:blocks] + 0x68E31DA4) & 1)
    return slot + slots * negative


@pytest.mark.parametrize(
    ("numel", "chunk", "size"),
    [
        (64 * 1000, 64, 64 * 300_000),  # 1000 of 300,000 slots: five pieces, a few keys in each
        (16 * 40_000 + 5, 16, 16 * 150_000),  # under half a round, a partial last block
        (64 * 140_000, 64, 64 * 300_000 - 7),  # just under half a round; the last slot wraps
        (64 * 150_001, 64, 64 * 300_000),  # just over half: the whole round is sorted
        (2 * 300_000 + 17, 2, 2 * 200_000),  # two whole rounds, then a few blocks of a third
        (3, 64, 64 * 200_000),  # three blocks of a large bank
    ],
)
@pytest.mark.parametrize("salt", [0, 77, 2**32 - 1])
def test_hash_rows_equal_the_fully_sorted_reference(numel, chunk, size, salt):
    assert torch.equal(hash_rows(numel, chunk, salt, size).long(), reference_rows(numel, chunk, salt, size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize("gain", [1.0, 0.37])
def test_generation_without_autograd_equals_the_autograd_kernel(dtype, chunk, gain):
    size, shape = 100_003, (300, 257)  # the last slot wraps; the weight ends in a partial block
    bank = torch.randn(size, generator=torch.Generator().manual_seed(1)).to(dtype)
    gen = Hash(shape, salt=3, gain=gain, chunk=chunk, bank_size=size).to(dtype)
    with torch.no_grad():
        fast = gen(bank)
    slow = hashed_blocks(bank.clone().requires_grad_(True), gen.rows, gen.numel, chunk, gain)
    assert fast.dtype == dtype
    assert torch.equal(fast.view(-1), slow.detach())


@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize("gain", [1.0, 1.9])
def test_calibration_sample_is_every_step_th_generated_value(chunk, gain):
    size, shape = 50_001, (700, 300)
    bank = torch.randn(size, generator=torch.Generator().manual_seed(2))
    gen = Hash(shape, salt=9, gain=gain, chunk=chunk, bank_size=size)
    step = sample_step(shape, 2**12)
    with torch.no_grad():
        assert torch.equal(_hash_sample(gen, bank, step), gen(bank).reshape(-1)[::step])


@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_a_saved_hash_plan_reapplies_to_the_same_weights(chunk):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    )
    config = npas_fx.GeneratorConfig(hash_chunk=chunk)
    tokens = {"input_ids": torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(0))}
    torch.manual_seed(1)
    gm = npas_fx.compile(model, 0.1, strategy="hash", generators=config, example_inputs=tokens)
    plan = npas_fx.Plan.from_json(npas_fx.plan_of(gm).to_json())
    torch.manual_seed(1)
    again = npas_fx.compile(model, plan=plan)
    with torch.no_grad():
        for i in range(len(plan.layers)):
            assert torch.equal(gm.npas.generate(i), again.npas.generate(i)), plan.layers[i].name
