"""Demo: a CNN on scikit-learn's digits, compiled to 10 % of its parameters with three strategies.

Run: ``python examples/digits_cnn.py`` (about a minute on 2 CPU cores). Prints the original and
compiled parameter counts, the test accuracy of each, and the plan summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import npas_fx  # noqa: E402
from examples.digits import DigitsCNN, accuracy, load_digits_split, train  # noqa: E402

BUDGET = 0.1
EPOCHS = 15


def fresh_model() -> DigitsCNN:
    """The same untrained CNN every call: each row starts from the same init, none from a trained one."""
    torch.manual_seed(0)
    return DigitsCNN(width=32)


def main() -> None:
    data = load_digits_split(seed=0)
    original = npas_fx.count_parameters(fresh_model())
    rows = []
    strategies = [
        ("original (dense)", None),
        ("npas_fx default", "auto"),
        ("npas_fx shape", "shape"),
        ("npas_fx hash", "hash"),
    ]
    for name, strategy in strategies:
        # Compile an untrained model: compiling the trained dense one would hand the compiled rows its
        # trained biases and BatchNorm statistics (as benchmarks/accuracy.py, every row starts fresh).
        model = fresh_model()
        net = model if strategy is None else npas_fx.compile(model, BUDGET, strategy=strategy, seed=0)
        train(net, data, epochs=EPOCHS, seed=0)
        rows.append((name, npas_fx.count_parameters(net), accuracy(net, data)))
        if strategy == "auto":
            default_plan = npas_fx.plan_of(net)
    print(f"digits CNN: {original:,} trainable parameters; budget {BUDGET:.0%} = {round(BUDGET * original):,}\n")
    print(f"{'model':<18} {'params':>9} {'of original':>12} {'test acc':>9}")
    for name, count, acc in rows:
        print(f"{name:<18} {count:>9,} {count / original:>11.1%} {acc:>9.3f}")
    print(f"\nplan of the default model ('auto' chose {default_plan.strategy!r} below the model's size):\n")
    print(default_plan.summary())


if __name__ == "__main__":
    main()
