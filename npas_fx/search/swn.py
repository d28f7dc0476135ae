"""Strategy ``"swn"``: SuperWeight Networks' gradient-similarity search (Teterwak et al., 2023).

1. Search model: SuperWeights (:mod:`npas_fx.superweights`) with one group per bin, every layer
   its own coefficients, at the target budget (search and training use the same generator).
2. A short pre-training (``search_steps`` Adam steps), then each layer's gradient of its generated
   weight, summed over ``grad_batches`` batches at fixed parameters (the official code used one).
3. Pairwise cosine similarity of those gradients on each pair's common top-left block, in one
   batched computation per bin (:func:`~npas_fx.search.similarity.cropped_cosine_similarity`);
   ``options={"concat_weights": True}`` compares the normalised gradient concatenated with the
   normalised generated weight (the paper's optional variant, :func:`with_weights`).
4. Groups: connected components of the graph of pairs above a threshold (a real merge), starting
   at ``threshold`` (0.1) and lowering it by ``threshold_step`` (0.05) until every SuperWeight of
   every group gets at least one template of its own under the budget (or the bins are merged);
   ``num_groups``, when given, also caps the number of groups.
5. Refinement (hard -> soft sharing): a model with those groups and coefficients shared inside each
   group is pre-trained for ``refine_steps``; each layer's share of the gradient of the shared
   coefficients (a vector-Jacobian product of its weight gradient through its generator) is
   compared on common SuperWeights; layers whose agreement stays below ``refine_threshold`` (0.9)
   get coefficients of their own (components of the agreement graph share), as long as the extra
   coefficients cost no templates.

The plan's provenance records the similarity matrix (``{"layers", "matrix"}``; ``None`` between
layers of different bins), the threshold reached, the steps and the refinement.

Example:
    >>> import torch, npas_fx
    >>> import torch.nn.functional as F
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> gm = npas_fx.compile(model, 0.5, strategy="swn", data=data, loss_fn=F.cross_entropy, search_steps=4,
    ...                      options={"grad_batches": 2})
    >>> plan = npas_fx.plan_of(gm)
    >>> npas_fx.count_parameters(gm) == plan.budget, len(plan.provenance["similarity"]["matrix"])
    (True, 3)
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from ..budget import GeneratorConfig
from ..strategies import Grouping, StrategyContext, register_strategy
from ..superweights import SuperWeightAllocation, allocate_superweights, bins_of, minimum_superweight_budget
from .common import SearchOptions, compile_search_model, weight_gradients
from .pretrain import DEFAULT_SEARCH_STEPS, cycle_batches, pretrain, progress_bar, require_data
from .similarity import cropped_cosine_similarity, similarity_record, threshold_groups

__all__ = ["share_by_gradient_similarity", "binned_similarity", "fit_threshold", "with_weights"]

OPTIONS = (
    "lr",
    "progress",
    "grad_batches",
    "threshold",
    "threshold_step",
    "refine_threshold",
    "refine_steps",
    "concat_weights",
)


def binned_similarity(tensors: list[torch.Tensor], bins: list[list[int]]) -> torch.Tensor:
    """``(L, L)`` cropped cosine similarity inside each bin; ``nan`` between bins.

    Example:
        >>> s = binned_similarity([torch.ones(2, 2), torch.ones(3, 2), torch.ones(2, 2, 1)], [[0, 1], [2]])
        >>> s.tolist()
        [[1.0, 1.0, nan], [1.0, 1.0, nan], [nan, nan, 1.0]]
    """
    count = len(tensors)
    out = torch.full((count, count), float("nan"), dtype=torch.float64)
    for members in bins:
        index = torch.tensor(members, dtype=torch.int64)
        out[index[:, None], index[None, :]] = cropped_cosine_similarity([tensors[i] for i in members])
    return out


def fit_threshold(
    similarity: torch.Tensor,
    bins: list[list[int]],
    allocation: Callable[[list[list[int]]], SuperWeightAllocation],
    start: float,
    step: float,
    max_groups: int | None = None,
) -> tuple[list[list[int]], float, SuperWeightAllocation | None]:
    """Lower the threshold from ``start`` by ``step`` until ``allocation(groups).fits``
    (and there are at most ``max_groups`` groups, when given).

    Returns the groups, the threshold reached, and their allocation (``None`` if even the fully
    merged bins do not fit the budget; then the merged bins are returned).
    """
    n = 0
    while True:
        threshold = round(start - n * step, 10)
        groups = threshold_groups(similarity, threshold, bins)
        try:
            alloc = allocation(groups)
        except ValueError:  # more groups than the budget has bank values for: merge further
            alloc = None
        if alloc is not None and alloc.fits and (max_groups is None or len(groups) <= max_groups):
            return groups, threshold, alloc
        if len(groups) == len(bins):  # every bin one group: nothing left to merge
            return groups, threshold, alloc
        n += 1


def with_weights(gradient: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gradient`` and ``weight``, each divided by its norm, stacked on a last axis (SWN's optional
    similarity: cosines of these mix the gradients' and the weights' agreement).

    Example:
        >>> with_weights(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])).tolist()
        [[0.6000000238418579, 0.0], [0.800000011920929, 1.0]]
    """
    g = gradient / gradient.norm().clamp_min(torch.finfo(gradient.dtype).tiny)
    w = weight.to(gradient.dtype)
    return torch.stack([g, w / w.norm().clamp_min(torch.finfo(w.dtype).tiny)], dim=-1)


