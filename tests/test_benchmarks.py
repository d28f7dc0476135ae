"""Smoke tests of the accuracy-against-budget benchmarks: the byte LM's parameter arithmetic, the
narrowed baseline, the table writer and a tiny end-to-end ``accuracy_lm`` run (seconds)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import npas_fx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
try:
    from benchmarks import accuracy_lm
    from benchmarks.lm import ByteLM, dense_count, narrow_shape
    from benchmarks.sweep import write_marked
finally:
    sys.path.remove(str(REPO))


@pytest.mark.parametrize(
    "dim, layers, heads, context, hidden",
    [(16, 1, 2, 8, 64), (64, 4, 4, 64, 256), (10, 4, 1, 64, 49), (92, 3, 4, 32, 381), (6, 2, 3, 16, 1)],
)
def test_dense_count_is_the_byte_lm_parameter_count(dim, layers, heads, context, hidden):
    model = ByteLM(dim, layers, heads, context, hidden)
    assert dense_count(dim, layers, hidden, context) == npas_fx.count_parameters(model)


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25, 1.0, 2.0])
def test_narrowed_model_is_within_two_percent_and_keeps_the_depth(budget):
    original = dense_count(64, 4, 256, 64)
    dim, layers, hidden, heads = narrow_shape(round(budget * original), 64, 4, 4, 64)
    assert abs(dense_count(dim, layers, hidden, 64) / original - budget) <= 0.02 * budget
    assert layers == 4 and dim % heads == 0
    ByteLM(dim, layers, heads, 64, hidden)(torch.zeros(1, 4, dtype=torch.long))  # a valid model


def test_write_marked_replaces_only_the_table(tmp_path):
    path = tmp_path / "doc.md"
    write_marked(path, "first")
    path.write_text("intro\n" + path.read_text() + "outro\n")
    write_marked(path, "second")
    assert path.read_text() == "intro\n<!-- table -->\nsecond\n<!-- /table -->\noutro\n"


def test_accuracy_lm_quick_run_gives_every_cell_at_its_exact_budget(capsys):
    methods = ["dense", "narrow", "hash", "ssn"]
    argv = ["--quick", "--no-write", "--jobs", "1", "--steps", "5", "--corpus-bytes", "20000", "--val-windows", "4"]
    argv += ["--budgets", "0.25", "--strategies", *methods]
    results = accuracy_lm.main(argv)
    assert set(results) == {("dense", 1.0), ("narrow", 0.25), ("hash", 0.25), ("ssn", 0.25)}
    original = dense_count(16, 1, 64, 32)  # the --quick model
    for (method, budget), runs in results.items():
        assert len(runs) == 1 and all(math.isfinite(r["bpb"]) and r["bpb"] > 0 for r in runs)
        if method in ("hash", "ssn"):
            assert runs[0]["params"] == round(budget * original)
    out = capsys.readouterr().out
    assert "| npas_fx `ssn` |" in out and "Whole benchmark:" in out
