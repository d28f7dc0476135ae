"""Gradient similarity between layers and grouping by a similarity threshold (SWN's search).

:func:`cropped_cosine_similarity` compares tensors of different sizes on their common top-left
block: for every pair ``(i, j)`` both are cropped to ``min`` of their sizes along every dimension
and the cosine of the crops is taken. Tensors of one shape form a class; for each pair of classes
the crops (one common shape) are stacked in chunks and one matrix product gives every inner
product of the chunk pair. Nothing is padded to the largest layer, so memory stays within the
inputs plus two chunks (``chunk_elements`` float64 values each), however many layers a bin holds
and however large its largest layer is (an ``Embedding(30522, 768)`` beside 768x768 projections).

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

import math
from collections.abc import Iterator, Sequence

import networkx as nx
import torch
from torch import Tensor

__all__ = ["cropped_cosine_similarity", "naive_cropped_cosine_similarity", "threshold_groups", "similarity_record"]

CHUNK_ELEMENTS = 2**24  # float64 values per stacked chunk (128 MiB): bounds the pass's extra memory


def cropped_cosine_similarity(tensors: Sequence[Tensor], chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``(L, L)`` cosine similarities of ``tensors`` (same ndim) on each pair's common top-left block.

    Every dimension is cropped (rows and columns of a weight, kernel sizes too). A pair whose crop
    of either tensor is all zeros has similarity 0; the matrix is exactly symmetric with an exact
    diagonal of 1. Computed in float64, ``chunk_elements`` values per stacked chunk at most (one
    layer's crop always fits, whatever its size).
    """
    if not tensors:
        return torch.zeros(0, 0, dtype=torch.float64)
    if len({t.dim() for t in tensors}) != 1:
        raise ValueError(f"tensors should have one number of dimensions, got {sorted({t.dim() for t in tensors})}.")
    if chunk_elements < 1:
        raise ValueError(f"`chunk_elements` should be a positive int, got {chunk_elements!r}.")
    classes: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        classes.setdefault(tuple(t.shape), []).append(i)
    shapes = list(classes)
    similarity = torch.zeros(len(tensors), len(tensors), dtype=torch.float64)
    for a, shape_a in enumerate(shapes):
        for shape_b in shapes[a:]:
            crop = tuple(min(x, y) for x, y in zip(shape_a, shape_b, strict=True))
            rows = max(1, chunk_elements // max(1, math.prod(crop)))
            for left_index, left in _cropped_chunks(tensors, classes[shape_a], crop, rows):
                for right_index, right in _cropped_chunks(tensors, classes[shape_b], crop, rows):
                    cosines = _cosines(left, right)
                    similarity[left_index[:, None], right_index[None, :]] = cosines
                    similarity[right_index[:, None], left_index[None, :]] = cosines.T
    similarity = similarity.clamp(-1.0, 1.0).triu()
    similarity = similarity + similarity.triu(1).T  # exactly symmetric (a product may round (i, j) != (j, i))
    similarity.fill_diagonal_(1.0)
    return similarity


def _cropped_chunks(
    tensors: Sequence[Tensor], members: list[int], crop: tuple[int, ...], rows: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(indices, (n, prod(crop)) float64)`` chunks of ``members`` cropped to ``crop`` (one copy, no padding)."""
    window = tuple(slice(0, c) for c in crop)
    for start in range(0, len(members), rows):
        chunk = members[start : start + rows]
        out = torch.empty(len(chunk), math.prod(crop), dtype=torch.float64)
        for row, i in enumerate(chunk):
            out[row].view(crop).copy_(tensors[i].detach()[window])  # copy_ casts to float64 in place
        yield torch.tensor(chunk, dtype=torch.int64), out


def _cosines(left: Tensor, right: Tensor) -> Tensor:
    """Cosines of every row of ``left`` with every row of ``right``; 0 where either row is all zeros."""
    dots = left @ right.T
    denominator = left.norm(dim=1)[:, None] * right.norm(dim=1)[None, :]
    return torch.where(denominator > 0, dots / denominator.clamp_min(1e-300), torch.zeros_like(dots))


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
