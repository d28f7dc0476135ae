"""Build the trainable side of a plan: one bank module per group and one generator per layer.

Everything built here lives under ``gm.npas`` in the compiled GraphModule::

    npas.groups.g0.bank          the group's flat bank (and ``map_weight``/``map_bias`` for emb)
    npas.generators.l3           the generator of layer 3 (its coefficients, embedding, mask)

Example:
    >>> from npas_fx.plan import LayerPlan, GroupPlan
    >>> layer = LayerPlan("w", (2, 3), "", "Linear", 0, "slice", templates=1)
    >>> shared = SharedParameters([layer], [GroupPlan(0, ("w",), 6)], embedding_dim=24)
    >>> shared.generate(0).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .generators import (
    EmbeddingMix,
    Hash,
    Interpolate,
    Mask,
    Repeat,
    SignedRepeat,
    TemplateMix,
    WeightGenerator,
)
from .hash_kernels import _signed_gain_
from .plan import GroupPlan, LayerPlan
from .runtime import clear_cache
from .superweights import SuperWeightLayout, superweight_layouts

__all__ = ["GroupBank", "SharedParameters", "make_generator", "target_std", "wide_std"]


class GroupBank(nn.Module):
    """The parameters one group shares: a flat ``bank`` and, for ``emb``, the coefficient map."""

    def __init__(self, size: int, map_rows: int = 0, embedding_dim: int = 0) -> None:
        super().__init__()
        self.bank = nn.Parameter(torch.randn(size))
        if map_rows:
            weight = torch.empty(map_rows, embedding_dim)
            nn.init.orthogonal_(weight)
            self.map_weight = nn.Parameter(weight)
            self.map_bias = nn.Parameter(torch.zeros(map_rows))

    def inputs(self, generator: WeightGenerator) -> tuple[str, ...]:
        """Names of this module's tensors that ``generator`` takes, in call order."""
        named = getattr(generator, "group_inputs", None)  # a generator may name its inputs (SuperWeights)
        if named is not None:
            return tuple(named)
        return ("bank", "map_weight", "map_bias") if isinstance(generator, EmbeddingMix) else ("bank",)


def make_generator(
    layer: LayerPlan,
    embedding_dim: int,
    normalize: str = "none",
    layout: SuperWeightLayout | None = None,
    bank_size: int | None = None,
) -> WeightGenerator:
    """The generator module a :class:`LayerPlan` describes (``layout``: its SuperWeight group's).

    ``bank_size`` (the group's) lets ``hash`` compute its block indices once instead of every forward.
    """
    kind = layer.generator
    if kind == "superweight":
        if layout is None:
            raise ValueError(f"layer {layer.name!r} uses SuperWeights but its group has no SuperWeight layout.")
        return layout.generator(layer)
    if kind in ("slice", "wavg"):
        return TemplateMix(layer.shape, layer.offset, max(1, layer.templates), layer.gain)
    if kind == "emb":
        return EmbeddingMix(layer.shape, layer.offset, layer.templates, embedding_dim, layer.gain, normalize)
    if kind == "repeat":
        return Repeat(layer.shape, layer.offset, layer.gain)
    if kind == "signed":
        return SignedRepeat(layer.shape, layer.offset, layer.gain)
    if kind == "interpolate":
        rows, cols = layer.grid
        return Interpolate(layer.shape, layer.offset, (rows, cols), layer.gain)
    if kind == "mask":
        return Mask(layer.shape, layer.offset, layer.gain)
    if kind == "hash":
        return Hash(layer.shape, layer.salt, layer.gain, chunk=layer.chunk, bank_size=bank_size)
    raise ValueError(f"unknown generator {kind!r} for layer {layer.name!r}")


