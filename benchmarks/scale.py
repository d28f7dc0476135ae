"""Compile time and peak memory of ``npas_fx.compile`` against model size (BERT-shaped models).

Each case runs in a fresh subprocess: compile a very small BERT once (a warm-up: the first compile
loads code lazily), build a ``BertForMaskedLM`` from a random config (no download), read the
resident set size, reset the peak, compile at budget 0.1 with ``example_inputs``, and report the
wall time, the process's CPU time (one thread: the wall time less waits for a busy machine's
cores) and the peak resident set size above the built model, also as a multiple of the model's
own parameter bytes. Cases run one at a time (the machine is shared); the table is printed and
``docs/scale.png`` plots time and memory against parameters.

Strategies: ``shape``, ``single`` (what ``strategy="auto"``, the default, picks below the model's
size) and ``hash``. The parent prints the load average: times depend on what else runs.

Run: ``python benchmarks/scale.py`` (``--quick`` for the two smallest sizes; ``--sizes large``
for one size alone; ``--strategies hash`` for one strategy; ``--no-plot`` to leave the picture
as it is).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.rss import peak_rss_mib, reset_peak, rss_mib  # noqa: E402

# name: (hidden, layers, heads); vocab 30522 and intermediate 4 x hidden throughout, like BERT.
SIZES = {
    "tiny": (128, 4, 2),
    "small": (256, 8, 4),
    "medium": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
STRATEGIES = ("shape", "single", "hash")
BUDGET = 0.1


def build(size: str, vocab: int = 30522) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    hidden, layers, heads = SIZES[size]
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
    )
    torch.manual_seed(0)
    return BertForMaskedLM(config)


def measure(size: str, strategy: str) -> dict:
    """In this (fresh) process: build, reset the peak, compile; seconds and MiB above the built model."""
    import npas_fx

    torch.set_num_threads(1)
    # Warm-up: a first compile imports and initialises lazily loaded code (100+ MiB); not the model's cost.
    warm = build("tiny", vocab=100)
    npas_fx.compile(warm, BUDGET, strategy=strategy, example_inputs={"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    del warm
    gc.collect()
    model = build(size)
    tokens = torch.randint(0, 30522, (1, 16), generator=torch.Generator().manual_seed(0))
    params = npas_fx.count_parameters(model)
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    base = rss_mib()
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    gm = npas_fx.compile(model, BUDGET, strategy=strategy, example_inputs={"input_ids": tokens})
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = peak_rss_mib() - base
    assert npas_fx.count_parameters(gm) == round(BUDGET * params)
    return {
        "size": size,
        "strategy": strategy,
        "params": params,
        "model_mib": model_mib,
        "s": seconds,
        "cpu": cpu,
        "peak": peak,
    }


def run_case(size: str, strategy: str) -> dict:
    command = [sys.executable, __file__, "--child", size, strategy]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{size}/{strategy} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy in sorted({r["strategy"] for r in results}, key=STRATEGIES.index):
        rows = sorted((r for r in results if r["strategy"] == strategy), key=lambda r: r["params"])
        millions = [r["params"] / 1e6 for r in rows]
        left.plot(millions, [r["s"] for r in rows], "o-", label=strategy)
        right.plot(millions, [r["peak"] / r["model_mib"] for r in rows], "o-", label=strategy)
    left.set(xlabel="parameters (millions)", ylabel="compile time (s)", title=f"compile at budget {BUDGET}")
    right.set(xlabel="parameters (millions)", ylabel="peak RSS above the model / model size", title="peak memory")
    for axis in (left, right):
        axis.set_xscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend()
    left.set_yscale("log")
    fig.suptitle("npas_fx.compile on BertForMaskedLM (random configs, 1 CPU thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--quick", action="store_true", help="the two smallest sizes only")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    sizes = list(SIZES)[:2] if args.quick else args.sizes
    print(f"torch {torch.__version__}; BertForMaskedLM, random config; budget {BUDGET}; one process per case")
    # Times depend on what else runs (memory does not): say how busy the machine was.
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    header = f"{'size':<7} {'hidden':>6} {'layers':>6} {'params':>12} {'strategy':<8} {'compile s':>9} {'cpu s':>6} "
    print(header + f"{'peak MiB':>9} {'x model':>7}")
    results = []
    for size in sizes:
        for strategy in args.strategies:
            r = run_case(size, strategy)
            results.append(r)
            hidden, layers, _ = SIZES[size]
            print(
                f"{size:<7} {hidden:>6} {layers:>6} {r['params']:>12,} {strategy:<8} {r['s']:>9.2f} {r['cpu']:>6.2f} "
                f"{r['peak']:>9.0f} {r['peak'] / r['model_mib']:>7.2f}",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    if not args.no_plot:
        plot(results, ROOT / "docs" / "scale.png")
        print("\nwrote docs/scale.png")


if __name__ == "__main__":
    main()
