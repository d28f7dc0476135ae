"""What keeps the learned searches' memory low: chunked SuperWeight windows, no copies of the weights
generators replace, gradients captured without the weights, nothing of a search phase kept past it.

Memory sizes are measured by ``benchmarks/search_memory.py``; these tests check the behaviour that
the savings rest on (equal results, storage shared or not, objects freed).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import npas_fx
from npas_fx import mix_kernels as kernels
from npas_fx.search import common, swn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def _batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(count)]


# ---- window_mix in chunks ---------------------------------------------------------------------------
# (source size, templates, block values, stride, index): overlapping windows (stride < span),
# disjoint ones (stride > span), a stride that does not divide the span, repeated and unsorted indices.
GEOMETRIES = [
    (400, 4, 6, 5, torch.arange(0, 70)),
    (400, 2, 6, 3, torch.tensor([0, 1, 2, 7, 8, 30, 31, 32, 100])),
    (400, 2, 5, 13, torch.arange(0, 29)),
    (400, 3, 4, 7, torch.tensor([3, 0, 5, 5, 1, 40, 2])),
]


@pytest.mark.parametrize(("size", "k", "m", "stride", "index"), GEOMETRIES)
def test_window_mix_chunks_give_the_unchunked_values_exactly(monkeypatch, size, k, m, stride, index):
    torch.manual_seed(0)
    source = torch.randn(size, requires_grad=True)
    mix = torch.randn(index.numel(), k, requires_grad=True)
    grad = torch.randn(index.numel(), m)

    def run() -> tuple[torch.Tensor, ...]:
        out = kernels.window_mix(source, mix, index, k * m, stride)
        return (out, *torch.autograd.grad(out, [source, mix], grad))

    whole = run()
    monkeypatch.setattr(kernels, "WINDOW_CHUNK", 2 * k * m)  # two SuperWeights per chunk
    chunked = run()
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)
    # The reference: gather every window, mix, differentiate with autograd.
    windows = source.unfold(0, k * m, stride).index_select(0, index).view(-1, k, m)
    reference = (mix.unsqueeze(2) * windows).sum(1)
    expected = (reference, *torch.autograd.grad(reference, [source, mix], grad))
    for a, b in zip(chunked, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_window_mix_chunked_gradients_check(monkeypatch):
    monkeypatch.setattr(kernels, "WINDOW_CHUNK", 24)  # two SuperWeights of 3 x 4 values per chunk
    source = torch.randn(60, dtype=torch.double, requires_grad=True)
    mix = torch.randn(7, 3, dtype=torch.double, requires_grad=True)
    index = torch.tensor([0, 1, 2, 4, 4, 6, 9])

    def f(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return kernels.window_mix(s, m, index, 12, 5)

    assert torch.autograd.gradcheck(f, (source, mix))
    assert torch.autograd.gradgradcheck(f, (source, mix))


# ---- search models ------------------------------------------------------------------------------------
def test_search_model_copy_shares_only_the_generated_weights():
    from npas_fx.passes.trace import trace

    traced = trace(_model())
    gm = traced.graph_module
    names = ["0.weight", "2.weight"]
    copied = common._copy_sharing(gm, set(names))
    for name, p in gm.named_parameters():
        q = copied.get_parameter(name)
        assert q is not p and torch.equal(q, p)
        assert (q.data_ptr() == p.data_ptr()) == (name in names), name


@pytest.mark.parametrize("strategy", ["swn", "ssn"])
def test_learned_search_leaves_the_input_model_untouched(strategy):
    model = _model()
    before = {k: (v.clone(), v._version) for k, v in model.state_dict().items()}
    options = {"grad_batches": 2, "refine_steps": 2} if strategy == "swn" else {}
    npas_fx.compile(model, 0.5, strategy=strategy, data=_batches(), loss_fn=F.cross_entropy, search_steps=3,
                    options=options)  # fmt: skip
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key][0]) and value._version == before[key][1], key


def test_weight_gradients_equal_the_gradients_of_the_weight_tensors():
    gm = npas_fx.compile(_model(), 0.5, strategy="superweight")
    batches = _batches(1)
    got = common.weight_gradients(gm, iter(batches), F.cross_entropy, 1)
    outputs = {}
    handles = [
        g.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
        for i, g in enumerate(gm.npas.generators[f"l{i}"] for i in range(len(gm.npas.generators)))
    ]
    loss = F.cross_entropy(gm(batches[0][0]), batches[0][1])
    for h in handles:
        h.remove()
    expected = torch.autograd.grad(loss, [outputs[i] for i in range(len(outputs))])
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_swn_frees_each_search_model_and_its_gradients_before_the_next_phase(monkeypatch):
    models: list[weakref.ref] = []
    gradients: list[weakref.ref] = []
    alive_at_refinement: list[int] = []
    build, gradient_pass, refine = swn.compile_search_model, swn.weight_gradients, swn._refine

    def spy_build(*args, **kwargs):
        gm, index = build(*args, **kwargs)
        models.append(weakref.ref(gm))
        return gm, index

    def spy_gradients(*args, **kwargs):
        grads = gradient_pass(*args, **kwargs)
        gradients.extend(weakref.ref(g) for g in grads)
        return grads

    def spy_refine(*args, **kwargs):
        alive_at_refinement.append(sum(r() is not None for r in [*models, *gradients]))
        return refine(*args, **kwargs)

    monkeypatch.setattr(swn, "compile_search_model", spy_build)
    monkeypatch.setattr(swn, "weight_gradients", spy_gradients)
    monkeypatch.setattr(swn, "_refine", spy_refine)
    gc.disable()  # only what the search frees itself counts, not a collection that happens to run
    try:
        gm = npas_fx.compile(_model(), 0.5, strategy="swn", data=_batches(), loss_fn=F.cross_entropy,
                             search_steps=3, options={"grad_batches": 2, "refine_steps": 2})  # fmt: skip
        alive_at_end = [r() is not None for r in [*models, *gradients]]
    finally:
        gc.enable()
    assert len(models) == 2 and gradients  # the refinement ran: two search models
    assert npas_fx.plan_of(gm).provenance["refinement"].get("skipped") is None
    assert alive_at_refinement == [0]
    assert not any(alive_at_end)
