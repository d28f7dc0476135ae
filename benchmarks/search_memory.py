"""Peak memory of ``swn``'s gradient-similarity pass, and of a whole ``swn`` search, on BERT-base.

Two measurements, each in a fresh subprocess whose peak resident set size is reset after the
inputs are built (so the numbers are what the pass adds on top of them):

* ``similarity``: random float32 "gradients" with the shapes of every weight ``swn`` generates in
  a BERT-base ``BertForMaskedLM`` (12 layers, hidden 768, vocab 30522; the tied decoder counted
  once), through ``binned_similarity`` + ``bins_of`` exactly as ``swn`` calls them. The former
  padded computation's float64 batch size is printed next to it (computed, not run: it does not
  fit this machine).
* ``swn``: ``npas_fx.compile(BertForMaskedLM(random config), 0.1, strategy="swn")`` with a few
  search steps on random tokens; the peak above the built model, against the model's own size.

Run: ``python benchmarks/search_memory.py`` (``--layers 2`` for a quick smoke run; ``--only
similarity`` or ``--only swn``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.rss import peak_rss_mib, reset_peak, rss_mib  # noqa: E402


def bert_config(layers: int, dropout: float = 0.1) -> object:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def generated_shapes(layers: int) -> list[tuple[int, ...]]:
    """Shapes of BERT-base's trainable weights of 2+ dims (what ``swn`` generates), tied ones once."""
    from transformers import BertForMaskedLM

    with torch.device("meta"):
        model = BertForMaskedLM(bert_config(layers))
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad and p.dim() >= 2]


def padded_bytes(shapes: list[tuple[int, ...]]) -> int:
    """Float64 bytes of the former computation's padded batch (layers x max rows x max cols x rest), per bin."""
    from npas_fx.superweights import bins_of

    total = 0
    for members in bins_of(shapes):
        rows = max(shapes[i][0] for i in members)
        cols = max(shapes[i][1] for i in members)
        rest = max(int(torch.Size(shapes[i][2:]).numel()) for i in members)
        total = max(total, len(members) * rows * cols * rest * 8)
    return total


def measure_similarity(layers: int) -> dict:
    from npas_fx.search.swn import binned_similarity
    from npas_fx.superweights import bins_of

    shapes = generated_shapes(layers)
    grads = [torch.randn(*s) for s in shapes]
    base = rss_mib()
    reset_peak()
    start = time.perf_counter()
    similarity = binned_similarity(grads, bins_of(shapes))
    seconds = time.perf_counter() - start
    return {
        "layers": len(shapes),
        "weights": sum(g.numel() for g in grads),
        "inputs_mib": sum(g.numel() for g in grads) * 4 / 2**20,
        "peak_above_mib": peak_rss_mib() - base,
        "seconds": seconds,
        "padded_mib": padded_bytes(shapes) / 2**20,
        "finite": bool(similarity[~similarity.isnan()].isfinite().all()),
    }


class MaskedLMLoss(torch.nn.Module):
    """``BertForMaskedLM`` inside a root that traces (the transformer one leaf), returning its loss.

    Without dropout: a partial trace is kept only if it reproduces the model's outputs.
    """

    def __init__(self, layers: int) -> None:
        from transformers import BertForMaskedLM

        super().__init__()
        self.bert = BertForMaskedLM(bert_config(layers, dropout=0.0))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, labels=labels).loss


def measure_swn(layers: int, steps: int, wrapped: bool) -> dict:
    from transformers import BertForMaskedLM

    import npas_fx

    torch.manual_seed(0)
    model = MaskedLMLoss(layers) if wrapped else BertForMaskedLM(bert_config(layers))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 30522, (4, 32), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    base = rss_mib()
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    reset_peak()
    start = time.perf_counter()
    gm = npas_fx.compile(
        model,
        0.1,
        strategy="swn",
        example_inputs=batches[0] if wrapped else {"input_ids": batches[0]["input_ids"]},
        data=batches,
        search_steps=steps,
        options={"grad_batches": 1, "refine_steps": 1, "progress": False},
    )
    seconds = time.perf_counter() - start
    return {
        "params": npas_fx.count_parameters(model),
        "budget": npas_fx.count_parameters(gm),
        "model_mib": model_mib,
        "peak_above_mib": peak_rss_mib() - base,
        "seconds": seconds,
    }


def child(kind: str, layers: int, steps: int, wrapped: bool) -> None:
    torch.set_num_threads(1)
    result = measure_similarity(layers) if kind == "similarity" else measure_swn(layers, steps, wrapped)
    print(json.dumps(result))


def run_child(kind: str, layers: int, steps: int, wrapped: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--layers", str(layers), "--steps", str(steps)]
    command += ["--wrapped"] if wrapped else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} case failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="BERT encoder layers (12 = BERT-base)")
    parser.add_argument("--steps", type=int, default=3, help="swn search steps")
    parser.add_argument("--only", choices=["similarity", "swn"], default=None)
    parser.add_argument(
        "--wrapped", action="store_true", help="swn on BertForMaskedLM inside a traced root that returns its loss"
    )
    parser.add_argument("--child", choices=["similarity", "swn"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.layers, args.steps, args.wrapped)
        return
    if args.only in (None, "similarity"):
        r = run_child("similarity", args.layers, args.steps)
        print(
            f"similarity pass, BERT-base shapes ({args.layers} layers): {r['layers']} weights tensors, "
            f"{r['weights']:,} weights ({r['inputs_mib']:.0f} MiB float32)"
        )
        print(
            f"  peak above the gradients: {r['peak_above_mib']:.0f} MiB in {r['seconds']:.1f} s "
            f"(former padded batch: {r['padded_mib'] / 1024:.1f} GiB)"
        )
    if args.only in (None, "swn"):
        r = run_child("swn", args.layers, args.steps, args.wrapped)
        where = " in a traced root" if args.wrapped else ""
        print(
            f"swn search, BertForMaskedLM{where} ({args.layers} layers, {r['params']:,} params, "
            f"{r['model_mib']:.0f} MiB), budget {r['budget']:,}, {args.steps} steps:"
        )
        print(
            f"  peak above the built model: {r['peak_above_mib']:.0f} MiB "
            f"({r['peak_above_mib'] / r['model_mib']:.2f}x the model) in {r['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
