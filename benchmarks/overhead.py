"""Training-step time of npas_fx-compiled models relative to the original, side by side.

For a CNN and a small transformer, at budgets 0.1, 1.0 and 4.0, eager and under
``torch.compile``: each configuration's step (forward, backward, Adam step) is timed in rounds that
alternate with the original model's step in the same process, and the table reports the median of
the per-round ratios (compiled / original) with the spread (interquartile range). Absolute times on
a shared machine are noise; the ratio measured side by side is not.

Run: ``python benchmarks/overhead.py`` (add ``--quick`` for a smoke run, ``--device cuda`` on a GPU).
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


def make_step(model: nn.Module, x: Tensor, y: Tensor, use_compile: bool) -> Callable[[], None]:
    forward = torch.compile(model) if use_compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        out = forward(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None], repeats: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def ratio(
    base: Callable[[], None], other: Callable[[], None], rounds: int, repeats: int, device: str
) -> tuple[float, float]:
    for _ in range(3):  # warm-up (and compilation)
        base()
        other()
    ratios = []
    for _ in range(rounds):
        ratios.append(timed(other, repeats, device) / timed(base, repeats, device))
    quartiles = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), quartiles[2] - quartiles[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="few rounds, eager only (smoke test)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rounds, repeats = (3, 2) if args.quick else (9, 5)
    modes = [False] if args.quick else [False, True]
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    print("step = forward + backward + Adam; ratio = npas_fx step time / original step time (median, IQR)\n")
    print(f"{'model':<12} {'mode':<14} {'budget':>6} {'params':>10} {'ratio':>7} {'IQR':>6}")
    for case_name, case in [("cnn", cnn_case), ("transformer", transformer_case)]:
        for use_compile in modes:
            model, x, y = case(args.device)
            base = make_step(model, x, y, use_compile)
            for budget in (0.1, 1.0, 4.0):
                gm = npas_fx.compile(model, budget, strategy="shape", seed=0)
                median, iqr = ratio(base, make_step(gm, x, y, use_compile), rounds, repeats, args.device)
                mode = "torch.compile" if use_compile else "eager"
                count = npas_fx.count_parameters(gm)
                print(f"{case_name:<12} {mode:<14} {budget:>6} {count:>10,} {median:>7.2f} {iqr:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
