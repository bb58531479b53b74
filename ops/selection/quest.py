"""Quest (Tang et al., 2024) as a selector in MAGE's backend, for like-for-like comparisons.

Quest keeps, per KV page, the channel-wise min and max of the page's keys; for a query q the page's
attention logit is bounded by sum_d max(q_d * min_d, q_d * max_d), and the pages with the highest bounds
are attended. Quest is query-aware: it re-scores at every step. Adapted to block diffusion, where a
block's B x G query rows share one KV set per KV head (the sparse kernel's contract), the page bound is
taken for the **block-mean query** of each KV head (the mean over the block's tokens and the G query heads
that share it), the same reduction MAGE's `mean` selector applies to probabilities.

Pages are `page_size` consecutive prefix positions of a request (logical pages: the bound does not depend
on where SGLang's allocator put the tokens). Page scores are expanded to positions so that the shared
top-k op keeps sinks, the local window and whole pages up to the budget.

`page_bounds` is a Triton kernel (`page_bounds_ref` is its PyTorch reference, which materialises the
gathered prefix and is only for tests): the bounds read K once per block, at its first step, as MAGE's
scoring does; each later step reads only the bounds (2 / page_size of K's bytes), with torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _page_bounds_kernel(
    K, R2T, POOL, PREFIX, KMIN, KMAX,
    stride_ks, stride_kh, stride_r2t, stride_br, stride_bh, stride_bp, n_pages,
    PAGE: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGES_PER_PROG: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    pool = tl.load(POOL + r).to(tl.int64)
    prefix = tl.load(PREFIX + r)
    offs_t = tl.arange(0, PAGE_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for i in range(PAGES_PER_PROG):
        page = tl.program_id(2) * PAGES_PER_PROG + i
        pos = page * PAGE + offs_t
        t_ok = (offs_t < PAGE) & (pos < prefix)
        slot = tl.load(R2T + pool * stride_r2t + pos, mask=t_ok, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_ks + h * stride_kh + offs_d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        kmin = tl.min(tl.where(t_ok[:, None], k, float("inf")), axis=0)
        kmax = tl.max(tl.where(t_ok[:, None], k, float("-inf")), axis=0)
        any_ok = tl.sum(t_ok.to(tl.int32), axis=0) > 0
        kmin = tl.where(any_ok, kmin, 0.0)
        kmax = tl.where(any_ok, kmax, 0.0)
        out = r * stride_br + h * stride_bh + page * stride_bp + offs_d
        store_ok = d_ok & (page < n_pages)
        tl.store(KMIN + out, kmin.to(KMIN.dtype.element_ty), mask=store_ok)
        tl.store(KMAX + out, kmax.to(KMAX.dtype.element_ty), mask=store_ok)


def page_bounds(
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    page_size: int,
    max_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise (min, max) of K per logical page of each request's prefix (see `page_bounds_ref`)."""
    r, (hkv, d) = req_pool_indices.shape[0], k_buffer.shape[1:]
    n_pages = -(-max_prefix // page_size)
    kmin = torch.empty((r, hkv, n_pages, d), dtype=k_buffer.dtype, device=k_buffer.device)
    kmax = torch.empty_like(kmin)
    if r * hkv * n_pages == 0:
        return kmin, kmax
    per_prog = 8
    _page_bounds_kernel[(r, hkv, triton.cdiv(n_pages, per_prog))](
        k_buffer, req_to_token, req_pool_indices, prefix_lens, kmin, kmax,
        k_buffer.stride(0), k_buffer.stride(1), req_to_token.stride(0), kmin.stride(0), kmin.stride(1),
        kmin.stride(2), n_pages,
        PAGE=page_size, PAGE_PAD=max(16, triton.next_power_of_2(page_size)), HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), PAGES_PER_PROG=per_prog,
    )
    return kmin, kmax


