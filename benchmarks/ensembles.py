"""Shared ensembles against dense ones on scikit-learn's digits (real data, no download).

Four CNNs of different width and depth (3-5 convolutions, 4-16 channels, heads of 32-64 units) are
trained as one ensemble (the sum of the members' cross-entropies) in three ways:

* **shared**: ``npas_fx.compile_ensemble`` at the parameter count of the largest member (1x) and
  at twice it (2x), for four strategies; every member's weights come from shared banks;
* **dense ensemble**: the same members with their own full weights (a fully parameterised ensemble,
  whose members are independent: the summed loss gives each member its own gradient);
* **members alone**: each dense member's own accuracy (the largest one is the single-model baseline).

Prediction averages the members' softmaxes; the anytime curve adds members cheapest first (FLOPs
measured with ``torch.utils.flop_counter.FlopCounterMode`` on one test batch) and reports the
accuracy after 1, 2, ..., 4 members against the cumulative FLOPs per image.

Run: ``python benchmarks/ensembles.py`` (about 7 minutes on 2 CPU cores; ``--quick`` is a smoke
run). Writes ``docs/ensembles.md`` (tables) and ``docs/ensembles.png`` (the anytime curves).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import npas_fx  # noqa: E402
from examples.digits import DigitsSplit, load_digits_split  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64
#: (width, convolutions, hidden units) of each member; the last is the largest.
MEMBERS = ((2, 3, 16), (4, 3, 24), (4, 5, 32), (8, 4, 32))
STRATEGIES = ("single", "superweight", "shape", "hash")  # the first is compile_ensemble's default
MULTIPLES = (1.0, 2.0)  # budgets as multiples of the largest member's parameters


class DigitsNet(nn.Module):
    """``convs`` 3x3 convolutions (BatchNorm, ReLU; the last one strided to 4x4), then a 2-layer head.

    Example:
        >>> tuple(DigitsNet(4, 3, 32)(torch.zeros(2, 1, 8, 8)).shape)
        (2, 10)
    """

    def __init__(self, width: int, convs: int, hidden: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        chain = [block(1, width)] + [block(width, width) for _ in range(convs - 2)] + [block(width, 2 * width, 2)]
        self.features = nn.Sequential(*chain)  # (B, 2w, 4, 4)
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(self.features(x).flatten(1))))


class DenseEnsemble(nn.Module):
    """The members with their own weights; forward returns every member's logits."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(m(x) for m in self.members)


def members(seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [DigitsNet(*shape) for shape in MEMBERS]


def train(ensemble: nn.Module, data: DigitsSplit, epochs: int, seed: int, lr: float = 3e-3) -> None:
    """Adam, batches of 64, cosine schedule; the loss is the sum of the members' cross-entropies."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(data.train_y) // BATCH))
    ensemble.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(data.train_y), generator=generator).split(BATCH):
            loss = sum(F.cross_entropy(out, data.train_y[batch]) for out in ensemble(data.train_x[batch]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    ensemble.eval()


def accuracy(probabilities: Tensor, target: Tensor) -> float:
    return float((probabilities.argmax(-1) == target).float().mean())


@torch.no_grad()
def evaluate(ensemble: nn.Module, data: DigitsSplit, order: list[int]) -> dict:
    """Each member's accuracy and the anytime accuracy after 1..k members in ``order``."""
    ensemble.eval()
    outputs = ensemble(data.test_x)
    alone = [accuracy(o, data.test_y) for o in outputs]
    running = torch.zeros_like(outputs[0])
    anytime = []
    for count, i in enumerate(order, 1):
        running += outputs[i].softmax(-1)
        anytime.append(accuracy(running / count, data.test_y))
    return {"alone": alone, "anytime": anytime}


def run(build: Callable[[], nn.Module], data: DigitsSplit, epochs: int, seed: int, order: list[int]) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    ensemble = build()
    params = npas_fx.count_parameters(ensemble)
    train(ensemble, data, epochs, seed)
    return {**evaluate(ensemble, data, order), "params": params, "seconds": time.perf_counter() - start}


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values) * 100
    return f"{mean:.1f} ± {statistics.stdev(values) * 100 if len(values) > 1 else 0.0:.1f}"


