"""Fused first step (Triton) against its PyTorch reference over a grid of shapes: the exact block
attention output and the block-mean-query scores. Output buffers are NaN-filled; tolerances per dtype from
tests/utils.TOLERANCES."""

import itertools

import pytest
import torch

from sglang_mage.ops.first_step import fused_first_step, fused_first_step_ref
from tests.ops.test_selection import make_batch
from tests.utils import ON_GPU, assert_close

PREFIXES = [0, 1, 37, 90] if not ON_GPU else [0, 1, 37, 300, 1000]
GRID = list(itertools.product([4, 32], [1, 2, 7], [64, 128], [torch.float32, torch.float16]))


@pytest.mark.parametrize("B, G, D, dtype", GRID)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_reference(B, G, D, dtype, num_splits):
    b = make_batch(PREFIXES, B, G, 2, D, dtype, seed=B * G + D, short_last=False)
    v_buffer = torch.randn_like(b["k_buffer"])
    args = (b["q"], b["k_buffer"], v_buffer, b["qo_indptr"], b["req_to_token"], b["req_pool_indices"],
            b["prefix_lens"], b["sm_scale"], B, max(PREFIXES))
    out = torch.full_like(b["q"], float("nan"))
    scores = torch.full((len(PREFIXES), 2, max(PREFIXES)), float("nan"), device=b["q"].device)
    fused_first_step(*args, out=out, scores=scores, num_splits=num_splits)
    ref_out, ref_scores = fused_first_step_ref(*(a.cpu() if torch.is_tensor(a) else a for a in args))
    assert_close(out, ref_out, dtype, "out")
    finite = torch.isfinite(ref_scores)
    assert torch.equal(torch.isfinite(scores.cpu()), finite), "scores written outside [0, prefix)"
    assert_close(scores.cpu()[finite], ref_scores[finite], dtype, "scores")


def test_scores_rank_like_the_block_mean_query_logits():
    # The top-scored position is the one whose key best matches the block-mean query, per KV head.
    B, G = 4, 2
    b = make_batch([64], B, G, 1, 32, torch.float32, seed=9, short_last=False)
    qbar = b["q"].view(B, G, 32).mean((0, 1))
    slot = b["req_to_token"][b["req_pool_indices"][0], 17].long()
    b["k_buffer"][slot, 0] = qbar * 10  # plant a key aligned with the mean query at position 17
    _, scores = fused_first_step(b["q"], b["k_buffer"], torch.randn_like(b["k_buffer"]), b["qo_indptr"],
                                 b["req_to_token"], b["req_pool_indices"], b["prefix_lens"], b["sm_scale"], B, 64)
    assert int(scores[0, 0].argmax()) == 17
