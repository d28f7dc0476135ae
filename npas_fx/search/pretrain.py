"""The data API of learned strategies and their short pre-training loop.

Batch convention (what ``compile(..., data=batches, loss_fn=...)`` expects; ``data`` is any iterable
of batches, re-iterated when the search needs more steps than it holds):

* ``(inputs, target)``: ``inputs`` is a tensor (``model(inputs)``), a tuple or list of positional
  inputs (``model(*inputs)``) or a dict of keyword inputs (``model(**inputs)``); the loss is
  ``loss_fn(output, target)``, so ``loss_fn`` unpacks structured outputs (dicts, dataclasses).
* a dict: keyword inputs only (``model(**batch)``); the loss is ``loss_fn(output)``, or, without a
  ``loss_fn``, the output's own ``"loss"`` entry or ``.loss`` attribute (Hugging Face models).

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> model = torch.nn.Linear(4, 3)
    >>> batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> batch_loss(model, batch, F.cross_entropy).shape
    torch.Size([])
    >>> losses = pretrain(model, [batch], F.cross_entropy, steps=3, seed=0)
    >>> len(losses), losses[-1] < losses[0]
    (3, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "require_data",
    "batch_loss",
    "check_finite",
    "cycle_batches",
    "pretrain",
    "progress_bar",
    "DEFAULT_SEARCH_STEPS",
]

# SSN pre-trains for about 10-15 % of a full run before clustering; without knowing the run, 100
# optimiser steps is that share of a few thousand, and cheap on small models.
DEFAULT_SEARCH_STEPS = 100

LossFn = Callable[..., Tensor]


def require_data(strategy: str, data: Any) -> None:
    """Raise the error a data-driven strategy gives when it is called without ``data``."""
    if data is None:
        raise ValueError(
            f"strategy {strategy!r} learns where to share from a short pre-training, so it needs data: pass "
            f"`data=` (an iterable of (inputs, target) batches) and `loss_fn=` (loss_fn(output, target) -> "
            f"scalar), e.g. npas_fx.compile(model, 0.1, strategy={strategy!r}, data=loader, "
            "loss_fn=torch.nn.functional.cross_entropy); or use a data-free strategy ('shape', 'hash', ...)."
        )
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"`data` should be an iterable of batches (a list or a DataLoader), got {type(data).__name__}; "
            "wrap a single batch in a list: data=[(inputs, target)]."
        )


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _own_loss(output: Any) -> Any:
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    if getattr(output, "loss", None) is not None:
        return output.loss
    if isinstance(output, Tensor) and output.dim() == 0:
        return output
    raise ValueError(
        f"no `loss_fn` was given and the model's output ({type(output).__name__}) carries no 'loss'; pass "
        "loss_fn=... (called as loss_fn(output, target), or loss_fn(output) for dict batches)."
    )


def batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> Tensor:
    """The scalar loss of ``model`` on one ``batch`` (see the module docstring for the convention)."""
    if isinstance(batch, Mapping):
        output = _call(model, batch)
        loss = loss_fn(output) if loss_fn is not None else _own_loss(output)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = batch
        output = _call(model, inputs)
        loss = loss_fn(output, target) if loss_fn is not None else _own_loss(output)
    else:
        raise TypeError(
            f"a batch should be an (inputs, target) pair or a dict of keyword inputs, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "; wrap several positional inputs as ((x1, x2), target)."
        )
    if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
        raise ValueError(
            f"`loss_fn` should return a scalar tensor that depends on the model, got "
            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}; reduce it (e.g. .mean())."
        )
    return loss


def check_finite(value: float, what: str, lr: float | None = None) -> None:
    """Raise a ``ValueError`` naming ``what`` (the search step) when ``value`` is NaN or infinite.

    Example:
        >>> try:
        ...     check_finite(float("nan"), "pre-training step 3 of 10", lr=0.1)
        ... except ValueError as error:
        ...     print(str(error)[:60])
        the search's loss is nan at pre-training step 3 of 10; the s
    """
    if math.isfinite(value):
        return
    rate = f" (now {lr:g})" if lr is not None else ""
    raise ValueError(
        f"the search's loss is {value} at {what}; the search cannot group layers from it. Pass a lower "
        f"learning rate, options={{'lr': ...}}{rate}, or check that `data` and `loss_fn` give finite losses."
    )


def cycle_batches(data: Iterable) -> Iterator[Any]:
    """Batches of ``data`` forever: an iterable is iterated again, a one-shot iterator is replayed."""
    seen: list[Any] = []
    one_shot = iter(data) is data
    while True:
        count = 0
        for batch in data if not (one_shot and seen) else seen:
            count += 1
            if one_shot and len(seen) < count:
                seen.append(batch)
            yield batch
        if count == 0:
            raise ValueError("`data` yielded no batches; give at least one (inputs, target) batch.")


def progress_bar(total: int, description: str, enabled: bool | None) -> tqdm:
    """A tqdm bar over search steps (``enabled=None``: shown on an interactive terminal only)."""
    return tqdm(total=total, desc=description, unit="step", disable=None if enabled is None else not enabled)


def pretrain(
    model: nn.Module,
    data: Iterable | Iterator,
    loss_fn: LossFn | None,
    steps: int,
    seed: int,
    lr: float = 1e-3,
    bar: tqdm | None = None,
) -> list[float]:
    """Train ``model`` in place for ``steps`` Adam steps on ``data``; returns the losses.

    ``data`` may be an iterable (cycled) or an iterator of :func:`cycle_batches`. The global RNG is
    seeded with ``seed`` inside a fork, so dropout and shuffling repeat exactly for the same seed.
    """
    batches = data if isinstance(data, Iterator) else cycle_batches(data)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            loss = batch_loss(model, next(batches), loss_fn)
            check_finite(float(loss.detach()), f"pre-training step {step + 1} of {steps}", lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
    # torch.optim keeps the optimiser in a reference cycle (a frame of its __init__): free its
    # moments (twice the trained parameters) now, not at the next garbage collection.
    optimizer.state.clear()
    return losses
