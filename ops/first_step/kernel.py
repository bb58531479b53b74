"""Fused MAGE first step: exact block attention and the selection scores in one pass over K.

MAGE's `mean` selector reads the prefix's K twice at a block's first step: once in FlashInfer's exact pass
and once to score every position with the block-average probability (which needs that pass's LSE). Here
the exact pass also writes, for each (request, KV head), the logit of the **block-mean query** (the mean
of the block's rows over its tokens and the G query heads of the KV head) against every prefix key, so the
first step reads K once. The ranking criterion differs from `mean` (the logit of the mean query instead of
the mean of the probabilities); `--mage-selector fused` uses it, and the accuracy harness compares the
recall of both.

One program owns (request, KV head, row tile, key split) and streams its share of the request's keys
(prefix, then the block's own tokens, all through `req_to_token`) with an online softmax; row tile 0 of
each split also writes that split's scores. Splits over the keys keep a small batch from leaving most SMs
idle at long context; their partial outputs are merged by LSE with the sparse kernel's merge pass.
Its speed against FlashInfer is for the GPU benchmark to show.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..selection.mean_query_scores import block_mean_query_triton
from ..sparse_attention.kernel import _merge_splits

_LOG2E = 1.4426950408889634
# About two waves of programs on a 132-SM H100, and no split shorter than this many keys.
_TARGET_PROGRAMS = 264
_MIN_KEYS_PER_SPLIT = 512
_MAX_SPLITS = 64


@triton.jit
def _fused_first_step_kernel(
    Q, QBAR, K, V, OUT, SCORES, QO_INDPTR, R2T, POOL, PREFIX, O_PART, LSE,
    stride_qt, stride_qh, stride_br, stride_bh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_sr, stride_sh, stride_r2t,
    stride_pr, stride_ph, stride_ps, stride_pm, stride_lr, stride_lh, stride_ls,
    qk_scale, score_scale, num_m_tiles, num_splits,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE_DOT: tl.constexpr, DIRECT: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1) // num_m_tiles
    mt = tl.program_id(1) % num_m_tiles
    split = tl.program_id(2)
    q_start = tl.load(QO_INDPTR + r)
    ext_len = tl.load(QO_INDPTR + r + 1) - q_start
    pool = tl.load(POOL + r).to(tl.int64)
    prefix = tl.load(PREFIX + r)
    total = prefix + ext_len
    chunk = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    key_start = split * chunk
    key_end = tl.minimum(key_start + chunk, total)

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = offs_m // G
    head = h * G + offs_m % G
    row_ok = tok < ext_len
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    q = tl.load(Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qbar = tl.load(QBAR + r * stride_br + h * stride_bh + offs_d, mask=d_ok, other=0.0)
    write_scores = mt == 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(key_start, key_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < key_end
        slot = tl.load(R2T + pool * stride_r2t + offs_n, mask=n_ok, other=0).to(tl.int64)
        # Gathered as [N, D], each slot's row read contiguously (coalesced), and transposed in registers.
        k = tl.load(K + slot[:, None] * stride_ks + h * stride_kh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.trans(k)
        if IEEE_DOT:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
        if write_scores:
            s = tl.sum(qbar[None, :] * k.to(tl.float32), axis=1) * score_scale
            in_prefix = offs_n < prefix
            tl.store(SCORES + r * stride_sr + h * stride_sh + offs_n, s, mask=in_prefix)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vs + h * stride_vh + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # An empty split (a short request's trailing splits) publishes O = 0 and LSE = -inf.
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    store_mask = row_ok[:, None] & dv_ok[None, :]
    if DIRECT:
        tl.store(OUT + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
                 + offs_dv[None, :], o.to(OUT.dtype.element_ty), mask=store_mask)
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part = r.to(tl.int64) * stride_pr + h * stride_ph + split * stride_ps
        tl.store(O_PART + part + offs_m[:, None] * stride_pm + offs_dv[None, :], o, mask=store_mask)
        tl.store(LSE + r.to(tl.int64) * stride_lr + h * stride_lh + split * stride_ls + offs_m, lse, mask=row_ok)


def default_fused_block_m(rows: int) -> int:
    """Of 64 and 128, the row tile that pads a KV head's B x G rows least; on a tie 128, which re-reads K and V
    fewer times. From benchmarks/bench_first_step.py on the H200 (`results/first_step.json`, B=32, graph
    replay, 3 stages): 64 rows for the 1.5B shape's 192 (233 us at 128K against 291 us with 128) and 128
    for the 7B shape's 224 (401 us against 526 us with 64)."""
    if rows < 64:
        return max(16, triton.next_power_of_2(rows))
    return 64 if triton.cdiv(rows, 64) * 64 < triton.cdiv(rows, 128) * 128 else 128


