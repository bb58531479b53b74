"""Tests of sglang_mage.ops.selection: block-mean scores (Triton vs reference), top-k by captured score
mass, and the vote selector against brute force."""

# Without CUDA the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET before any
# test module imports them.
import itertools

import pytest
import torch

from sglang_mage.ops.selection import (  # noqa: E402
    adaptive_budgets,
    block_mean_scores,
    block_mean_scores_ref,
    block_self_mass_ref,
    dense_lse_ref,
    layer_score,
    online_budget,
    pad_row_probs,
    row_probs_padded,
    row_probs_ref,
    select_by_votes,
    select_topk,
    vote_candidates,
    vote_candidates_ref,
)
from tests.utils import DEVICE, ON_GPU, TOLERANCES, assert_close, max_abs_err  # noqa: E402


def make_batch(prefix_lens, B, G, Hkv, D, dtype, seed=0, device=DEVICE, short_last=True):
    """A paged batch: shuffled slots, req_pool_indices ≠ arange, the last request's block one token short
    (ragged ext_len), and the block's keys stored right after each prefix, as the real pool holds them."""
    gen = torch.Generator().manual_seed(seed)
    R = len(prefix_lens)
    ext = [B - 1 if (short_last and r == R - 1 and B > 1) else B for r in range(R)]
    max_ctx = max(p + e for p, e in zip(prefix_lens, ext)) + 3
    P = R + 3
    S = sum(p + e for p, e in zip(prefix_lens, ext)) + 11
    perm = torch.randperm(S, generator=gen)
    req_to_token = torch.zeros((P, max_ctx), dtype=torch.int32)
    pool = torch.randperm(P, generator=gen)[:R]
    used = 0
    for r in range(R):
        n = prefix_lens[r] + ext[r]
        req_to_token[pool[r], :n] = perm[used : used + n].int()
        used += n
    qo_indptr = torch.tensor([0] + list(itertools.accumulate(ext)), dtype=torch.int32)
    T = int(qo_indptr[-1])
    # ×1.5 sharpens the softmax so that top-k choices are not decided by noise.
    q = (torch.randn((T, Hkv * G, D), generator=gen) * 1.5).to(dtype)
    k_buffer = torch.randn((S, Hkv, D), generator=gen).to(dtype)
    sm_scale = D**-0.5
    b = dict(
        q=q.to(device),
        k_buffer=k_buffer.to(device),
        qo_indptr=qo_indptr.to(device),
        req_to_token=req_to_token.to(device),
        req_pool_indices=pool.to(device),
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=device),
    )
    b["lse"] = dense_lse_ref(b["q"], b["k_buffer"], b["qo_indptr"], b["req_to_token"], b["req_pool_indices"], b["prefix_lens"], sm_scale)
    b["sm_scale"] = sm_scale
    return b


def _args(b):
    return (b["q"], b["k_buffer"], b["qo_indptr"], b["req_to_token"], b["req_pool_indices"], b["prefix_lens"], b["lse"], b["sm_scale"])


SCORE_PREFIXES = [[0, 1, 37, 150], [200]] if ON_GPU else [[0, 1, 37, 90]]
SCORE_GRID = list(itertools.product([4, 32], [1, 2, 7], [64, 128], [torch.float32, torch.float16]))


@pytest.mark.parametrize("B,G,D,dtype", SCORE_GRID)
def test_block_mean_scores_matches_reference(B, G, D, dtype):
    for prefixes in SCORE_PREFIXES:
        b = make_batch(prefixes, B, G, Hkv=2, D=D, dtype=dtype, seed=B * 100 + G * 10 + D)
        max_prefix = max(prefixes) + 5  # wider than any prefix: the padding must come back -inf
        out = torch.full((len(prefixes), 2, max_prefix), float("nan"), device=DEVICE)
        got = block_mean_scores(*_args(b), max_extend_len=B, max_prefix=max_prefix, out=out)
        ref = block_mean_scores_ref(*_args(b), B, max_prefix)
        pad = torch.isinf(ref)
        assert torch.equal(torch.isneginf(got), pad), "padding must be exactly the positions past each prefix"
        # Probabilities are ~1/prefix, far below the absolute tolerance; scaled to mean 1 the table bites.
        scale = ref[~pad].mean()
        assert_close(got[~pad] / scale, ref[~pad] / scale, dtype=dtype, name=f"scores B={B} G={G} D={D}")


