"""Recompute: generated weights are remade in backward, so what autograd keeps follows the budget.

* bytes kept for backward (every storage a saved tensor refers to, parameters included, counted
  once, through an outer ``saved_tensors_hooks``): below the original's at budget 0.1 on
  weight-dominated models (traced leaves, an opaque root, a Hugging Face root), above it without
  recompute; no saved storage as large as a generated weight;
* gradients equal with recompute on and off, across strategies and generators, reaching every bank;
  ``create_graph`` backward (a gradient penalty), activation checkpointing around the model;
* a bank changed in place between forward and backward raises (naming the fix);
* eval / ``no_grad`` outputs and caching unchanged; hooks never leak (errors included); the
  option survives deepcopy and pickling, switches with ``set_recompute``, is validated.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from models import CASES, loss_of
from structured import assert_gradient_reaches_every_bank, output_loss
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import npas_fx
from npas_fx.recompute import AUTO_MIN_NUMEL, RecomputeError

top_hooks = torch._C._autograd._top_saved_tensors_default_hooks


# ---- models -------------------------------------------------------------------------------------
class Block(nn.Module):
    """A pre-norm transformer block: attention + MLP, weights much larger than a small batch."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.down(torch.relu(self.up(self.norm2(x))))


class WeightDominated(nn.Module):
    """Two blocks and a head; ``untraceable=True`` adds a data-dependent branch (root runs as a leaf)."""

    def __init__(self, dim: int = 64, untraceable: bool = False) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.blocks = nn.ModuleList(Block(dim) for _ in range(2))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        if self.untraceable and x.sum() > 1e9:
            x = -x
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=2, n_positions=16, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(config)


def _inputs(name: str) -> dict | tuple:
    if name == "gpt2":
        ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids}
    return (torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0)),)


def _model(name: str) -> nn.Module:
    if name == "gpt2":
        return _gpt2()
    torch.manual_seed(0)
    return WeightDominated(untraceable=name == "opaque_root")


def _call(model: nn.Module, inputs: dict | tuple) -> Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return output_loss(out)


