"""``npas_fx.materialize``: a compiled model back as a plain dense model of the original class.

For deployment and for every tool that expects ordinary parameters (``save_pretrained`` /
``from_pretrained``, ``torch.jit.trace``, ONNX, ``torch.export``): each generated weight becomes
an ``nn.Parameter`` holding its current value, tied weights stay one Parameter, every other
parameter and buffer is copied from the compiled model as it is now. The compiled model is left
untouched (it keeps training from its banks). peft's ``merge_and_unload`` and FakeRoast's
``RoastToFull`` are the peers.

Example:
    >>> import torch, npas_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = npas_fx.compile(model, 0.25)
    >>> dense = npas_fx.materialize(gm)
    >>> type(dense).__name__, npas_fx.count_parameters(dense) == npas_fx.count_parameters(model)
    ('Sequential', True)
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(dense.eval()(x), gm.eval()(x))
    True
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .build import SHARED_NAME
from .runtime import INDEX_ATTR, ROOT_KEY, SHARED_ATTR, GeneratedParameters

__all__ = ["materialize"]


def _root_and_shared(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """(original-class root, the banks' module, the GraphModule whose state is current or None)."""
    shared = getattr(module, SHARED_NAME, None) if isinstance(module, torch.fx.GraphModule) else None
    if shared is not None:
        ref = module.__dict__.get(ROOT_KEY) or module.meta.get(ROOT_KEY)
        if ref is None:
            raise ValueError(
                "this compiled model keeps no original-class root (it was made by an older npas_fx or "
                "by the search); compile it again with npas_fx.compile to materialize it."
            )
        return ref.module, shared, module
    for sub in module.modules():
        shared = sub.__dict__.get(SHARED_ATTR)
        if shared is not None:
            return module, shared, None
    raise ValueError(
        f"{type(module).__name__} has no generated weights: materialize takes a model made by "
        "npas_fx.compile (or a submodule of one)."
    )


def _current_state(compiled: nn.Module, dense: nn.Module) -> None:
    # The traced GraphModule owns the live kept parameters and buffers (``.to()`` may have
    # replaced them in its own containers); copy them into the original-class tree by name.
    # (A root that runs as a leaf is the GraphModule's own ``model``: already current.)
    names = {name for name, _ in dense.named_parameters(remove_duplicate=False)}
    names |= {name for name, _ in dense.named_buffers(remove_duplicate=False)}
    for name, tensor in [*compiled.named_parameters(), *compiled.named_buffers()]:
        if name.startswith(SHARED_NAME + ".") or name not in names:
            continue
        path, _, leaf = name.rpartition(".")
        owner = dense.get_submodule(path)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)
        else:
            owner._buffers[leaf] = tensor.detach().clone()


@torch.no_grad()
def materialize(module: nn.Module) -> nn.Module:
    """A dense copy of ``module``'s original-class model with the current generated weights.

    ``module`` is a GraphModule from :func:`npas_fx.compile` or any submodule of its model (for a
    Hugging Face model: ``gm``, ``gm.model`` or e.g. ``gm.model.bert``). The result is an ordinary
    ``nn.Module`` of the original class (a ``PreTrainedModel`` keeps its ``config``), in the
    compiled model's train/eval mode, whose outputs equal the compiled model's.
    """
    root, shared, compiled = _root_and_shared(module)
    # The copy reads the live banks once; they are not copied into it.
    dense = copy.deepcopy(root, {id(shared): shared})
    made: dict[int, nn.Parameter] = {}  # generator index -> Parameter: tied weights stay tied
    for sub in dense.modules():
        if not isinstance(sub, GeneratedParameters):
            continue
        for name, index in sub.__dict__.pop(INDEX_ATTR, {}).items():
            if index not in made:
                made[index] = nn.Parameter(shared.generate(index).detach().clone())
            sub._parameters[name] = made[index]
        sub.__dict__.pop(SHARED_ATTR, None)
        sub.__class__ = sub._npas_base
    if compiled is not None:
        if getattr(compiled, "model", None) is not root:
            _current_state(compiled, dense)
        dense.train(compiled.training)
    return dense