def test_block_mean_scores_strided_out_and_2d_q():
    b = make_batch([5, 70], 4, 2, Hkv=2, D=64, dtype=torch.float32)
    cache = torch.full((2, 3, 2, 80), float("nan"), device=DEVICE)
    view = cache[:, 1]
    q2 = b["q"].reshape(b["q"].shape[0], -1)
    got = block_mean_scores(q2, *_args(b)[1:], max_extend_len=4, max_prefix=72, out=view)
    ref = block_mean_scores_ref(*_args(b), 4, 72)
    pad = torch.isinf(ref)
    assert torch.equal(torch.isneginf(got), pad)
    assert_close(got[~pad] * 70, ref[~pad] * 70, name="strided out")
    assert torch.isnan(cache[:, 1, :, 72:]).all() and torch.isnan(cache[:, 0]).all(), "wrote outside its window"
    # FlashInfer returns its LSE in log2; taken as such, it must give the same probabilities.
    lse2 = b["lse"] * 1.4426950408889634
    got2 = block_mean_scores(*_args(b)[:6], lse2, b["sm_scale"], max_extend_len=4, max_prefix=72, lse_is_log2=True)
    assert_close(got2[~pad] * 70, ref[~pad] * 70, name="log2 lse")
    probs2, _ = row_probs_padded(*_args(b)[:6], lse2, b["sm_scale"], 4, 72, lse_is_log2=True)
    probs, _ = row_probs_padded(*_args(b), 4, 72)
    assert_close(probs2, probs, name="row probs, log2 lse")


def test_reference_scores_plus_self_mass_sum_to_one():
    b = make_batch([0, 1, 23, 60], 4, 2, Hkv=2, D=64, dtype=torch.float32)
    ref = block_mean_scores_ref(*_args(b), 4, 60)
    total = ref.nan_to_num(neginf=0.0).sum(-1) + block_self_mass_ref(*_args(b))
    assert_close(total, torch.ones_like(total), name="prefix mass + block mass")


@pytest.mark.gpu
def test_block_mean_scores_bf16_gpu():
    b = make_batch([0, 1, 513, 4000], 32, 7, Hkv=4, D=128, dtype=torch.bfloat16, device="cuda")
    got = block_mean_scores(*_args(b), max_extend_len=32, max_prefix=4000)
    ref = block_mean_scores_ref(*_args(b), 32, 4000)
    pad = torch.isinf(ref)
    assert torch.equal(torch.isneginf(got), pad)
    atol, _ = TOLERANCES[torch.bfloat16]
    err = max_abs_err(got[~pad], ref[~pad])
    assert err <= atol, f"bf16 max abs err {err:.3e} > {atol}"
    # Probabilities are ~1e-3 here, so also hold them, scaled to mean 1, to the bf16 tolerance.
    scale = ref[~pad].mean()
    assert_close(got[~pad] / scale, ref[~pad] / scale, dtype=torch.bfloat16, name="bf16 scores")


# ---------------------------------------------------------------- top-k


def _dev(*ts):
    """Selection tests build their inputs on the CPU; the ops run where the kernels do."""
    return [t.to(DEVICE) if torch.is_tensor(t) else t for t in ts]


def _kept(positions, lens, r, h):
    return positions[r, h, : int(lens[r, h])].tolist()


