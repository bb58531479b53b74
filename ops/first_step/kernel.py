"""Fused MAGE first step: exact block attention and the selection scores in one pass over K.

MAGE's `mean` selector reads the prefix's K twice at a block's first step: once in FlashInfer's exact pass
and once to score every position with the block-average probability (which needs that pass's LSE). Here
the exact pass also writes, for each (request, KV head), the logit of the **block-mean query** (the mean
of the block's rows over its tokens and the G query heads of the KV head) against every prefix key, so the
first step reads K once. The ranking criterion differs from `mean` (the logit of the mean query instead of
the mean of the probabilities); `--mage-selector fused` uses it, and the accuracy harness compares the
recall of both.

One program owns (request, KV head, row tile) and streams all of the request's keys (prefix, then the
block's own tokens, all through `req_to_token`) with an online softmax. Row tile 0 also writes the scores.
There is no split over keys yet: at batch 1 the grid is small, so this kernel's speed against FlashInfer
is for the GPU benchmark to show.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _fused_first_step_kernel(
    Q, QBAR, K, V, OUT, SCORES, QO_INDPTR, R2T, POOL, PREFIX,
    stride_qt, stride_qh, stride_br, stride_bh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_sr, stride_sh, stride_r2t,
    qk_scale, score_scale, num_m_tiles,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1) // num_m_tiles
    mt = tl.program_id(1) % num_m_tiles
    q_start = tl.load(QO_INDPTR + r)
    ext_len = tl.load(QO_INDPTR + r + 1) - q_start
    pool = tl.load(POOL + r).to(tl.int64)
    prefix = tl.load(PREFIX + r)
    total = prefix + ext_len

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
    for n0 in range(0, total, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < total
        slot = tl.load(R2T + pool * stride_r2t + offs_n, mask=n_ok, other=0).to(tl.int64)
        kt = tl.load(K + slot[None, :] * stride_ks + h * stride_kh + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if IEEE_DOT:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
        if write_scores:
            s = tl.sum(qbar[:, None] * kt.to(tl.float32), axis=0) * score_scale
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
    o = acc / l_i[:, None]
    tl.store(OUT + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
             o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of each block over its prefix + itself (bidirectional), plus the block-mean query's
    logit (times sm_scale) against every prefix key.

    q: [T, Hq, D], request r's block at rows qo_indptr[r]:qo_indptr[r+1] (every block `block_size` rows);
    k_buffer/v_buffer: [S, Hkv, D/Dv], with the block's own K/V already written at req_to_token[pool,
    prefix:prefix+ext]. Returns (out [T, Hq, Dv], scores [R, Hkv, max_prefix] fp32, -inf past a prefix)."""
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
    qbar = q.float().view(r, block_size, hkv, group, d).mean(dim=(1, 3)).contiguous()
    rows = block_size * group
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    num_m_tiles = triton.cdiv(rows, block_m)
    _fused_first_step_kernel[(r, hkv * num_m_tiles)](
        q, qbar, k_buffer, v_buffer, out, scores, qo_indptr, req_to_token, req_pool_indices, prefix_lens,
        q.stride(0), q.stride(1), qbar.stride(0), qbar.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), out.stride(0), out.stride(1), scores.stride(0), scores.stride(1),
        req_to_token.stride(0), sm_scale * _LOG2E, sm_scale, num_m_tiles,
        G=group, HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=block_m, BLOCK_N=64 if max(d, dv) <= 128 else 32,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        IEEE_DOT=q.dtype == torch.float32,
    )
    return out, scores
