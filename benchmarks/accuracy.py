"""Test accuracy against parameter budget on scikit-learn's digits (real data, no download).

A residual CNN (six 3x3 convolutions in two stages and a two-layer head, 8 generated weights) is
trained at budgets of 5 %, 10 %, 25 %, 100 %, 200 % and 400 % of its parameters with the
strategies ``hash``, ``shape``, ``single``, ``random``, ``ssn`` and ``swn``, next to two dense
baselines: the original model, and the same architecture narrowed (or widened) to the width whose
parameter count is closest to the budget. Every configuration runs with several seeds (model
init, compile seed, batch order); the table gives mean ± std test accuracy and the plot accuracy
against budget (log x).

The learned strategies search on the training batches for ``SEARCH_SHARE`` (15 %) of the training
steps (SSN's "10-15 % of a run"), then the final model is trained from scratch for the full run.
SWN's search time adds its refinement model (half as many steps).

Run: ``python benchmarks/accuracy.py`` (about 15 minutes on 2 CPU cores; ``--quick`` for a smoke
run). Writes the table into ``docs/accuracy.md`` (between its ``<!-- table -->`` markers, so the
study below it survives) and ``docs/accuracy.png`` (the plot). A filtered run
(``--strategies hash --budgets 0.05 0.1 --hash-chunk 1``) only prints its rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import npas_fx  # noqa: E402
from benchmarks.sweep import SEARCH_SHARE, build, mean_std, method_table, plot, search_notes, write_marked  # noqa: E402
from examples.digits import DigitsSplit, accuracy, load_digits_split, train  # noqa: E402

BUDGETS = (0.05, 0.1, 0.25, 1.0, 2.0, 4.0)
STRATEGIES = ("hash", "shape", "single", "random", "superweight", "ssn", "swn")
WIDTH = 8
BATCH = 64
ROOT = Path(__file__).resolve().parent.parent


class ResidualDigitsCNN(nn.Module):
    """stem -> 2 residual 3x3 convs (w) -> strided conv (2w) -> 2 residual 3x3 convs -> fc -> fc.

    Three conv shapes, two linear shapes: layers of different sizes in each bin, so where to share
    is a real choice. ``width`` scales the convolutions and ``hidden`` (default ``4 * width``) the
    head: the dense narrow/wide baseline picks both to match a parameter count.
    """

    def __init__(self, width: int = WIDTH, hidden: int | None = None) -> None:
        super().__init__()
        w = width
        hidden = 4 * w if hidden is None else hidden

        def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))

        self.stem = conv(1, w)
        self.stage1 = nn.ModuleList([conv(w, w), conv(w, w)])
        self.down = conv(w, 2 * w, stride=2)
        self.stage2 = nn.ModuleList([conv(2 * w, 2 * w), conv(2 * w, 2 * w)])
        self.fc1 = nn.Linear(2 * w * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))  # (B, w, 8, 8)
        for block in self.stage1:
            h = h + F.relu(block(h))
        h = F.relu(self.down(h))  # (B, 2w, 4, 4)
        for block in self.stage2:
            h = h + F.relu(block(h))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def dense_count(width: int, hidden: int) -> int:
    """Trainable parameters of ``ResidualDigitsCNN(width, hidden)`` (convs, BatchNorm affines, head).

    Example:
        >>> dense_count(8, 32) == npas_fx.count_parameters(ResidualDigitsCNN(8, 32))
        True
    """
    return 108 * width * width + 27 * width + 32 * width * hidden + 11 * hidden + 10


def narrow_shape(target: int) -> tuple[int, int]:
    """``(width, hidden)`` of the dense model with (within 2 %) ``target`` parameters.

    Among the shapes that close, the one nearest the original proportions (``hidden = 4 width``).
    """
    shapes = [(w, h) for w in range(1, 4 * WIDTH + 1) for h in range(1, 16 * WIDTH + 1)]
    close = [s for s in shapes if abs(dense_count(*s) - target) <= 0.02 * target]
    if not close:
        return min(shapes, key=lambda s: (abs(dense_count(*s) - target), s))
    return min(close, key=lambda s: (abs(s[1] - 4 * s[0]), abs(dense_count(*s) - target), s))


def batches_for(data: DigitsSplit, seed: int) -> list[tuple[Tensor, Tensor]]:
    """One shuffled epoch of training batches: the learned strategies' search data."""
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1000 + seed))
    return [(data.train_x[i], data.train_y[i]) for i in order.split(BATCH)]


