"""Weight generators: small modules that turn a shared bank into one layer's weight.

Every generator is an ``nn.Module`` whose ``forward(bank, *group_tensors)`` returns a tensor of
the layer's shape. A generator owns only its per-layer parameters (coefficients, embeddings,
masks); the bank itself belongs to the group and is handed in by the graph, so the rewritten
``forward`` shows the data flow ``bank -> generator -> layer`` explicitly.

``gain`` is a fixed (not trainable) factor chosen at compile time so that the generated weight
starts at the scale of the layer's own initialisation, whatever the bank is shared with.

Example:
    >>> import torch
    >>> gen = TemplateMix((4, 3), offset=0, templates=2)
    >>> gen(torch.randn(24)).shape
    torch.Size([4, 3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .hash_kernels import hash_rows, hashed_blocks, signed_gather
from .kernel_base import _MASK32
from .kernels import masked_tile, row_signs, skew_tile
from .mix_kernels import LerpPlan, bilinear, lerp_plan, template_mix
from .runtime import CACHE_ATTR, generate_cached

__all__ = [
    "WeightGenerator",
    "TemplateMix",
    "EmbeddingMix",
    "Repeat",
    "Interpolate",
    "Mask",
    "SignedRepeat",
    "Hash",
    "GENERATOR_KINDS",
    "interpolation_grid",
]


class WeightGenerator(nn.Module):
    """Base class: stores the output ``shape`` and the fixed ``gain``."""

    kind: str = ""

    def __init__(self, shape: Sequence[int], gain: float = 1.0) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.gain = float(gain)

    def __call__(self, *inputs: Tensor) -> Tensor:
        # Reused while the inputs are unchanged, in eval without grad or inside npas_fx.cached().
        return generate_cached(self, inputs, super().__call__)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop(CACHE_ATTR, None)  # a cached weight is derived data: never saved or copied
        return state

    def _scaled(self, bank: Tensor) -> Tensor:
        # The gain scales the small bank, not the large output (the same values: one multiply each).
        # The tiling and hashing kernels take the gain themselves (no extra autograd node).
        return bank * self.gain if self.gain != 1.0 else bank

    def _finish(self, flat: Tensor) -> Tensor:
        # A gain of exactly 1 (copied weights) skips the multiply so copies stay bit-exact.
        if self.gain != 1.0:
            flat = flat * self.gain
        return flat.view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, gain={self.gain:.4g}"


class TemplateMix(WeightGenerator):
    """Downsampling by template mixing (SSN ``wavg``; Savarese & Maire 2019).

    ``w = gain * sum_k a_k T_k`` where ``T_k = bank[offset + k*n : offset + (k+1)*n]`` are ``K``
    consecutive layer-sized slices of the group bank and ``a`` are free per-layer coefficients.
    With ``K = 1`` there are no coefficients and the layer reads one slice (hard sharing).

    Example:
        >>> gen = TemplateMix((2, 2), offset=1, templates=1)
        >>> gen(torch.arange(6.0)).tolist()
        [[1.0, 2.0], [3.0, 4.0]]
    """

    kind = "wavg"

    def __init__(self, shape: Sequence[int], offset: int, templates: int, gain: float = 1.0) -> None:
        super().__init__(shape, gain)
        if templates < 1:
            raise ValueError(f"`templates` should be >= 1, got {templates}.")
        self.offset = int(offset)
        self.templates = int(templates)
        if self.templates > 1:
            self.coefficients = nn.Parameter(torch.full((self.templates,), 1.0 / math.sqrt(self.templates)))
        else:
            self.register_parameter("coefficients", None)

    def forward(self, bank: Tensor) -> Tensor:
        if self.coefficients is None:
            return self._finish(bank.narrow(0, self.offset, self.numel))
        flat = template_mix(bank, self.coefficients.to(bank.dtype), self.offset, self.numel, self.gain)
        return flat.view(self.shape)  # the gain is folded into the K coefficients, not the n outputs

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset={self.offset}, templates={self.templates}"


class EmbeddingMix(WeightGenerator):
    """Downsampling with coefficients from a learned layer embedding (SSN ``emb``).

    ``a = W[:K] @ phi + b[:K]`` with a per-layer embedding ``phi`` and a map ``(W, b)`` shared by the
    group (handed in by the graph); then ``w = gain * sum_k a_k T_k`` as in :class:`TemplateMix`.
    ``normalize="softmax"`` uses ``softmax(a)`` instead (SSN's mapping search), so coefficient
    vectors of different layers live on one simplex and can be clustered.

    Example:
        >>> gen = EmbeddingMix((2, 3), offset=0, templates=2, embedding_dim=4)
        >>> gen(torch.randn(12), torch.randn(3, 4), torch.zeros(3)).shape
        torch.Size([2, 3])
    """

    kind = "emb"

    def __init__(
        self,
        shape: Sequence[int],
        offset: int,
        templates: int,
        embedding_dim: int,
        gain: float = 1.0,
        normalize: str = "none",
    ) -> None:
        super().__init__(shape, gain)
        if templates < 2:
            raise ValueError(f"`templates` should be >= 2 for an embedding mix, got {templates}.")
        if normalize not in ("none", "softmax"):
            raise ValueError(f"`normalize` should be 'none' or 'softmax', got {normalize!r}.")
        self.offset = int(offset)
        self.templates = int(templates)
        self.normalize = normalize
        self.embedding = nn.Parameter(torch.randn(embedding_dim) / math.sqrt(embedding_dim))

    def coefficients(self, map_weight: Tensor, map_bias: Tensor) -> Tensor:
        """The layer's ``K`` mixing coefficients (what SSN's mapping search clusters)."""
        k = self.templates
        logits = map_weight[:k] @ self.embedding + map_bias[:k]  # (K, E) @ (E,) -> (K,)
        return torch.softmax(logits, 0) if self.normalize == "softmax" else logits

    def forward(self, bank: Tensor, map_weight: Tensor, map_bias: Tensor) -> Tensor:
        flat = template_mix(bank, self.coefficients(map_weight, map_bias), self.offset, self.numel, self.gain)
        return flat.view(self.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset={self.offset}, templates={self.templates}"


class Repeat(WeightGenerator):
    """Upsampling by tiling: ``w = gain * tile(bank, offset)``, the copies rotated.

    ``t[j] = bank[(k + c) mod P]`` for ``j + offset = c * P + k`` (:func:`~npas_fx.kernels.skew_tile`,
    one write of the weight). Plain tiling makes every row identical whenever ``P`` divides the row
    length (a 10-class head tiled from 16 values has rank 1); the skew keeps rows apart. (Rotating
    copies by hashed amounts instead scored lower on the digits benchmark at 25 %: 87 % against 97 %.)
    Layers of one group start at staggered offsets so that equal shapes get different weights.

    Example:
        >>> Repeat((2, 3), offset=1)(torch.tensor([1.0, 2.0, 3.0])).tolist()
        [[2.0, 3.0, 2.0], [3.0, 1.0, 3.0]]
    """

    kind = "repeat"

    def __init__(self, shape: Sequence[int], offset: int = 0, gain: float = 1.0) -> None:
        super().__init__(shape, gain)
        self.offset = int(offset)

    def forward(self, bank: Tensor) -> Tensor:
        return skew_tile(bank, self.numel, self.offset, self.gain).view(self.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset={self.offset}"


def interpolation_grid(shape: Sequence[int], bank_size: int) -> tuple[int, int]:
    """The largest ``(rows, cols)`` grid that fits ``bank_size`` with the aspect of ``shape``.

    ``shape`` is viewed as ``(out, rest)``; the grid is bilinearly stretched to that size.

    Example:
        >>> interpolation_grid((8, 4, 3, 3), 36)
        (3, 12)
    """
    out = int(shape[0])
    rest = math.prod(int(s) for s in shape[1:]) if len(shape) > 1 else 1
    rows = max(1, min(out, round(math.sqrt(bank_size * out / rest))))
    cols = max(1, min(rest, bank_size // rows))
    while rows * cols > bank_size:  # rounding can overshoot by a row
        rows -= 1
    return rows, cols


class Interpolate(WeightGenerator):
    """Upsampling by bilinear interpolation (SSN ``inter``).

    A ``rows x cols`` block of the bank (see :func:`interpolation_grid`) is stretched to the
    layer's 2-D view ``(out, in * k * ...)`` with ``align_corners=True``.

    Example:
        >>> Interpolate((3, 3), offset=0, grid=(2, 2))(torch.tensor([0.0, 2.0, 2.0, 4.0])).tolist()
        [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]]
    """

    kind = "interpolate"

    def __init__(self, shape: Sequence[int], offset: int, grid: tuple[int, int], gain: float = 1.0) -> None:
        super().__init__(shape, gain)
        self.offset = int(offset)
        self.grid = (int(grid[0]), int(grid[1]))
        self.view2d = (self.shape[0], self.numel // self.shape[0])
        # The stretch's two sparse matrices (2 entries per output row/column), as non-persistent
        # buffers: O(rows + columns) values, rebuilt from the plan. The gain is not folded in: it is
        # calibrated after construction (build.py sets ``gain``), so it scales the small block.
        for axis, plan in (
            ("rows", lerp_plan(self.view2d[0], self.grid[0])),
            ("cols", lerp_plan(self.view2d[1], self.grid[1])),
        ):
            for field, tensor in zip(LerpPlan._fields, plan, strict=True):
                self.register_buffer(f"_{axis}_{field}", tensor, persistent=False)

    def _plan(self, axis: str) -> LerpPlan:
        return LerpPlan(*(getattr(self, f"_{axis}_{field}") for field in LerpPlan._fields))

    def forward(self, bank: Tensor) -> Tensor:
        rows, cols = self.grid
        block = self._scaled(bank.narrow(0, self.offset, rows * cols)).view(rows, cols)
        return bilinear(block, self._plan("rows"), self._plan("cols")).view(self.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset={self.offset}, grid={self.grid}"


class Mask(WeightGenerator):
    """Upsampling by tiling with a learned mask per output row (SSN ``mask``).

    ``w[o, :] = gain * m_o * tile(bank, offset)[o, :]``; ``m`` starts at random signs so that the
    copies of the bank differ from the first step. (The gain scales the bank before the mask: equal
    to ``(tile * m) * gain`` up to one rounding.)

    Example:
        >>> gen = Mask((2, 3))
        >>> gen(torch.ones(4)).abs().tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    kind = "mask"

    def __init__(self, shape: Sequence[int], offset: int = 0, gain: float = 1.0) -> None:
        super().__init__(shape, gain)
        self.offset = int(offset)
        signs = torch.randint(0, 2, (self.shape[0],)).float() * 2 - 1
        self.mask = nn.Parameter(signs)

    def forward(self, bank: Tensor) -> Tensor:
        return masked_tile(bank, self.mask.to(bank.dtype), self.numel, self.offset, self.gain).view(self.shape)