def _check_topk(scores, prefix_lens, k, n_sink, n_local, kmax=None, seed=0, topk_method="torch"):
    R, Hkv, N = scores.shape
    gen = torch.Generator().manual_seed(seed)
    P = R + 2
    r2t = torch.stack([torch.randperm(10 * N + 7, generator=gen)[: N + 4] for _ in range(P)]).int()
    pool = torch.randperm(P, generator=gen)[:R]
    cache_rows = torch.randperm(P + 1, generator=gen)[:R]
    kmax = kmax or (k + n_sink + n_local + 3)
    cache = torch.full((P + 1, 2, Hkv, kmax), -7, dtype=torch.int32)
    lens_cache = torch.full((P + 1, 2, Hkv), -7, dtype=torch.int32)
    pl = torch.tensor(prefix_lens, dtype=torch.int32)
    scores_d, pl_d, r2t_d, pool_d, cache_d, lens_d, rows_d = _dev(scores, pl, r2t, pool, cache, lens_cache, cache_rows)
    positions, lens = select_topk(scores_d, pl_d, k, n_sink, n_local, r2t_d, pool_d, cache_d[:, 1], lens_d[:, 1], rows_d,
                                  topk_method=topk_method)
    positions, lens, cache, lens_cache = positions.cpu(), lens.cpu(), cache_d.cpu(), lens_d.cpu()
    k_total = min(k + n_sink + n_local, N)
    for r in range(R):
        prefix = prefix_lens[r]
        forced = {p for p in range(prefix) if p < n_sink or p >= prefix - n_local}
        for h in range(Hkv):
            kept = _kept(positions, lens, r, h)
            n = min(prefix, k_total)
            assert int(lens[r, h]) == n and int(lens_cache[cache_rows[r], 1, h]) == n
            assert kept == sorted(set(kept)) and all(0 <= p < prefix for p in kept), "sorted, unique, in prefix"
            assert forced <= set(kept), "sinks and local window always kept"
            if prefix <= k + n_sink + n_local:
                assert kept == list(range(prefix)), "short prefix keeps everything"
            rest = [p for p in range(prefix) if p not in forced]
            got_mass = sum(float(scores[r, h, p]) for p in kept if p not in forced)
            best = torch.tensor([float(scores[r, h, p]) for p in rest]).sort(descending=True).values
            true_mass = float(best[: n - len(forced)].sum()) if rest else 0.0
            assert abs(got_mass - true_mass) <= 1e-5, f"captured mass {got_mass} < top-k mass {true_mass}"
            slots = cache[cache_rows[r], 1, h, :n].tolist()
            assert slots == r2t[pool[r], kept].tolist(), "slots are req_to_token of kept positions"
    untouched = torch.ones(P + 1, dtype=torch.bool)
    untouched[cache_rows] = False
    assert (cache[untouched] == -7).all() and (cache[:, 0] == -7).all() and (lens_cache[:, 0] == -7).all()


def test_select_topk_rejects_unknown_method():
    scores = torch.rand((1, 1, 64))
    out = torch.zeros((1, 1, 16), dtype=torch.int32)
    with pytest.raises(ValueError, match="topk_method"):
        select_topk(scores, torch.tensor([64], dtype=torch.int32), 8, 2, 2, torch.arange(64, dtype=torch.int32)[None],
                    torch.zeros(1, dtype=torch.int64), out, torch.zeros((1, 1), dtype=torch.int32),
                    topk_method="bitonic")
    assert (out == 0).all(), "nothing written before the method is checked"


@pytest.mark.parametrize(
    "prefix_lens,k,n_sink,n_local",
    [
        ([0, 1, 5, 40, 300], 16, 4, 8),
        ([3, 12, 29, 30, 31, 200], 16, 4, 10),  # around prefix == k + sink + local
        ([50, 120], 8, 0, 0),
        ([6, 100], 10, 5, 5),  # sink and local windows overlap in the short prefix
        ([1000], 64, 1, 32),
    ],
)
@pytest.mark.parametrize("topk_method", ["torch", "radix"])
def test_select_topk_captures_top_mass(prefix_lens, k, n_sink, n_local, topk_method):
    gen = torch.Generator().manual_seed(len(prefix_lens) + k)
    N = max(prefix_lens) + 2
    scores = torch.rand((len(prefix_lens), 3, N), generator=gen)
    scores = torch.where(torch.arange(N) < torch.tensor(prefix_lens).view(-1, 1, 1), scores, float("-inf"))
    _check_topk(scores, prefix_lens, k, n_sink, n_local, topk_method=topk_method)


def test_select_topk_k_total_clamped_to_max_prefix():
    scores = torch.rand((2, 2, 10))
    _check_topk(scores, [10, 4], k=32, n_sink=4, n_local=4, kmax=10)


def test_select_topk_on_kernel_scores():
    b = make_batch([0, 9, 64], 4, 2, Hkv=2, D=64, dtype=torch.float32)
    scores = block_mean_scores(*_args(b), max_extend_len=4, max_prefix=64).cpu()
    _check_topk(scores, [0, 9, 64], k=8, n_sink=2, n_local=4)


# ---------------------------------------------------------------- vote