def tables(results: dict, order: list[int], flops: list[int], counts: list[int], seeds: int, epochs: int) -> str:
    largest = counts[-1]
    k = len(order)
    lines = [
        f"Test accuracy (%) on digits, mean ± std over {seeds} seeds, {epochs} epochs. Members (width, convs, "
        "hidden; trainable params; FLOPs per image): "
        + "; ".join(f"{i}: {MEMBERS[i]}, {counts[i]:,}, {flops[i]:,}" for i in range(k))
        + f". The largest member has {largest:,} parameters; the dense ensemble {sum(counts):,}.",
        "",
        "| model | trainable params | ensemble (all members) | " + " | ".join(f"member {i}" for i in range(k)) + " |",
        "|---|---|---|" + "---|" * k,
    ]
    dense = results["dense"]
    lines.append(
        f"| dense ensemble | {sum(counts):,} | {_cell([r['anytime'][-1] for r in dense])} | "
        + " | ".join(_cell([r["alone"][i] for r in dense]) for i in range(k))
        + " |"
    )
    for key, runs in results.items():
        if key == "dense":
            continue
        strategy, multiple = key
        lines.append(
            f"| shared `{strategy}` {multiple:g}x largest | {runs[0]['params']:,} | "
            f"{_cell([r['anytime'][-1] for r in runs])} | "
            + " | ".join(_cell([r["alone"][i] for r in runs]) for i in range(k))
            + " |"
        )
    lines.append(
        f"| largest member alone (dense) | {largest:,} | | " + " | ".join([""] * (k - 1)) + " | "
        f"{_cell([r['alone'][-1] for r in dense])} |"
    )
    cumulative = [sum(flops[i] for i in order[: n + 1]) for n in range(k)]
    lines += [
        "",
        "Anytime prediction: accuracy (%) after the first n members, cheapest first (order "
        + " -> ".join(map(str, order))
        + "), against cumulative FLOPs per image.",
        "",
        "| ensemble | " + " | ".join(f"n={n + 1} ({cumulative[n]:,} FLOPs)" for n in range(k)) + " |",
        "|---|" + "---|" * k,
    ]
    for key, runs in results.items():
        label = "dense ensemble" if key == "dense" else f"shared `{key[0]}` {key[1]:g}x largest"
        lines.append(f"| {label} | " + " | ".join(_cell([r["anytime"][n] for r in runs]) for n in range(k)) + " |")
    return "\n".join(lines)


def plot(results: dict, order: list[int], flops: list[int], keys: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cumulative = [sum(flops[i] for i in order[: n + 1]) / 1e3 for n in range(len(order))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in keys:
        runs = results[key]
        accs = [[r["anytime"][n] * 100 for r in runs] for n in range(len(order))]
        means = [statistics.fmean(a) for a in accs]
        stds = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
        params = runs[0]["params"]
        label = f"dense ensemble ({params:,} params)" if key == "dense" else f"shared {key[0]} {key[1]:g}x ({params:,})"
        if key == "dense":
            style = {"linestyle": "--", "color": "black"}
        else:  # a colour per strategy, solid at 1x and dotted at larger budgets
            strategies = list(dict.fromkeys(k[0] for k in keys if k != "dense"))
            style = {"color": f"C{strategies.index(key[0])}", "linestyle": "-" if key[1] == MULTIPLES[0] else ":"}
        ax.errorbar(cumulative, means, yerr=stds, marker="o", capsize=3, label=label, **style)
    dense = results["dense"]
    alone = [statistics.fmean(r["alone"][i] * 100 for r in dense) for i in order]
    ax.scatter([flops[i] / 1e3 for i in order], alone, marker="x", color="gray", zorder=3, label="dense member alone")
    for n, x in enumerate(cumulative):
        ax.annotate(f"{n + 1}", (x, 0), textcoords="offset points", xytext=(0, 4), xycoords=("data", "axes fraction"))
    ax.set_xscale("log")
    ax.set_xlabel("cumulative kFLOPs per image (members added cheapest first; numbers: members used)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits: anytime prediction of shared and dense ensembles (mean ± std)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, one strategy (smoke run)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), help="the first (the default) is plotted")
    parser.add_argument("--multiples", nargs="+", type=float, default=list(MULTIPLES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest and repeatable
    seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)
    strategies = args.strategies[:1] if args.quick else args.strategies
    multiples = args.multiples
    data = load_digits_split(seed=0)
    example = (data.test_x[:1],)
    probe = npas_fx.compile_ensemble(members(0), 1.0, strategy="single", example_inputs=example)
    order, flops = list(probe.order), list(probe.flops)
    counts = [npas_fx.count_parameters(m) for m in members(0)]
    results: dict = {}
    start = time.perf_counter()
    configs: list = ["dense"] + [(s, m) for s in strategies for m in multiples]
    for n, key in enumerate(configs, 1):
        runs = []
        for seed in range(seeds):
            if key == "dense":
                build = lambda seed=seed: DenseEnsemble(members(seed))  # noqa: E731
            else:
                budget = round(key[1] * counts[-1])
                build = lambda seed=seed, key=key, budget=budget: npas_fx.compile_ensemble(  # noqa: E731
                    members(seed), budget, strategy=key[0], seed=seed, example_inputs=example
                )
            runs.append(run(build, data, epochs, seed, order))
        results[key] = runs
        accs = ", ".join(f"{r['anytime'][-1]:.3f}" for r in runs)
        print(f"[{n}/{len(configs)} {time.perf_counter() - start:5.0f}s] {key}: ensemble {accs}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    text = tables(results, order, flops, counts, seeds, epochs) + f"\n\nWhole benchmark: {minutes:.1f} min."
    print("\n" + text)
    if not args.quick and args.strategies == list(STRATEGIES) and args.multiples == list(MULTIPLES):
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ensembles.md").write_text(text + "\n", encoding="utf-8")
        plot(
            results,
            order,
            flops,
            [k for k in results if k == "dense" or k[0] == strategies[0]],
            args.out / "ensembles.png",
        )
        print(f"\nwrote {args.out / 'ensembles.md'} and {args.out / 'ensembles.png'}")


if __name__ == "__main__":
    main()
