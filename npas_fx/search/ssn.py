"""Strategy ``"ssn"``: Shapeshifter Networks' learned mapping (Plummer et al., ICLR 2022).

1. Search model: the layers in ONE bank, each mixing ``K = 4`` templates with softmax-normalised
   coefficients from a learned layer embedding (``emb``); the bank holds ``K`` templates of the
   largest layer, so every layer gets all ``K``.
2. A short pre-training (``search_steps`` Adam steps on ``data``).
3. k-means (scikit-learn) on the layers' coefficient vectors gives ``num_groups`` groups; the
   final model is then built from scratch with those groups and the user's generators.

``num_groups`` defaults to ``round(sqrt(layers))``, the default of the ``"random"`` strategy, so
that ``ssn`` and ``random`` differ only in *which* layers share, never in how many groups there
are: the comparison then measures the learned mapping itself. Layers with equal coefficient
vectors cannot be told apart, so the group count is capped by the number of distinct vectors.

Example:
    >>> import torch, npas_fx
    >>> import torch.nn.functional as F
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> gm = npas_fx.compile(model, 0.5, strategy="ssn", data=data, loss_fn=F.cross_entropy, search_steps=5)
    >>> plan = npas_fx.plan_of(gm)
    >>> len(plan.groups), plan.provenance["search_steps"], npas_fx.count_parameters(gm) == plan.budget
    (2, 5, True)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..budget import GeneratorConfig, minimum_budget
from ..compiler import plan_of
from ..strategies import Grouping, StrategyContext, register_strategy
from .common import SearchOptions, compile_search_model
from .pretrain import DEFAULT_SEARCH_STEPS, check_finite, cycle_batches, pretrain, progress_bar, require_data

__all__ = ["ssn_search_budget", "share_by_coefficient_clusters"]

OPTIONS = ("lr", "progress", "templates")


def ssn_search_budget(shapes: list[tuple[int, ...]], kept: int, templates: int, embedding_dim: int) -> int:
    """Budget of the search model: ``K`` templates of the largest layer, embeddings, the shared map.

    Example:
        >>> ssn_search_budget([(8, 4), (4, 4)], kept=0, templates=4, embedding_dim=24)
        276
    """
    largest = max(math.prod(s) for s in shapes)
    return kept + templates * largest + len(shapes) * embedding_dim + templates * (embedding_dim + 1)


def _check_feasible(ctx: StrategyContext, k: int) -> None:
    """Refuse a budget no grouping into ``k`` groups can meet, before any search is run."""
    config = ctx.generator_config if ctx.generator_config is not None else GeneratorConfig()
    sizes = [math.prod(s) for s in ctx.shapes]
    groups = [[i] for i in range(k - 1)] + [list(range(k - 1, len(sizes)))]  # the floor ignores membership
    minimum = minimum_budget(sizes, [s[0] for s in ctx.shapes], groups, ctx.kept, config)
    if ctx.budget < minimum:
        raise ValueError(
            f"budget {ctx.budget} is infeasible: the smallest feasible budget for this model and strategy "
            f"'ssn' with {k} groups is {minimum}. Ask for at least {minimum} or pass a smaller `num_groups`."
        )


def _cluster(vectors: np.ndarray, k: int, seed: int) -> list[list[int]]:
    distinct = len(np.unique(vectors.round(12), axis=0))
    k = min(k, distinct)
    from sklearn.cluster import KMeans  # imported here: it adds seconds to `import npas_fx`

    labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(vectors).labels_
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])  # canonical order: by first layer


@register_strategy("ssn")
def share_by_coefficient_clusters(ctx: StrategyContext) -> Grouping:
    """SSN: k-means on the softmax template coefficients learned in a short one-bank pre-training."""
    require_data("ssn", ctx.data)
    opts = SearchOptions.parse(ctx.options, OPTIONS)
    count = len(ctx.shapes)
    k = ctx.num_groups if ctx.num_groups is not None else max(1, round(count**0.5))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= count:
        raise ValueError(f"`num_groups` should be an int between 1 and the {count} generated layers, got {k!r}.")
    _check_feasible(ctx, k)
    steps = ctx.search_steps or DEFAULT_SEARCH_STEPS
    embedding_dim = ctx.generator_config.embedding_dim if ctx.generator_config is not None else 24
    config = GeneratorConfig(
        downsample="emb", max_templates=opts.templates, embedding_dim=embedding_dim, normalize="softmax"
    )
    budget = ssn_search_budget(list(ctx.shapes), ctx.kept, opts.templates, embedding_dim)
    search, index = compile_search_model(ctx, budget, "single", generators=config)
    kinds = {(x.generator, x.templates) for x in plan_of(search).layers}
    if kinds != {("emb", opts.templates)}:  # the search budget holds K templates of the largest layer
        raise RuntimeError(
            f"npas_fx bug: SSN's search model should mix {opts.templates} templates everywhere: {kinds}."
        )
    with progress_bar(steps, "npas_fx ssn search", opts.progress) as bar:
        losses = pretrain(search, cycle_batches(ctx.data), ctx.loss_fn, steps, ctx.seed, opts.lr, bar)
    group = search.npas.groups.g0
    with torch.no_grad():
        vectors = np.array(
            [
                search.npas.generators[f"l{i}"].coefficients(group.map_weight, group.map_bias).double().tolist()
                for i in index
            ]
        )
    if not np.isfinite(vectors).all():
        check_finite(float("nan"), f"the learned coefficients after {steps} pre-training steps", opts.lr)
    groups = _cluster(vectors, k, ctx.seed)
    provenance = {
        "search": "ssn",
        "search_steps": steps,
        "search_budget": budget,
        "templates": opts.templates,
        "num_groups": len(groups),
        "num_groups_asked": k,
        "lr": opts.lr,
        "loss": [losses[0], losses[-1]],
        "coefficients": {"layers": list(ctx.names), "vectors": vectors.tolist()},
    }
    return Grouping(tuple(tuple(g) for g in groups), provenance=provenance)
