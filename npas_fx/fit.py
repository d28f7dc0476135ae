"""Start banks from a trained model: ``npas_fx.compile(model, budget, init="fit")``.

Every generator is linear in its group's bank once its other tensors (coefficients, masks,
embeddings, SuperWeight mixes) are fixed, and affine in each of those once the bank is fixed. So
the banks and coefficients that make the generated weights closest to the trained weights,

    min  sum_i ||G_i(bank, coefficients) - W_i||^2 / s_i^2        (s_i: W_i's standard deviation)

are found one tensor at a time (block coordinate descent), each block exactly or nearly exactly by
conjugate gradients on its normal equations ``J^T J x = J^T (W - G(0))``, using only forwards and
vector-Jacobian products of the generators (``torch.autograd.grad``): no generator-specific code, no
dense index tensor, nothing kept afterwards. Dividing by ``s_i^2`` makes the fit scale-free: every
weight counts in units of its own layer's spread, so an ``N(0, 1)`` embedding sharing a hash memory
with 0.02-std projections does not take the memory over.

* Gathers (``slice``, ``repeat``, ``hash``, ``mask``, SuperWeights with ``K = 1``: each generated
  value is ``±gain * m * bank[j]`` for one ``j``): ``J^T J`` is diagonal, read off as
  ``J^T J 1``; with it as preconditioner one step gives the closed form, each bank value the
  weighted mean of the (sign-, gain- and mask-corrected) weights that read it. The solver detects
  this itself (``J^T J z == (J^T J 1) * z`` for a random ``z``). Bank values no weight reads keep
  their random start.
* Template mixing (``wavg``, ``emb``, SuperWeights with ``K >= 2``) and ``interpolate``: plain CG
  for the bank, then the coefficients (``emb``: the layer embedding and the group's map) with the
  bank fixed, for a few rounds. ``emb`` with ``normalize="softmax"`` is not affine in its
  coefficients: only its bank is fitted.

Each block step starts from the current values and is kept only if it lowers the objective, so the
fit is never worse than the random start it begins from. Gains stay as calibrated (the plan is
the one ``init="random"`` makes with the same seed, and re-applies exactly with ``plan=``); the
fit scales the bank instead, which gives the same weights.

Example:
    >>> import torch, npas_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> random = npas_fx.compile(model, 0.5)
    >>> fitted = npas_fx.compile(model, 0.5, init="fit")
    >>> weight_errors(fitted, model)["total"] < weight_errors(random, model)["total"]
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .shared_params import SharedParameters, target_std

__all__ = ["INITS", "FitResult", "fit_shared", "weight_errors", "relative_errors"]

INITS = ("random", "fit")
ROUNDS = 8  # alternations bank <-> coefficients; gathers without coefficients need one
MAX_ITER = 50  # CG steps per block (a gather bank converges in one, K coefficients in K)
TOLERANCE = 1e-6  # CG stops when the normal-equation residual falls by this factor
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit_shared` did: relative Frobenius errors per layer and in total, before and after."""

    before: tuple[float, ...]
    after: tuple[float, ...]
    total_before: float
    total_after: float
    rounds: int


# ---- one block: min_x sum_i w_i ||G_i(x) - T_i||^2 with G affine in x ----------------------------
def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.vdot(a.reshape(-1), b.reshape(-1)).real)


def _vjp(
    generate: Callable[[Tensor], list[Tensor]], x: Tensor, cotangent: Callable[[list[Tensor]], list[Tensor]]
) -> Tensor:
    """``J^T cotangent(G(x))`` (the cotangent is computed from the outputs, detached)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        outputs = generate(x)
        cotangents = cotangent([o.detach() for o in outputs])
        (grad,) = torch.autograd.grad(outputs, x, cotangents, allow_unused=True, materialize_grads=True)
    return grad


class _Block:
    """The normal equations of one tensor ``x`` of a group, for fixed values of the others."""

    def __init__(self, generate: Callable[[Tensor], list[Tensor]], targets: list[Tensor], weights: list[float]):
        self.generate, self.targets, self.weights = generate, targets, weights

    def loss(self, x: Tensor) -> float:
        with torch.no_grad():
            return sum(
                w * float((o - t).abs().pow(2).sum())
                for o, t, w in zip(self.generate(x), self.targets, self.weights, strict=True)
            )

    def residual(self, x: Tensor) -> Tensor:
        """``J^T W (T - G(x))``: minus half the objective's gradient."""
        return _vjp(
            self.generate,
            x,
            lambda outs: [w * (t - o) for o, t, w in zip(outs, self.targets, self.weights, strict=True)],
        )

    def normal(self, v: Tensor, offset: list[Tensor]) -> Tensor:
        """``J^T W J v``; ``J v = G(v) - G(0)`` because ``G`` is affine in ``x``."""
        return _vjp(
            self.generate, v, lambda outs: [w * (o - c) for o, c, w in zip(outs, offset, self.weights, strict=True)]
        )


