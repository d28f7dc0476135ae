"""Validation bits/byte against parameter budget for a byte-level transformer LM (real text, no download).

The harder companion of ``accuracy.py`` (digits saturates near 98 % at 10 % of the parameters): a
nanoGPT-style causal transformer over bytes (``benchmarks/lm.py``) trained from scratch on the
docstrings of the Python standard library, at budgets of 5 %, 10 %, 25 %, 100 % and 200 % of its
parameters with every registered strategy (``superweight`` with its default, one group per bin,
each layer its own coefficients), next to the dense original and the dense ByteLM narrowed or
widened (width, MLP width; depth kept) to the parameter count closest to the budget. Every
configuration runs with several seeds (model init, compile seed, batch order); the table gives
validation bits per byte (lower is better) as mean ± std, the plot the same against budget (log x).

Same protocol as ``accuracy.py`` (``benchmarks/sweep.py``): learned strategies search on training
batches for 15 % of the training steps, then the final model trains from scratch for the full run.

Run: ``python benchmarks/accuracy_lm.py`` (about 22 minutes on 2 quiet CPU cores: two worker
processes of one thread each; ``--quick`` for a smoke run). Writes ``docs/accuracy_lm.md`` (the
table, between its markers) and ``docs/accuracy_lm.png``; a filtered run (``--strategies``,
``--budgets``) only prints its rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.lm import (  # noqa: E402
    ByteLM,
    Corpus,
    add_lm_arguments,
    bits_per_byte,
    dense_count,
    lm_loss,
    load_corpus,
    narrow_shape,
    train,
)
from benchmarks.sweep import SEARCH_SHARE, build, mean_std, method_table, plot, search_notes, write_marked  # noqa: E402

BUDGETS = (0.05, 0.1, 0.25, 1.0, 2.0)
STRATEGIES = ("hash", "shape", "single", "random", "superweight", "ssn", "swn")
QUICK = dict(seeds=1, steps=20, dim=16, layers=1, heads=2, context=32, batch=8, val_windows=16, corpus_bytes=100_000)
ROOT = Path(__file__).resolve().parent.parent
_CORPUS: Corpus | None = None  # a worker's copy, set once by _start_worker


def run_one(corpus: Corpus, key: str, budget: float, seed: int, args: argparse.Namespace) -> dict:
    """Build, (search,) train and evaluate one (method, budget, seed) cell."""
    torch.manual_seed(seed)
    model = ByteLM(args.dim, args.layers, args.heads, args.context)
    start, cpu = time.perf_counter(), time.process_time()

    def narrowed(target: int) -> tuple[nn.Module, tuple[int, int, int, int]]:
        torch.manual_seed(seed)
        dim, layers, hidden, heads = shape = narrow_shape(target, args.dim, args.layers, args.heads, args.context)
        return ByteLM(dim, layers, heads, args.context, hidden), shape

    def learned() -> dict:
        search_steps = max(1, round(SEARCH_SHARE * args.steps))
        generator = torch.Generator().manual_seed(1000 + seed)
        data = [corpus.batch(args.batch, args.context, generator) for _ in range(search_steps)]
        return dict(data=data, loss_fn=lm_loss, search_steps=search_steps)

    net, run = build(key, budget, seed, model, narrowed, learned)
    train(net, corpus, args.steps, args.lr, args, seed=seed)
    return {
        **run,
        "bpb": bits_per_byte(net, corpus, args.context, args.val_windows),
        "total_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
    }


def _start_worker(corpus: Corpus, threads: int) -> None:
    global _CORPUS
    _CORPUS = corpus
    torch.set_num_threads(threads)


def _work(key: str, budget: float, seed: int, args: argparse.Namespace) -> dict:
    assert _CORPUS is not None
    return run_one(_CORPUS, key, budget, seed, args)


def sweep(corpus: Corpus, cells: list[tuple[str, float]], args: argparse.Namespace) -> dict:
    """``{(method, budget): [run per seed]}``; ``--jobs`` worker processes, the widest models first."""
    tasks = sorted(((k, b, s) for k, b in cells for s in range(args.seeds)), key=lambda t: -t[1])
    runs: dict = {}
    start = time.perf_counter()

    def report(task: tuple[str, float, int], run: dict) -> None:
        runs[task] = run
        key, budget, seed = task
        print(
            f"[{len(runs)}/{len(tasks)} {time.perf_counter() - start:6.0f}s] {key:<11} {budget:>5.0%} seed {seed}: "
            f"{run['bpb']:.3f} bits/byte ({run['total_s']:.0f}s, {run['cpu_s']:.0f}s CPU)",
            flush=True,
        )

    if args.jobs == 1:
        for task in tasks:
            report(task, run_one(corpus, *task, args))
    else:
        context = get_context("spawn")  # fork after torch has started threads is unsafe
        with ProcessPoolExecutor(args.jobs, context, _start_worker, (corpus, args.threads)) as pool:
            futures = {pool.submit(_work, *task, args): task for task in tasks}
            for future in as_completed(futures):
                report(futures[future], future.result())
    return {cell: [runs[(*cell, s)] for s in range(args.seeds)] for cell in cells}


def table(results: dict, budgets: tuple[float, ...], args: argparse.Namespace, seconds: float) -> str:
    original = dense_count(args.dim, args.layers, 4 * args.dim, args.context)
    strategies = [s for s in STRATEGIES if any((s, b) in results for b in budgets)]
    lines = [
        f"Validation bits per byte (lower is better) on stdlib docstrings, mean ± std over {args.seeds} seed(s); "
        f"ByteLM dim {args.dim}, {args.layers} layers, {args.heads} heads, context {args.context} "
        f"({original:,} parameters), {args.steps} steps of batch {args.batch} at lr {args.lr}. "
        "Budgets are fractions of its trainable parameters.",
        "",
        *method_table(results, budgets, strategies, lambda runs: mean_std([r["bpb"] for r in runs])),
    ]
    narrow = [(b, results[("narrow", b)][0]) for b in budgets if ("narrow", b) in results]
    if narrow:
        shapes = "; ".join(
            f"{b:.0%}: dim={r['shape'][0]}, layers={r['shape'][1]}, mlp={r['shape'][2]}, heads={r['shape'][3]}, "
            f"{r['params'] / original:.1%}"
            for b, r in narrow
        )
        lines += [
            "",
            f"Dense narrowed/widened (original dim={args.dim}, layers={args.layers}, mlp={4 * args.dim}, "
            f"heads={args.heads}) and its parameter count as a fraction of the original: {shapes} "
            "(npas_fx models hit the budget exactly).",
        ]
    lines += [
        *search_notes(results, budgets),
        f"Whole benchmark: {seconds / 60:.1f} min wall time, {args.jobs} worker process(es) of {args.threads} "
        f"thread(s), torch {torch.__version__}.",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps, 1 seed, 2 budgets")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=250, help="training steps of every model")
    add_lm_arguments(parser)
    parser.set_defaults(lr=6e-3)  # from scratch in 250 steps: 6e-3 beat 2e-3 (dense 3.77 vs 3.94 bits/byte at 300)
    parser.add_argument("--strategies", nargs="+", choices=("dense", "narrow", *STRATEGIES), help="only these rows")
    parser.add_argument("--budgets", nargs="+", type=float, help="only these budgets, e.g. 0.05 0.1")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (tiny models: one per core is fastest)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.quick:  # the quick sizes replace the defaults; flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    budgets = tuple(args.budgets) if args.budgets else (0.1, 1.0) if args.quick else BUDGETS
    corpus = load_corpus(args.corpus_bytes, args.corpus_file)
    print(f"corpus: {corpus.train.numel() + corpus.val.numel():,} bytes of stdlib docstrings", flush=True)
    cells = [("dense", 1.0)] + [(k, b) for b in budgets for k in ("narrow", *STRATEGIES)]
    if args.strategies:
        cells = [(k, b) for k, b in cells if k in args.strategies]
    results = sweep(corpus, cells, args)
    text = table(results, budgets, args, time.perf_counter() - start)
    print("\n" + text)
    if not (args.quick or args.no_write or args.strategies or args.budgets):
        write_marked(args.out / "accuracy_lm.md", text)
        labels = ("validation bits per byte (lower is better)", "byte LM: bits/byte vs budget (mean ± std over seeds)")
        plot(results, budgets, STRATEGIES, lambda r: r["bpb"], labels, args.out / "accuracy_lm.png")
        print(f"\nwrote {args.out / 'accuracy_lm.md'} and {args.out / 'accuracy_lm.png'}")
    return results


if __name__ == "__main__":
    main()
