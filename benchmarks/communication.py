"""Gradient all-reduce bytes per data-parallel step: npas_fx-compiled models against the originals.

Two ``gloo`` processes on this machine train each model with ``DistributedDataParallel`` for two
steps; a comm hook around DDP's default all-reduce sums the bytes of every gradient bucket it sends
(``bucket.buffer().numel() * element_size()``), and the table reports the second step's bytes
(the first rebuilds buckets) for the original and for the model compiled at budgets 0.1, 1.0 and
4.0 (strategy ``shape``), and their ratio. The volume is exactly 4 bytes x the trainable count
(float32), so the ratio is the budget: a compiled model at 0.1 sends a tenth of the gradients.

Run: ``python benchmarks/communication.py``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import npas_fx  # noqa: E402
from benchmarks.overhead import TinyTransformer  # noqa: E402
from examples.digits import DigitsCNN  # noqa: E402

WORLD = 2
BUDGETS = (0.1, 1.0, 4.0)

Case = tuple[nn.Module, Callable[[nn.Module], Tensor], dict | None]  # model, loss of a step, example_inputs


def cnn() -> Case:
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    return DigitsCNN(32), lambda m: F.cross_entropy(m(x), y), None


def transformer() -> Case:
    tokens = torch.randint(0, 512, (4, 32))
    return TinyTransformer(), lambda m: F.cross_entropy(m(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()), None


def bert() -> Case:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    )
    tokens = torch.randint(0, 30522, (4, 32))
    inputs = {"input_ids": tokens, "labels": tokens}
    return BertForMaskedLM(config), lambda m: m(**inputs).loss, {"input_ids": tokens}


CASES = {"digits CNN": cnn, "tiny transformer": transformer, "BERT (h128, 2 layers)": bert}


def counting_hook(state, bucket):  # unannotated: DDP checks real annotations, postponed ones are strings
    """The default all-reduce, counting the bytes of every bucket it sends."""
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


def bytes_per_step(model: nn.Module, loss_of: Callable[[nn.Module], Tensor]) -> int:
    """All-reduced bytes of DDP's second training step of ``model``."""
    wrapped = DistributedDataParallel(model)
    state = {"bytes": 0}
    wrapped.register_comm_hook(state, counting_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):
        state["bytes"] = 0
        optimizer.zero_grad(set_to_none=True)
        loss_of(wrapped).backward()
        optimizer.step()
    return state["bytes"]


def rank_main(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        if rank == 0:
            print(f"torch {torch.__version__}, {WORLD} gloo processes, DDP default all-reduce, strategy 'shape'\n")
            print(f"{'model':<22} {'budget':>6} {'params':>11} {'bytes/step':>12} {'original':>12} {'ratio':>6}")
        for name, case in CASES.items():
            torch.manual_seed(0)  # every rank builds the same model and data
            model, loss_of, example_inputs = case()
            original = bytes_per_step(model, loss_of)
            for budget in BUDGETS:
                torch.manual_seed(0)
                fresh, _, _ = case()
                gm = npas_fx.compile(fresh, budget, strategy="shape", seed=0, example_inputs=example_inputs)
                sent = bytes_per_step(gm, loss_of)
                if rank == 0:
                    count = npas_fx.count_parameters(gm)
                    print(
                        f"{name:<22} {budget:>6} {count:>11,} {sent:>12,} {original:>12,} {sent / original:>6.3f}",
                        flush=True,
                    )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.start_processes(rank_main, args=(free_port(),), nprocs=WORLD, join=True, start_method="spawn")
