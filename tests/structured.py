"""Test helpers for models with structured inputs and outputs (dicts, ``ModelOutput``, tuples).

Used by ``test_untraceable.py`` and ``test_transformers.py``: call a model on a tuple or a dict of
inputs, compare output structures, build a loss over every floating tensor of an output, check
that gradient reaches every bank, and compile the identity plan of any model.

Example:
    >>> import torch
    >>> out = {"a": torch.ones(2), "b": (torch.zeros(1, 3), None)}
    >>> [tuple(t.shape) for t in float_leaves(out)]
    [(2,), (1, 3)]
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from models import loss_of
from torch import Tensor, fx, nn

import npas_fx

__all__ = [
    "call",
    "float_leaves",
    "assert_same_structure",
    "assert_same_outputs",
    "output_loss",
    "assert_gradient_reaches_every_bank",
    "identity_compile",
    "search_arguments",
    "compiled_case",
    "assert_compiled_like",
    "assert_learned_plan_reapplies",
]


def call(model: nn.Module, inputs: tuple | Mapping[str, Any], **extra: Any) -> Any:
    """``model(*inputs, **extra)`` or ``model(**inputs, **extra)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs, **extra)
    return model(*inputs, **extra)


def float_leaves(output: Any) -> list[Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, Tensor) and x.is_floating_point()]


def assert_same_structure(output: Any, reference: Any) -> None:
    """Same container types and keys all the way down, tensors of the same shape and dtype."""
    assert type(output) is type(reference), (type(output), type(reference))
    leaves, spec = pytree.tree_flatten(output)
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    assert spec == ref_spec, f"{spec} != {ref_spec}"
    for x, y in zip(leaves, ref_leaves, strict=True):
        assert type(x) is type(y)
        if isinstance(x, Tensor):
            assert (x.shape, x.dtype) == (y.shape, y.dtype)


def assert_same_outputs(output: Any, reference: Any) -> None:
    """:func:`assert_same_structure` and every tensor equal."""
    assert_same_structure(output, reference)
    for x, y in zip(pytree.tree_leaves(output), pytree.tree_leaves(reference), strict=True):
        if isinstance(x, Tensor):
            assert torch.equal(x, y), f"max difference {float((x - y).abs().max())}"


def output_loss(output: Any) -> Tensor:
    """A loss that reaches every floating tensor of ``output`` (logits, hidden states, pooled...)."""
    leaves = [x for x in float_leaves(output) if x.requires_grad]
    assert leaves, "the output holds no differentiable tensor"
    return sum(loss_of(x) for x in leaves)


def assert_gradient_reaches_every_bank(gm: fx.GraphModule) -> None:
    """Every bank got a finite, non-zero gradient; every other npas parameter a finite one."""
    banks = 0
    for name, p in gm.get_submodule("npas").named_parameters():
        assert p.grad is not None, f"npas.{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"npas.{name} has a non-finite gradient"
        if name.endswith(".bank"):
            banks += 1
            assert p.grad.abs().sum() > 0, f"npas.{name} got a zero gradient"
    assert banks == len(npas_fx.plan_of(gm).groups)


def identity_compile(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """The identity plan of any model: every generated layer alone in a group, budget 1.0.

    ``strategy="shape"`` gives copies only when all shapes differ; ``"random"`` with one group per
    layer does for every model, so each layer's bank holds a copy of its original weight.
    """
    first = npas_fx.compile(model, 1.0, example_inputs=example_inputs)
    layers = len(npas_fx.plan_of(first).layers)
    gm = npas_fx.compile(model, 1.0, strategy="random", num_groups=layers, example_inputs=example_inputs)
    assert all(layer.copied for layer in npas_fx.plan_of(gm).layers)
    return gm


def search_arguments(strategy: str, example: tuple | Mapping[str, Any]) -> dict[str, Any]:
    """``compile`` keywords that let a learned strategy search on ``example`` (none for data-free ones).

    The loss reaches every floating output (:func:`output_loss`), so any model can be searched:
    a dict example is a keyword batch (``loss_fn(output)``), a tuple one ``(inputs, None)``.
    """
    if strategy not in ("ssn", "swn"):
        return {}
    if isinstance(example, Mapping):
        data, loss_fn = [dict(example)], output_loss
    else:
        data, loss_fn = [(tuple(example), None)], (lambda output, _target: output_loss(output))
    options: dict[str, Any] = {"progress": False, **({"grad_batches": 2} if strategy == "swn" else {})}
    return {"data": data, "loss_fn": loss_fn, "search_steps": 3, "options": options}


def compiled_case(
    cache: dict, cases: Mapping[str, Any], name: str, strategy: str, budget: float
) -> tuple[nn.Module, Any]:
    """(original, fresh copy of its compiled model) for ``cases[name]``; each compile runs once.

    ``cases`` map names to objects with ``build()`` and ``example()``.
    """
    key = (name, strategy, budget)
    if key not in cache:
        case = cases[name]
        model = case.build()
        example = case.example()
        extra = search_arguments(strategy, example)
        cache[key] = (model, npas_fx.compile(model, budget, strategy=strategy, example_inputs=example, **extra))
    model, gm = cache[key]
    return model, copy.deepcopy(gm)


def assert_compiled_like(model: nn.Module, gm: fx.GraphModule, example: Any, budget: float) -> None:
    """Exact budget, the original's output structure (eval), and gradients reaching every bank."""
    target = round(budget * npas_fx.count_parameters(model))
    assert npas_fx.count_parameters(gm) == target == npas_fx.plan_of(gm).trainable_params
    gm.eval()
    assert_same_structure(call(gm, example), call(model.eval(), example))
    gm.train()
    gm.zero_grad()
    output_loss(call(gm, example)).backward()
    assert_gradient_reaches_every_bank(gm)


def assert_learned_plan_reapplies(model: nn.Module, gm: fx.GraphModule, example: Any) -> None:
    """A learned plan names the final model's own parameters (its search model was built from the
    same traced module: never a doubly wrapped ``model.model.``) and re-applies exactly."""
    plan = npas_fx.plan_of(gm)
    for layer in plan.layers:
        owner = gm.get_submodule(layer.module)  # raises if the plan names a module gm does not have
        assert layer.name.rpartition(".")[2] in owner._parameters, layer.name
    again = npas_fx.compile(model, plan=npas_fx.Plan.from_json(plan.to_json()), example_inputs=example)
    assert npas_fx.plan_of(again).layers == plan.layers
    assert_same_outputs(call(again.eval(), example), call(gm.eval(), example))
