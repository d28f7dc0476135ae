"""Forward and backward time of every weight generator relative to a ``clone()`` of the weight.

The floor for a generated weight is one write of its size forward and one read backward
(DESIGN.md section 7). For each generator kind and weight sizes of 10K to 4M values (banks at 10 %
of the weight for the upsamplers ``repeat``, ``signed`` (the default), ``interpolate``, ``mask``, ``hash`` (chunks of 64, 16, 1); 4 templates for
the mixers ``wavg``, ``emb``, ``superweight``; a bank of the weight's size for ``slice``):

* forward: ``gen(bank, ...)`` with autograd recording (bank and generator parameters require grad);
* backward: ``torch.autograd.grad(out, inputs, g, retain_graph=True)`` on that output.

Weights under 1M values are timed over ``1M / numel`` calls per sample (per-call overhead is then
part of the ratio, as it is in training).

Both are divided by the time of ``x.clone()`` of a same-size ``x`` measured in the same round.
``bank clone``: where the bank is larger than the weight (the mixers read ``K`` templates of the
weight's size), a clone of the bank in the same unit: their physical floor, since backward must
write the bank's gradient (and forward read the templates).
``clone()``'s own backward hands the gradient through untouched (no read, no write), so the clone's
forward time (one read and one write of the weight) is the unit for both columns. Cases and the
clone run interleaved, round after round; the table gives the median over rounds of the per-round
ratio. The ``before`` columns time the formulas npas_fx used until this benchmark was written
(``_tile`` as one gather of ``(j + j // P) mod P``, per-element HashedNets hashing recomputed at every
forward), kept below as reference implementations, in the same rounds. Targets: forward within 2x,
backward within 3x.

``--compile``: each case's forward through ``torch.compile`` (``fullgraph``; the ``before`` columns
are then left out), the kernels as a compiled model runs them.

Run: ``python benchmarks/generators.py`` (a few minutes on 1 CPU thread; ``--quick``: 10K and 100K,
3 rounds; ``--device cuda`` on a GPU; ``--threads N``; ``--sizes 1M 4M`` and ``--only repeat mask`` pick rows;
``--clock cpu`` times process CPU time, less disturbed by other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The timer: wall time, or (``--clock cpu``) this process's CPU time, which a machine shared with other
# jobs disturbs less (time-slicing does not count; with 1 thread it is the work done).
CLOCK: list[Callable[[], float]] = [time.perf_counter]

from npas_fx.generators import (  # noqa: E402
    EmbeddingMix,
    Hash,
    Interpolate,
    Mask,
    Repeat,
    SignedRepeat,
    TemplateMix,
    WeightGenerator,
    interpolation_grid,
)
from npas_fx.kernel_base import _mix32  # noqa: E402
from npas_fx.plan import LayerPlan  # noqa: E402
from npas_fx.superweights import SuperWeightLayout  # noqa: E402

SHAPES = {"10K": (100, 100), "100K": (250, 400), "1M": (1000, 1000), "4M": (2000, 2000)}
UPSAMPLE = 0.1  # bank / weight for repeat, interpolate, mask, hash
TEMPLATES = 4  # templates of wavg, emb, superweight


# ---- the formulas before this benchmark (reference implementations) ---------------------------
def old_tile(bank: Tensor, numel: int, offset: int) -> Tensor:
    size = bank.numel()
    position = torch.arange(offset, offset + numel, device=bank.device)
    return bank[torch.remainder(position + torch.div(position, size, rounding_mode="floor"), size)]


def old_repeat(gen: Repeat) -> Callable[[Tensor], Tensor]:
    return lambda bank: (old_tile(bank, gen.numel, gen.offset) * gen.gain).view(gen.shape)


def old_mask(gen: Mask) -> Callable[[Tensor], Tensor]:
    def forward(bank: Tensor) -> Tensor:
        tiled = old_tile(bank, gen.numel, gen.offset).view(gen.shape[0], -1)
        return ((tiled * gen.mask.unsqueeze(1)).reshape(-1) * gen.gain).view(gen.shape)

    return forward


def old_hash(gen: Hash) -> Callable[[Tensor], Tensor]:
    def forward(bank: Tensor) -> Tensor:
        position = torch.arange(gen.numel, device=bank.device, dtype=torch.int64)
        h = _mix32(position + gen.salt * 0x9E3779B1)
        index = torch.remainder(h, bank.numel())
        sign = ((_mix32(h + 0x68E31DA4) & 1) * 2 - 1).to(bank.dtype)
        return ((bank[index] * sign) * gen.gain).view(gen.shape)

    return forward


# ---- cases ------------------------------------------------------------------------------------
class Case:
    """A generator with its group tensors; ``run()`` is the forward being timed."""

    def __init__(self, gen: WeightGenerator, bank_size: int, extra: tuple[Tensor, ...], device: str) -> None:
        self.gen = gen.to(device)
        for p in self.gen.parameters():
            p.requires_grad_(True)
        self.bank = torch.randn(bank_size, device=device, requires_grad=True)
        self.extra = tuple(t.to(device).requires_grad_(True) for t in extra)
        self.inputs = (self.bank, *self.extra, *self.gen.parameters())
        self.old: Callable[[Tensor], Tensor] | None = None

    def run(self) -> Tensor:
        return self.gen(self.bank, *self.extra)

    def run_old(self) -> Tensor:
        assert self.old is not None
        return self.old(self.bank)


def superweight(shape: tuple[int, int]) -> tuple[WeightGenerator, int, tuple[Tensor, ...]]:
    block = (shape[0] // 2, shape[1] // 2)  # a 2x2 grid of SuperWeights: the group's smaller layer
    layer = LayerPlan("w", shape, "", "Linear", 0, "superweight", templates=TEMPLATES, block=block)
    half = LayerPlan("v", block, "", "Linear", 0, "superweight", templates=TEMPLATES, block=block)
    size = math.prod(shape)
    layout = SuperWeightLayout([layer, half], size)
    coefficients = layout.coefficient_parameters()["coefficients_0"].detach()
    return layout.generator(layer), size, (coefficients,)


def make_cases(shape: tuple[int, int], device: str) -> dict[str, Case]:
    n = math.prod(shape)
    small = max(1, round(UPSAMPLE * n))
    offset = small // 3
    emb = (torch.randn(TEMPLATES, 24), torch.randn(TEMPLATES))
    specs: dict[str, tuple[WeightGenerator, int, tuple[Tensor, ...]]] = {
        "slice": (TemplateMix(shape, 0, 1, gain=1.0), n, ()),
        "wavg": (TemplateMix(shape, 0, TEMPLATES, gain=1.3), TEMPLATES * n, ()),
        "emb": (EmbeddingMix(shape, 0, TEMPLATES, 24, gain=1.3), TEMPLATES * n, emb),
        "repeat": (Repeat(shape, offset, gain=1.3), small, ()),
        "signed": (SignedRepeat(shape, offset, gain=1.3), small, ()),
        "interpolate": (Interpolate(shape, 0, interpolation_grid(shape, small), gain=1.3), small, ()),
        "mask": (Mask(shape, offset, gain=1.3), small, ()),
        "hash c64": (Hash(shape, 3, gain=1.3, chunk=64, bank_size=small), small, ()),
        "hash c16": (Hash(shape, 3, gain=1.3, chunk=16, bank_size=small), small, ()),
        "hash c1": (Hash(shape, 3, gain=1.3, chunk=1, bank_size=small), small, ()),
        "superweight": superweight(shape),
    }
    cases = {name: Case(gen, size, extra, device) for name, (gen, size, extra) in specs.items()}
    cases["repeat"].old = old_repeat(cases["repeat"].gen)
    cases["mask"].old = old_mask(cases["mask"].gen)
    cases["hash c1"].old = old_hash(cases["hash c1"].gen)
    return cases


# ---- timing -----------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _forward_backward(
    run: Callable[[], Tensor], inputs: tuple[Tensor, ...], inner: int, device: str
) -> tuple[float, float]:
    """Seconds per forward and per backward, each timed over ``inner`` calls."""
    _sync(device)
    start = CLOCK[0]()
    for _ in range(inner):
        out = run()
    _sync(device)
    forward = (CLOCK[0]() - start) / inner
    grad = torch.ones_like(out)
    _sync(device)
    start = CLOCK[0]()
    for _ in range(inner):
        torch.autograd.grad(out, inputs, grad, retain_graph=True, allow_unused=True)
    _sync(device)
    return forward, (CLOCK[0]() - start) / inner


def _clone_time(x: Tensor, inner: int, device: str) -> float:
    _sync(device)
    start = CLOCK[0]()
    for _ in range(inner):
        x.clone()
    _sync(device)
    return (CLOCK[0]() - start) / inner


def measure(
    shape: tuple[int, int], rounds: int, device: str, only: list[str] | None = None, compiled: bool = False
) -> dict[str, tuple[float, ...]]:
    """Median per-round ratios ``(fwd, bwd, bank clone, old fwd, old bwd)`` per case (NaN: no old
    formula; no bank clone where the bank is not larger than the weight)."""
    cases = {name: case for name, case in make_cases(shape, device).items() if not only or name in only}
    if compiled:
        for case in cases.values():
            case.run = torch.compile(case.run, fullgraph=True)  # type: ignore[method-assign]
            case.old = None
    x = torch.randn(math.prod(shape), device=device)
    inner = max(1, 1_000_000 // x.numel())  # small weights: time many calls per sample
    ratios: dict[str, list[tuple[float, ...]]] = {name: [] for name in cases}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, case in cases.items():
            clone = _clone_time(x, inner, device)
            new = _forward_backward(case.run, case.inputs, inner, device)
            old = _forward_backward(case.run_old, case.inputs, inner, device) if case.old else (math.nan, math.nan)
            bank = _clone_time(case.bank.detach(), inner, device) if case.bank.numel() > x.numel() else math.nan
            clone = min(clone, _clone_time(x, inner, device))  # the clone on both sides of the case
            if round_:
                ratios[name].append(tuple(t / clone for t in (*new, bank, *old)))
    return {name: tuple(statistics.median(r[i] for r in rows) for i in range(5)) for name, rows in ratios.items()}


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10K and 100K weights, 3 rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", nargs="+", choices=tuple(SHAPES), help="weight sizes to run (default: all)")
    parser.add_argument("--only", nargs="+", help="generator cases to run (default: all)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="timer (cpu: process CPU time)")
    parser.add_argument("--compile", action="store_true", help="each case's forward through torch.compile")
    args = parser.parse_args()
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    # Every case compiles the same method (`Case.run`) for another generator: one entry each.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._functorch.config.donated_buffer = False  # backward is timed again on one graph (retain_graph)
    torch.set_num_threads(args.threads)
    sizes = args.sizes or (("10K", "100K") if args.quick else tuple(SHAPES))
    rounds = 3 if args.quick else args.rounds
    print(
        f"time / clone() of the weight, median of {rounds} interleaved rounds; {args.device}, {args.threads} thread(s), "
        f"{args.clock} clock{', torch.compile' if args.compile else ''}"
    )
    head = (
        f"{'generator':<12} {'size':>5} {'fwd':>7} {'bwd':>7} {'bank clone':>11} {'fwd before':>11} {'bwd before':>11}"
    )
    print(head)
    print("-" * len(head))
    for size in sizes:
        rows = measure(SHAPES[size], rounds, args.device, args.only, args.compile)
        for name, (fwd, bwd, bank, old_fwd, old_bwd) in rows.items():
            print(
                f"{name:<12} {size:>5} {_fmt(fwd):>7} {_fmt(bwd):>7} {_fmt(bank):>11} {_fmt(old_fwd):>11} "
                f"{_fmt(old_bwd):>11}"
            )


if __name__ == "__main__":
    main()