class SharedParameters(nn.Module):
    """Banks and generators of a plan (see the module docstring for the layout)."""

    def __init__(
        self, layers: Sequence[LayerPlan], groups: Sequence[GroupPlan], embedding_dim: int, normalize: str = "none"
    ) -> None:
        super().__init__()
        layouts = superweight_layouts(layers, groups)
        self.groups = nn.ModuleDict()
        for group in groups:
            members = [x for x in layers if x.group == group.index]
            emb = [x.templates for x in members if x.generator == "emb"]
            self.groups[f"g{group.index}"] = GroupBank(group.bank_size, max(emb, default=0), embedding_dim)
            if group.index in layouts:  # SuperWeight coefficients belong to the group: sets span layers
                for name, param in layouts[group.index].coefficient_parameters().items():
                    self.groups[f"g{group.index}"].register_parameter(name, param)
        sizes = {g.index: g.bank_size for g in groups}
        self.generators = nn.ModuleDict(
            {
                f"l{i}": make_generator(x, embedding_dim, normalize, layouts.get(x.group), sizes[x.group])
                for i, x in enumerate(layers)
            }
        )
        self.layer_groups = [x.group for x in layers]

    def train(self, mode: bool = True) -> SharedParameters:
        clear_cache(self)  # cached eval weights (and the fast-eval runner) only last until training
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> SharedParameters:
        clear_cache(self)  # .to()/.half()/.cuda() make new tensors: never serve the old ones
        return super()._apply(fn, recurse)

    def input_paths(self, index: int, prefix: str = "") -> tuple[str, ...]:
        """Qualified names of the tensors generator ``index`` is called on."""
        group = f"groups.g{self.layer_groups[index]}"
        names = self.groups[f"g{self.layer_groups[index]}"].inputs(self.generators[f"l{index}"])
        return tuple(f"{prefix}{group}.{n}" for n in names)

    @torch.no_grad()
    def init_complex_banks(self) -> None:
        """Draw the imaginary part of complex banks too (a real draw cast to complex has none).

        Real and imaginary parts are each ``N(0, 1/2)``, so ``|z|`` has unit variance as in
        ``torch.randn(dtype=torch.cfloat)``; called after the banks are placed on their dtype.
        """
        for bank in self.groups.values():
            if bank.bank.is_complex():
                bank.bank.copy_(torch.randn(bank.bank.shape, dtype=bank.bank.dtype, device=bank.bank.device))

    @torch.no_grad()
    def generate_sample(self, index: int, limit: int) -> Tensor:
        """The values of layer ``index``'s weight an even sample picks (see :func:`sample_step`),
        made without the whole weight for slices, template mixes and hashing (else generated)."""
        generator = self.generators[f"l{index}"]
        bank = self.groups[f"g{self.layer_groups[index]}"].bank
        step = sample_step(generator.shape, limit)
        if step == 1 or type(generator) not in (TemplateMix, Hash) or getattr(generator, "rows", 0) is None:
            return _spread_sample(self.generate(index), limit)
        if type(generator) is TemplateMix:
            n, k = generator.numel, generator.templates
            block = bank.narrow(0, generator.offset, k * n).view(k, n)[:, ::step]
            values = block[0] if generator.coefficients is None else generator.coefficients.to(bank.dtype) @ block
            return values * generator.gain if generator.gain != 1.0 else values
        return _hash_sample(generator, bank, step)

    def generate(self, index: int) -> Tensor:
        """Layer ``index``'s weight, computed outside any graph (for init and inspection)."""
        bank = self.groups[f"g{self.layer_groups[index]}"]
        tensors = [getattr(bank, n) for n in bank.inputs(self.generators[f"l{index}"])]
        return self.generators[f"l{index}"](*tensors)


SAMPLE = 2**18  # values a scale estimate reads at most: its relative error is then about 0.15%


def sample_step(shape: Sequence[int], limit: int) -> int:
    """Stride of the even sample of at most about ``limit`` values that scale estimates read.

    Coprime with the last dimension, so a sample visits every column (a weight whose columns
    differ in scale is estimated fairly), with its rows evenly spaced.
    """
    step = -(-math.prod(shape) // limit)
    cols = shape[-1] if len(shape) else 1
    while step > 1 and math.gcd(step, cols) != 1:
        step += 1
    return step


def _spread_sample(tensor: Tensor, limit: int) -> Tensor:
    """Every :func:`sample_step`-th value of ``tensor`` (all of them when it is small)."""
    return tensor.reshape(-1)[:: sample_step(tensor.shape, limit)]


def _hash_sample(generator: Hash, bank: Tensor, step: int) -> Tensor:
    """Every ``step``-th value of a hash generator's weight (see :func:`~npas_fx.kernels.hash_rows`)."""
    size, chunk = bank.numel(), generator.chunk
    slots = -(-size // chunk)
    # Positions and bank indices in int32 when they fit (as the rows buffer does): half the traffic.
    small = generator.numel < 2**31 and size + 2 * chunk < 2**31
    dtype = torch.int32 if small else torch.int64
    position = torch.arange(0, generator.numel, step, device=bank.device, dtype=dtype)
    block = torch.div(position, chunk, rounding_mode="floor")
    row = generator.rows.index_select(0, block).to(dtype)
    negative = row >= slots
    # slot * chunk + (position - block * chunk), with the sign's slot offset taken off; below size + chunk
    index = row.sub_(negative.to(dtype), alpha=slots).mul_(chunk).add_(position.sub_(block, alpha=chunk))
    if chunk <= size:  # the last slot wraps to the bank's start once
        index.sub_((index >= size).to(dtype), alpha=size)
    else:
        index = torch.remainder(index, size)
    values = bank.index_select(0, index)
    _signed_gain_(values, negative, generator.gain)
    return values


def wide_std(tensor: Tensor, limit: int | None = None) -> float:
    """Standard deviation in double precision; a complex tensor's counts its imaginary part too.

    ``limit``: estimate it from about that many values spread evenly over the tensor (all of them
    when it holds fewer), so that a large weight costs a strided read of ``limit`` values rather
    than a double-precision copy of itself.

    Example:
        >>> round(wide_std(torch.tensor([1j, -1j])), 6)
        1.414214
        >>> x = torch.randn(4096, 1024)
        >>> abs(wide_std(x, limit=2**16) / wide_std(x) - 1) < 0.02
        True
    """
    values = tensor.detach()
    if limit is not None:
        values = _spread_sample(values, limit)
    wide = torch.complex128 if values.is_complex() else torch.float64  # .double() drops imaginary parts
    return float(values.to(wide).std())


def target_std(weight: Tensor) -> float:
    """Scale a generated weight should start at: the original's std, else ``1/sqrt(fan_in)``."""
    if weight.numel() > 1:
        std = wide_std(weight, SAMPLE)
        if math.isfinite(std) and std > 0:
            return std
    fan_in = max(1, weight.numel() // max(1, weight.shape[0] if weight.dim() else 1))
    return 1.0 / math.sqrt(fan_in)
