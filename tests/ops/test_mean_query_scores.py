"""Block-mean-query logits (Triton, ops/selection/mean_query_scores.py) against the PyTorch reference over a
grid of shapes; outputs NaN-filled so an unwritten position fails. Tolerances per dtype from tests/utils."""

import itertools

import pytest
import torch

from sglang_mage.ops.selection import block_mean_query_triton, mean_query_scores, mean_query_scores_ref
from sglang_mage.ops.selection.quest import block_mean_query
from tests.ops.test_selection import make_batch
from tests.utils import ON_GPU, assert_close

PREFIXES = [0, 1, 37, 90, 200] if not ON_GPU else [0, 1, 37, 300, 5000]
GRID = list(itertools.product([4, 32], [1, 2, 7], [64, 128], [torch.float32, torch.float16]))


def scores_of(b, B, max_prefix, hkv):
    out = torch.full((len(b["prefix_lens"]), hkv, max_prefix), float("nan"), device=b["q"].device)
    args = (b["q"], b["k_buffer"], b["qo_indptr"], b["req_to_token"], b["req_pool_indices"], b["prefix_lens"],
            b["sm_scale"])
    mean_query_scores(*args, B, max_prefix, out=out)
    ref = mean_query_scores_ref(*(a.cpu() if torch.is_tensor(a) else a for a in args), max_prefix)
    return out.cpu(), ref


@pytest.mark.parametrize("B, G, D, dtype", GRID)
def test_matches_reference(B, G, D, dtype):
    b = make_batch(PREFIXES, B, G, 2, D, dtype, seed=B * G + D, short_last=False)
    got, ref = scores_of(b, B, max(PREFIXES) + 5, 2)  # positions past every prefix must come out -inf too
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), finite), "scores written outside [0, prefix) or left unwritten"
    assert bool((got[~finite] == float("-inf")).all())
    assert_close(got[finite], ref[finite], dtype, "scores")


def test_ragged_last_block_and_block_mean_query():
    # A short last extend averages only its own rows, as quest.block_mean_query does for full blocks.
    b = make_batch([50, 20, 64], 4, 3, 2, 32, torch.float32, seed=3, short_last=True)
    got, ref = scores_of(b, 4, 64, 2)
    finite = torch.isfinite(ref)
    assert_close(got[finite], ref[finite], torch.float32, "ragged scores")
    full = make_batch([50, 20], 4, 3, 2, 32, torch.float32, seed=4, short_last=False)
    want = block_mean_query(full["q"], full["qo_indptr"], 2, 4)
    assert_close(block_mean_query_triton(full["q"], full["qo_indptr"], 2, 4), want, torch.float32, "q mean")
