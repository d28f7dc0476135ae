"""Shared pieces of the accuracy-against-budget sweeps (``accuracy.py`` on digits, ``accuracy_lm.py`` on text).

One protocol for every method at every budget: ``dense`` (the original), ``narrow`` (the dense model
narrowed or widened to the parameter count closest to the budget) and each npas_fx strategy.
Learned strategies search for ``SEARCH_SHARE`` of the training steps, then the final model is
trained from scratch for the full run. Results are ``{(method, budget): [run dict per seed]}``; a run
dict holds the metric, ``params``, ``search_s``, ``groups``, ``threshold`` and ``shape``.

Example:
    >>> mean_std([0.5, 0.7], digits=2)
    '0.60 ± 0.14'
    >>> mean_std([0.5], digits=2)
    '0.50'
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

import npas_fx

__all__ = ["SEARCH_SHARE", "LEARNED", "mean_std", "build", "method_table", "search_notes", "plot", "write_marked"]

SEARCH_SHARE = 0.15
LEARNED = ("ssn", "swn")
Results = dict[tuple[str, float], list[dict]]


def mean_std(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± std`` of ``values`` times ``scale`` (only the value for a single run)."""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def build(
    key: str,
    budget: float,
    seed: int,
    original: nn.Module,
    narrowed: Callable[[int], tuple[nn.Module, Any]],
    learned: Callable[[], dict],
    **options: Any,
) -> tuple[nn.Module, dict]:
    """The model of one sweep cell and its run dict (``params``, ``search_s``, ``shape``, plan facts).

    ``key``: ``"dense"``, ``"narrow"`` (``narrowed(target)`` gives the model and its shape) or a
    strategy; learned ones get ``learned()`` (``data``, ``loss_fn``, ``search_steps``) as compile
    arguments. ``options`` go to :func:`npas_fx.compile`.
    """
    total = npas_fx.count_parameters(original)
    target = round(budget * total)
    start = time.perf_counter()
    shape, plan = None, None
    if key == "dense":
        net = original
    elif key == "narrow":
        net, shape = narrowed(target)
    else:
        extra = {**learned(), "options": {"progress": False}} if key in LEARNED else {}
        net = npas_fx.compile(original, budget, strategy=key, seed=seed, **extra, **options)
        plan = npas_fx.plan_of(net)
        assert npas_fx.count_parameters(net) == target, (
            f"{key} at {budget}: {npas_fx.count_parameters(net)} != {target}"
        )
    run = {
        "params": npas_fx.count_parameters(net),
        "search_s": time.perf_counter() - start,
        "shape": shape,
        "groups": len(plan.groups) if plan else None,
        "threshold": plan.provenance.get("threshold") if plan else None,
    }
    return net, run


def method_table(
    results: Results, budgets: Sequence[float], strategies: Iterable[str], cell: Callable[[list[dict]], str]
) -> list[str]:
    """Markdown rows: one per method, one column per budget (the dense original under 100 %)."""
    lines = ["| method | " + " | ".join(f"{b:.0%}" for b in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
    if ("dense", 1.0) in results:
        cells = [cell(results[("dense", 1.0)]) if b == 1.0 else "" for b in budgets]
        lines.append("| dense original | " + " | ".join(cells) + " |")
    for key, label in [("narrow", "dense narrowed/widened")] + [(s, f"npas_fx `{s}`") for s in strategies]:
        cells = [cell(results[(key, b)]) if (key, b) in results else "" for b in budgets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def search_notes(results: Results, budgets: Sequence[float]) -> list[str]:
    """Lines on the learned strategies: mean search + compile time, and what ``swn`` settled on."""
    lines = []
    for s in LEARNED:
        cells = [
            f"{b:.0%}: {statistics.fmean(r['search_s'] for r in results[(s, b)]):.1f} s"
            for b in budgets
            if (s, b) in results
        ]
        if cells:
            lines.append(f"Mean `{s}` search + compile time: " + ", ".join(cells) + ".")
    swn = [
        (b, [r["groups"] for r in results[("swn", b)]], [r["threshold"] for r in results[("swn", b)]])
        for b in budgets
        if ("swn", b) in results
    ]
    if swn:
        lines.append(
            "`swn` groups / threshold reached per seed: " + "; ".join(f"{b:.0%}: {g} / {t}" for b, g, t in swn) + "."
        )
    return lines


def plot(
    results: Results,
    budgets: Sequence[float],
    strategies: Iterable[str],
    metric: Callable[[dict], float],
    labels: tuple[str, str],
    path: Path,
) -> None:
    """``metric`` against budget (log x), one line per method with std error bars; ``labels``: y label, title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in ("narrow", *strategies):
        xs = [b for b in budgets if (key, b) in results]
        if not xs:
            continue
        values = [[metric(r) for r in results[(key, b)]] for b in xs]
        means = [statistics.fmean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        style = {"linestyle": "--", "color": "black"} if key == "narrow" else {}
        label = "dense narrowed/widened" if key == "narrow" else key
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label, **style)
    if ("dense", 1.0) in results:
        mean = statistics.fmean(metric(r) for r in results[("dense", 1.0)])
        ax.axhline(mean, color="gray", linestyle=":", label="dense original")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:.0%}" for b in budgets])
    ax.set_xlabel("parameter budget (fraction of the original, log scale)")
    ax.set_ylabel(labels[0])
    ax.set_title(labels[1])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_marked(path: Path, text: str) -> None:
    """Write ``text`` between ``<!-- table -->`` and ``<!-- /table -->`` in ``path``, keeping the prose around it."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    marker = "<!-- table -->"
    if marker in old:
        head, _, rest = old.partition(marker)
        tail = rest.partition("<!-- /table -->")[2]
        path.write_text(f"{head}{marker}\n{text}\n<!-- /table -->{tail}", encoding="utf-8")
    else:
        path.write_text(f"{marker}\n{text}\n<!-- /table -->\n", encoding="utf-8")