def default_fused_splits(n_req: int, hkv: int, rows: int, block_m: int, max_prefix: int, block_size: int) -> int:
    """Key splits per (request, KV head, row tile): enough programs for about two waves, none too short."""
    programs = n_req * hkv * triton.cdiv(rows, block_m)
    by_keys = max(1, (max_prefix + block_size) // _MIN_KEYS_PER_SPLIT)
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs), by_keys, _MAX_SPLITS))


def fused_first_step(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    sm_scale: float,
    block_size: int,
    max_prefix: int,
    out: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of each block over its prefix + itself (bidirectional), plus the block-mean query's
    logit (times sm_scale) against every prefix key.

    q: [T, Hq, D], request r's block at rows qo_indptr[r]:qo_indptr[r+1] (every block `block_size` rows);
    k_buffer/v_buffer: [S, Hkv, D/Dv], with the block's own K/V already written at req_to_token[pool,
    prefix:prefix+ext]. Returns (out [T, Hq, Dv], scores [R, Hkv, max_prefix] fp32, -inf past a prefix).
    block_m / block_n / num_warps / num_stages override the tile (benchmarks/bench_first_step.py sweeps them)."""
    t, hq, d = q.shape
    hkv, dv = k_buffer.shape[1], v_buffer.shape[2]
    r = qo_indptr.shape[0] - 1
    group = hq // hkv
    assert hq % hkv == 0 and k_buffer.shape[2] == d
    assert t == r * block_size, f"{t} rows are not {r} blocks of {block_size}"
    if out is None:
        out = torch.empty((t, hq, dv), dtype=q.dtype, device=q.device)
    if scores is None:
        scores = torch.empty((r, hkv, max_prefix), dtype=torch.float32, device=q.device)
    scores.fill_(float("-inf"))
    if r == 0:
        return out, scores
    qbar = block_mean_query_triton(q, qo_indptr, hkv, block_size)
    rows = block_size * group
    if block_m is None:
        block_m = default_fused_block_m(rows)
    if block_n is None:
        block_n = 64 if max(d, dv) <= 128 else 32
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    if num_stages is None:
        num_stages = 3
    num_m_tiles = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = default_fused_splits(r, hkv, rows, block_m, max_prefix, block_size)
    direct = num_splits == 1
    if direct:
        o_part = lse = out  # unused on this path
        part_strides, lse_strides = (0, 0, 0, 0), (0, 0, 0)
    else:
        o_part = torch.empty((r, hkv, num_splits, rows, dv), dtype=torch.float32, device=q.device)
        lse = torch.empty((r, hkv, num_splits, rows), dtype=torch.float32, device=q.device)
        part_strides, lse_strides = o_part.stride()[:4], lse.stride()[:3]
    block_dv = max(16, triton.next_power_of_2(dv))
    _fused_first_step_kernel[(r, hkv * num_m_tiles, num_splits)](
        q, qbar, k_buffer, v_buffer, out, scores, qo_indptr, req_to_token, req_pool_indices, prefix_lens,
        o_part, lse,
        q.stride(0), q.stride(1), qbar.stride(0), qbar.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), out.stride(0), out.stride(1), scores.stride(0), scores.stride(1),
        req_to_token.stride(0), *part_strides, *lse_strides, sm_scale * _LOG2E, sm_scale, num_m_tiles, num_splits,
        G=group, HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=block_dv,
        IEEE_DOT=q.dtype == torch.float32, DIRECT=direct,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        merge_m = min(block_m, 32)
        merge_tiles = triton.cdiv(rows, merge_m)
        _merge_splits[(r, hkv * merge_tiles)](
            out, o_part, lse, qo_indptr, out.stride(0), out.stride(1), *part_strides, *lse_strides,
            merge_tiles, rows, HEAD_DIM_V=dv, G=group, BLOCK_M=merge_m, BLOCK_DV=block_dv,
            PDL_WAIT=False, NUM_SPLITS=num_splits,
        )
    return out, scores
