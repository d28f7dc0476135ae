"""Inference time of npas_fx-compiled models relative to the original, side by side.

For an MLP 784-512x3-10, the digits CNN and a small transformer, at budgets 0.1 and 4.0 and batch
sizes 1 and 64: the eval-mode forward under ``torch.inference_mode()`` of the compiled model is
timed in rounds that alternate with the original's in the same process; the table reports the
median per-round ratio (compiled / original) and its interquartile range.

* ``cached``: the normal eval path: each weight is generated once, then reused while the banks are
  unchanged (npas_fx checks their version counters on every call).
* ``regenerated``: the eval forward with gradients enabled, against the original's with gradients
  enabled: the compiled graph generates every weight on every call (what every eval forward cost
  before caching, and what a training forward pays).

Run: ``python benchmarks/inference.py`` (``--quick`` for a smoke run, ``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import npas_fx  # noqa: E402
from benchmarks.overhead import TinyTransformer, ratio  # noqa: E402
from examples.digits import DigitsCNN  # noqa: E402


def mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(3):
        layers += [nn.Linear(width, 512), nn.ReLU()]
        width = 512
    return nn.Sequential(*layers, nn.Linear(width, 10))


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Tensor]]] = {
    "mlp": (mlp, lambda b: torch.randn(b, 784)),
    "cnn": (lambda: DigitsCNN(32), lambda b: torch.randn(b, 1, 8, 8)),
    "transformer": (TinyTransformer, lambda b: torch.randint(0, 512, (b, 64))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke test)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rounds, repeats = (3, 5) if args.quick else (9, 10)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    print("eval forward under inference_mode; ratio = npas_fx time / original time (median over rounds, IQR)\n")
    print(f"{'model':<12} {'batch':>5} {'budget':>6} {'cached':>7} {'IQR':>5} {'regenerated':>12} {'IQR':>5}")
    for name, (build, inputs) in CASES.items():
        model = build().to(args.device).eval()
        for batch in (1, 64):
            x = inputs(batch).to(args.device)
            for budget in (0.1, 4.0):
                gm = npas_fx.compile(model, budget, strategy="shape", seed=0).eval()

                def original(model: nn.Module = model, x: Tensor = x) -> object:
                    with torch.inference_mode():
                        return model(x)

                def cached(gm: nn.Module = gm, x: Tensor = x) -> object:
                    with torch.inference_mode():
                        return gm(x)

                fast, fast_iqr = ratio(original, cached, rounds, repeats, args.device)
                # plain calls of the models themselves, gradients enabled
                slow, slow_iqr = ratio(partial(model, x), partial(gm, x), rounds, repeats, args.device)
                print(
                    f"{name:<12} {batch:>5} {budget:>6} {fast:>7.2f} {fast_iqr:>5.2f} {slow:>12.2f} {slow_iqr:>5.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