def _pretrained_gradients(
    ctx: StrategyContext,
    options: dict,
    config: GeneratorConfig,
    opts: SearchOptions,
    steps: int,
    batches: object,
    bar: object,
) -> tuple[torch.nn.Module, list[int], list[torch.Tensor | None], list[float]]:
    """A SuperWeight search model of ``options``, pre-trained; its layers' summed weight gradients.

    Returns the model, each layer's index in it, the gradients (a list the caller may empty as it
    goes) and the pre-training losses.
    """
    search, index = compile_search_model(ctx, ctx.budget, "superweight", generators=config, options=options)
    losses = pretrain(search, batches, ctx.loss_fn, steps, ctx.seed, opts.lr, bar)
    grads: list[torch.Tensor | None] = list(weight_gradients(search, batches, ctx.loss_fn, opts.grad_batches, bar))
    return search, index, grads, losses


def _gradient_similarity(
    ctx: StrategyContext,
    config: GeneratorConfig,
    bins: list[list[int]],
    opts: SearchOptions,
    steps: int,
    batches: object,
    bar: object,
) -> tuple[torch.Tensor, list[float]]:
    """Steps 1-3: pre-train the search model, sum each layer's weight gradient, compare them.

    Returns the similarity matrix and the losses; the search model and the gradients (the
    model's size) go on return, before the refinement builds its own model.
    """
    options = {"groups": _names(bins, list(ctx.names))}
    search, index, grads, losses = _pretrained_gradients(ctx, options, config, opts, steps, batches, bar)
    compared = []
    for j in index:  # each gradient leaves `grads` as it joins `compared`: one copy of them at a time
        grad, grads[j] = grads[j], None
        if opts.concat_weights:
            with torch.no_grad():
                grad = with_weights(grad, search.npas.generate(j))
        compared.append(grad)
    del search, grads
    return binned_similarity(compared, bins), losses


def _names(groups: list[list[int]], names: list[str]) -> list[list[str]]:
    return [[names[i] for i in g] for g in groups]


def _coefficient_gradients(search: torch.nn.Module, index: list[int], weight_grads: list[torch.Tensor | None]) -> dict:
    """Per layer with coefficients: its share of its set's coefficient gradient, as a (rows, cols, K) grid.

    Consumes ``weight_grads`` (each entry is dropped once used). The bank enters detached: only
    the coefficients' gradient is wanted, and the bank's would cost a bank-sized fold per layer.
    """
    out = {}
    for i, j in enumerate(index):
        generator = search.npas.generators[f"l{j}"]
        weight_grad, weight_grads[j] = weight_grads[j], None
        if generator.templates < 2:
            continue
        group = search.npas.groups[f"g{search.npas.layer_groups[j]}"]
        bank, coefficients = (getattr(group, name) for name in generator.group_inputs)
        with torch.enable_grad():
            weight = generator(bank.detach(), coefficients)
            (grad,) = torch.autograd.grad(weight, coefficients, grad_outputs=weight_grad.to(weight.dtype))
        del weight, weight_grad
        rows, cols = generator.grid
        out[i] = grad.index_select(0, generator.coefficient_rows).reshape(rows, cols, generator.templates)
    return out


def _hard_shared_gradients(
    ctx: StrategyContext,
    groups: list[list[int]],
    config: GeneratorConfig,
    opts: SearchOptions,
    steps: int,
    batches: object,
    bar: object,
) -> tuple[dict, list[float]]:
    """Pre-train the hard-shared model of ``groups``; per layer, its coefficient gradient (see
    :func:`_coefficient_gradients`), and the losses. The model and its weight gradients go on return."""
    options = {"groups": _names(groups, list(ctx.names)), "hard": True}
    search, index, grads, losses = _pretrained_gradients(ctx, options, config, opts, steps, batches, bar)
    return _coefficient_gradients(search, index, grads), losses