def test_row_probs_padded_matches_reference():
    b = make_batch([0, 1, 17, 40], 4, 3, Hkv=2, D=64, dtype=torch.float32)
    probs, row_valid = row_probs_padded(*_args(b), max_extend_len=4, max_prefix=42)
    ref, ref_valid = pad_row_probs(row_probs_ref(*_args(b)), 12, 42)
    assert torch.equal(row_valid.cpu(), ref_valid.cpu())
    assert_close(probs, ref, name="row probs")


@pytest.mark.parametrize("k", [1, 5, 50])
def test_vote_candidates_match_brute_force(k):
    prefixes = [0, 1, 17, 40]
    b = make_batch(prefixes, 4, 3, Hkv=2, D=64, dtype=torch.float32, seed=k)
    rows = row_probs_ref(*_args(b))
    probs, row_valid = pad_row_probs(rows, 12, 42)
    votes, union, cov = vote_candidates(probs, row_valid, b["prefix_lens"], k)
    ref_votes, ref_union, ref_cov = vote_candidates_ref(rows, prefixes, k, 42)
    assert torch.equal(votes.long().cpu(), ref_votes) and torch.equal(union.cpu(), ref_union)
    assert_close(cov, ref_cov, name="coverage")
    s = layer_score(union, cov)
    expect = torch.where(ref_union > 0, ref_union * (1 - torch.log(ref_cov.clamp_min(1e-30))), 0.0).max(-1).values
    assert_close(s, expect, name="layer score")


def test_adaptive_and_online_budgets():
    gen = torch.Generator().manual_seed(3)
    L, R, k = 12, 3, 64
    s = torch.rand((L, R), generator=gen) * 50 + 1
    s[:, 2] = 0.0  # an empty-prefix request
    for k_min in (0, 16):
        bud = adaptive_budgets(s, k, k_min)
        assert bud.dtype == torch.int64 and (bud >= k_min).all()
        tot = bud[:, :2].sum(0)
        assert (tot <= k * L + L * k_min).all() and (tot > k * L - L).all(), f"budgets sum {tot} vs k·L={k * L}"
        assert (bud[:, 2] == max(k, k_min)).all()
    # More diffuse (higher-scoring) layers never get less.
    order = s[:, 0].argsort()
    assert (bud[order, 0].diff() >= 0).all()
    # With the exact mean, the online rule is the paper's rule.
    mean = s.mean(0)
    online = torch.stack([online_budget(s[l], mean, k, 0, 10**6) for l in range(L)])
    assert torch.equal(online[:, :2], adaptive_budgets(s, k, 0)[:, :2])
    first = online_budget(s[0], torch.tensor([0.0, float("nan"), 1.0]), k, 8, 100)
    assert first[:2].tolist() == [k, k] and first[2].item() == 0 + 8
    assert (online_budget(s[0] * 1e6, mean, k, 8, 100) <= 100).all()


@pytest.mark.parametrize("use_scores", [False, True])
def test_select_by_votes_keeps_top_votes_then_recent(use_scores):
    gen = torch.Generator().manual_seed(7)
    R, Hkv, N, kmax = 4, 3, 60, 24
    prefix_lens = [0, 5, 40, 60]
    votes = torch.randint(0, 6, (R, Hkv, N), generator=gen) * (torch.rand((R, Hkv, N), generator=gen) < 0.3)
    votes = torch.where(torch.arange(N) < torch.tensor(prefix_lens).view(-1, 1, 1), votes, 0).int()
    budget = torch.tensor([4, 8, 12, 30])  # the last exceeds K_max: capped
    scores = torch.rand((R, Hkv, N), generator=gen) if use_scores else None
    r2t = torch.randperm(500, generator=gen)[: 5 * (N + 2)].view(5, N + 2).int()
    pool = torch.tensor([3, 0, 4, 1])
    cache = torch.full((5, Hkv, kmax), -1, dtype=torch.int32)
    lens_c = torch.full((5, Hkv), -1, dtype=torch.int32)
    args = _dev(votes, budget, torch.tensor(prefix_lens), r2t, pool, cache, lens_c)
    pos, lens = select_by_votes(*args, scores=_dev(scores)[0], n_sink=1, n_local=2)
    pos, lens, cache, lens_c = pos.cpu(), lens.cpu(), args[5].cpu(), args[6].cpu()
    for r in range(R):
        prefix = prefix_lens[r]
        forced = {p for p in range(prefix) if p < 1 or p >= prefix - 2}
        for h in range(Hkv):
            n = min(prefix, int(budget[r]) + 3, kmax)
            kept = _kept(pos, lens, r, h)
            assert int(lens[r, h]) == n == int(lens_c[pool[r], h]) and kept == sorted(set(kept))
            assert forced <= set(kept) and all(p < prefix for p in kept)
            assert cache[pool[r], h, :n].tolist() == r2t[pool[r], kept].tolist()
            free = [p for p in range(prefix) if p not in forced]
            union = [p for p in free if votes[r, h, p] > 0]
            n_free = n - len(forced)
            got = sorted((int(votes[r, h, p]) for p in kept if p not in forced), reverse=True)
            best = sorted((int(votes[r, h, p]) for p in free), reverse=True)[:n_free]
            assert sum(got) == sum(best), "vote mass of the kept set is the best possible"
            if n_free > len(union):  # all of U_h in, the rest the most recent non-voted positions
                pad = sorted((p for p in free if p not in union), reverse=True)[: n_free - len(union)]
                assert set(kept) == forced | set(union) | set(pad)


