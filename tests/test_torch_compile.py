"""``torch.compile(gm, fullgraph=True)`` on compiled models: no graph breaks, same numbers as eager.

Forward outputs and the gradients of every npas_fx parameter after ``backward`` must match eager
execution, for an MLP, a CNN with BatchNorm (train mode, where running statistics also have to
match, and eval mode) and attention blocks, across strategies and generators (hash and emb
included). Slow (inductor compiles C++ on CPU): marked ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASES, loss_of, npas_parameters

import npas_fx

pytestmark = pytest.mark.slow

CASES_TO_COMPILE = [
    ("mlp", "hash", npas_fx.GeneratorConfig(), 0.3),
    ("residual_cnn", "random", npas_fx.GeneratorConfig(downsample="emb", upsample="mask", embedding_dim=4), 0.6),
    ("attention_block", "single", npas_fx.GeneratorConfig(downsample="emb", upsample="hash"), 0.4),
]


def _build(name: str, strategy: str, config: npas_fx.GeneratorConfig, budget: float) -> torch.fx.GraphModule:
    model = CASES[name].build()
    if name == "residual_cnn":
        model.drop.p = 0.0  # train mode must be deterministic to compare with eager
    return npas_fx.compile(model, budget, strategy=strategy, generators=config, seed=1)


@pytest.mark.parametrize(
    ("name", "strategy", "config", "budget"),
    CASES_TO_COMPILE,
    ids=[f"{n}-{s}-{c.downsample}-{c.upsample}" for n, s, c, _ in CASES_TO_COMPILE],
)
def test_torch_compile_fullgraph_matches_eager(name, strategy, config, budget):
    torch._dynamo.reset()
    eager = _build(name, strategy, config, budget)
    plan = npas_fx.plan_of(eager)
    assert npas_fx.count_parameters(eager) == plan.budget
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)  # fullgraph: a graph break is an error
    x = CASES[name].inputs()
    modes = (True, False) if CASES[name].batchnorm else (True,)
    kinds = {layer.generator for layer in plan.layers}
    assert {"hash", "emb"} & kinds or strategy == "hash", kinds
    for training in modes:
        eager.train(training), twin.train(training)
        if not training:  # inference: forward only
            with torch.no_grad():
                torch.testing.assert_close(compiled(*x), eager(*x), rtol=1e-4, atol=1e-5)  # running statistics
            continue
        want, got = eager(*x), compiled(*x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        loss_of(want).backward()
        loss_of(got).backward()
        theirs = npas_parameters(eager)
        for key, param in npas_parameters(twin).items():
            assert param.grad is not None and param.grad.abs().sum() > 0, key
            torch.testing.assert_close(param.grad, theirs[key].grad, rtol=1e-4, atol=1e-5, msg=key)
        for (key, a), (_, b) in zip(sorted(eager.named_buffers()), sorted(twin.named_buffers()), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)  # running statistics updated