class SignedRepeat(WeightGenerator):
    """Tiling with a fixed hashed sign per output row: ``w[o, :] = gain * s_o * tile(bank, offset)[o, :]``.

    Plain tiling couples the rows: when the bank is not much larger than a row, every row reads
    nearly the whole bank, so all rows have about the same sum, and a layer fed non-negative inputs
    (after a ReLU) responds to their mean with the same sign in every unit. Half the time that sign
    is negative and every unit is dead from the start (the digits benchmark at 5 %: ``repeat x26``
    for a 32x256 layer left one seed in three at chance). Fixed signs ``s_o`` (HashedNets' sign
    hash, per row) decorrelate the rows at no parameter cost; the signs are a non-persistent buffer
    hashed from the offset, so a re-applied plan rebuilds them.

    Example:
        >>> SignedRepeat((2, 3), offset=1)(torch.tensor([1.0, 2.0, 3.0])).abs().tolist()
        [[2.0, 3.0, 2.0], [3.0, 1.0, 3.0]]
    """

    kind = "signed"

    def __init__(self, shape: Sequence[int], offset: int = 0, gain: float = 1.0) -> None:
        super().__init__(shape, gain)
        self.offset = int(offset)
        self.register_buffer("signs", row_signs(self.shape[0], self.offset), persistent=False)

    def forward(self, bank: Tensor) -> Tensor:
        return masked_tile(bank, self.signs.to(bank.dtype), self.numel, self.offset, self.gain).view(self.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset={self.offset}"


class Hash(WeightGenerator):
    """Hashed sharing: block ``b`` of ``chunk`` weights is ``gain * s(b) * (a hashed bank range)``.

    ``chunk=1`` is per-element HashedNets (Chen et al. 2015): ``w[j] = gain * s(j) * bank[h(j) mod P]``,
    the format of plans without a ``chunk``. ``chunk > 1`` is ROAST-style (Desai et al. 2022): the
    flattened weight is cut into blocks of ``chunk`` contiguous values, the bank into slots of
    ``chunk`` contiguous values (the last one wrapping to the start), and each block reads one slot
    times a hashed sign; blocks take slots in rounds, each round a hashed permutation of the slots,
    so a layer at least as large as its bank reads every bank value (see
    :func:`~npas_fx.kernels.hash_rows`). Hashes depend on the position and a per-layer ``salt``.
    Given the ``bank_size``, the one index per block is computed once into a non-persistent buffer
    ``rows`` (int32 when it fits: ``4 * ceil(numel / chunk)`` bytes), otherwise at every forward.

    Example:
        >>> gen = Hash((3, 4), salt=7)
        >>> bool((gen(torch.ones(5)).abs() == 1).all())
        True
        >>> Hash((3, 4), salt=7, chunk=4, bank_size=5).rows.shape
        torch.Size([3])
    """

    kind = "hash"

    def __init__(
        self, shape: Sequence[int], salt: int, gain: float = 1.0, chunk: int = 1, bank_size: int | None = None
    ) -> None:
        super().__init__(shape, gain)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"`chunk` should be an integer >= 1, got {chunk!r}.")
        if bank_size is not None and (isinstance(bank_size, bool) or not isinstance(bank_size, int) or bank_size < 1):
            raise ValueError(f"`bank_size` should be an integer >= 1 or None, got {bank_size!r}.")
        self.salt = int(salt) & _MASK32
        self.chunk = chunk
        self.bank_size = bank_size
        rows = None if bank_size is None else hash_rows(self.numel, chunk, self.salt, bank_size)
        self.register_buffer("rows", rows, persistent=False)

    def forward(self, bank: Tensor) -> Tensor:
        size = bank.numel()
        if self.rows is None:
            rows = hash_rows(self.numel, self.chunk, self.salt, size, bank.device)
        elif size != self.bank_size:
            raise ValueError(
                f"this hash generator was built for a bank of {self.bank_size} values, got {size}; "
                "build it with the bank's size (or bank_size=None to hash at every forward)."
            )
        else:
            rows = self.rows
        # No backward (and a bank of at least one whole slot): touch only what the weight reads.
        # Eager only: its masked write of the wrapping slot is data-dependent for torch.compile.
        eager = not torch.compiler.is_compiling() and not bank.is_meta
        if eager and not (torch.is_grad_enabled() and bank.requires_grad) and size >= self.chunk:
            return signed_gather(bank, rows, self.numel, self.chunk, self.gain).view(self.shape)
        return hashed_blocks(bank, rows, self.numel, self.chunk, self.gain).view(self.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, salt={self.salt}, chunk={self.chunk}"


GENERATOR_KINDS = ("slice", "wavg", "emb", "repeat", "signed", "interpolate", "mask", "hash", "superweight")
