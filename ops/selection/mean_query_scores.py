"""Block-mean-query logits of the prefix: the `fused` selector's scores, as a separate pass over K.

The `fused` selector ranks prefix keys by q̄·k, q̄ the mean of the block's queries over its tokens and the G
query heads of a KV head. ops/first_step computes that inside its own exact-attention kernel, one pass over
K. This op computes the same scores after any exact pass (FlashInfer's), so the first step can keep the
faster dense kernel: one q̄ per (request, KV head) against every prefix key is a GEMV, bound by reading K
once (half of a dense step's KV bytes, none of its matmul work).

Two launches: the block means, then the logits (each program owns BLOCK_N positions of one request and
loops over its KV heads, so every gathered slot's K row is read whole).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_N = 64
_NUM_WARPS = 4


@triton.jit
def _block_mean_query_kernel(Q, QO_INDPTR, OUT, stride_qt, stride_qh, stride_or, stride_oh, G: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(QO_INDPTR + r)
    n_rows = (tl.load(QO_INDPTR + r + 1) - q_start) * G
    rows = tl.arange(0, BLOCK_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    ptr = Q + (q_start + rows // G).to(tl.int64)[:, None] * stride_qt + (h * G + rows % G)[:, None] * stride_qh
    q = tl.load(ptr + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(q, axis=0) / tl.maximum(n_rows, 1).to(tl.float32)
    tl.store(OUT + r * stride_or + h * stride_oh + offs_d, mean, mask=offs_d < HEAD_DIM)


@triton.jit
def _mean_query_scores_kernel(QM, K, REQ_TO_TOKEN, REQ_POOL_INDICES, PREFIX_LENS, OUT, sm_scale, max_prefix,
                              stride_qr, stride_qh, stride_ks, stride_kh, stride_r2t, stride_or, stride_oh,
                              HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    r = tl.program_id(1)
    prefix = tl.load(PREFIX_LENS + r)
    pool = tl.load(REQ_POOL_INDICES + r).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_prefix = offs_n < prefix
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # int64 before the stride: slot * stride overflows int32 on large pools.
    slot = tl.load(REQ_TO_TOKEN + pool * stride_r2t + offs_n, mask=in_prefix, other=0).to(tl.int64)
    for h in tl.static_range(HKV):
        qm = tl.load(QM + r * stride_qr + h * stride_qh + offs_d, mask=d_ok, other=0.0)
        k = tl.load(K + slot[:, None] * stride_ks + h * stride_kh + offs_d[None, :],
                    mask=in_prefix[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(k * qm[None, :], axis=1) * sm_scale
        tl.store(OUT + r.to(tl.int64) * stride_or + h * stride_oh + offs_n, tl.where(in_prefix, s, float("-inf")),
                 mask=offs_n < max_prefix)


def block_mean_query_triton(q: torch.Tensor, qo_indptr: torch.Tensor, num_kv_heads: int, max_extend_len: int,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """[R, Hkv, D] fp32 mean of each request's extend rows over its tokens and the G heads of a KV head (as
    quest.block_mean_query, in one launch, and with ragged extends <= max_extend_len allowed)."""
    t, hq, d = q.shape
    r = qo_indptr.shape[0] - 1
    g = hq // num_kv_heads
    assert q.stride(-1) == 1 and hq % num_kv_heads == 0
    if out is None:
        out = torch.empty((r, num_kv_heads, d), dtype=torch.float32, device=q.device)
    if r:
        _block_mean_query_kernel[(r, num_kv_heads)](
            q, qo_indptr, out, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            G=g, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_ROWS=triton.next_power_of_2(max_extend_len * g),
            num_warps=4,
        )
    return out


def mean_query_scores(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    sm_scale: float,
    block_size: int,
    max_prefix: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores [R, Hkv, max_prefix] fp32: q̄·k·sm_scale for every prefix position, −inf past each prefix.

    q [T, Hq, D], every request's extend <= block_size rows (q̄ averages the rows it has); k_buffer [S, Hkv, D];
    req_to_token [P, ctx]; req_pool_indices / prefix_lens [R]. No host sync: graph-capturable.
    """
    _, hq, d = q.shape
    hkv = k_buffer.shape[1]
    r = qo_indptr.shape[0] - 1
    assert k_buffer.shape[2] == d and k_buffer.stride(-1) == 1 and req_to_token.stride(-1) == 1
    if out is None:
        out = torch.empty((r, hkv, max_prefix), dtype=torch.float32, device=q.device)
    assert out.shape == (r, hkv, max_prefix) and out.stride(-1) == 1
    if r == 0 or max_prefix == 0:
        return out
    q_mean = block_mean_query_triton(q, qo_indptr, hkv, block_size)
    _mean_query_scores_kernel[(triton.cdiv(max_prefix, _BLOCK_N), r)](
        q_mean, k_buffer, req_to_token, req_pool_indices, prefix_lens, out, sm_scale, max_prefix,
        q_mean.stride(0), q_mean.stride(1), k_buffer.stride(0), k_buffer.stride(1), req_to_token.stride(0),
        out.stride(0), out.stride(1),
        HKV=hkv, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=_BLOCK_N, num_warps=_NUM_WARPS,
    )
    return out
