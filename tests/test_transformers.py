"""Hugging Face transformers models, which torch.fx cannot trace, compiled to exact budgets.

Tiny configs with random weights (no downloads): BERT, GPT-2 with its tied LM head, a Llama
causal LM and a ViT classifier. torch.fx fails at each root (item assignment on a Proxy in
transformers' input-handling decorators, "co_varnames is too small" on the wrapped forwards), so
each compiles as one leaf whose parameters come from generator nodes. For every model, every
data-free strategy at budgets 0.1 and 2.0: exact count, the original's output type and keys, and
gradient in every bank; the identity plan gives the original outputs; keyword and non-tensor
inputs (``labels``, ``output_hidden_states``, ``return_dict``) pass through; the GPT-2 tie stays
one generated tensor; a user's model around BERT traces, with BERT as one leaf. ``torch.compile``
(``fullgraph=True``) of a compiled BERT matches eager (slow).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import LEARNED_NAMES, STRATEGY_NAMES
from models import assert_unchanged, snapshot
from structured import (
    assert_compiled_like,
    assert_gradient_reaches_every_bank,
    assert_learned_plan_reapplies,
    assert_same_outputs,
    assert_same_structure,
    call,
    compiled_case,
    identity_compile,
    output_loss,
)
from torch import nn

import npas_fx

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # tiny configs make it warn about token ids


# ---- tiny models --------------------------------------------------------------------------------
def _bert(layers: int = 2) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config)


def _gpt2(layers: int = 2) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=layers,
        n_head=2,
        n_positions=24,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _llama(layers: int = 2) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def _vit(layers: int = 2) -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    return transformers.ViTForImageClassification(config)


def _text(g: torch.Generator) -> dict[str, Any]:
    ids = torch.randint(0, 100, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # a padded sequence, so the mask matters
    return {"input_ids": ids, "attention_mask": mask}


@dataclass(frozen=True)
class HFCase:
    factory: Callable[[int], nn.Module]
    inputs: Callable[[torch.Generator], tuple | dict]
    output_type: str

    def build(self, layers: int = 2) -> nn.Module:
        torch.manual_seed(0)
        return self.factory(layers)

    def example(self, seed: int = 1) -> tuple | dict:
        return self.inputs(torch.Generator().manual_seed(seed))


CASES: dict[str, HFCase] = {
    "bert": HFCase(
        _bert,
        lambda g: {**_text(g), "token_type_ids": torch.randint(0, 2, (2, 7), generator=g)},
        "BaseModelOutputWithPoolingAndCrossAttentions",
    ),
    "gpt2": HFCase(_gpt2, _text, "CausalLMOutputWithCrossAttentions"),
    "llama": HFCase(
        _llama, lambda g: {**_text(g), "labels": torch.randint(0, 100, (2, 7), generator=g)}, "CausalLMOutputWithPast"
    ),
    "vit": HFCase(_vit, lambda g: (torch.randn(2, 3, 16, 16, generator=g),), "ImageClassifierOutput"),
}
NAMES = tuple(CASES)


@pytest.fixture(scope="module")
def compiled_cache() -> dict:
    return {}


def _compiled(cache: dict, name: str, strategy: str, budget: float) -> tuple[nn.Module, Any]:
    return compiled_case(cache, CASES, name, strategy, budget)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strategy", LEARNED_NAMES)
def test_learned_plans_name_the_final_models_parameters_and_reapply(compiled_cache, name, strategy):
    model, gm = _compiled(compiled_cache, name, strategy, 0.1)
    assert_learned_plan_reapplies(model, gm, CASES[name].example())


# ---- the sweep ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strategy", STRATEGY_NAMES + LEARNED_NAMES)
@pytest.mark.parametrize("budget", [0.1, 2.0])
def test_exact_budget_structure_and_gradients(compiled_cache, name, strategy, budget):
    model, gm = _compiled(compiled_cache, name, strategy, budget)
    # Every weight is generated: no dense parameter of 2+ dims is left outside the banks.
    assert not [n for n, p in gm.named_parameters() if p.dim() >= 2 and not n.startswith("npas.")]
    x = CASES[name].example()
    assert type(call(gm.eval(), x)).__name__ == CASES[name].output_type
    assert_compiled_like(model, gm, x, budget)


@pytest.mark.parametrize("name", NAMES)
def test_root_runs_as_one_leaf_and_the_plan_says_why(name):
    case = CASES[name]
    model = case.build()
    plan = npas_fx.plan_of(npas_fx.compile(model, 0.5, example_inputs=case.example()))
    assert [o.path for o in plan.opaque] == [""] and plan.traced == ()
    assert any(s in plan.opaque[0].reason for s in ("Proxy", "co_varnames")), plan.opaque[0].reason
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p.dim() >= 2}
    assert {a for layer in plan.layers for a in layer.aliases} == {f"model.{n}" for n in names}
    assert npas_fx.Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("name", NAMES)
def test_identity_plan_reproduces_the_model(name):
    case = CASES[name]
    model = case.build().eval()
    before = snapshot(model)
    gm = identity_compile(model, case.example()).eval()
    for seed in (1, 2):
        assert_same_outputs(call(gm, case.example(seed)), call(model, case.example(seed)))
    assert_unchanged(model, before)


def test_identity_by_shape_when_every_shape_is_distinct():
    # A one-layer GPT-2 has distinct weight shapes (wte 100x32, wpe 24x32, c_attn, attn c_proj 32x32,
    # c_fc, mlp c_proj),
    # so the plain API's identity plan, strategy "shape" at budget 1.0, copies every weight.
    model = _gpt2(layers=1).eval()
    x = _text(torch.Generator().manual_seed(1))
    gm = npas_fx.compile(model, 1.0, strategy="shape", example_inputs=x).eval()
    assert all(layer.copied for layer in npas_fx.plan_of(gm).layers)
    assert_same_outputs(gm(**x), model(**x))


class BertClassifier(nn.Module):
    """A user's model around a transformer: the root traces, the transformer is one leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = _bert()
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return self.head(out.last_hidden_state[:, 0])  # (B, 3) from the first token


