"""Training memory of npas_fx-compiled models relative to the original, with and without recompute.

For the CNN and the transformer of ``benchmarks/overhead.py`` and a weight-dominated transformer
step (4 blocks of width 512, batch 2 x 16 tokens), at budgets 0.1, 1.0 and 4.0, against the
original model in the same process:

* **state**: bytes of parameters + gradients + Adam's two moments, read from the tensors after a
  step, against the ratio of trainable counts (the budget): they must be equal (16 bytes per
  trainable parameter in float32). Adam's ``step`` counters (one scalar per parameter tensor) are
  left out of both.
* **peak**: the measured peak memory of one training step (forward, loss, backward, Adam step),
  taken after a warm-up step so that Adam's state exists and with the gradients set to ``None``
  before it: the bytes resident before the step (parameters, buffers such as BatchNorm statistics
  or hash indices, Adam state, each storage once) plus the peak of the CPU allocator during the
  step, read from ``torch.profiler.profile(profile_memory=True)``: every allocation event carries the
  allocator's running total of the bytes allocated since profiling began, whose maximum is the
  step's peak above what was resident. Counted: every tensor the step allocates through torch's
  CPU allocator (activations, saved tensors, generated weights, gradients, Adam's temporaries).
  Not counted: the inputs and targets (the same for every model), Python objects, the allocator's
  own slack and fragmentation (the CPU allocator returns memory to malloc), and memory outside
  torch's allocator (oneDNN/BLAS scratch space).
* **held**: the bytes allocated in the forward (and loss) still alive when it returns, from the same
  timeline: what autograd keeps for backward, plus the output.
* **time**: step time with recompute over step time without: the median over alternating rounds
  of the ratio of the process's CPU time (``time.process_time``; wall time on a shared machine
  mostly measures the neighbours).

Each model is compiled with ``recompute=False`` and ``recompute=True`` (``strategy="shape"``);
ratios are compiled / original. Run: ``python benchmarks/memory.py`` (``--quick``: the
weight-dominated case at budget 0.1 only; ``--device cuda`` on a GPU, where the caching allocator's
statistics give the peak above what was allocated before the step exactly, and time is wall time
between synchronisations).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines would interleave with the table
import torch  # noqa: E402
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import npas_fx  # noqa: E402
from benchmarks.overhead import cnn_case, transformer_case, weight_dominated_case  # noqa: E402

MB = 2**20
_FORWARD = "npas_memory_forward"


CASES = {"cnn": cnn_case, "transformer": transformer_case, "transformer-w": weight_dominated_case}


def _storage_bytes(tensors: Iterable[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class Step:
    """One training step of ``model`` (forward, cross-entropy, backward, Adam), warmed up once."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        with record_function(_FORWARD):
            out = self.model(self.x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), self.y.reshape(-1))
        del out
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        """Parameters + gradients + Adam moments (after a step that leaves the gradients set)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss = self.model(self.x).float().square().mean()
        loss.backward()
        grads = [p.grad for p in params]
        moments = [self.optimizer.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
        total = _storage_bytes(params) + _storage_bytes(grads) + _storage_bytes(moments)
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def resident_bytes(self) -> int:
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
        return _storage_bytes([*self.model.parameters(), *self.model.buffers(), *state])


def _allocations(prof: profile) -> tuple[list[tuple[int, int]], int]:
    """Allocation events as (time, running total) in time order, and the end time of the forward."""
    events, forward_end = [], 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, node.typed[1].total_allocated))
        elif node.name == _FORWARD:
            forward_end = node.end_time_ns
        stack.extend(node.children)
    return sorted(events), forward_end


def measure(step: Step) -> tuple[int, int]:
    """(peak bytes of one step including what was resident, bytes held when the forward returned)."""
    gc.collect()
    resident = step.resident_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, forward_end = _allocations(prof)
    peak = max((total for _, total in events), default=0)
    before = [total for t, total in events if t <= forward_end]
    held = before[-1] if before else 0
    return resident + peak, held


def measure_cuda(step: Step) -> tuple[int, int]:
    """On a GPU the caching allocator counts exactly: (what the step holds resident plus the
    allocator's peak above what was allocated before it, as on CPU; bytes allocated in the forward
    still alive when it returns). Other models alive on the device are not counted."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = step.resident_bytes()
    before = torch.cuda.memory_allocated()
    out = step.model(step.x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), step.y.reshape(-1))
    held = torch.cuda.memory_allocated() - before
    del out
    loss.backward()
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return resident + torch.cuda.max_memory_allocated() - before, held


def _timed(step: Callable[[], None], repeats: int) -> float:
    # CPU: the process's CPU time (wall time on a shared machine mostly measures the neighbours);
    # GPU: wall time between synchronisations.
    cuda = torch.cuda.is_initialized()
    clock = time.perf_counter if cuda else time.process_time
    if cuda:
        torch.cuda.synchronize()
    start = clock()
    for _ in range(repeats):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (clock() - start) / repeats


def time_ratio(base: Step, other: Step, rounds: int, repeats: int) -> float:
    ratios = [_timed(other, repeats) / _timed(base, repeats) for _ in range(rounds)]
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the weight-dominated case at budget 0.1 only")
    parser.add_argument("--device", default="cpu", help="cpu (profiler allocation events) or cuda (allocator stats)")
    args = parser.parse_args()
    device = args.device
    measure_step = measure_cuda if device == "cuda" else measure
    torch.manual_seed(0)
    cases = ["transformer-w"] if args.quick else list(CASES)
    budgets = (0.1,) if args.quick else (0.1, 1.0, 4.0)
    rounds, repeats = (5, 2) if args.quick else (9, 2)
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}")
    print("ratios are compiled / original; peak and held: recompute off -> on; time: step time on / off\n")
    header = (
        f"{'model':<14} {'budget':>6} {'params':>10} {'count':>7} {'state':>7} {'peak':>13} {'held':>13} {'time':>5}"
    )
    print(header)
    for name in cases:
        model, x, y = CASES[name](device)
        original = Step(model, x, y)
        state0 = original.state_bytes()
        peak0, held0 = measure_step(original)
        count0 = npas_fx.count_parameters(model)
        print(
            f"{name:<14} {'orig':>6} {count0:>10,} {'':>7} {state0 / MB:>6.1f}M "
            f"{peak0 / MB:>12.1f}M {held0 / MB:>12.1f}M {'':>5}"
        )
        for budget in budgets:
            steps = [Step(npas_fx.compile(model, budget, recompute=r), x, y) for r in (False, True)]
            count = npas_fx.count_parameters(steps[0].model)
            state = steps[1].state_bytes() / state0
            (peak_off, held_off), (peak_on, held_on) = measure_step(steps[0]), measure_step(steps[1])
            slower = time_ratio(steps[0], steps[1], rounds, repeats)
            print(
                f"{name:<14} {budget:>6} {count:>10,} {count / count0:>7.4f} {state:>7.4f} "
                f"{peak_off / peak0:>5.2f} -> {peak_on / peak0:>4.2f} {held_off / held0:>5.2f} -> {held_on / held0:>4.2f} "
                f"{slower:>5.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
