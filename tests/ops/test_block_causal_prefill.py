"""Chunked block-causal prefill equals SGLang's block-by-block prefill (fp32, <= 1e-5), chunk planning, and
the three-state decomposition that the FlashInfer path will use."""

import pytest
import torch

from sglang_mage.ops.block_causal_prefill import (
    block_by_block_ref,
    block_causal_decomposed_ref,
    block_causal_mask,
    chunked_ref,
    plan_chunks,
)

ATOL = 1e-5


def qkv(n, hq=4, hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hq, d, generator=g), torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g))


@pytest.mark.parametrize(
    "cached, prompt, B, chunk, expect",
    [
        (0, 16, 4, 8, [(0, 8), (8, 16)]),
        (0, 18, 4, 8, [(0, 8), (8, 16)]),  # the 2-token tail joins the [MASK] block
        (0, 18, 4, 10, [(0, 8), (8, 16)]),  # a chunk size inside a block snaps down to a block boundary
        (0, 18, 4, 3, [(0, 4), (4, 8), (8, 12), (12, 16)]),  # never less than one block
        (8, 30, 4, 100, [(8, 28)]),  # a cached prefix (radix hit) is skipped
        (0, 3, 4, 8, []),  # shorter than a block: nothing to prefill in chunks
        (32, 32, 32, 64, []),
    ],
)
def test_plan_chunks(cached, prompt, B, chunk, expect):
    assert plan_chunks(cached, prompt, B, chunk) == expect


@pytest.mark.parametrize("args", [(2, 16, 4, 8), (0, 16, 0, 8), (0, 16, 4, 0)])
def test_plan_chunks_rejects_bad_input(args):
    with pytest.raises(ValueError):
        plan_chunks(*args)


def test_block_causal_mask_matches_definition():
    m = block_causal_mask(4, 12, 4)
    for row, p in enumerate(range(4, 12)):
        assert m[row].tolist() == [j < (p // 4 + 1) * 4 for j in range(12)]


@pytest.mark.parametrize("B", [4, 32])
@pytest.mark.parametrize("prompt", [37, 130, 257])
@pytest.mark.parametrize("chunk", ["one_block", "three_blocks", "inside_block", "whole"])
def test_chunked_equals_block_by_block(B, prompt, chunk):
    size = {"one_block": B, "three_blocks": 3 * B, "inside_block": 2 * B + B // 2, "whole": 10**6}[chunk]
    q, k, v = qkv(prompt, seed=prompt + B)
    chunks = plan_chunks(0, prompt, B, size)
    full = prompt // B * B
    ref = block_by_block_ref(q, k, v, B)[:full]
    got = chunked_ref(q, k, v, chunks, B)[:full]
    assert not torch.isnan(got).any(), "a prompt block was left out of every chunk"
    assert (got - ref).abs().max().item() <= ATOL
    dec = block_causal_decomposed_ref(q, k, v, chunks, B)[:full]
    assert (dec - ref).abs().max().item() <= ATOL


def test_mixed_prompt_lengths_with_cached_prefixes():
    # A batch of requests: different prompt lengths, some with a radix-cache hit of whole blocks.
    B = 4
    for i, (prompt, cached) in enumerate([(5, 0), (64, 16), (101, 0), (250, 200)]):
        q, k, v = qkv(prompt, seed=i)
        chunks = plan_chunks(cached, prompt, B, 24)
        if not chunks:
            continue
        lo, hi = chunks[0][0], chunks[-1][1]
        ref = block_by_block_ref(q, k, v, B)[lo:hi]
        assert (chunked_ref(q, k, v, chunks, B)[lo:hi] - ref).abs().max().item() <= ATOL
        assert (block_causal_decomposed_ref(q, k, v, chunks, B)[lo:hi] - ref).abs().max().item() <= ATOL


def test_token_causal_alone_is_not_block_causal():
    # Guards the test itself: dropping state (b) of the decomposition must be caught.
    B, prompt = 4, 32
    q, k, v = qkv(prompt)
    ref = block_by_block_ref(q, k, v, B)
    scale = q.shape[-1] ** -0.5
    causal = torch.softmax(
        (torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) * scale).masked_fill(
            ~torch.ones(prompt, prompt, dtype=torch.bool).tril(), float("-inf")), -1)
    wrong = torch.einsum("hqk,khd->qhd", causal, v.repeat_interleave(2, 1))
    assert (wrong - ref).abs().max().item() > 1e-2
