"""Kernels as custom ops under ``torch.compile`` on CPU (``npas_fx.opaque_kernels``).

The ops must be correct operators (``torch.library.opcheck``: schema, fake tensors, autograd
registration), equal to the eager kernels in value and gradient on every layout (a head only,
wrapping copies, more copies than the bank has values), and be what a CPU compile calls: the
traced forward graph holds ``npas_fx::skew_tile``, the backward ``npas_fx::skew_tile_backward``
(tiles) or ``npas_fx::hashed_blocks_backward`` (hashing). Exporting must not use them (an exported
graph holds ATen ops only).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from npas_fx import hash_kernels, kernels
from npas_fx.generators import Hash, Mask, Repeat, SignedRepeat

# (bank values, weight values, offset): one wrap, several copies, more copies than values (whole
# circulants), a single extra row, a tail only
LAYOUTS = [(7, 10, 3), (5, 23, 0), (3, 40, 2), (6, 12, 5), (11, 12, 10)]


@pytest.mark.parametrize(("size", "numel", "offset"), LAYOUTS)
def test_the_tile_ops_pass_opcheck_and_equal_the_eager_kernels(size, numel, offset):
    bank = torch.randn(size, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.npas_fx.skew_tile.default, (bank, numel, offset, 1.3))
    grad = torch.randn(numel, dtype=torch.float64)
    torch.library.opcheck(torch.ops.npas_fx.skew_tile_backward.default, (grad, size, offset, 1.3))
    out = torch.ops.npas_fx.skew_tile(bank, numel, offset, 1.3)
    want = kernels._SkewTile.apply(bank, numel, offset, 1.3)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out, bank, grad)[0], torch.autograd.grad(want, bank, grad)[0])
    assert torch.autograd.gradcheck(lambda b: torch.ops.npas_fx.skew_tile(b, numel, offset, 1.3), (bank,))


def _hashed_by_autograd(bank: torch.Tensor, rows: torch.Tensor, numel: int, chunk: int, gain: float) -> torch.Tensor:
    """The hashed blocks in plain differentiable ops: an independent reference for the backward."""
    slots = hash_kernels.slot_count(bank.numel(), chunk)
    wrapped = bank[torch.arange(slots * chunk) % bank.numel()] * gain
    table = torch.cat([wrapped, -wrapped]).view(2 * slots, chunk)
    return table[rows.long()].reshape(-1)[:numel]


# chunks of 1, 4-64; partial last blocks; banks smaller and larger than the weight
@pytest.mark.parametrize(
    ("size", "numel", "chunk"), [(7, 20, 4), (5, 23, 1), (3, 40, 8), (20, 9, 16), (1000, 600, 64), (90, 100, 7)]
)
def test_the_hash_backward_op_passes_opcheck_and_equals_autograd(size, numel, chunk):
    bank = torch.randn(size, dtype=torch.float64, requires_grad=True)
    rows = hash_kernels.hash_rows(numel, chunk, 3, size)
    grad = torch.randn(numel, dtype=torch.float64)
    torch.library.opcheck(torch.ops.npas_fx.hashed_blocks_backward.default, (grad, rows, size, chunk, 1.3))
    want = torch.autograd.grad(_hashed_by_autograd(bank, rows, numel, chunk, 1.3), bank, grad)[0]
    torch.testing.assert_close(torch.ops.npas_fx.hashed_blocks_backward(grad, rows, size, chunk, 1.3), want)
    got = torch.autograd.grad(hash_kernels.hashed_blocks(bank, rows, numel, chunk, 1.3), bank, grad)[0]
    torch.testing.assert_close(got, want)


def _targets(graphs: list[torch.fx.GraphModule]) -> set[object]:
    return {node.target for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")  # the recording backend's
@pytest.mark.parametrize(
    "make",
    [
        lambda: (Repeat((9, 7), offset=2, gain=1.2), "skew_tile"),
        lambda: (SignedRepeat((8, 5), offset=1, gain=1.3), "skew_tile"),
        lambda: (Mask((6, 5), 3), "skew_tile"),
        lambda: (Hash((10, 13), salt=4, gain=1.1, chunk=8, bank_size=4), "hashed_blocks"),
        lambda: (Hash((10, 13), salt=4, chunk=1, bank_size=4), "hashed_blocks"),
        lambda: (Hash((5, 6), salt=4, gain=1.1, chunk=8, bank_size=20), "hashed_blocks"),  # signs per block
    ],
    ids=["repeat", "signed", "mask", "hash-c8", "hash-c1", "hash-big-bank"],
)
def test_a_cpu_compile_calls_the_ops_and_matches_eager(make):
    torch._dynamo.reset()
    gen, kernel = make()
    size = gen.bank_size if isinstance(gen, Hash) else 4
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(gen, backend=backend, fullgraph=True)
    banks = [torch.randn(size).requires_grad_(True) for _ in range(2)]
    with torch.no_grad():
        banks[1].copy_(banks[0])
    outs = [gen(banks[0]), compiled(banks[1])]
    torch.testing.assert_close(outs[1], outs[0])
    upstream = torch.randn_like(outs[0])
    params = [list(gen.parameters()) for _ in range(2)]
    grads = [torch.autograd.grad(out, [bank, *ps], upstream) for out, bank, ps in zip(outs, banks, params, strict=True)]
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)
    if kernel == "skew_tile":  # the tiles' forward too; the hashed blocks' forward is a gather inductor fuses
        assert torch.ops.npas_fx.skew_tile.default in _targets(backend.fw_graphs)
    assert getattr(torch.ops.npas_fx, f"{kernel}_backward").default in _targets(backend.bw_graphs)


def test_export_traces_the_aten_kernels_not_the_ops():
    class Tiled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bank = torch.nn.Parameter(torch.randn(5))
            self.gen = SignedRepeat((6, 4), offset=2, gain=1.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.gen(self.bank).t()

    model, x = Tiled(), torch.randn(3, 4)
    exported = torch.export.export(model, (x,), strict=False)
    namespaces = {getattr(t, "namespace", None) for t in _targets([exported.graph_module])}
    assert "npas_fx" not in namespaces
    torch.testing.assert_close(exported.module()(x), model(x))
