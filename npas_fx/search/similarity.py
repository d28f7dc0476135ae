"""Gradient similarity between layers and grouping by a similarity threshold (SWN's search).

:func:`cropped_cosine_similarity` compares tensors of different sizes on their common top-left
block: for every pair ``(i, j)`` both are cropped to ``min`` of their sizes along every dimension
and the cosine of the crops is taken. All pairs are computed at once: the tensors are zero-padded
into one batch, so one matrix product gives every cropped inner product (padding adds zeros), and
2-D prefix sums of the squared entries give every cropped norm (no loop over pairs).

:func:`threshold_groups` merges layers whose similarity exceeds a threshold: the groups are the
connected components of the similarity graph (networkx), so sharing is transitive (a union of the
pairs above the threshold, not a relabelling).

Example:
    >>> import torch
    >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> s = cropped_cosine_similarity([a, a[:1], -a])
    >>> s.round(decimals=3).tolist()
    [[1.0, 1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]
    >>> threshold_groups(s, 0.5)
    [[0, 1], [2]]
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import torch
from torch import Tensor

__all__ = ["cropped_cosine_similarity", "naive_cropped_cosine_similarity", "threshold_groups", "similarity_record"]


def cropped_cosine_similarity(tensors: Sequence[Tensor]) -> Tensor:
    """``(L, L)`` cosine similarities of ``tensors`` (same ndim) on each pair's common top-left block.

    The first two dimensions may differ (rows and columns of a weight); the rest are cropped too.
    A pair whose crop of either tensor is all zeros has similarity 0; the diagonal is exactly 1.
    Computed in float64.
    """
    if not tensors:
        return torch.zeros(0, 0, dtype=torch.float64)
    if len({t.dim() for t in tensors}) != 1:
        raise ValueError(f"tensors should have one number of dimensions, got {sorted({t.dim() for t in tensors})}.")
    count = len(tensors)
    as2d = [t.detach().double().reshape(t.shape[0], t.shape[1] if t.dim() > 1 else 1, -1) for t in tensors]
    rest = max(t.shape[2] for t in as2d)
    if any(t.shape[2] != rest for t in as2d):  # trailing dims differ: crop them to the common block too
        common = [min(t.shape[d] for t in tensors) for d in range(2, tensors[0].dim())]
        as2d = [
            t.detach()
            .double()[(slice(None), slice(None), *(slice(0, c) for c in common))]
            .reshape(t.shape[0], t.shape[1], -1)
            for t in tensors
        ]
        rest = as2d[0].shape[2]
    rows = max(t.shape[0] for t in as2d)
    cols = max(t.shape[1] for t in as2d)
    padded = torch.zeros(count, rows, cols, rest, dtype=torch.float64)
    for i, t in enumerate(as2d):
        padded[i, : t.shape[0], : t.shape[1]] = t
    flat = padded.reshape(count, -1)
    dots = flat @ flat.T  # (L, L): zeros outside each tensor make this the inner product of the crops
    # energy[i, a, b] = squared norm of tensor i's top-left (a x b) block (2-D prefix sums).
    energy = torch.zeros(count, rows + 1, cols + 1, dtype=torch.float64)
    energy[:, 1:, 1:] = padded.pow(2).sum(-1).cumsum(1).cumsum(2)
    sizes = torch.tensor([[t.shape[0], t.shape[1]] for t in as2d])
    crop_rows = torch.minimum(sizes[:, None, 0], sizes[None, :, 0])  # (L, L)
    crop_cols = torch.minimum(sizes[:, None, 1], sizes[None, :, 1])
    index = torch.arange(count)[:, None].expand(count, count)
    norm_i = energy[index, crop_rows, crop_cols].sqrt()  # tensor i cropped to pair (i, j)
    denominator = norm_i * norm_i.T
    similarity = torch.where(denominator > 0, dots / denominator.clamp_min(1e-300), torch.zeros_like(dots))
    similarity = similarity.clamp(-1.0, 1.0).triu()
    similarity = similarity + similarity.triu(1).T  # exactly symmetric (the product may round i,j != j,i)
    similarity.fill_diagonal_(1.0)
    return similarity


def naive_cropped_cosine_similarity(tensors: Sequence[Tensor]) -> Tensor:
    """Reference for :func:`cropped_cosine_similarity`: one crop and one cosine per pair (slow).

    Example:
        >>> import torch
        >>> naive_cropped_cosine_similarity([torch.ones(2, 3), torch.ones(3, 2)]).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    count = len(tensors)
    out = torch.eye(count, dtype=torch.float64)
    for i in range(count):
        for j in range(count):
            if i == j:
                continue
            common = tuple(slice(0, min(a, b)) for a, b in zip(tensors[i].shape, tensors[j].shape, strict=True))
            a, b = tensors[i][common].double().reshape(-1), tensors[j][common].double().reshape(-1)
            norm = a.norm() * b.norm()
            out[i, j] = float((a @ b) / norm) if norm > 0 else 0.0
    return out


def threshold_groups(
    similarity: Tensor, threshold: float, bins: Sequence[Sequence[int]] | None = None
) -> list[list[int]]:
    """Connected components of the graph with an edge wherever ``similarity > threshold``.

    Edges only join layers of one bin (``bins``: lists of layer indices; default: one bin).
    Groups are sorted, and ordered by their first layer.
    """
    count = similarity.shape[0]
    bins = [list(range(count))] if bins is None else [list(b) for b in bins]
    graph = nx.Graph()
    graph.add_nodes_from(range(count))
    for members in bins:
        index = torch.tensor(members, dtype=torch.int64)
        block = similarity[index][:, index]
        rows, cols = torch.nonzero(torch.triu(block > threshold, diagonal=1), as_tuple=True)
        graph.add_edges_from(zip(index[rows].tolist(), index[cols].tolist(), strict=True))
    return sorted((sorted(c) for c in nx.connected_components(graph)), key=lambda g: g[0])


def similarity_record(similarity: Tensor, names: Sequence[str]) -> dict:
    """``{"layers": names, "matrix": rows}`` for a plan's provenance (JSON: ``nan`` becomes ``None``).

    Example:
        >>> similarity_record(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), ["a", "b"])
        {'layers': ['a', 'b'], 'matrix': [[1.0, None], [None, 1.0]]}
    """
    rows = similarity.tolist()
    matrix = [[None if value != value else float(value) for value in row] for row in rows]  # nan != nan
    return {"layers": list(names), "matrix": matrix}
