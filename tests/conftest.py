"""Shared fixtures of the npas_fx test suite: seeding and a cache of compiled table models.

Compiling is cheap (milliseconds) but the table sweep asks for the same (model, strategy, budget)
triple in several tests, so :func:`compiled` builds each triple once per session and hands out
deep copies; tests may train, move or mutate what they get.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from models import CASES, Case, snapshot
from torch import fx, nn

import npas_fx

torch.set_num_threads(1)  # 2-core machine: one intra-op thread is faster for tiny models

BUDGETS: tuple[float | str, ...] = (0.1, 1.0, 4.0, "int")
STRATEGY_NAMES: tuple[str, ...] = ("shape", "single", "random", "hash")
# Learned strategies (and SuperWeights without search) swept on the same model families.
LEARNED_NAMES: tuple[str, ...] = ("superweight", "ssn", "swn")


def budget_value(budget: float | str, model: nn.Module) -> int | float:
    """The budget handed to ``compile``: ``"int"`` stands for an exact count (a third, plus one)."""
    return npas_fx.count_parameters(model) // 3 + 1 if budget == "int" else budget


def expected_count(budget: float | str, model: nn.Module) -> int:
    """The exact trainable count ``compile`` must reach for ``budget``."""
    value = budget_value(budget, model)
    return value if isinstance(value, int) else round(value * npas_fx.count_parameters(model))


@dataclass
class Compiled:
    """One compiled table model: the untouched input, its snapshot from before compile, the result."""

    case: Case
    model: nn.Module
    before: dict
    gm: fx.GraphModule
    target: int
    strategy: str


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _compiled_cache() -> dict:
    return {}


@pytest.fixture
def compiled(_compiled_cache: dict) -> Callable[[str, str, float | str], Compiled]:
    """``compiled(case_name, strategy, budget)`` -> a fresh :class:`Compiled` (deep-copied gm)."""

    def get(name: str, strategy: str, budget: float | str) -> Compiled:
        key = (name, strategy, budget)
        if key not in _compiled_cache:
            case = CASES[name]
            model = case.build()
            before = snapshot(model)
            gm = npas_fx.compile(model, budget_value(budget, model), strategy=strategy, seed=3)
            _compiled_cache[key] = Compiled(case, model, before, gm, expected_count(budget, model), strategy)
        entry = _compiled_cache[key]
        return Compiled(entry.case, entry.model, entry.before, copy.deepcopy(entry.gm), entry.target, strategy)

    return get
