"""Compress a trained language model: ``init="fit"`` against random banks, before and after fine-tuning.

A small causal transformer (byte-level, vocabulary 256) is trained densely on real English text
that ships with Python: the docstrings of the standard library (parsed with ``ast``, nothing
imported or downloaded; about 1.2 MB). It is then compiled to 50 %, 25 % and 10 % of its
parameters with strategies ``shape`` and ``hash``, once with ``init="fit"`` (banks start as the
least-squares fit of the trained weights) and once with ``init="random"`` (the default: banks
random at the trained weights' scale; biases and norms keep their trained values either way), and
each compiled model is fine-tuned for the same number of steps. The table gives validation loss in
bits per byte right after compile and after fine-tuning (mean ± std over seeds: compile seed and
batch order), next to the dense model, and the relative Frobenius error of the generated weights.

Run: ``python benchmarks/compress.py`` (about 10 minutes on 2 CPU cores; ``--quick`` for a smoke
run). Writes ``docs/compress.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import npas_fx  # noqa: E402
from benchmarks.lm import ByteLM, Corpus, add_lm_arguments, bits_per_byte, load_corpus, train  # noqa: E402
from benchmarks.sweep import mean_std, write_marked  # noqa: E402
from npas_fx.fit import weight_errors  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (0.5, 0.25, 0.1)
STRATEGIES = ("shape", "hash")
INITS = ("fit", "random")


# ---- the trained dense model ------------------------------------------------------------------
def dense_model(corpus: Corpus, args: argparse.Namespace) -> nn.Module:
    """The trained dense model (loaded from ``--dense`` when that file exists, else trained and saved there)."""
    torch.manual_seed(0)
    dense = ByteLM(args.dim, args.layers, args.heads, args.context)
    path = Path(args.dense) if args.dense else None
    if path is not None and path.exists():
        dense.load_state_dict(torch.load(path))
        return dense
    train(dense, corpus, args.dense_steps, args.lr, args, seed=0)
    if path is not None:
        torch.save(dense.state_dict(), path)
    return dense


# ---- the table ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    started = time.time()
    corpus = load_corpus(args.corpus_bytes, args.corpus_file)
    print(
        f"corpus: {corpus.train.numel() + corpus.val.numel():,} bytes of stdlib docstrings ({time.time() - started:.0f}s)"
    )
    dense = dense_model(corpus, args).eval()
    dense_bpb = bits_per_byte(dense, corpus, args.context, args.val_windows)
    original = npas_fx.count_parameters(dense)
    print(
        f"dense: {original:,} params, {dense_bpb:.3f} bits/byte after {args.dense_steps} steps ({time.time() - started:.0f}s)"
    )
    rows = [("dense", "-", "-", f"{original:,}", "0", f"{dense_bpb:.3f}", f"{dense_bpb:.3f}")]
    inits = INITS + (("fit+KD",) if args.distill else ())
    for budget in args.budgets:
        for strategy in args.strategies:
            for init in inits:
                errors, before, after = [], [], []
                for seed in range(args.seeds):
                    gm = npas_fx.compile(dense, budget, strategy=strategy, seed=seed, init=init.split("+")[0])
                    errors.append(weight_errors(gm, dense)["total"])
                    before.append(bits_per_byte(gm, corpus, args.context, args.val_windows))
                    teacher = dense if init.endswith("+KD") else None
                    train(gm, corpus, args.steps, args.finetune_lr, args, seed=100 + seed, teacher=teacher)
                    after.append(bits_per_byte(gm, corpus, args.context, args.val_windows))
                count = f"{npas_fx.count_parameters(gm):,}"
                row = (f"{budget:.0%}", strategy, init, count, f"{statistics.mean(errors):.3f}")
                rows.append((*row, mean_std(before), mean_std(after)))
                print("  ".join(rows[-1]), f"({time.time() - started:.0f}s)", flush=True)
    header = ("budget", "strategy", "init", "params", "weight error", "bits/byte after compile", "after fine-tune")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    setup = (
        f"ByteLM dim={args.dim} layers={args.layers} heads={args.heads} context={args.context}; dense {args.dense_steps} "
        f"steps at lr {args.lr}; fine-tune {args.steps} steps at lr {args.finetune_lr}, batch {args.batch}; "
        f"{args.seeds} seed(s); validation {args.val_windows} windows; {time.time() - started:.0f}s on "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    return "\n".join(lines) + "\n\n" + setup


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps, one seed")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="fine-tuning steps of each compiled model")
    parser.add_argument("--dense-steps", type=int, default=800)
    add_lm_arguments(parser)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--distill", action="store_true", help="add fit+KD rows: fine-tune half on the dense model's KL"
    )
    parser.add_argument("--dense", default="", help="file to load the trained dense model from (or save it to)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.dense_steps, args.dim, args.layers = 1, 10, 60, 32, 2
        args.val_windows, args.corpus_bytes, args.budgets = 32, 200_000, [0.25]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    table = run(args)
    print()
    print(table)
    filtered = args.budgets != list(BUDGETS) or args.strategies != list(STRATEGIES) or args.distill
    if not args.quick and not args.no_write and not filtered:
        target = ROOT / "docs" / "compress.md"
        write_marked(target, table)
        print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