def _diagonal(block: _Block, x: Tensor, offset: list[Tensor]) -> Tensor | None:
    """``diag(J^T W J)`` when the matrix is diagonal (each output reads one entry of ``x``), else None."""
    d = block.normal(torch.ones_like(x), offset)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = probe.to(device=x.device, dtype=x.dtype)
    product = block.normal(probe, offset)
    scale = float(product.abs().max()) if product.numel() else 0.0
    return d if torch.allclose(product, d * probe, rtol=1e-4, atol=1e-5 * scale) else None


def _solve_block(block: _Block, x0: Tensor, max_iter: int = MAX_ITER, tol: float = TOLERANCE) -> Tensor:
    """Preconditioned CG from ``x0``; returns ``x0`` itself unless the result lowers the objective."""
    r = block.residual(x0)
    start = math.sqrt(_dot(r, r))
    if start == 0.0 or not math.isfinite(start):
        return x0
    with torch.no_grad():
        offset = block.generate(torch.zeros_like(x0))
    d = _diagonal(block, x0, offset)
    inverse = None if d is None else torch.where(d.abs() > 0, 1.0 / d, torch.zeros_like(d))
    x = x0.clone()
    z = r if inverse is None else inverse * r
    p, rz = z.clone(), _dot(r, z)
    for _ in range(max_iter):
        ap = block.normal(p, offset)
        curvature = _dot(p, ap)
        if not curvature > 0 or rz == 0.0:
            break
        alpha = rz / curvature
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        if math.sqrt(_dot(r, r)) <= tol * start:
            break
        z = r if inverse is None else inverse * r
        rz, previous = _dot(r, z), rz
        p = z + (rz / previous) * p
    return x if block.loss(x) < block.loss(x0) else x0


# ---- a compiled model's tensors -----------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype  # CG in half precision stalls


class _Layers:
    """Working copies of every trainable tensor of ``shared`` and a functional ``generate``."""

    def __init__(self, shared: SharedParameters) -> None:
        self.shared = shared
        self.params = dict(shared.named_parameters())
        self.state = {k: p.detach().to(_compute_dtype(p.dtype)).clone() for k, p in self.params.items()}
        count = len(shared.layer_groups)
        self.inputs = [shared.input_paths(i) for i in range(count)]
        self.own = [[n for n, _ in shared.generators[f"l{i}"].named_parameters()] for i in range(count)]

    def generate(self, i: int, replace: dict[str, Tensor] | None = None) -> Tensor:
        state = self.state if not replace else {**self.state, **replace}
        generator = self.shared.generators[f"l{i}"]
        own = {n: state[f"generators.l{i}.{n}"] for n in self.own[i]}
        return functional_call(generator, own, tuple(state[k] for k in self.inputs[i]))

    def readers(self, key: str, members: Sequence[int]) -> list[int]:
        return [i for i in members if key in self.inputs[i] or key.startswith(f"generators.l{i}.")]

    def keys(self, members: Sequence[int]) -> list[str]:
        """The group's tensors in fitting order: the bank, group tensors, then per-layer ones.

        ``emb`` layers that normalise coefficients with a softmax are not affine in their
        embedding or in the group's map: those stay at their start values.
        """
        softmax = [i for i in members if getattr(self.shared.generators[f"l{i}"], "normalize", "none") == "softmax"]
        frozen = {k for i in softmax for k in self.inputs[i][1:]} | {
            f"generators.l{i}.{n}" for i in softmax for n in self.own[i]
        }
        group = list(dict.fromkeys(k for i in members for k in self.inputs[i]))
        layer = [f"generators.l{i}.{n}" for i in members for n in self.own[i]]
        return [k for k in group + layer if k not in frozen and self.params[k].requires_grad]