def page_bounds_ref(
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    page_size: int,
    max_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise (min, max) of K per logical page of each request's prefix.

    k_buffer: [S, Hkv, D]; req_to_token: [P, max_ctx]; req_pool_indices, prefix_lens: [R].
    Returns two [R, Hkv, n_pages, D] tensors in K's dtype, n_pages = ceil(max_prefix / page_size); pages
    (and page tails) past a request's prefix are ignored, a page with no position is (0, 0)."""
    r, (hkv, d) = req_pool_indices.shape[0], k_buffer.shape[1:]
    n_pages = -(-max_prefix // page_size)
    span = n_pages * page_size
    pos = torch.arange(span, device=k_buffer.device)
    valid = pos.view(1, -1) < prefix_lens.view(-1, 1).long()  # [R, span]
    cols = pos.clamp(max=req_to_token.shape[1] - 1)
    slots = req_to_token[req_pool_indices.long()][:, cols].long()  # [R, span]
    slots = torch.where(valid, slots, 0)
    keys = k_buffer[slots].view(r, n_pages, page_size, hkv, d)  # [R, pages, P, Hkv, D]
    v = valid.view(r, n_pages, page_size, 1, 1)
    kmin = torch.where(v, keys, torch.full((), float("inf"), dtype=keys.dtype, device=keys.device)).amin(2)
    kmax = torch.where(v, keys, torch.full((), float("-inf"), dtype=keys.dtype, device=keys.device)).amax(2)
    empty = ~valid.view(r, n_pages, page_size).any(-1).view(r, n_pages, 1, 1)
    kmin = torch.where(empty, 0, kmin).permute(0, 2, 1, 3).contiguous()
    kmax = torch.where(empty, 0, kmax).permute(0, 2, 1, 3).contiguous()
    return kmin, kmax


def block_mean_query(q: torch.Tensor, qo_indptr: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """[R, Hkv, D] fp32: the mean of each request's block rows over its tokens and the G heads per KV head.
    Every request's extend is one block of `block_size` rows (the sparse kernel's contract)."""
    t, hq, d = q.shape
    r = qo_indptr.shape[0] - 1
    assert t == r * block_size, f"{t} query rows are not {r} blocks of {block_size}"
    return q.float().view(r, block_size, num_kv_heads, hq // num_kv_heads, d).mean(dim=(1, 3))


def quest_position_scores(
    q_mean: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, prefix_lens: torch.Tensor, page_size: int,
    max_prefix: int,
) -> torch.Tensor:
    """Upper bound of q_mean . k over each page, expanded to the page's positions: [R, Hkv, max_prefix] fp32,
    -inf past each request's prefix (the layout `select_topk` takes)."""
    qm = q_mean.unsqueeze(2)  # [R, Hkv, 1, D]
    bound = torch.maximum(qm * kmin.float(), qm * kmax.float()).sum(-1)  # [R, Hkv, pages]
    scores = bound.repeat_interleave(page_size, dim=2)[:, :, :max_prefix].contiguous()
    past = torch.arange(max_prefix, device=scores.device).view(1, 1, -1) >= prefix_lens.view(-1, 1, 1)
    return scores.masked_fill(past, float("-inf"))


def quest_scores_ref(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, prefix_lens, block_size, page_size,
                     max_prefix):
    """Loop reference of bounds + block-mean query + expansion, one request, head and page at a time."""
    r_count, hkv = req_pool_indices.shape[0], k_buffer.shape[1]
    group = q.shape[1] // hkv
    out = torch.full((r_count, hkv, max_prefix), float("-inf"))
    for r in range(r_count):
        n = int(prefix_lens[r])
        rows = q[int(qo_indptr[r]):int(qo_indptr[r + 1])].float()
        slots = req_to_token[int(req_pool_indices[r]), :n].long()
        for h in range(hkv):
            qm = rows[:, h * group:(h + 1) * group].reshape(-1, rows.shape[-1]).mean(0)
            keys = k_buffer[slots, h].float()
            for s in range(0, n, page_size):
                page = keys[s:s + page_size]
                bound = sum(max(qm[c] * page[:, c].min(), qm[c] * page[:, c].max()) for c in range(page.shape[1]))
                out[r, h, s:min(s + page_size, n)] = bound
    return out