def saved_bytes(model: nn.Module, inputs: dict | tuple) -> tuple[int, int]:
    """(total, largest) bytes of the storages autograd keeps for backward after one forward."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _call(model, inputs)
    loss.backward()
    return sum(storages.values()), max(storages.values())


# ---- bytes kept for backward --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["traced", "opaque_root", "gpt2"])
def test_saved_bytes_with_recompute_are_below_the_original(name):
    model, inputs = _model(name), _inputs(name)
    original, _ = saved_bytes(model, inputs)
    on = npas_fx.compile(model, 0.1, recompute=True)
    off = npas_fx.compile(model, 0.1, recompute=False)
    if name != "traced":
        assert "" in {o.path for o in npas_fx.plan_of(on).opaque}  # the root runs as one leaf
    kept_on, largest_on = saved_bytes(on, inputs)
    kept_off, _ = saved_bytes(off, inputs)
    assert kept_off >= original  # every generated weight kept, as the original keeps its own
    assert kept_on < 0.5 * original
    smallest_weight = min(layer.numel for layer in npas_fx.plan_of(on).layers) * 4
    banks = max(p.numel() * 4 for p in on.npas.parameters())
    assert largest_on <= max(banks, smallest_weight // 2)  # no generated weight is kept


def test_set_recompute_switches_it_off_and_on():
    model, inputs = _model("traced"), _inputs("traced")
    gm = npas_fx.compile(model, 0.1, recompute=True)
    assert npas_fx.recompute_enabled(gm)
    on, _ = saved_bytes(gm, inputs)
    off, _ = saved_bytes(npas_fx.set_recompute(gm, False), inputs)
    assert not npas_fx.recompute_enabled(gm) and off > 2 * on
    assert saved_bytes(npas_fx.set_recompute(gm, True), inputs)[0] == on
    with pytest.raises(TypeError, match="`enabled`"):
        npas_fx.set_recompute(gm, "yes")
    with pytest.raises(TypeError, match="`min_numel`"):
        npas_fx.set_recompute(gm, True, min_numel=-1)
    with pytest.raises(ValueError, match="not a model compiled"):
        npas_fx.set_recompute(model)


# ---- same gradients -----------------------------------------------------------------------------
GRADIENT_CASES = [
    ("mlp", "shape", npas_fx.GeneratorConfig(), 0.3),
    ("mlp", "hash", npas_fx.GeneratorConfig(hash_chunk=4), 0.3),
    ("residual_cnn", "random", npas_fx.GeneratorConfig(downsample="emb", upsample="mask", embedding_dim=4), 0.6),
    ("residual_cnn", "superweight", npas_fx.GeneratorConfig(), 0.5),
    ("mha_block", "single", npas_fx.GeneratorConfig(upsample="interpolate"), 0.4),
    ("attention_block", "superweight", npas_fx.GeneratorConfig(), 2.0),
    ("tied_weights", "shape", npas_fx.GeneratorConfig(), 0.5),
    ("transformer_layer", "shape", npas_fx.GeneratorConfig(), 3.0),
    ("embedding_layernorm", "hash", npas_fx.GeneratorConfig(hash_chunk=1), 0.2),
]


def _grads(gm: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad for n, p in gm.named_parameters()}


@pytest.mark.parametrize(
    ("name", "strategy", "config", "budget"),
    GRADIENT_CASES,
    ids=[f"{n}-{s}-{c.downsample}-{c.upsample}-{b}" for n, s, c, b in GRADIENT_CASES],
)
def test_gradients_are_the_same_with_and_without_recompute(name, strategy, config, budget):
    case = CASES[name]
    model = case.build()
    if case.dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    results = []
    for recompute in (False, True):
        gm = npas_fx.compile(model, budget, strategy=strategy, generators=config, seed=1, recompute=recompute)
        torch.manual_seed(2)  # the same dropout masks (attention dropout has no module to switch off)
        out = gm(*case.inputs())
        loss_of(out).backward()
        results.append((out.detach(), _grads(gm), gm))
    (out_off, grads_off, _), (out_on, grads_on, gm_on) = results
    assert torch.equal(out_on, out_off)
    assert grads_on.keys() == grads_off.keys()
    for key in grads_off:
        torch.testing.assert_close(grads_on[key], grads_off[key], rtol=1e-5, atol=1e-6)
    assert_gradient_reaches_every_bank(gm_on)


@pytest.mark.parametrize("name", ["opaque_root", "gpt2"])
def test_gradients_are_the_same_through_opaque_and_hugging_face_roots(name):
    model, inputs = _model(name), _inputs(name)
    grads = []
    for recompute in (False, True):
        gm = npas_fx.compile(model, 0.1, recompute=recompute)
        _call(gm, inputs).backward()
        grads.append(_grads(gm))
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-6)


def test_double_backward_differentiates_the_regenerated_weights():
    # A gradient penalty: backward with create_graph must regenerate weights with their graph.
    # (CPU attention has no double backward: an MLP.)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))
    (x,) = _inputs("traced")
    grads = []
    for recompute in (False, True):
        gm = npas_fx.compile(model, 0.1, recompute=recompute)
        x_grad = x.flatten(0, 1).clone().requires_grad_()
        (first,) = torch.autograd.grad(gm(x_grad).square().sum(), x_grad, create_graph=True)
        first.square().sum().backward()
        grads.append(_grads(gm))
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_around_the_compiled_model_gives_the_same_gradients(use_reentrant):
    model, (x,) = _model("traced"), _inputs("traced")
    x = x.requires_grad_(use_reentrant)
    grads = []
    for checkpointed in (False, True):
        gm = npas_fx.compile(model, 0.1, recompute=True)
        out = checkpoint(gm, x, use_reentrant=use_reentrant) if checkpointed else gm(x)
        out.square().sum().backward()
        grads.append(_grads(gm))
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-6)


def test_outer_saved_tensor_hooks_still_see_the_activations():
    # save_on_cpu and friends wrap the model in their own hooks: recompute hands them every
    # tensor that is not a generated weight, and gets it back from them in backward.
    model, (x,) = _model("traced"), _inputs("traced")
    gm = npas_fx.compile(model, 0.1, recompute=True)
    packed, unpacked = [], []

    def pack(tensor: Tensor) -> tuple[str, Tensor]:
        packed.append(tuple(tensor.shape))
        return ("mine", tensor)

    def unpack(box: tuple[str, Tensor]) -> Tensor:
        unpacked.append(box[0])
        return box[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = gm(x).square().sum()
    loss.backward()
    assert packed and unpacked == ["mine"] * len(unpacked) and len(unpacked) >= len(packed) // 2
    # no generated weight, nor its transpose; a slice at gain 1 is a view of its bank (kept for free, not recorded)
    layers = npas_fx.plan_of(gm).layers
    weights = {tuple(layer.shape) for layer in layers if not (layer.generator == "slice" and layer.gain == 1.0)}
    assert not weights & ({s for s in packed} | {s[::-1] for s in packed})
    assert top_hooks(True) is None


# ---- refusing to recompute from changed banks ---------------------------------------------------
@pytest.mark.parametrize("change", ["in_place", "optimizer_step"])
def test_a_bank_changed_between_forward_and_backward_raises(change):
    model, (x,) = _model("traced"), _inputs("traced")
    gm = npas_fx.compile(model, 0.1, recompute=True)
    loss = gm(x).square().sum()
    if change == "in_place":
        with torch.no_grad():
            gm.npas.groups.g0.bank.mul_(2)
    else:
        for p in gm.parameters():
            p.grad = torch.ones_like(p)
        torch.optim.SGD(gm.parameters(), lr=0.1).step()
    with pytest.raises(RecomputeError, match="changed in place since the forward.*recompute=False"):
        loss.backward()


# ---- what recompute leaves alone ----------------------------------------------------------------
def test_eval_and_no_grad_are_unchanged_and_cached():
    model, (x,) = _model("traced"), _inputs("traced")
    on, off = npas_fx.compile(model, 0.1).eval(), npas_fx.compile(model, 0.1, recompute=False).eval()
    with torch.no_grad():
        first, again = on(x), on(x)
        assert torch.equal(first, off(x)) and torch.equal(first, again)
    cached = [m for m in on.npas.generators.values() if "_npas_cache" in m.__dict__]
    assert len(cached) == len(npas_fx.plan_of(on).layers)  # generated once, reused
    with torch.inference_mode():
        assert torch.equal(on(x), first)
    assert top_hooks(True) is None


def test_hooks_never_leak_when_the_forward_raises():
    gm = npas_fx.compile(_model("traced"), 0.1, recompute=True)
    with pytest.raises(RuntimeError):
        gm(torch.randn(1, 4, 7))  # wrong width
    assert top_hooks(True) is None
    out = gm(*_inputs("traced"))  # and the next forward still works
    out.sum().backward()


class LargeAndSmall(nn.Module):
    """One weight of exactly AUTO_MIN_NUMEL values, one far below it."""

    def __init__(self) -> None:
        super().__init__()
        self.large = nn.Linear(512, 512)  # 2**18 weights
        self.small = nn.Linear(512, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.small(torch.tanh(self.large(x)))


@pytest.mark.parametrize("copied", ["as compiled", "deepcopy", "torch.save"])
def test_the_default_regenerates_large_weights_and_keeps_small_ones(copied):
    torch.manual_seed(0)
    model, x = LargeAndSmall(), (torch.randn(2, 512, requires_grad=True),)  # so linear keeps its weight
    default = npas_fx.compile(model, 0.1, strategy="shape")
    if copied == "deepcopy":
        default = copy.deepcopy(default)
    elif copied == "torch.save":
        buffer = io.BytesIO()
        torch.save(default, buffer)
        default = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    every = npas_fx.compile(model, 0.1, strategy="shape", recompute=True)
    keep = npas_fx.compile(model, 0.1, strategy="shape", recompute=False)
    small, large = 16 * 512 * 4, 512 * 512 * 4
    assert AUTO_MIN_NUMEL == 512 * 512
    kept = {name: saved_bytes(gm, x) for name, gm in [("default", default), ("every", every), ("keep", keep)]}
    assert kept["keep"][1] >= large  # recompute off: the large generated weight is kept
    assert kept["default"][1] < large  # the default remakes it ...
    assert kept["default"][0] >= kept["every"][0] + small  # ... and keeps the small one
    banks = max(p.numel() * 4 for p in every.npas.parameters())
    assert kept["every"][1] <= banks  # recompute=True remakes every generated weight: only banks are kept


def test_the_option_survives_copies_and_is_validated():
    gm = npas_fx.compile(_model("traced"), 0.1, recompute=True)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for other in (copy.deepcopy(gm), loaded):
        assert npas_fx.recompute_enabled(other)
        assert saved_bytes(other, _inputs("traced"))[0] == saved_bytes(gm, _inputs("traced"))[0]
    assert not npas_fx.recompute_enabled(copy.deepcopy(npas_fx.set_recompute(gm, False)))
    with pytest.raises(TypeError, match="`recompute` should be True, False or None"):
        npas_fx.compile(_model("traced"), 0.1, recompute="yes")


@pytest.mark.parametrize(("budget", "expected"), [(0.1, True), (0.99, True), (1.0, False), (4.0, False)])
def test_recompute_is_on_by_default_below_the_original_size(budget, expected):
    model = CASES["mlp"].build()
    assert npas_fx.recompute_enabled(npas_fx.compile(model, budget)) is expected
    assert npas_fx.recompute_enabled(npas_fx.compile(model, budget, recompute=not expected)) is not expected


class EditsItsWeight(nn.Module):
    """A forward that scales a weight in place before using it (the regenerated one would differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: Tensor) -> Tensor:
        w = self.a.weight
        w.mul_(2)
        return nn.functional.linear(x, w) + self.b(x)


