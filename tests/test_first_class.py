"""A compiled model is a first-class model: weights outside forward, dense export, caching, HF tools.

* every generated layer's weight reads as its current generated tensor outside the compiled
  forward (traced leaves, opaque leaves, Hugging Face roots), differentiable to the banks;
* code that calls the wrapped model's own methods works: HF ``generate``, HF gradient
  checkpointing and ``torch.utils.checkpoint`` inside an untraceable block (same gradients as
  without), peft LoRA on ``gm.model`` and on ``gm``;
* ``npas_fx.materialize`` gives the original class with dense weights equal to the generated ones
  (ties kept) and the same outputs; it saves/loads with ``save_pretrained``, generates, traces
  with ``torch.jit.trace``, exports to ONNX and with ``torch.export``; ``gm.model.save_pretrained``
  writes the dense weights, never a checkpoint without them;
* eval-mode caching: one generation per weight, never stale (in-place bank edits, optimizer steps,
  ``load_state_dict``, ``train()``), ``npas_fx.cached`` with gradients;
* non-strict ``torch.export.export(gm, ...)``; the wrapper's signature mirrors the model's; the
  class name says it is compiled; no tensor of the original's dense weights stays reachable.
"""

from __future__ import annotations

import copy
import gc
import io
import tempfile
import types
from pathlib import Path

import pytest
import torch
from models import CASES
from structured import output_loss
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import npas_fx

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# ---- models -------------------------------------------------------------------------------------
def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=24, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _bert_classifier() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


class CheckpointedBlocks(nn.Module):
    """An untraceable model (data-dependent branch) whose blocks run under activation checkpointing."""

    def __init__(self, use_reentrant: bool = False) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor, checkpointed: bool = True) -> Tensor:
        if x.sum() > 1e9:  # data-dependent: the root runs as one leaf
            x = -x
        for block in self.blocks:
            x = x + (checkpoint(block, x, use_reentrant=self.use_reentrant) if checkpointed else block(x))
        return self.head(x)


def _ids(seed: int = 0, shape: tuple[int, int] = (2, 6)) -> Tensor:
    return torch.randint(1, 100, shape, generator=torch.Generator().manual_seed(seed))


def _bank_grads(gm: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in gm.npas.named_parameters() if p.grad is not None}


# ---- weights that exist -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "residual_cnn", "tied_weights", "mha_block"])
def test_weights_read_outside_forward_are_the_generated_ones(name):
    case = CASES[name]
    gm = npas_fx.compile(case.build(), 0.3)
    plan = npas_fx.plan_of(gm)
    for index, layer in enumerate(plan.layers):
        for alias in layer.aliases:
            owner, _, leaf = alias.rpartition(".")
            if not owner:
                continue
            weight = getattr(gm.get_submodule(owner), leaf)
            assert torch.equal(weight, gm.npas.generate(index))
    # differentiable: a loss on a weight read outside forward reaches its bank
    layer = plan.layers[0]
    owner, _, leaf = layer.aliases[-1].rpartition(".")
    getattr(gm.get_submodule(owner), leaf).square().sum().backward()
    assert gm.npas.groups[f"g{layer.group}"].bank.grad.abs().sum() > 0


def test_hugging_face_weights_read_outside_forward():
    gm = npas_fx.compile(_bert_classifier(), 0.2)
    query = gm.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, nn.Linear) and type(query).__name__ == "Linear"
    assert query.weight.shape == (32, 32) and query.weight.requires_grad
    assert "weight" not in dict(query.named_parameters())  # generated, not a parameter
    embeddings = gm.model.bert.embeddings.word_embeddings
    assert embeddings.weight.shape == (100, 32)


def test_generate_matches_the_materialized_model():
    gm = npas_fx.compile(_gpt2(), 0.3).eval()
    ids = _ids()
    out = gm.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    dense = npas_fx.materialize(gm)
    assert torch.equal(dense.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), out)
    assert out.shape == (2, 12)


def test_generate_at_the_identity_plan_matches_the_original():
    model = _gpt2().eval()
    layers = len(npas_fx.plan_of(npas_fx.compile(model, 1.0)).layers)
    gm = npas_fx.compile(model, 1.0, strategy="random", num_groups=layers).eval()
    ids = _ids(1)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(gm.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)


