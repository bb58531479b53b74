"""Radix-select top-k (Triton) against torch.topk: the same multiset of kept values (ties make positions
ambiguous, so values are compared), positions unique, ascending and in range; among ties the lowest
positions. Shapes cover several BLOCK-sized chunks, -inf padding, +inf forced entries and heavy ties."""

import pytest
import torch

from sglang_mage.ops.selection.radix_topk import radix_topk_positions
from tests.utils import DEVICE


def keys_for(kind, rows, n, gen):
    x = torch.randn(rows, n, generator=gen)
    if kind == "padded":  # scores past a short prefix are -inf, forced sinks/local window +inf
        x[0, n // 3:] = float("-inf")
        x[:, :4] = float("inf")
        x[-1, -8:] = float("inf")
    elif kind == "ties":
        x = torch.randint(0, 5, (rows, n), generator=gen).float() * 0.25 - 0.5
    elif kind == "signs":  # negative, zero of both signs, tiny and huge magnitudes
        x = x * torch.tensor([1e-30, 1.0, 1e30]).repeat(n // 3 + 1)[:n]
        x[:, ::7] = -0.0
        x[:, 1::7] = 0.0
    return x


@pytest.mark.parametrize("kind", ["random", "padded", "ties", "signs"])
@pytest.mark.parametrize("rows, n, n_top", [(1, 100, 7), (3, 5000, 300), (2, 4097, 4097), (4, 2048, 1), (2, 64, 0)])
@pytest.mark.parametrize("chunk, block, bits", [(None, 1024, 8), (256, 128, 8), (256, 128, 11)],
                         ids=["default-chunk", "chunk256", "chunk256-bits11"])
def test_radix_topk_matches_torch(kind, rows, n, n_top, chunk, block, bits):
    # chunk256 cuts every row into many programs, so the cross-program passes (atomics, per-chunk offsets,
    # ties that straddle chunks) carry the result.
    gen = torch.Generator().manual_seed(rows * n + n_top)
    keys = keys_for(kind, rows, n, gen)
    out = torch.full((rows, n_top), -1, dtype=torch.int64, device=DEVICE)  # unwritten entries stay -1
    got = radix_topk_positions(keys.to(DEVICE), n_top, out=out, chunk=chunk, block=block, bits=bits).cpu()
    assert got.shape == (rows, n_top)
    for r in range(rows):
        pos = got[r]
        assert bool((pos >= 0).all()) and bool((pos < n).all()), "every entry written, in range"
        assert torch.equal(pos, pos.unique(sorted=True)), "unique and ascending"
        want = torch.topk(keys[r], n_top).values.sort().values if n_top else torch.empty(0)
        assert torch.equal(keys[r][pos].sort().values, want), "the same kept values as torch.topk"
        if n_top:
            kth = want[0]
            ties = (keys[r] == kth).nonzero().flatten()
            n_ties_kept = int((keys[r][pos] == kth).sum())
            assert torch.equal(pos[keys[r][pos] == kth], ties[:n_ties_kept]), "lowest positions among ties"


def test_default_chunk_fills_the_gpu_within_bounds():
    from sglang_mage.ops.selection.radix_topk import default_chunk

    assert default_chunk(4, 131072) == 2048  # batch 1, 4 KV heads: 256 programs
    assert default_chunk(32, 131072) == 8192  # capped: 512 programs
    assert default_chunk(1, 100) == 1024  # never below one block


def test_chunk_must_be_a_multiple_of_block():
    with pytest.raises(AssertionError, match="multiple"):
        radix_topk_positions(torch.zeros(1, 300, device=DEVICE), 5, chunk=200, block=128)


def test_radix_topk_leading_dims_and_strided_rows():
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(2, 3, 3000, generator=gen)
    keys = big[:, :, :2500]  # rows strided by 3000
    got = radix_topk_positions(keys.to(DEVICE), 40).cpu()
    assert got.shape == (2, 3, 40)
    want = torch.topk(keys, 40, dim=-1).indices.sort(-1).values
    assert torch.equal(got, want)