def _refine(
    ctx: StrategyContext,
    groups: list[list[int]],
    base: SuperWeightAllocation,
    config: GeneratorConfig,
    opts: SearchOptions,
    steps: int,
    batches: object,
    bar: object,
) -> tuple[list[int], dict]:
    """Coefficient sets per layer (hard sharing split where coefficient gradients disagree)."""
    count = len(ctx.shapes)
    hard = [0] * count
    candidates = [g for g, members in enumerate(groups) if len(members) > 1 and base.templates[g] >= 2]
    record: dict = {"threshold": opts.refine_threshold, "steps": steps, "split": [], "kept_hard": []}
    if steps == 0 or not candidates:
        record["skipped"] = "refine_steps is 0" if steps == 0 else "no group of 2+ layers mixes 2+ templates"
        return hard, record
    per_layer, losses = _hard_shared_gradients(ctx, groups, config, opts, steps, batches, bar)
    gc.collect()  # free the hard-shared model (reference cycles) before the similarities
    agreement = torch.full((count, count), float("nan"), dtype=torch.float64)
    shares = list(hard)
    for g in candidates:
        members = groups[g]
        sim = cropped_cosine_similarity([per_layer[i] for i in members])
        agreement[torch.tensor(members)[:, None], torch.tensor(members)[None, :]] = sim
        sets = threshold_groups(sim, opts.refine_threshold - 1e-12)  # agree >= threshold: share
        if len(sets) == 1:
            continue
        trial = list(shares)
        for label, local in enumerate(sets):
            for m in local:
                trial[members[m]] = label
        alloc = allocate_superweights(ctx.shapes, groups, trial, ctx.kept, ctx.budget, config.max_templates)
        # Own coefficients are paid from the banks: accept the split only if it costs no templates.
        if alloc.templates == base.templates and (alloc.fits or not base.fits):
            shares = trial
            record["split"].append([[ctx.names[members[m]] for m in local] for local in sets])
        else:
            record["kept_hard"].append([ctx.names[i] for i in members])
    record["coefficient_similarity"] = similarity_record(agreement, list(ctx.names))
    record["loss"] = [losses[0], losses[-1]] if losses else []
    return shares, record


@register_strategy("swn")
def share_by_gradient_similarity(ctx: StrategyContext) -> Grouping:
    """SWN: group layers whose weight gradients agree; SuperWeights; refine hard -> soft sharing."""
    require_data("swn", ctx.data)
    opts = SearchOptions.parse(ctx.options, OPTIONS)
    steps = ctx.search_steps or DEFAULT_SEARCH_STEPS
    refine_steps = opts.refine_steps if opts.refine_steps is not None else steps // 2
    config = ctx.generator_config if ctx.generator_config is not None else GeneratorConfig()
    names = list(ctx.names)
    bins = bins_of(ctx.shapes)
    if ctx.num_groups is not None and not len(bins) <= ctx.num_groups <= len(names):
        raise ValueError(
            f"`num_groups` for 'swn' caps the groups its threshold search may leave; it should be between the "
            f"{len(bins)} bin(s) (layers of different kernel sizes / ranks never share) and the {len(names)} "
            f"layers, got {ctx.num_groups!r}."
        )
    minimum = minimum_superweight_budget(bins, ctx.kept)  # every bin merged: the fewest groups
    if ctx.budget < minimum:
        raise ValueError(
            f"budget {ctx.budget} is infeasible: the smallest feasible budget for this model and strategy 'swn' "
            f"is {minimum} ({ctx.kept} kept dense + one bank value for each of {len(bins)} bin(s)). "
            f"Ask for at least {minimum} or keep fewer parameters dense."
        )

    def allocation(groups: list[list[int]]) -> SuperWeightAllocation:
        hard = [0] * len(names)  # SWN starts from hard sharing inside each group
        return allocate_superweights(ctx.shapes, groups, hard, ctx.kept, ctx.budget, config.max_templates)

    total = steps + opts.grad_batches + (refine_steps + opts.grad_batches if refine_steps else 0)
    with torch.random.fork_rng(devices=[]), progress_bar(total, "npas_fx swn search", opts.progress) as bar:
        torch.manual_seed(ctx.seed)
        batches = cycle_batches(ctx.data)
        similarity, losses = _gradient_similarity(ctx, config, bins, opts, steps, batches, bar)
        gc.collect()  # the search model (an fx graph owns its module) and its optimiser live in reference cycles
        groups, threshold, alloc = fit_threshold(
            similarity, bins, allocation, opts.threshold, opts.threshold_step, ctx.num_groups
        )
        if alloc is None:
            alloc = allocation(groups)  # raises the budget's ValueError with the minimum
        shares, refinement = _refine(ctx, groups, alloc, config, opts, refine_steps, batches, bar)
        if bar.n < total:  # refinement was skipped: end the bar at the steps actually run
            bar.total = bar.n
            bar.refresh()
    provenance = {
        "search": "swn",
        "search_steps": steps,
        "grad_batches": opts.grad_batches,
        "lr": opts.lr,
        "loss": [losses[0], losses[-1]],
        "similarity": similarity_record(similarity, names),
        "bins": _names(bins, names),
        "threshold": threshold,
        "threshold_start": opts.threshold,
        "threshold_step": opts.threshold_step,
        "concat_weights": opts.concat_weights,
        "fits": bool(alloc.fits),
        "refinement": refinement,
    }
    return Grouping(tuple(tuple(g) for g in groups), force="superweight", shares=tuple(shares), provenance=provenance)