def test_hugging_face_gradient_checkpointing_gives_the_same_gradients():
    ids = _ids(2)
    grads = []
    for enable in (False, True):
        gm = npas_fx.compile(_gpt2(), 0.3, seed=1).train()
        gm.model.config.attn_pdrop = gm.model.config.resid_pdrop = gm.model.config.embd_pdrop = 0.0
        for module in gm.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if enable:
            gm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        gm(input_ids=ids, labels=ids).loss.backward()
        grads.append(_bank_grads(gm))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint_inside_an_untraceable_block_gives_the_same_gradients(use_reentrant):
    # The recomputation in backward runs after the compiled forward has unbound the weights: the
    # layers read them through their properties, from the banks.
    gm = npas_fx.compile(CheckpointedBlocks(use_reentrant), 0.3)
    assert "" in {o.path for o in npas_fx.plan_of(gm).opaque}
    x = torch.randn(5, 16, requires_grad=use_reentrant)  # reentrant checkpoints need an input that requires grad
    grads = []
    for checkpointed in (False, True):
        gm.zero_grad()
        output_loss(gm(x, checkpointed=checkpointed)).backward()
        grads.append(_bank_grads(gm))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(gm.npas.parameters()))
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrap", ["model", "gm"])
def test_peft_lora_trains(wrap):
    peft = pytest.importorskip("peft")
    gm = npas_fx.compile(_bert_classifier(), 0.3)
    target = gm.model if wrap == "model" else gm
    lora = peft.get_peft_model(target, peft.LoraConfig(target_modules=["query", "value"], r=4))
    lora.eval()  # no dropout: the loss may only move by the adapters' steps
    ids, labels = _ids(3, (4, 7)), torch.tensor([0, 1, 2, 1])
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all(p.numel() < 32 * 32 for p in trainable)  # only the adapters
    optimizer = torch.optim.Adam(trainable, lr=5e-2)
    before = lora(input_ids=ids, labels=labels).loss
    for _ in range(5):
        optimizer.zero_grad()
        loss = lora(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None for p in trainable)
    assert float(lora(input_ids=ids, labels=labels).loss) < float(before)


