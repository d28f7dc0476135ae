"""A byte-level language model on text that ships with Python: corpus, model, training, bits/byte.

The corpus is the docstrings of the standard library (parsed with ``ast``, nothing imported or
downloaded; about 1.2 MB of real English); the model a nanoGPT-style causal transformer over bytes
(vocabulary 256). Shared by ``benchmarks/compress.py`` and ``benchmarks/accuracy_lm.py``.

Example:
    >>> model = ByteLM(dim=16, layers=1, heads=2, context=8)
    >>> dense_count(16, 1, 64, 8) == sum(p.numel() for p in model.parameters())
    True
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 256])
"""

from __future__ import annotations

import argparse
import ast
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Corpus",
    "ByteLM",
    "stdlib_docstrings",
    "load_corpus",
    "dense_count",
    "narrow_shape",
    "lm_loss",
    "bits_per_byte",
    "train",
    "add_lm_arguments",
]


# ---- data ---------------------------------------------------------------------------------------
def stdlib_docstrings(limit: int) -> bytes:
    """Docstrings of the Python standard library (modules, classes, functions), about ``limit`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
    parts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc.encode("utf-8"))
                    size += len(parts[-1]) + 2
        if size >= limit:
            break
    return b"\n\n".join(parts)


@dataclass
class Corpus:
    train: Tensor  # (N,) int64 bytes
    val: Tensor

    def batch(self, size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, self.train.numel() - context - 1, (size,), generator=generator)
        windows = torch.stack([self.train[s : s + context + 1] for s in starts.tolist()])  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]


def load_corpus(limit: int, path: str | Path | None = None) -> Corpus:
    """The first 90 % of the docstrings for training, the rest for validation.

    ``path``: read the bytes from this file instead (``limit`` is then ignored), e.g. the docstrings
    written out on one machine, so that another Python, whose standard library differs, trains on
    the same text.
    """
    text = Path(path).read_bytes() if path else stdlib_docstrings(limit)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(0.9 * data.numel())
    return Corpus(data[:cut], data[cut:])


# ---- model (nanoGPT-style, one file) -------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, h, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteLM(nn.Module):
    """Byte embedding + learned positions -> ``layers`` pre-norm blocks (MLP width ``hidden``, default 4 dim) -> head."""

    def __init__(self, dim: int, layers: int, heads: int, context: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = 4 * dim if hidden is None else hidden
        self.embed = nn.Embedding(256, dim)
        self.position = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.blocks(self.embed(tokens) + self.position(positions))
        return self.head(self.ln(h))  # (B, T, 256)


def dense_count(dim: int, layers: int, hidden: int, context: int) -> int:
    """Trainable parameters of ``ByteLM(dim, layers, heads, context, hidden)`` (any ``heads``).

    Embeddings and head ``(512 + context) dim``, final norm ``2 dim``; per block two norms ``4 dim``,
    attention ``4 dim^2 + 4 dim``, MLP ``2 dim hidden + hidden + dim``.
    """
    return (512 + context + 2) * dim + layers * (4 * dim * dim + 2 * dim * hidden + hidden + 9 * dim)


def narrow_shape(target: int, dim: int, layers: int, heads: int, context: int) -> tuple[int, int, int, int]:
    """``(dim, layers, hidden, heads)`` of the ByteLM with (within 2 %) ``target`` parameters.

    The reference model is ``ByteLM(dim, layers, heads, context, hidden=4 dim)``. Its depth is kept
    where some width closes to 2 % (else the nearest depth that does); among those shapes, the one
    whose MLP is nearest ``4 dim``. Heads keep the reference head size as far as the width allows.

    Example:
        >>> narrow_shape(dense_count(64, 4, 256, 64), 64, 4, 4, 64)
        (64, 4, 256, 4)
    """
    shapes = []
    for n in range(1, 2 * layers + 1):
        for d in range(4, 4 * dim + 1, 2):
            h = round((target - dense_count(d, n, 0, context)) / (n * (2 * d + 1)))  # the MLP width that closes
            shapes.append((d, n, min(max(h, d), 8 * d)))
    close = [s for s in shapes if abs(dense_count(*s, context) - target) <= 0.02 * target]
    if close:
        d, n, h = min(close, key=lambda s: (abs(s[1] - layers), abs(s[2] - 4 * s[0]), s))
    else:
        d, n, h = min(shapes, key=lambda s: (abs(dense_count(*s, context) - target), abs(s[1] - layers), s))
    head_size = min(dim // heads, d)
    return d, n, h, max(k for k in range(1, d + 1) if d % k == 0 and d // k >= head_size)


# ---- training -----------------------------------------------------------------------------------
def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Next-byte cross-entropy (nats) of ``(B, T, 256)`` logits against ``(B, T)`` bytes."""
    return F.cross_entropy(logits.reshape(-1, 256), target.reshape(-1))


def bits_per_byte(model: nn.Module, corpus: Corpus, context: int, windows: int) -> float:
    """Validation loss in bits per byte over ``windows`` evenly spaced windows of the validation text."""
    model.eval()
    step = max(1, (corpus.val.numel() - context - 1) // windows)
    starts = list(range(0, corpus.val.numel() - context - 1, step))[:windows]
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), 32):
            chunk = torch.stack([corpus.val[s : s + context + 1] for s in starts[i : i + 32]])
            logits = model(chunk[:, :-1])
            total += float(F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum"))
    model.train()
    return total / (len(starts) * context) / math.log(2)


def train(
    model: nn.Module,
    corpus: Corpus,
    steps: int,
    lr: float,
    args: argparse.Namespace,
    seed: int,
    teacher: nn.Module | None = None,
) -> None:
    """AdamW with warm-up and cosine decay; with a ``teacher``, half the loss is KL to its predictions.

    ``args`` gives ``batch``, ``context`` and ``verbose`` (print the loss every 100 steps); ``seed``
    the batch order.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    for step in range(steps):
        x, y = corpus.batch(args.batch, args.context, generator)
        logits = model(x)
        loss = lm_loss(logits, y)
        if teacher is not None:
            with torch.no_grad():
                target = F.log_softmax(teacher(x).reshape(-1, 256), -1)
            kl = F.kl_div(F.log_softmax(logits.reshape(-1, 256), -1), target, log_target=True, reduction="batchmean")
            loss = 0.5 * loss + 0.5 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if args.verbose and (step + 1) % 100 == 0:
            print(f"    step {step + 1}/{steps}: loss {float(loss):.3f}", flush=True)


def add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and training flags that every ByteLM benchmark shares (``train`` reads them)."""
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--val-windows", type=int, default=192, help="validation windows of --context bytes")
    parser.add_argument("--corpus-bytes", type=int, default=1_200_000)
    parser.add_argument("--corpus-file", help="train on this file's bytes instead of the stdlib docstrings")
    parser.add_argument("--verbose", action="store_true", help="print the training loss every 100 steps")