def test_a_weight_edited_in_place_in_the_forward_is_kept_not_regenerated():
    torch.manual_seed(0)
    model = EditsItsWeight()
    grads = []
    for recompute in (False, True):
        gm = npas_fx.compile(model, 0.3, recompute=recompute)
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
        gm(x).square().sum().backward()
        grads.append({**_grads(gm), "x": x.grad})  # the input's gradient reads the weight
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key])


# ---- generators keep nothing of the weight's size ----------------------------------------------
@pytest.mark.parametrize(("strategy", "budget"), [("superweight", 2.0), ("superweight", 0.5), ("hash", 0.3)])
def test_generators_keep_no_tensor_of_their_weights_size(strategy, budget):
    gm = npas_fx.compile(CASES["attention_block"].build(), budget, strategy=strategy)
    resident = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}
    plan = npas_fx.plan_of(gm)
    for index, layer in enumerate(plan.layers):
        kept: dict[int, int] = {}

        def pack(tensor: Tensor, kept: dict[int, int] = kept) -> Tensor:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gm.npas.generate(index)
        made = {ptr: size for ptr, size in kept.items() if ptr not in resident}  # banks, indices: there anyway
        assert sum(made.values()) < layer.numel * 4 / 2, (layer.name, made)
    if strategy == "superweight" and budget > 1:
        assert any(layer.templates > 1 for layer in plan.layers)  # the mixing path, not plain slices


def test_window_mix_gradients():
    from npas_fx.mix_kernels import window_mix

    source = torch.randn(50, dtype=torch.double, requires_grad=True)
    mix = torch.randn(7, 3, dtype=torch.double, requires_grad=True)
    index = torch.tensor([0, 3, 5, 1, 1, 0, 9])
    assert torch.autograd.gradcheck(lambda s, m: window_mix(s, m, index, 12, 4), (source, mix))
    assert torch.autograd.gradgradcheck(lambda s, m: window_mix(s, m, index, 12, 4), (source, mix))
    with pytest.raises(ValueError, match="multiple of the 3 templates"):
        window_mix(source, mix, index, 10, 4)