# ---- materialize --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "residual_cnn", "tied_weights", "direct_params", "frozen_buffers"])
def test_materialize_gives_the_original_class_with_equal_outputs(name):
    case = CASES[name]
    model = case.build()
    gm = npas_fx.compile(model, 0.3).eval()
    dense = npas_fx.materialize(gm)
    assert type(dense) is type(model)
    assert not any(npas_fx.runtime.is_generated(m) for m in dense.modules())
    assert dict(dense.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert {k: v.shape for k, v in dense.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert not dense.training
    x = case.inputs()
    torch.testing.assert_close(dense(*x), gm(*x), rtol=1e-5, atol=1e-6)
    # the compiled model is untouched and still trains from its banks
    assert npas_fx.count_parameters(gm) == npas_fx.plan_of(gm).budget


def test_materialize_keeps_ties_and_the_hugging_face_class(tmp_path: Path):
    gm = npas_fx.compile(_gpt2(), 0.3).eval()
    dense = npas_fx.materialize(gm)
    assert type(dense) is transformers.GPT2LMHeadModel and dense.config.n_embd == 32
    assert dense.lm_head.weight is dense.transformer.wte.weight
    ids = _ids(4)
    with torch.no_grad():
        expected = gm(input_ids=ids).logits
        torch.testing.assert_close(dense(input_ids=ids).logits, expected)
    dense.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("owner", ["model", "model.transformer"])
def test_save_pretrained_of_the_wrapped_model_writes_the_dense_weights(tmp_path: Path, owner):
    gm = npas_fx.compile(_gpt2(), 0.3).eval()
    module = gm.get_submodule(owner)
    module.save_pretrained(tmp_path)
    cls = transformers.GPT2LMHeadModel if owner == "model" else transformers.GPT2Model
    loaded = cls.from_pretrained(tmp_path).eval()
    ids = _ids(5)
    with torch.no_grad():
        expected = module(input_ids=ids)[0]
        torch.testing.assert_close(loaded(input_ids=ids)[0], expected)
    safetensors = pytest.importorskip("safetensors.torch")
    saved = safetensors.load_file(str(tmp_path / "model.safetensors"))
    assert sum(t.dim() == 2 for t in saved.values()) >= 6  # the weight matrices are there
    assert npas_fx.runtime.is_generated(gm.model.transformer.h[0].attn.c_attn)  # gm untouched


def test_materialized_models_trace_and_export():
    model = CASES["residual_cnn"].build()
    gm = npas_fx.compile(model, 0.3).eval()
    dense = npas_fx.materialize(gm)
    (x,) = CASES["residual_cnn"].inputs()
    expected = gm(x)
    torch.testing.assert_close(torch.jit.trace(dense, (x,))(x), expected)
    torch.testing.assert_close(torch.export.export(dense, (x,)).module()(x), expected)
    pytest.importorskip("onnx")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.onnx"
        torch.onnx.export(dense, (x,), str(path), dynamo=False)
        assert path.stat().st_size > 0


@pytest.mark.parametrize("name", ["mlp", "residual_cnn"])
def test_non_strict_export_of_the_compiled_model(name):
    case = CASES[name]
    gm = npas_fx.compile(case.build(), 0.3).eval()
    x = case.inputs()
    exported = torch.export.export(gm, x, strict=False)
    torch.testing.assert_close(exported.module()(*x), gm(*x))


def test_non_strict_export_of_a_wrapped_hugging_face_model():
    gm = npas_fx.compile(_bert_classifier(), 0.3).eval()
    ids = _ids(6, (2, 7))
    exported = torch.export.export(gm, (), {"input_ids": ids}, strict=False)
    torch.testing.assert_close(exported.module()(input_ids=ids).logits, gm(input_ids=ids).logits)


# ---- caching ------------------------------------------------------------------------------------
def _counting(gm: nn.Module) -> list[int]:
    calls = [0]
    for generator in gm.npas.generators.values():
        generator.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_eval_without_grad_generates_each_weight_once(context):
    case = CASES["mlp"]
    gm = npas_fx.compile(case.build(), 0.3).eval()
    calls = _counting(gm)
    x = case.inputs()
    manager = torch.no_grad if context == "no_grad" else torch.inference_mode
    with manager():
        first = gm(*x)
        after_one = calls[0]
        second = gm(*x)
    assert after_one == len(npas_fx.plan_of(gm).layers) and calls[0] == after_one
    assert torch.equal(first, second)
    gm.train()  # training mode: every forward generates
    with manager():
        gm(*x)
    assert calls[0] == 2 * after_one


@pytest.mark.parametrize("change", ["in_place", "optimizer", "load_state_dict", "to_dtype"])
def test_cached_weights_are_never_stale(change):
    case = CASES["mlp"]
    gm = npas_fx.compile(case.build(), 0.3).eval()
    x = case.inputs()
    with torch.no_grad():
        before = gm(*x)
    bank = gm.npas.groups.g0.bank
    if change == "in_place":
        with torch.no_grad():
            bank.mul_(2.0)
    elif change == "optimizer":
        gm.train()
        output_loss(gm(*x)).backward()
        torch.optim.SGD(gm.parameters(), lr=1.0).step()
        gm.eval()
    elif change == "load_state_dict":
        state = {k: v.clone() for k, v in gm.state_dict().items()}
        state["npas.groups.g0.bank"] = torch.randn_like(bank)
        gm.load_state_dict(state)
    else:
        gm.to(torch.float64)
        x = tuple(t.double() for t in x)
    with torch.no_grad():
        after = gm(*x)
    fresh = copy.deepcopy(gm).train()  # a model that has never cached anything
    with torch.no_grad():
        expected = fresh.eval()(*x) if change != "to_dtype" else fresh(*x)
    assert not torch.equal(after.to(before.dtype), before) or change == "to_dtype"
    torch.testing.assert_close(after, expected)


def test_explicit_cache_with_gradients():
    case = CASES["mlp"]
    gm = npas_fx.compile(case.build(), 0.3).train()
    calls = _counting(gm)
    x = case.inputs()
    with npas_fx.cached(gm):
        loss = output_loss(gm(*x)) + output_loss(gm(*x))
    loss.backward()
    assert calls[0] == len(npas_fx.plan_of(gm).layers)
    assert gm.npas.groups.g0.bank.grad.abs().sum() > 0
    output_loss(gm(*x))  # outside the block: generated again
    assert calls[0] == 2 * len(npas_fx.plan_of(gm).layers)


def test_caches_are_not_saved_or_copied():
    case = CASES["mlp"]
    gm = npas_fx.compile(case.build(), 0.3).eval()

    def saved_size() -> int:
        buffer = io.BytesIO()
        torch.save(gm, buffer)
        return buffer.tell()

    saved_size()  # the first save records the graph's code in the module: sizes settle after it
    empty = saved_size()
    with torch.no_grad():
        gm(*case.inputs())
    assert saved_size() == empty
    assert not any("_npas_cache" in m.__dict__ for m in copy.deepcopy(gm).modules())


# ---- Hugging Face workflow ----------------------------------------------------------------------
def test_wrapper_signature_and_name():
    model = _bert_classifier()
    gm = npas_fx.compile(model, 0.3)
    import inspect

    names = list(inspect.signature(gm.forward).parameters)
    assert names == list(inspect.signature(model.forward).parameters)
    assert "labels" in names and "input_ids" in names
    assert type(gm).__name__ != type(model).__name__ and "BertForSequenceClassification" in type(gm).__name__


def test_trainer_with_defaults_trains_evaluates_and_reloads(tmp_path: Path):
    pytest.importorskip("accelerate")
    datasets_like = [
        {"input_ids": _ids(i, (1, 7))[0], "attention_mask": torch.ones(7, dtype=torch.long), "labels": i % 3}
        for i in range(8)
    ]
    gm = npas_fx.compile(_bert_classifier(), 0.3)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], save_strategy="no"
    )
    trainer = transformers.Trainer(model=gm, args=args, train_dataset=datasets_like, eval_dataset=datasets_like)
    before = {k: v.clone() for k, v in gm.npas.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in gm.npas.state_dict().items())
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0
    trainer.save_model(str(tmp_path / "final"))
    npas_fx.plan_of(gm).to_json(tmp_path / "final" / "npas_plan.json")
    reloaded = npas_fx.load(_bert_classifier(), tmp_path / "final")
    batch = {"input_ids": _ids(9, (2, 7))}
    gm.cpu().eval()  # the Trainer moves the model to a GPU when there is one
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, gm(**batch).logits)


