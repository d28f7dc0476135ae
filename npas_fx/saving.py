"""Save a compiled model compactly (its plan and its banks) and load it back onto a fresh model.

A directory holds ``npas_plan.json`` (the plan, see :class:`~npas_fx.plan.Plan`) and the compiled
model's ``state_dict`` (banks, generator parameters, kept dense parameters, buffers) as
``model.safetensors`` when safetensors is installed, else ``npas_model.pt``. That is also what
Hugging Face ``Trainer.save_model`` writes for a compiled model (it saves the state dict of a
model that is not a ``PreTrainedModel``), so ``load`` reads a Trainer's output directory once the
plan is saved beside it. For a dense checkpoint of the original class, use
:func:`npas_fx.materialize` and the ecosystem's own format.

Example:
    >>> import tempfile, torch, npas_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = npas_fx.compile(model, 0.5)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     _ = npas_fx.save(gm, directory)
    ...     again = npas_fx.load(model, directory)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(again(x), gm(x))
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import compiler
from .compiler import plan_of
from .plan import Plan

__all__ = ["save", "load", "PLAN_FILE"]

PLAN_FILE = "npas_plan.json"
_SAFETENSORS = "model.safetensors"
_TORCH = "npas_model.pt"


def save(gm: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``gm``'s plan and state dict into ``directory`` (created if needed); returns it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    plan_of(gm).to_json(path / PLAN_FILE)
    state = {k: v.detach().contiguous() for k, v in gm.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(state, path / _TORCH)
    else:
        save_file(_untied(state), str(path / _SAFETENSORS), metadata={"format": "pt"})
    return path


def _untied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; tied entries are re-tied by load_state_dict.
    seen: set[int] = set()
    result = {}
    for key, value in state.items():
        pointer = value.untyped_storage().data_ptr()
        result[key] = value.clone() if pointer in seen and value.numel() else value
        seen.add(pointer)
    return result


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if (path / _SAFETENSORS).exists():
        from safetensors.torch import load_file

        return load_file(str(path / _SAFETENSORS))
    for name in (_TORCH, "pytorch_model.bin"):
        if (path / name).exists():
            return torch.load(path / name, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no weights in {str(path)!r}: expected {_SAFETENSORS} or {_TORCH} (written by npas_fx.save or "
        "Trainer.save_model)."
    )


def load(model: nn.Module, directory: str | os.PathLike, **compile_kwargs: Any) -> fx.GraphModule:
    """Compile ``model`` (a fresh instance of the saved model's architecture) with the saved plan
    and load the saved state; ``compile_kwargs`` go to :func:`npas_fx.compile` (e.g.
    ``example_inputs`` when the plan was made with them)."""
    path = Path(directory)
    if not (path / PLAN_FILE).exists():
        raise FileNotFoundError(
            f"no {PLAN_FILE} in {str(path)!r}: save one with npas_fx.save(gm, directory) or "
            f"npas_fx.plan_of(gm).to_json(directory / {PLAN_FILE!r})."
        )
    plan = Plan.from_json((path / PLAN_FILE).read_text())
    gm = compiler.compile(model, plan=plan, **compile_kwargs)
    state = _read_state(path)
    device = next(iter(gm.parameters())).device
    gm.load_state_dict({k: v.to(device) for k, v in state.items()})
    return gm