def run_one(
    data: DigitsSplit,
    strategy: str,
    budget: float,
    seed: int,
    epochs: int,
    config: npas_fx.GeneratorConfig | None = None,
) -> dict:
    torch.manual_seed(seed)
    model = ResidualDigitsCNN()
    start = time.perf_counter()

    def narrowed(target: int) -> tuple[nn.Module, tuple[int, int]]:
        torch.manual_seed(seed)
        shape = narrow_shape(target)
        return ResidualDigitsCNN(*shape), shape

    def learned() -> dict:
        steps = epochs * -(-len(data.train_y) // BATCH)
        search_steps = max(1, round(SEARCH_SHARE * steps))
        return dict(data=batches_for(data, seed), loss_fn=F.cross_entropy, search_steps=search_steps)

    net, run = build(strategy, budget, seed, model, narrowed, learned, generators=config)
    train(net, data, epochs=epochs, seed=seed)
    return {**run, "acc": accuracy(net, data), "total_s": time.perf_counter() - start}


def table(results: dict, budgets: tuple[float, ...], original: int, seeds: int, epochs: int, seconds: float) -> str:
    lines = [
        f"Test accuracy (%) on digits, mean ± std over {seeds} seeds, {epochs} epochs; ResidualDigitsCNN "
        f"(width {WIDTH}, {original:,} parameters). Budgets are fractions of its trainable parameters.",
        "",
        *method_table(results, budgets, STRATEGIES, lambda runs: mean_std([r["acc"] for r in runs], 1, 100)),
    ]
    narrow = [(b, results[("narrow", b)][0]) for b in budgets if ("narrow", b) in results]
    lines += [
        "",
        "Dense narrowed/widened (conv width w, hidden h; original w=8, h=32) and its parameter count as a "
        "fraction of the original: "
        + "; ".join(f"{b:.0%}: w={r['shape'][0]}, h={r['shape'][1]}, {r['params'] / original:.1%}" for b, r in narrow)
        + " (npas_fx models hit the budget exactly).",
        *search_notes(results, budgets),
        f"Whole benchmark: {seconds / 60:.1f} min on this machine.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 3 budgets (smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--strategies", nargs="+", choices=("dense", "narrow", *STRATEGIES), help="only these rows")
    parser.add_argument("--budgets", nargs="+", type=float, help="only these budgets, e.g. 0.05 0.1 0.25")
    parser.add_argument("--hash-chunk", type=int, help="GeneratorConfig.hash_chunk (1: per-element hashing)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest and repeatable
    budgets = tuple(args.budgets) if args.budgets else (0.05, 1.0, 4.0) if args.quick else BUDGETS
    seeds, epochs = (1, 2) if args.quick else (args.seeds, args.epochs)
    config = (
        npas_fx.GeneratorConfig() if args.hash_chunk is None else npas_fx.GeneratorConfig(hash_chunk=args.hash_chunk)
    )
    data = load_digits_split(seed=0)
    original = npas_fx.count_parameters(ResidualDigitsCNN())
    configs = [("dense", 1.0)] + [(k, b) for b in budgets for k in ("narrow", *STRATEGIES)]
    if args.strategies:  # a filtered run prints its rows and writes nothing
        configs = [(k, b) for k, b in configs if k in args.strategies]
    results: dict = {}
    start = time.perf_counter()
    for n, (key, budget) in enumerate(configs, 1):
        runs = [run_one(data, key, budget, seed, epochs, config) for seed in range(seeds)]
        results[(key, budget)] = runs
        accs = ", ".join(f"{r['acc']:.3f}" for r in runs)
        print(f"[{n}/{len(configs)} {time.perf_counter() - start:6.0f}s] {key:<7} {budget:>5.0%}: {accs}", flush=True)
    seconds = time.perf_counter() - start
    text = table(results, budgets, original, seeds, epochs, seconds)
    print("\n" + text)
    if not args.quick and not args.strategies and not args.budgets and args.hash_chunk is None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_marked(args.out / "accuracy.md", text)
        labels = ("test accuracy (%)", "digits: accuracy vs budget (mean ± std over seeds)")
        plot(results, budgets, STRATEGIES, lambda r: r["acc"] * 100, labels, args.out / "accuracy.png")
        print(f"\nwrote {args.out / 'accuracy.md'} and {args.out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