def test_select_topk_non_finite_scores_and_empty_batch():
    scores = torch.rand((2, 2, 40))
    scores[0, 0, 3] = float("nan")
    scores[0, 0, 5] = float("-inf")
    scores[0, 1, 7] = float("inf")
    scores[1, :, :] = float("nan")  # prefix 6 < k + sink + local: all six kept whatever the scores
    cache = torch.full((3, 2, 16), -7, dtype=torch.int32)
    lens_c = torch.full((3, 2), -7, dtype=torch.int32)
    r2t = torch.arange(3 * 40, dtype=torch.int32).view(3, 40)
    scores, pl, r2t, pool, cache, lens_c = _dev(scores, torch.tensor([40, 6]), r2t, torch.tensor([2, 0]), cache, lens_c)
    pos, lens = select_topk(scores, pl, 8, 1, 2, r2t, pool, cache, lens_c)
    pos, lens = pos.cpu(), lens.cpu()
    kept00, kept01 = _kept(pos, lens, 0, 0), _kept(pos, lens, 0, 1)
    assert 3 not in kept00 and 5 not in kept00, "NaN and -inf rank below every finite score"
    assert 7 in kept01, "+inf (valid, not forced) still ranks as the highest score"
    assert _kept(pos, lens, 1, 0) == list(range(6)) and lens_c[0].tolist() == [6, 6]
    assert cache[0, 1, :6].tolist() == list(range(6)) and (cache[1] == -7).all()
    # No prefix anywhere: lengths 0, nothing else written.
    empty = torch.empty((2, 2, 0), device=DEVICE)
    pos, lens = select_topk(empty, pl * 0, 8, 1, 2, r2t, pool, cache, lens_c)
    assert lens.tolist() == [[0, 0], [0, 0]] and lens_c[2].tolist() == [0, 0] and lens_c[0].tolist() == [0, 0]


def test_select_by_votes_int_budget_and_unvoted_head():
    votes = torch.zeros((1, 2, 30), dtype=torch.int32)
    votes[0, 0, [2, 9, 17]] = torch.tensor([5, 1, 3], dtype=torch.int32)  # head 1 has no votes at all
    cache = torch.full((1, 2, 8), -1, dtype=torch.int32)
    lens_c = torch.full((1, 2), -1, dtype=torch.int32)
    r2t = torch.arange(30, dtype=torch.int32).view(1, 30) + 100
    votes, pl, r2t, pool, cache, lens_c = _dev(votes, torch.tensor([25]), r2t, torch.tensor([0]), cache, lens_c)
    pos, lens = select_by_votes(votes, 2, pl, r2t, pool, cache, lens_c)
    pos, lens = pos.cpu(), lens.cpu()
    assert _kept(pos, lens, 0, 0) == [2, 17] and _kept(pos, lens, 0, 1) == [23, 24], "top votes; else most recent"
    assert cache[0, 0, :2].tolist() == [102, 117] and lens_c.tolist() == [[2, 2]]


def test_topk_methods_match_the_config_flag():
    from sglang_mage.config import TOPK_METHODS as FLAG_CHOICES
    from sglang_mage.ops.selection.topk import TOPK_METHODS

    assert TOPK_METHODS == FLAG_CHOICES
