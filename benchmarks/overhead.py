"""Training-step time of npas_fx-compiled models relative to the original, side by side.

For a CNN and a small transformer, at budgets 0.1, 1.0 and 4.0, eager and under
``torch.compile``: each configuration's step (forward, backward, Adam step) is timed in rounds that
alternate with the original model's step in the same process, and the table reports the median of
the per-round ratios (compiled / original) with the spread (interquartile range). Absolute times on
a shared machine are noise; the ratio measured side by side is not.

``floor``: above the original's size (budget 4.0) the step must update more parameters. The floor
is the original's step with Adam over as many parameters as the compiled model has (the original's
and a dense extra parameter whose gradient is handed in, not computed), timed in the same rounds:
no step with that optimizer state can be cheaper. ``eager, no recompute``: the eager rows again
with ``recompute=False`` (on by default below the original's size), to show its share.

Run: ``python benchmarks/overhead.py`` (add ``--quick`` for a smoke run, ``--device cuda`` on a GPU;
``--models``, ``--budgets``, ``--modes`` pick rows; ``--models transformer-w`` adds the memory benchmark's
weight-dominated transformer; ``--strategy shape`` compiles with another strategy).
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

# The timer: wall time, or (``--clock cpu``) this process's CPU time, which a machine shared with other
# jobs disturbs less (time-slicing does not count; with 1 thread it is the work done).
CLOCK: list[Callable[[], float]] = [time.perf_counter]

import npas_fx  # noqa: E402
from examples.digits import DigitsCNN  # noqa: E402


class TinyTransformer(nn.Module):
    """A 2-block pre-norm transformer language model (embedding, attention, MLP, LM head)."""

    def __init__(self, vocab: int = 512, dim: int = 128, heads: int = 4, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(blocks))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(dim, 4 * dim) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(4 * dim, dim) for _ in range(blocks))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)  # (B, T, D)
        for n1, attn, n2, up, down in zip(self.norms1, self.attns, self.norms2, self.ups, self.downs, strict=True):
            x = n1(h)
            h = h + attn(x, x, x, need_weights=False)[0]
            h = h + down(F.gelu(up(n2(h))))
        return self.head(h)  # (B, T, vocab)


def cnn_case(device: str) -> tuple[nn.Module, Tensor, Tensor]:
    return DigitsCNN(32).to(device), torch.randn(64, 1, 8, 8, device=device), torch.randint(0, 10, (64,), device=device)


def transformer_case(device: str) -> tuple[nn.Module, Tensor, Tensor]:
    tokens = torch.randint(0, 512, (16, 64), device=device)
    return TinyTransformer().to(device), tokens, tokens.roll(-1, dims=1)


def weight_dominated_case(device: str) -> tuple[nn.Module, Tensor, Tensor]:
    """A 4-block transformer of width 512 on a small batch (2 x 16 tokens): the weights dominate."""
    tokens = torch.randint(0, 512, (2, 16), device=device)
    model = TinyTransformer(vocab=512, dim=512, heads=8, blocks=4).to(device)
    return model, tokens, tokens.roll(-1, dims=1)


def make_step(model: nn.Module, x: Tensor, y: Tensor, use_compile: bool, extra: int = 0) -> Callable[[], None]:
    """One training step; ``extra`` > 0 adds a dense parameter of that size to Adam (the floor's state)."""
    forward = torch.compile(model) if use_compile else model
    params = list(model.parameters())
    pad = nn.Parameter(torch.zeros(extra, device=x.device)) if extra > 0 else None
    pad_grad = torch.randn(extra, device=x.device) if pad is not None else None
    optimizer = torch.optim.Adam(params + ([pad] if pad is not None else []), lr=1e-4)

    def step() -> None:
        out = forward(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if pad is not None:
            pad.grad = pad_grad  # a gradient of that size handed in: the floor computes none
        optimizer.step()

    return step


def timed(step: Callable[[], None], repeats: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = CLOCK[0]()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (CLOCK[0]() - start) / repeats


def ratio(
    base: Callable[[], None], other: Callable[[], None], rounds: int, repeats: int, device: str
) -> tuple[float, float]:
    """Median and IQR of the per-round ``other / base`` time ratio."""
    return ratios(base, [other], rounds, repeats, device)[0]


def ratios(
    base: Callable[[], None], others: list[Callable[[], None]], rounds: int, repeats: int, device: str
) -> list[tuple[float, float]]:
    """Median and IQR of ``other / base`` for each of ``others``, all timed in the same rounds."""
    for _ in range(3):  # warm-up (and compilation)
        base()
        for other in others:
            other()
    values: list[list[float]] = [[] for _ in others]
    for _ in range(rounds):
        base_time = timed(base, repeats, device)
        for i, other in enumerate(others):
            values[i].append(timed(other, repeats, device) / base_time)
    out = []
    for row in values:
        quartiles = statistics.quantiles(row, n=4)
        out.append((statistics.median(row), quartiles[2] - quartiles[0]))
    return out


CASES = {"cnn": cnn_case, "transformer": transformer_case, "transformer-w": weight_dominated_case}
MODES = {"eager": (False, None), "eager-norecompute": (False, False), "compile": (True, None)}
MODE_NAMES = {"eager": "eager", "eager-norecompute": "eager, no recomp", "compile": "torch.compile"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="few rounds, eager only (smoke test)")
    parser.add_argument("--models", nargs="+", choices=tuple(CASES), default=["cnn", "transformer"])
    parser.add_argument("--strategy", default="auto", help="compile's strategy (default: its default, auto)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 1.0, 4.0])
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["eager", "eager-norecompute", "compile"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="timer (cpu: process CPU time)")
    args = parser.parse_args()
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, repeats = (3, 2) if args.quick else (args.rounds, 5)
    modes = ["eager"] if args.quick else args.modes
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"strategy {args.strategy}"
    )
    print("step = forward + backward + Adam; ratio = npas_fx step time / original step time (median, IQR);")
    print("floor = original step with Adam over the compiled model's parameter count (only above 1.0)\n")
    head = f"{'model':<13} {'mode':<17} {'budget':>6} {'params':>10} {'ratio':>7} {'IQR':>6} {'floor':>7}"
    print(head)
    print("-" * len(head))
    for case_name in args.models:
        for mode in modes:
            use_compile, recompute = MODES[mode]
            model, x, y = CASES[case_name](args.device)
            original = sum(p.numel() for p in model.parameters())
            base = make_step(model, x, y, use_compile)
            for budget in args.budgets:
                gm = npas_fx.compile(model, budget, strategy=args.strategy, seed=0, recompute=recompute)
                count = npas_fx.count_parameters(gm)
                steps = [make_step(gm, x, y, use_compile)]
                if count > original:
                    steps.append(make_step(model, x, y, use_compile, extra=count - original))
                results = ratios(base, steps, rounds, repeats, args.device)
                (median, iqr), floor = results[0], (f"{results[1][0]:.2f}" if len(results) > 1 else "-")
                print(
                    f"{case_name:<13} {MODE_NAMES[mode]:<17} {budget:>6} {count:>10,} {median:>7.2f} {iqr:>6.2f} "
                    f"{floor:>7}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