# ---- memory hygiene -----------------------------------------------------------------------------
def _reachable_tensors(module: nn.Module) -> list[Tensor]:
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack: list[object] = [module]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            found[id(obj)] = obj
            continue
        if isinstance(obj, (str, bytes, int, float, type, types.ModuleType, types.FunctionType)) or obj is None:
            continue  # code and modules lead to the whole process, not to what the model holds
        stack.extend(gc.get_referents(obj))
        if hasattr(obj, "__dict__"):  # instance dicts are not always gc referents (3.11 managed dicts)
            stack.append(vars(obj))
    return list(found.values())


@pytest.mark.parametrize(
    "build", [lambda: nn.LSTM(32, 32, 2), lambda: nn.GRU(16, 24), lambda: CASES["residual_cnn"].build()]
)
def test_no_dense_original_weight_stays_reachable(build):
    # No tensor of a generated layer's shape is reachable from the compiled model (RNNs keep a
    # second list of their weights), other than npas_fx's own parameters.
    model = build()
    gm = npas_fx.compile(model, 0.2)
    shapes = {layer.shape for layer in npas_fx.plan_of(gm).layers}
    own = {id(p) for p in gm.npas.parameters()}
    held = [tuple(t.shape) for t in _reachable_tensors(gm) if id(t) not in own and tuple(t.shape) in shapes]
    assert not held
    # and an RNN still runs, with gradients reaching its banks
    if isinstance(model, nn.RNNBase):
        out, _ = gm(torch.randn(3, 2, model.input_size))
        out.sum().backward()
        assert all(p.grad is not None for p in gm.npas.parameters())


# ---- fast evaluation (the dense runner) ---------------------------------------------------------
def _graph_output(gm: nn.Module, *x: Tensor) -> Tensor:
    with npas_fx.cached(gm), torch.no_grad():  # inside cached() the compiled graph runs
        return gm(*x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_without_grad_runs_the_dense_runner_with_equal_outputs(name):
    from npas_fx import inference

    case = CASES[name]
    gm = npas_fx.compile(case.build(), 0.5).eval()
    x = case.inputs()
    with torch.no_grad():
        fast = gm(*x)
    assert inference._RUNNERS.get(gm.npas) is not None  # the runner served the call
    torch.testing.assert_close(fast, _graph_output(gm, *x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", ["bank", "kept_parameter", "buffer", "submodule", "graph"])
def test_the_runner_follows_every_change(change):
    case = CASES["residual_cnn"]
    gm = npas_fx.compile(case.build(), 0.5).eval()
    (x,) = case.inputs()
    with torch.no_grad():
        before = gm(x)
        if change == "bank":
            gm.npas.groups.g0.bank.add_(0.5)
        elif change == "kept_parameter":
            gm.head.bias = nn.Parameter(gm.head.bias + 1.0)
        elif change == "buffer":
            gm.bn1.running_mean = gm.bn1.running_mean + 1.0  # a replaced buffer tensor
        elif change == "submodule":
            gm.drop = nn.Identity()
            gm.bn2 = nn.Identity()
        else:  # a user's fx pass on the compiled graph: the output doubled
            output = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(output):
                doubled = gm.graph.call_function(torch.mul, (output.args[0], 2.0))
            output.args = (doubled,)
            gm.recompile()
        after = gm(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, _graph_output(gm, x), rtol=1e-5, atol=1e-6)


def test_the_runner_is_not_used_with_hooks_gradients_or_training():
    case = CASES["mlp"]
    gm = npas_fx.compile(case.build(), 0.5).eval()
    x = case.inputs()
    seen = []
    handle = gm.register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        gm(*x)
    assert seen == [1]
    handle.remove()
    out = gm(*x)  # gradients enabled: the graph, differentiable to the banks
    out.sum().backward()
    assert gm.npas.groups.g0.bank.grad is not None
    copied = copy.deepcopy(gm)
    assert type(type(copied).__dict__["_wrapped_call"]).__name__ == "_FastEvalCall"
    with torch.no_grad():
        torch.testing.assert_close(copied(*x), gm(*x))