def relative_errors(generated: Sequence[Tensor], originals: Sequence[Tensor]) -> tuple[tuple[float, ...], float]:
    """``||G - W|| / ||W||`` per layer (the absolute error where ``W`` is all zeros), and in total.

    The total is ``sqrt(sum ||G - W||^2 / sum ||W||^2)``.

    Example:
        >>> relative_errors([torch.ones(2)], [torch.full((2,), 2.0)])
        ((0.5,), 0.5)
    """
    per_layer, squared, norms = [], 0.0, 0.0
    for g, w in zip(generated, originals, strict=True):
        g = g.detach().to(torch.complex128 if g.is_complex() else torch.float64)
        w = w.detach().to(device=g.device, dtype=g.dtype)
        error, norm = float(torch.linalg.vector_norm(g - w)), float(torch.linalg.vector_norm(w))
        per_layer.append(error / (norm if norm > 0 else 1.0))
        squared, norms = squared + error**2, norms + norm**2
    return tuple(per_layer), math.sqrt(squared / norms) if norms > 0 else math.sqrt(squared)


def _fit_group(layers: _Layers, members: list[int], targets: dict[int, Tensor], weights: dict[int, float]) -> int:
    keys = layers.keys(members)
    rounds = ROUNDS if len(keys) > 1 else 1
    objective = math.inf
    for done in range(1, rounds + 1):
        for key in keys:
            readers = layers.readers(key, members)

            def generate(x: Tensor, key: str = key, readers: list[int] = readers) -> list[Tensor]:
                return [layers.generate(i, {key: x}) for i in readers]

            block = _Block(generate, [targets[i] for i in readers], [weights[i] for i in readers])
            layers.state[key] = _solve_block(block, layers.state[key])
        with torch.no_grad():
            now = sum(weights[i] * float((layers.generate(i) - targets[i]).abs().pow(2).sum()) for i in members)
        if now >= objective * (1 - 1e-4):  # converged (or stalled): further rounds would not pay
            return done
        objective = now
    return rounds


@torch.no_grad()
def fit_shared(shared: SharedParameters, originals: Sequence[Tensor]) -> FitResult:
    """Set ``shared``'s banks and coefficients to the least-squares fit of ``originals`` (in place).

    ``originals[i]`` is the trained weight generator ``i`` should reproduce. Gains are not changed.

    Example:
        >>> from npas_fx.plan import LayerPlan, GroupPlan
        >>> layer = LayerPlan("w", (4, 3), "", "Linear", 0, "repeat", gain=0.5)
        >>> shared = SharedParameters([layer], [GroupPlan(0, ("w",), 6)], embedding_dim=24)
        >>> w = torch.randn(4, 3)
        >>> result = fit_shared(shared, [w])
        >>> result.after[0] < result.before[0]
        True
    """
    training = shared.training
    shared.train()  # never serve (or store) eval-cached weights while the tensors are swapped
    try:
        return _fit(shared, originals)
    finally:
        shared.train(training)


def _fit(shared: SharedParameters, originals: Sequence[Tensor]) -> FitResult:
    layers = _Layers(shared)
    targets = {i: w.detach().to(device=layers.state[layers.inputs[i][0]].device) for i, w in enumerate(originals)}
    targets = {i: t.to(layers.state[layers.inputs[i][0]].dtype) for i, t in targets.items()}
    weights = {i: 1.0 / target_std(w) ** 2 for i, w in enumerate(originals)}
    before, total_before = relative_errors([layers.generate(i) for i in targets], originals)
    rounds = 0
    for group in dict.fromkeys(shared.layer_groups):
        members = [i for i, g in enumerate(shared.layer_groups) if g == group]
        rounds = max(rounds, _fit_group(layers, members, targets, weights))
    for key, param in layers.params.items():
        param.copy_(layers.state[key])
    after, total_after = relative_errors([shared.generate(i) for i in targets], originals)
    return FitResult(before, after, total_before, total_after, rounds)


@torch.no_grad()
def weight_errors(gm: nn.Module, model: nn.Module) -> dict[str, float]:
    """Relative Frobenius error of every generated weight of ``gm`` against ``model``'s, and ``"total"``.

    Keys are the plan's layer names; ``"total"`` is ``sqrt(sum ||G - W||^2 / sum ||W||^2)``.
    """
    from .compiler import plan_of  # late: the compiler imports this module through build

    plan = plan_of(gm)
    shared = gm.get_submodule("npas")
    params = dict(model.named_parameters(remove_duplicate=False))
    originals = []
    for layer in plan.layers:  # a root run as one leaf prefixes names with "model."
        names = [m for n in (layer.name, *layer.aliases) for m in (n, n.removeprefix("model."))]
        originals.append(next(params[n] for n in names if n in params))
    per_layer, total = relative_errors([shared.generate(i) for i in range(len(plan.layers))], originals)
    return {**{layer.name: e for layer, e in zip(plan.layers, per_layer, strict=True)}, "total": total}
