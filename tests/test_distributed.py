"""Data-parallel training of compiled models: DDP and FSDP2 on CPU (gloo), two processes.

A compiled model is an ordinary ``nn.Module`` whose only trainable parameters are the banks (and
the kept-dense vectors), so the data-parallel wrappers must work unchanged and all-reduce exactly
``budget`` values per step. Each test spawns two ranks on a free localhost port (bounded time);
every rank compiles the same model with the same seed and trains on its half of one global batch.
Asserted: the ranks end identical, their mean loss and their parameters match one process
training on the whole batch, and (DDP) the bytes all-reduced per step, counted by a comm hook
around the default all-reduce, are exactly 4 x budget (float32). Spawning costs seconds: ``slow``.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import npas_fx

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 3
BATCH = 8  # global batch; each rank gets BATCH // WORLD
TIME_LIMIT_S = 180
STRATEGIES = ("shape", "hash")


class SmallCNN(nn.Module):
    """Conv -> ReLU -> Conv -> ReLU -> Linear (no BatchNorm: per-rank statistics would differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.flatten(1))


def build(strategy: str) -> nn.Module:
    """The same compiled model in every process (fixed seeds)."""
    torch.manual_seed(0)
    return npas_fx.compile(SmallCNN(), 0.1, strategy=strategy, seed=1)


def global_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def train(model: nn.Module, x: Tensor, y: Tensor, after_step: Callable[[], None] | None = None) -> list[float]:
    """``STEPS`` SGD steps on (x, y); the loss of each step (before its update)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if after_step is not None:
            after_step()
    return [float(v) for v in losses]


def counting_hook(state, bucket):  # unannotated: DDP checks real annotations, postponed ones are strings
    """The default all-reduce, counting the bytes of every bucket it sends (``state``: ``{"bytes": int}``)."""
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


def _rank(rank: int, port: int, mode: str, strategies: tuple[str, ...], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        for strategy in strategies:  # one spawn for all strategies: starting processes is the slow part
            record = _train_rank(rank, mode, strategy)
            torch.save(record, Path(out) / f"{mode}-{strategy}-rank{rank}.pt")
        dist.barrier()  # neither rank closes its connections while the other still uses them
    finally:
        gc.collect()  # DDP's reducer holds the group in C++: free it before the group, not at exit
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads torn down there can abort the process
    # ("terminate called without an active exception", pytorch/pytorch#179291) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_rank(rank: int, mode: str, strategy: str) -> dict:
    """This rank's training on its half of the global batch.

    Returns the mean losses over ranks, the (full) parameters, and ``sent``: DDP's bytes per step,
    or FSDP2's count of parameter values held by this rank.
    """
    gm = build(strategy)
    x, y = global_batch()
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    sent: list[int] = []
    if mode == "ddp":
        model = DistributedDataParallel(gm)
        state = {"bytes": 0}
        model.register_comm_hook(state, counting_hook)

        def after_step() -> None:
            sent.append(state["bytes"])
            state["bytes"] = 0

        losses = train(model, x[half], y[half], after_step)
        params = {n: p.detach().clone() for n, p in gm.named_parameters()}
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(gm, mesh=init_device_mesh("cpu", (WORLD,)))
        losses = train(gm, x[half], y[half])
        sent = [sum(p.to_local().numel() for p in gm.parameters())]  # values this rank holds
        params = {n: p.full_tensor().detach().clone() for n, p in gm.named_parameters()}
    mean = torch.tensor(losses)
    dist.all_reduce(mean)  # the global batch's loss: mean over ranks of equal halves
    return {"losses": (mean / WORLD).tolist(), "params": params, "sent": sent}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out: Path, mode: str, strategies: tuple[str, ...]) -> dict[str, list[dict]]:
    """Spawn the ranks, wait at most ``TIME_LIMIT_S``; per strategy, each rank's record."""
    context = mp.start_processes(
        _rank, args=(free_port(), mode, strategies, str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIME_LIMIT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{mode} ranks did not finish in {TIME_LIMIT_S} s")
    return {s: [torch.load(out / f"{mode}-{s}-rank{r}.pt") for r in range(WORLD)] for s in strategies}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> object:
    """``trained(mode)`` -> per strategy, the ranks' records (each mode spawned once per module)."""
    cache: dict[str, dict[str, list[dict]]] = {}

    def get(mode: str) -> dict[str, list[dict]]:
        if mode not in cache:
            cache[mode] = run_ranks(tmp_path_factory.mktemp(mode), mode, STRATEGIES)
        return cache[mode]

    return get


def single_process(strategy: str) -> tuple[list[float], dict[str, Tensor], int]:
    gm = build(strategy)
    losses = train(gm, *global_batch())
    return losses, {n: p.detach() for n, p in gm.named_parameters()}, npas_fx.count_parameters(gm)


def assert_matches_single_process(ranks: list[dict], strategy: str) -> None:
    losses, params, _ = single_process(strategy)
    first = ranks[0]["params"]
    assert first.keys() == params.keys()
    for other in ranks[1:]:
        assert all(torch.equal(first[n], other["params"][n]) for n in first)  # ranks identical, bit for bit
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for name, value in params.items():
        assert torch.allclose(first[name], value, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_trains_like_one_process_and_all_reduces_exactly_the_budget(trained, strategy):
    ranks = trained("ddp")[strategy]
    assert_matches_single_process(ranks, strategy)
    budget = single_process(strategy)[2]
    assert budget == round(0.1 * npas_fx.count_parameters(SmallCNN()))
    for rank in ranks:
        assert rank["sent"] == [4 * budget] * STEPS  # float32 gradients of exactly `budget` values


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fsdp2_shards_and_trains_like_one_process(trained, strategy):
    ranks = trained("fsdp")[strategy]
    assert_matches_single_process(ranks, strategy)
    budget = single_process(strategy)[2]
    held = [rank["sent"][0] for rank in ranks]
    assert sum(held) == budget and max(held) < budget  # every value on one rank, none holds all
