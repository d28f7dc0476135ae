"""Compiled models on a CUDA device: placement, numbers equal to CPU, training, caches, torch.compile.

Skipped where no GPU is present (the project's CI machine has none); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``. What must hold on a GPU:

* every parameter, buffer and generator index of the compiled model lives on the model's device and
  keeps its dtype (float32 and bfloat16), and the count is exact;
* the same plan gives the same outputs and bank gradients on CUDA as on CPU (hash indices, tiles and
  masks are computed identically on both devices), and the identity plan gives the original's;
* gradients reach every bank; recompute gives the same gradients as keeping the weights;
* cached evaluation, weights read outside forward, ``materialize``, ``save``/``load`` and
  ``init="fit"`` work on the device; ``torch.compile`` (inductor, Triton kernels) matches eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASE_NAMES, CASES, DISTINCT_SHAPE_CASES, loss_of, npas_parameters
from structured import assert_gradient_reaches_every_bank, identity_compile, search_arguments

import npas_fx

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_precision():
    """TF32 convolutions and matmuls differ from CPU float32 by ~1e-3: compare in full precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


STRATEGIES = ("shape", "single", "random", "hash", "ssn", "swn")


def _inputs(name: str, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in CASES[name].inputs())


def _deterministic(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # train-mode outputs must be comparable across devices
        elif isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0  # a float, not a Dropout module
    return model


def _tensors_of(gm: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return [(name, t) for name, t in named if t is not None]


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_plan_same_numbers_on_cuda_and_cpu(name, strategy):
    model = _deterministic(CASES[name].build())
    example = CASES[name].inputs()
    extra = search_arguments(strategy, example)
    cpu = npas_fx.compile(model, 0.4, strategy=strategy, seed=3, example_inputs=example, **extra)
    plan = npas_fx.plan_of(cpu)
    gpu = npas_fx.compile(copy.deepcopy(model).to(CUDA), plan=plan, example_inputs=_inputs(name, CUDA))
    gpu.load_state_dict(cpu.state_dict())
    assert npas_fx.count_parameters(gpu) == npas_fx.count_parameters(cpu) == plan.budget
    for tensor_name, tensor in _tensors_of(gpu):
        assert tensor.device.type == "cuda", f"{tensor_name} is on {tensor.device}"
    for module in (cpu, gpu):
        module.train()
        module.zero_grad()
    want, got = cpu(*example), gpu(*_inputs(name, CUDA))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    loss_of(want).backward()
    loss_of(got.cpu()).backward()
    assert_gradient_reaches_every_bank(gpu)
    for key, p in npas_parameters(cpu).items():
        torch.testing.assert_close(npas_parameters(gpu)[key].grad.cpu(), p.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", DISTINCT_SHAPE_CASES)
def test_identity_plan_on_cuda_equals_the_original(name):
    model = _deterministic(CASES[name].build()).to(CUDA).eval()
    gm = identity_compile(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(*_inputs(name, CUDA)), model(*_inputs(name, CUDA)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["shape", "hash"])
def test_dtype_and_device_are_kept_and_training_works(dtype, strategy):
    model = _deterministic(CASES["attention_block"].build()).to(CUDA, dtype)
    gm = npas_fx.compile(model, 0.3, strategy=strategy)
    for tensor_name, tensor in _tensors_of(gm):
        assert tensor.device.type == "cuda", tensor_name
        if tensor.is_floating_point():
            assert tensor.dtype == dtype, (tensor_name, tensor.dtype)
    x = _inputs("attention_block", CUDA)[0].to(dtype)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = gm(x).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("strategy", ["shape", "hash"])
def test_recompute_gives_the_same_gradients_on_cuda(strategy):
    model = _deterministic(CASES["transformer_layer"].build()).to(CUDA)
    x = _inputs("transformer_layer", CUDA)
    grads = []
    for recompute in (False, True):
        gm = npas_fx.compile(model, 0.2, strategy=strategy, seed=1, recompute=recompute)
        loss_of(gm(*x)).backward()
        grads.append({k: p.grad for k, p in npas_parameters(gm).items()})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad)


def test_cached_eval_weights_outside_forward_materialize_and_save_load(tmp_path):
    model = CASES["mlp"].build().to(CUDA)
    x = _inputs("mlp", CUDA)
    gm = npas_fx.compile(model, 0.3, strategy="hash").eval()
    with torch.no_grad():
        first, again = gm(*x), gm(*x)  # the second call reads the eval cache
        torch.testing.assert_close(again, first)
        weight = gm.get_submodule(npas_fx.plan_of(gm).layers[0].module).weight
        assert weight.device.type == "cuda"
        dense = npas_fx.materialize(gm)
        assert all(p.device.type == "cuda" for p in dense.parameters())
        torch.testing.assert_close(dense(*x), first)
    npas_fx.save(gm, tmp_path)
    loaded = npas_fx.load(CASES["mlp"].build().to(CUDA), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), first)


def test_fit_init_on_cuda_is_exact_at_the_identity_plan():
    model = CASES["attention_block"].build().to(CUDA).eval()
    gm = npas_fx.compile(model, 1.0, init="fit").eval()
    with torch.no_grad():
        x = _inputs("attention_block", CUDA)
        torch.testing.assert_close(gm(*x), model(*x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["shape", "hash"])
def test_torch_compile_on_cuda_matches_eager(strategy):
    torch._dynamo.reset()
    eager = npas_fx.compile(_deterministic(CASES["attention_block"].build()).to(CUDA), 0.3, strategy=strategy)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    x = _inputs("attention_block", CUDA)
    want, got = eager(*x), compiled(*x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    loss_of(want).backward()
    loss_of(got).backward()
    for key, p in npas_parameters(eager).items():
        torch.testing.assert_close(npas_parameters(twin)[key].grad, p.grad, rtol=1e-3, atol=1e-5)


def test_hugging_face_bert_on_cuda():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).to(CUDA)
    batch = {"input_ids": torch.randint(0, 99, (2, 7), device=CUDA), "labels": torch.tensor([0, 1], device=CUDA)}
    gm = npas_fx.compile(model, 0.25, example_inputs=batch)
    assert npas_fx.count_parameters(gm) == round(0.25 * npas_fx.count_parameters(model))
    gm(**batch).loss.backward()
    assert_gradient_reaches_every_bank(gm)
