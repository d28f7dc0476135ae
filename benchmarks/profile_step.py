"""Where a compiled model's training step spends its time: ``torch.profiler`` on the overhead models.

Profiles ``--steps`` training steps (forward, backward, Adam) of the original and of the compiled
model from ``benchmarks/overhead.py`` (``cnn`` or ``transformer``) at one budget, and prints the
plan and each one's operator table, sorted by self CPU time and grouped by input shape, so the
generators' kernels (``_MaskedTile``, ``_TemplateMix``, their backwards, the copies they make) can
be read next to the layers' own work. Before each table it prints the step's process CPU time
(mean of ``--steps`` steps after 3 warm-up steps, the two models one after the other), and the
ratio compiled / original. Used for the overhead analysis in the README.

Run: ``python benchmarks/profile_step.py cnn 0.1`` (``--compile`` wraps both in ``torch.compile``;
``--strategy shape``, ``--no-recompute``, ``--rows 30``, ``--steps 10``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import npas_fx  # noqa: E402
from benchmarks.overhead import cnn_case, make_step, transformer_case  # noqa: E402


def cpu_ms_per_step(step: object, steps: int) -> float:
    """Mean process CPU time of ``steps`` calls of ``step`` after 3 warm-up calls, in ms."""
    for _ in range(3):
        step()
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps * 1e3


def operator_table(step: object, steps: int, rows: int) -> str:
    """The profiler's table over ``steps`` calls of ``step``."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=32
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=("cnn", "transformer"))
    parser.add_argument("budget", type=float)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--no-recompute", action="store_true", help="compile with recompute=False")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models' forward")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x, y = {"cnn": cnn_case, "transformer": transformer_case}[args.model]("cpu")
    recompute = False if args.no_recompute else None
    gm = npas_fx.compile(model, args.budget, strategy=args.strategy, seed=0, recompute=recompute)
    print(npas_fx.plan_of(gm).summary(), "\n")
    times = {}
    for label, net in (("original", model), ("compiled", gm)):
        step = make_step(net, x, y, args.compile)
        times[label] = cpu_ms_per_step(step, args.steps)
        print(f"---- {label}: {times[label]:.1f} ms of CPU per step; profile of {args.steps} steps ----")
        print(operator_table(step, args.steps, args.rows))
    print(f"compiled / original step CPU time: {times['compiled'] / times['original']:.2f}")


if __name__ == "__main__":
    main()
