"""Quest selector pieces (ops/selection/quest.py): page bounds + block-mean query + expansion against a
loop reference, the upper-bound property that defines Quest, and selection of whole top pages."""

import pytest
import torch

from sglang_mage.ops.selection import select_topk
from sglang_mage.ops.selection.quest import (
    block_mean_query,
    page_bounds,
    page_bounds_ref,
    quest_position_scores,
    quest_scores_ref,
)
from tests.ops.test_selection import make_batch


def quest_scores(b, B, page, max_prefix):
    kmin, kmax = page_bounds(b["k_buffer"], b["req_to_token"], b["req_pool_indices"], b["prefix_lens"], page,
                             max_prefix)
    qm = block_mean_query(b["q"], b["qo_indptr"], b["k_buffer"].shape[1], B)
    return quest_position_scores(qm, kmin, kmax, b["prefix_lens"], page, max_prefix), qm


@pytest.mark.parametrize("B, G, page", [(4, 1, 4), (4, 7, 16), (32, 2, 16), (4, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scores_match_loop_reference(B, G, page, dtype):
    prefixes = [0, 3, 37, 64]  # empty, shorter than a page, a partial last page, whole pages
    b = make_batch(prefixes, B, G, 2, 16, dtype, seed=B + G + page, short_last=False)
    got, _ = quest_scores(b, B, page, max(prefixes))
    ref = quest_scores_ref(b["q"].cpu(), b["k_buffer"].cpu(), b["qo_indptr"].cpu(), b["req_to_token"].cpu(),
                           b["req_pool_indices"].cpu(), b["prefix_lens"].cpu(), B, page, max(prefixes))
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got.cpu()), finite)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert torch.allclose(got.cpu()[finite], ref[finite], atol=tol, rtol=tol)


def test_bound_is_an_upper_bound_of_every_logit_in_its_page():
    B, G, page = 4, 2, 8
    b = make_batch([50, 81], B, G, 2, 32, torch.float32, seed=3, short_last=False)
    scores, qm = quest_scores(b, B, page, 81)
    for r in range(2):
        n = int(b["prefix_lens"][r])
        slots = b["req_to_token"][b["req_pool_indices"][r], :n].long()
        for h in range(2):
            logits = b["k_buffer"][slots, h].float() @ qm[r, h]
            assert (scores[r, h, :n] >= logits - 1e-5).all()


def test_selection_keeps_the_pages_with_the_highest_bounds():
    B, G, page, k = 4, 1, 8, 16
    b = make_batch([96], B, G, 1, 16, torch.float32, seed=5, short_last=False)
    scores, _ = quest_scores(b, B, page, 96)
    out_slots = torch.full((8, 1, k), -1, dtype=torch.int32)
    out_lens = torch.zeros((8, 1), dtype=torch.int32)
    positions, lens = select_topk(scores, b["prefix_lens"], k, 0, 0, b["req_to_token"], b["req_pool_indices"],
                                  out_slots, out_lens)
    page_bounds_ = scores[0, 0, ::page]
    best = set(torch.topk(page_bounds_, k // page).indices.tolist())
    chosen = positions[0, 0, : int(lens[0, 0])].tolist()
    assert {p // page for p in chosen} == best and len(chosen) == k


@pytest.mark.parametrize("page, D", [(16, 128), (4, 64), (5, 32), (64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_page_bounds_kernel_matches_reference(page, D, dtype):
    prefixes = [0, 3, 37, 200]
    b = make_batch(prefixes, 4, 1, 2, D, dtype, seed=page + D, short_last=False)
    args = (b["k_buffer"], b["req_to_token"], b["req_pool_indices"], b["prefix_lens"], page, max(prefixes))
    kmin, kmax = page_bounds(*args)
    rmin, rmax = page_bounds_ref(*(a.cpu() if torch.is_tensor(a) else a for a in args))
    # min/max select existing values: equal bit for bit.
    assert torch.equal(kmin.cpu(), rmin) and torch.equal(kmax.cpu(), rmax)
