"""Exact budget accounting (npas_fx.budget): resolving budgets, exact splits, allocation, minimum."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npas_fx.budget import (
    BANK_FLOOR,
    DOWNSAMPLERS,
    UPSAMPLERS,
    Allocation,
    GeneratorConfig,
    allocate,
    bank_split,
    minimum_budget,
    resolve_budget,
    split_exact,
)


# ---- resolve_budget -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("budget", "original", "expected"),
    [
        (123, 1000, 123),
        (5000, 1000, 5000),  # an int is a count, above the original too
        (0.25, 1000, 250),
        (0.1, 837, 84),  # 83.7 rounds to the nearest integer
        (4.0, 837, 3348),
        (1.0, 837, 837),
        (np.int64(77), 1000, 77),
        (np.float64(0.5), 1000, 500),
    ],
)
def test_resolve_budget_counts_and_multiples(budget, original, expected):
    result = resolve_budget(budget, original)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    ("budget", "error", "words"),
    [
        (True, TypeError, ["bool", "int", "float"]),
        (False, TypeError, ["bool"]),
        ("ten", ValueError, ["'ten'", "'10%'"]),  # strings are read as the CLI reads them ("10%", "0.1", "5000")
        (None, TypeError, ["NoneType"]),
        (torch.tensor(3), TypeError, ["Tensor"]),
        (math.nan, ValueError, ["finite", "nan"]),
        (math.inf, ValueError, ["finite", "inf"]),
        (-math.inf, ValueError, ["finite"]),
        (0, ValueError, ["positive", "0"]),
        (-5, ValueError, ["positive", "-5"]),
        (0.0, ValueError, ["positive", "0.1"]),  # the message suggests a valid multiple
        (-0.3, ValueError, ["positive", "-0.3"]),
        (1e-6, ValueError, ["positive", "= 0 parameters"]),  # rounds to zero parameters
    ],
    ids=repr,
)
def test_resolve_budget_rejects(budget, error, words):
    with pytest.raises(error) as info:
        resolve_budget(budget, 1000)
    for word in words:
        assert word in str(info.value), str(info.value)
    if error is TypeError:
        assert "1000" in str(info.value)  # it names the model's count, so a multiple can be chosen


# ---- split_exact --------------------------------------------------------------------------------
def test_split_exact_documented_cases():
    assert split_exact(10, [1, 1, 2]) == [3, 2, 5]
    assert split_exact(7, [1]) == [7]
    assert split_exact(6, [1, 1, 1]) == [2, 2, 2]
    assert split_exact(3, [1000, 1, 1]) == [1, 1, 1]  # the minimum overrides proportion
    assert split_exact(9, [5, 5], minimum=3) == [5, 4]


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=12),
    extra=st.integers(0, 100_000),
    minimum=st.integers(0, 5),
)
def test_split_exact_sums_exactly_and_respects_minimum(weights, extra, minimum):
    total = minimum * len(weights) + extra
    shares = split_exact(total, weights, minimum)
    assert len(shares) == len(weights)
    assert sum(shares) == total
    assert all(s >= minimum for s in shares)
    quotas = [total * w / sum(weights) for w in weights]
    if all(math.floor(q) >= minimum for q in quotas):  # no top-up: largest remainders, so within 1
        assert all(abs(s - q) < 1 for s, q in zip(shares, quotas, strict=True))


@pytest.mark.parametrize(("total", "count", "minimum"), [(2, 3, 1), (0, 1, 1), (5, 2, 3)])
def test_split_exact_refuses_impossible(total, count, minimum):
    with pytest.raises(ValueError, match=rf"cannot split {total} into {count} parts of at least {minimum}"):
        split_exact(total, [1] * count, minimum)


# ---- bank_split ---------------------------------------------------------------------------------
def _quotas(total: int, sizes: list[int], floor: float) -> list[float]:
    """The real-valued split bank_split rounds, by bisection on the proportional factor."""
    floors = [min(n, floor * total / len(sizes)) for n in sizes]
    lo, hi = 0.0, total / min(sizes)
    for _ in range(200):
        lam = (lo + hi) / 2
        lo, hi = (lam, hi) if sum(max(f, lam * n) for f, n in zip(floors, sizes, strict=True)) < total else (lo, lam)
    return [max(f, hi * n) for f, n in zip(floors, sizes, strict=True)]


def test_bank_split_documented_cases():
    assert bank_split(100, [900, 100]) == [75, 25]  # floor: half of an equal share (25)
    assert bank_split(100, [900, 100], floor=0.0) == split_exact(100, [900, 100]) == [90, 10]
    assert bank_split(100, [900, 100], floor=1.0) == [50, 50]
    assert bank_split(100, [900, 10]) == [90, 10]  # a small group's floor is its own size
    assert bank_split(1000, [900, 100]) == [900, 100]  # every layer once: the floor does not bind
    assert bank_split(3, [1000, 1, 1]) == [1, 1, 1]
    # the digits benchmark at 5 % (shape groups): the 10x32 head gets 50 values, not 12
    assert bank_split(598, [72, 1152, 1152, 4608, 8192, 320]) == [50, 50, 50, 143, 255, 50]
    assert split_exact(598, [72, 1152, 1152, 4608, 8192, 320])[-1] == 12


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=12),
    extra=st.integers(0, 60_000),
    more=st.integers(0, 5_000),
    floor=st.sampled_from([0.0, 0.25, BANK_FLOOR, 1.0]),
)
def test_bank_split_is_exact_floored_and_monotone(sizes, extra, more, floor):
    total = len(sizes) + extra
    shares = bank_split(total, sizes, floor)
    assert sum(shares) == total and all(s >= 1 for s in shares)
    quotas = _quotas(total, sizes, floor)
    if all(q >= 1 for q in quotas):  # no top-up to one value: largest remainders, so within 1
        assert all(abs(s - q) < 1 + 1e-6 for s, q in zip(shares, quotas, strict=True))
    for s, n in zip(shares, sizes, strict=True):  # the floor: own size, or a share of an equal split
        assert s >= min(n, math.floor(floor * total / len(sizes)))
    for a, b in zip(shares, sizes, strict=True):  # a larger group never gets (a rounding) less
        assert all(s >= a - 1 for s, n in zip(shares, sizes, strict=True) if n >= b)
    if total >= sum(sizes):  # every layer fits once: exactly SSN's proportional split
        assert all(abs(s - total * n / sum(sizes)) < 1 + 1e-6 for s, n in zip(shares, sizes, strict=True))
    grown = bank_split(total + more, sizes, floor)  # a larger budget takes nothing from any bank
    if all(q >= 1 for q in quotas):
        assert all(g >= s - 1 for g, s in zip(grown, shares, strict=True))
    assert all(gq >= q - 1e-6 for gq, q in zip(_quotas(total + more, sizes, floor), quotas, strict=True))


@pytest.mark.parametrize(("total", "sizes", "floor"), [(2, [1, 1, 1], 0.5), (10, [1, 1], 1.5), (10, [1, 1], -0.1)])
def test_bank_split_refuses_impossible(total, sizes, floor):
    with pytest.raises(ValueError, match="cannot split|`floor`"):
        bank_split(total, sizes, floor)


# ---- allocate -----------------------------------------------------------------------------------
configs = st.builds(
    GeneratorConfig,
    downsample=st.sampled_from(DOWNSAMPLERS),
    upsample=st.sampled_from(UPSAMPLERS),
    max_templates=st.integers(1, 8),
    embedding_dim=st.integers(1, 24),
)


@st.composite
def problems(draw: st.DrawFn) -> dict:
    """Layers (sizes, rows), a partition into groups, a kept count and a generator config."""
    count = draw(st.integers(1, 8))
    rows = draw(st.lists(st.integers(1, 40), min_size=count, max_size=count))
    cols = draw(st.lists(st.integers(1, 40), min_size=count, max_size=count))
    labels = draw(st.lists(st.integers(0, count - 1), min_size=count, max_size=count))
    groups = [[i for i in range(count) if labels[i] == g] for g in sorted(set(labels))]
    return {
        "sizes": [r * c for r, c in zip(rows, cols, strict=True)],
        "rows": rows,
        "groups": groups,
        "kept": draw(st.integers(0, 300)),
        "config": draw(configs),
        "force": draw(st.sampled_from([None, None, None, "hash"])),
    }


def _check_allocation(alloc: Allocation, p: dict, budget: int) -> None:
    sizes, config = p["sizes"], p["config"]
    assert alloc.total == budget
    assert alloc.kept == p["kept"]
    assert len(alloc.bank_sizes) == len(p["groups"]) and all(b >= 1 for b in alloc.bank_sizes)
    for g, members in enumerate(p["groups"]):
        widest = 0
        for i in members:
            k = alloc.templates[i]
            assert 0 <= k <= config.max_templates
            if k:  # the bank holds every template the layer mixes
                assert alloc.bank_sizes[g] >= k * sizes[i]
            if p["force"] == "hash":
                assert k == 0 and alloc.layer_overheads[i] == 0
                continue
            if k >= 2:
                widest = max(widest, k)
                assert alloc.layer_overheads[i] == (k if config.downsample == "wavg" else config.embedding_dim)
            elif k == 0 and config.upsample == "mask":
                assert alloc.layer_overheads[i] == p["rows"][i]  # one learned mask value per output row
            else:
                assert alloc.layer_overheads[i] == 0
        shared_map = widest * (config.embedding_dim + 1) if config.downsample == "emb" and p["force"] != "hash" else 0
        assert alloc.group_overheads[g] == shared_map


@settings(max_examples=150, deadline=None)
@given(p=problems(), scale=st.floats(0.0, 3.0))
def test_allocate_is_exact_and_banks_hold_their_templates(p, scale):
    minimum = minimum_budget(p["sizes"], p["rows"], p["groups"], p["kept"], p["config"], p["force"])
    budget = minimum + int(scale * (sum(p["sizes"]) + p["kept"]))
    alloc = allocate(p["sizes"], p["groups"], p["kept"], budget, p["config"], rows=p["rows"], force=p["force"])
    _check_allocation(alloc, p, budget)


@settings(max_examples=100, deadline=None)
@given(p=problems())
def test_minimum_budget_is_feasible_and_one_less_is_not(p):
    args = (p["sizes"], p["groups"], p["kept"])
    minimum = minimum_budget(p["sizes"], p["rows"], p["groups"], p["kept"], p["config"], p["force"])
    assert minimum >= p["kept"] + len(p["groups"])  # a bank needs at least one value
    alloc = allocate(*args, minimum, p["config"], rows=p["rows"], force=p["force"])
    _check_allocation(alloc, p, minimum)
    with pytest.raises(ValueError) as info:
        allocate(*args, minimum - 1, p["config"], rows=p["rows"], force=p["force"])
    message = str(info.value)
    assert f"budget {minimum - 1} is infeasible" in message
    assert re.search(rf"\bis {minimum}\b", message) and f"at least {minimum}" in message


@settings(max_examples=100, deadline=None)
@given(p=problems(), extra=st.integers(0, 500))
def test_a_budget_covering_every_weight_upsamples_nothing(p, extra):
    # With room for every weight once, each bank holds at least one template of each member.
    if p["force"] == "hash":
        p["force"] = None
    minimum = minimum_budget(p["sizes"], p["rows"], p["groups"], p["kept"], p["config"])
    assert minimum <= p["kept"] + sum(p["sizes"])  # every weight once is always feasible
    budget = p["kept"] + sum(p["sizes"]) + extra
    alloc = allocate(p["sizes"], p["groups"], p["kept"], budget, p["config"], rows=p["rows"])
    _check_allocation(alloc, p, budget)
    assert min(alloc.templates) >= 1


def test_one_value_weights_do_not_starve_the_others():
    # 1-value weights start at one template; raising them to two (two coefficients for one weight)
    # must not leave a larger layer upsampled when every weight fits once
    sizes, groups = [1, 1, 1, 2], [[0, 1, 2], [3]]
    alloc = allocate(sizes, groups, kept=0, budget=5, config=GeneratorConfig(upsample="repeat", max_templates=2))
    assert alloc.total == 5
    assert min(alloc.templates) >= 1  # the identity split (banks 3 and 2, slices) fits exactly


def test_mask_minimum_does_not_refuse_the_identity_budget():
    # a fan-in-1 layer (numel == rows) costs more masked (bank + a value per row) than as a slice
    config = GeneratorConfig(upsample="mask")
    alloc = allocate([8], [[0]], kept=0, budget=8, config=config, rows=[8])  # e.g. nn.Linear(1, 8) without bias
    assert alloc.templates == (1,) and alloc.total == 8
    assert minimum_budget([8], [8], [[0]], kept=0, config=config) <= 8


def test_identity_budget_gives_one_template_each():
    # singleton groups, budget = kept + weights: every layer is its own bank slice, no overhead
    sizes = [12, 30, 7]
    alloc = allocate(sizes, [[0], [1], [2]], kept=5, budget=5 + sum(sizes), config=GeneratorConfig())
    assert alloc.bank_sizes == tuple(sizes)
    assert alloc.templates == (1, 1, 1)
    assert alloc.layer_overheads == (0, 0, 0) and alloc.group_overheads == (0, 0, 0)


def test_allocate_documented_example_and_bank_proportions():
    a = allocate([12, 12], [[0, 1]], kept=5, budget=53, config=GeneratorConfig())
    assert (a.bank_sizes, a.templates, a.total) == ((42,), (3, 3), 53)
    # banks are proportional to their group's total layer size
    b = allocate([100, 300], [[0], [1]], kept=0, budget=200, config=GeneratorConfig())
    assert b.bank_sizes == (50, 150) and b.templates == (0, 0)


def test_max_templates_caps_mixing():
    alloc = allocate([10], [[0]], kept=0, budget=10_000, config=GeneratorConfig(max_templates=3))
    assert alloc.templates == (3,)
    assert alloc.bank_sizes == (10_000 - 3,)  # three coefficients; the rest is bank
    hard = allocate([10], [[0]], kept=0, budget=10_000, config=GeneratorConfig(max_templates=1))
    assert hard.templates == (1,) and hard.layer_overheads == (0,)


# ---- GeneratorConfig ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("downsample", "avg"),
        ("upsample", "nearest"),
        ("max_templates", 0),
        ("max_templates", True),
        ("max_templates", 2.0),
        ("embedding_dim", 0),
        ("embedding_dim", "24"),
    ],
)
def test_generator_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=rf"`{field}`.*{re.escape(repr(value))}"):
        GeneratorConfig(**{field: value})


def test_generator_config_round_trips_as_dict():
    config = GeneratorConfig(downsample="emb", upsample="mask", max_templates=4, embedding_dim=6)
    assert GeneratorConfig(**config.to_dict()) == config
