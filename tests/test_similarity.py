"""SWN's cropped cosine similarity: equal to the former padded computation, memory that scales.

The former implementation (kept below as the reference) zero-padded every layer of a bin to the
bin's largest rows x largest columns and took one matrix product; it is exact but needs
``layers x max rows x max cols`` float64 values (18 GB for a 2.7M-parameter model with an
``Embedding(30522, 64)``). The current one must give the same matrix while allocating about the
size of its inputs.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from npas_fx.search.similarity import cropped_cosine_similarity, naive_cropped_cosine_similarity
from npas_fx.search.swn import binned_similarity
from npas_fx.superweights import bins_of


def padded_reference(tensors: list[Tensor]) -> Tensor:
    """The former all-pairs computation: zero-pad to (max rows, max cols), one product, prefix-sum norms."""
    count = len(tensors)
    as2d = [t.double().reshape(t.shape[0], t.shape[1] if t.dim() > 1 else 1, -1) for t in tensors]
    rows, cols, rest = (max(t.shape[d] for t in as2d) for d in range(3))
    padded = torch.zeros(count, rows, cols, rest, dtype=torch.float64)
    for i, t in enumerate(as2d):
        padded[i, : t.shape[0], : t.shape[1]] = t
    flat = padded.reshape(count, -1)
    dots = flat @ flat.T
    energy = torch.zeros(count, rows + 1, cols + 1, dtype=torch.float64)
    energy[:, 1:, 1:] = padded.pow(2).sum(-1).cumsum(1).cumsum(2)
    sizes = torch.tensor([[t.shape[0], t.shape[1]] for t in as2d])
    crop_rows = torch.minimum(sizes[:, None, 0], sizes[None, :, 0])
    crop_cols = torch.minimum(sizes[:, None, 1], sizes[None, :, 1])
    norm_i = energy[torch.arange(count)[:, None].expand(count, count), crop_rows, crop_cols].sqrt()
    denominator = norm_i * norm_i.T
    similarity = torch.where(denominator > 0, dots / denominator.clamp_min(1e-300), torch.zeros_like(dots))
    similarity = similarity.clamp(-1.0, 1.0).triu()
    similarity = similarity + similarity.triu(1).T
    similarity.fill_diagonal_(1.0)
    return similarity


def random_layers(sizes: list[tuple[int, int]], trailing: tuple[int, ...], seed: int) -> list[Tensor]:
    """Random tensors of the given (rows, cols) + trailing shapes, some repeated, one all zeros."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(r, c, *trailing, generator=g) for r, c in sizes]
    tensors += [tensors[0][:1, :1].clone(), torch.randn(*tensors[0].shape, generator=g)]  # a crop, a same-shape twin
    tensors[1] = torch.zeros_like(tensors[1])  # a layer with no gradient: similarity 0
    return tensors


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=6),
    st.sampled_from([(), (3,), (2, 2)]),
    st.sampled_from([1, 5, 64, 2**24]),
    st.integers(0, 2**16),
)
def test_similarity_equals_the_former_padded_computation(sizes, trailing, chunk_elements, seed):
    tensors = random_layers(sizes, trailing, seed)
    fast = cropped_cosine_similarity(tensors, chunk_elements=chunk_elements)
    assert torch.allclose(fast, padded_reference(tensors), rtol=0, atol=1e-12)
    assert torch.equal(fast, fast.T) and torch.equal(fast.diagonal(), torch.ones(len(tensors), dtype=torch.float64))
    assert torch.equal(fast[1, 2:], torch.zeros(len(tensors) - 2, dtype=torch.float64))  # the all-zero layer


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)), min_size=2, max_size=5),
    st.integers(0, 2**16),
)
def test_similarity_crops_every_dimension_per_pair(shapes, seed):
    # Kernel sizes differing inside one call: each pair is cropped to its own common block.
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*shape, generator=g) for shape in shapes]
    assert torch.allclose(
        cropped_cosine_similarity(tensors, chunk_elements=3), naive_cropped_cosine_similarity(tensors), atol=1e-12
    )


def test_similarity_allocates_about_its_inputs_not_a_padded_batch():
    # Padding these to (3000, 3000) would allocate 2 x 72 MB; the crops are 3000 x 4 values.
    tensors = [torch.randn(3000, 4), torch.randn(4, 3000), torch.randn(5, 5), torch.randn(3000, 4)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        similarity = cropped_cosine_similarity(tensors)
    allocated = sum(event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0)
    inputs_as_float64 = sum(t.numel() for t in tensors) * 8
    assert allocated < 4 * inputs_as_float64
    assert torch.allclose(similarity, padded_reference(tensors), atol=1e-12)


def test_binned_similarity_is_the_per_bin_similarity_and_nan_across_bins():
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4), (4, 4, 3, 3), (30, 2), (2, 4, 3, 3), (5, 7), (4, 4, 1, 1)]
    tensors = [torch.randn(*s, generator=g) for s in shapes]
    bins = bins_of(shapes)
    out = binned_similarity(tensors, bins)
    for members in bins:
        index = torch.tensor(members)
        assert torch.allclose(out[index[:, None], index[None, :]], padded_reference([tensors[i] for i in members]))
    same_bin = torch.zeros(len(shapes), len(shapes), dtype=torch.bool)
    for members in bins:
        same_bin[torch.tensor(members)[:, None], torch.tensor(members)[None, :]] = True
    assert out[~same_bin].isnan().all() and not out[same_bin].isnan().any()