def test_a_transformer_inside_a_traced_model_is_one_leaf():
    torch.manual_seed(0)
    model = BertClassifier().eval()
    x = _text(torch.Generator().manual_seed(1))
    gm = npas_fx.compile(model, 0.2, example_inputs=x, strategy="shape")  # "single" mixes the unused pooler
    plan = npas_fx.plan_of(gm)
    assert [o.path for o in plan.opaque] == ["bert"] and plan.traced == ("",)
    assert npas_fx.count_parameters(gm) == round(0.2 * npas_fx.count_parameters(model))
    assert plan.layer("head.weight").module == "head"  # names as in the model: the root is traced
    output_loss(gm.train()(**x)).backward()
    assert_gradient_reaches_every_bank(gm)
    identity = identity_compile(model, x).eval()
    assert_same_outputs(identity(**x), model(**x))
    assert_same_outputs(identity(x["input_ids"]), model(x["input_ids"]))


# ---- inputs, outputs, ties ----------------------------------------------------------------------
def test_keyword_and_non_tensor_inputs_pass_through():
    model = CASES["bert"].build().eval()
    x = CASES["bert"].example()
    gm = identity_compile(model, x).eval()
    for extra in ({"output_hidden_states": True}, {"output_attentions": True}, {"return_dict": False}):
        assert_same_outputs(gm(**x, **extra), model(**x, **extra))
    hidden = gm(**x, output_hidden_states=True).hidden_states
    assert len(hidden) == 3  # embeddings + 2 layers
    assert isinstance(gm(**x, return_dict=False), tuple)
    assert_same_outputs(gm(x["input_ids"]), model(x["input_ids"]))  # positional, mask left out


def test_labels_give_the_same_loss_and_train_the_banks():
    model = CASES["llama"].build().eval()
    x = CASES["llama"].example()
    gm = identity_compile(model, x).eval()
    assert torch.equal(gm(**x).loss, model(**x).loss)
    compact = npas_fx.compile(model, 0.25, example_inputs=x).train()
    compact(**x).loss.backward()
    assert_gradient_reaches_every_bank(compact)


def test_gpt2_tied_embedding_and_head_are_one_generated_tensor():
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight and model.config.tie_word_embeddings
    gm = npas_fx.compile(model, 0.5, example_inputs=_text(torch.Generator().manual_seed(1)))
    plan = npas_fx.plan_of(gm)
    tied = plan.layer("model.lm_head.weight")
    assert set(tied.aliases) == {"model.transformer.wte.weight", "model.lm_head.weight"}
    assert sum(layer.name == tied.name for layer in plan.layers) == 1
    assert plan.original_params == npas_fx.count_parameters(model)  # the tie counted once
    seen = {}
    hooks = [
        gm.get_submodule(path).register_forward_pre_hook(lambda m, a, path=path: seen.__setitem__(path, m.weight))
        for path in ("model.transformer.wte", "model.lm_head")
    ]
    gm(torch.randint(0, 100, (1, 4)))
    for hook in hooks:
        hook.remove()
    assert seen["model.transformer.wte"] is seen["model.lm_head"]


def test_compiled_transformer_round_trips_deepcopy_and_save():
    model = CASES["bert"].build()
    x = CASES["bert"].example()
    gm = npas_fx.compile(model, 0.3, strategy="random", example_inputs=x).eval()
    expected = gm(**x)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(gm), torch.load(buffer, weights_only=False)):
        assert_same_outputs(copied(**x), expected)
        assert npas_fx.count_parameters(copied) == npas_fx.count_parameters(gm)


def test_inputs_the_model_itself_rejects_are_a_user_error():
    model = CASES["bert"].build()
    with pytest.raises(ValueError, match="BertModel itself fails on `example_inputs`"):
        npas_fx.compile(model, 0.5, example_inputs={"input_ids": torch.full((1, 4), 1000)})  # vocab is 100


@pytest.mark.slow
def test_torch_compile_of_a_compiled_bert_matches_eager():
    model = CASES["bert"].build()
    x = CASES["bert"].example()
    gm = npas_fx.compile(model, 0.5, example_inputs=x).eval()
    expected = gm(**x)
    got = torch.compile(gm, fullgraph=True)(**x)  # functional_call of the root leaf: no graph break
    assert_same_structure(got, expected)
    assert torch.allclose(got.last_hidden_state, expected.last_hidden_state, atol=1e-5)
    assert torch.allclose(got.pooler_output, expected.pooler_output, atol=1e-5)
