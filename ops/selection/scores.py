"""Block-mean attention scores of the prefix (MAGE v2 `mean`), as one Triton pass over the prefix's K.

At a block's first denoising step the exact pass (FlashInfer) has already produced, for every query row,
the log-sum-exp over all of its keys (prefix + block). With that LSE, the probability of a single key is
exp(q·k·scale − lse) and needs no second softmax pass, so scoring reads K once and never materialises the
[rows, prefix] probability matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634

# Tile sizes, from a sweep on an H100 (bf16, 28 q / 4 kv heads, D=128, 32-token blocks, 8K–128K prefix):
# 128 positions × 32 query rows, 4 warps, ran 2.3× faster than 64 × 128 at 8 warps. A small row tile keeps
# more programs resident, which hides the latency of the scattered K gather; the rows loop inside the
# program, so K is still read once per program and the extra Q reloads hit L2.
_BLOCK_N = 128
_MAX_BLOCK_M = 32
_NUM_WARPS = 4


@triton.jit
def _block_mean_scores_kernel(
    Q,
    K,
    QO_INDPTR,
    REQ_TO_TOKEN,
    REQ_POOL_INDICES,
    PREFIX_LENS,
    LSE,
    OUT,
    qk_scale_log2,
    lse_to_log2,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_r2t,
    stride_lt,
    stride_lh,
    stride_or,
    stride_oh,
    max_prefix,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)

    prefix = tl.load(PREFIX_LENS + r)
    q_start = tl.load(QO_INDPTR + r)
    q_end = tl.load(QO_INDPTR + r + 1)
    n_rows = (q_end - q_start) * G

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    vals = tl.full([BLOCK_N], float("-inf"), tl.float32)
    # Requests of a batch have mixed prefix lengths while the grid covers the longest one; chunks past this
    # request's prefix only write the -inf padding and skip the gather and the dots.
    if pid_n * BLOCK_N < prefix:
        mask_n = offs_n < prefix
        pool = tl.load(REQ_POOL_INDICES + r).to(tl.int64)
        slots = tl.load(REQ_TO_TOKEN + pool * stride_r2t + offs_n, mask=mask_n, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        # Loaded [N, D] so that each gathered row is read contiguously (coalesced), then transposed in
        # registers for the dot. Slot × stride can exceed 2^31 on a large pool, hence the int64 slots.
        k = tl.load(
            K + slots[:, None] * stride_ks + h * stride_kh + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        kt = tl.trans(k)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for m0 in range(0, n_rows, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            mask_m = rows < n_rows
            # Row m is token m // G, q head h·G + m % G: the G query heads that share kv head h (GQA).
            tok = (q_start + rows // G).to(tl.int64)
            head = h * G + rows % G
            q = tl.load(
                Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :],
                other=0.0,
            )
            lse = tl.load(LSE + tok * stride_lt + head * stride_lh, mask=mask_m, other=0.0)
            if IEEE:
                # fp32 inputs would otherwise run as TF32 on the GPU, whose ~1e-3 relative logit error becomes
                # the same relative error in every probability.
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            p = tl.exp2(s * qk_scale_log2 - lse[:, None] * lse_to_log2)
            acc += tl.sum(tl.where(mask_m[:, None], p, 0.0), axis=0)
        vals = tl.where(mask_n, acc / tl.maximum(n_rows, 1).to(tl.float32), float("-inf"))
    out_ptr = OUT + r.to(tl.int64) * stride_or + h * stride_oh + offs_n
    tl.store(out_ptr, vals, mask=offs_n < max_prefix)


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def block_mean_scores(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    lse: torch.Tensor,
    sm_scale: float,
    max_extend_len: int,
    max_prefix: int,
    out: torch.Tensor | None = None,
    lse_is_log2: bool = False,
    block_n: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Block-average attention probability of every prefix position, per (request, kv head).

    scores[r, h, p] = mean over the ext_len·G query rows of kv head h (q heads h·G .. h·G+G−1) of
    exp(q·k_p·sm_scale − lse), for p < prefix_lens[r]; −inf for prefix_lens[r] ≤ p < max_prefix.

    Args:
        q: [T, Hq, D] (or [T, Hq·D]); request r owns rows qo_indptr[r]:qo_indptr[r+1]. Same dtype as k_buffer.
        k_buffer: [S, Hkv, D] paged K pool, last dim contiguous. Prefix position p of request r lives at
            slot req_to_token[req_pool_indices[r], p].
        qo_indptr: [R+1] int. req_to_token: [P, max_ctx] int32. req_pool_indices: [R]. prefix_lens: [R] int32.
        lse: [T, Hq] fp32, natural-log LSE of each query row over ALL its keys (prefix + block), as the exact
            first-step pass returns it. Each row's probabilities over the prefix therefore sum to ≤ 1; the
            rest is the block's own mass.
        sm_scale: softmax scale the LSE was computed with.
        max_extend_len: the block size; sizes the Q row tile only (longer blocks stay correct, rows loop).
        max_prefix: static upper bound on prefix_lens (a Python int, so no host sync); sizes the grid/output.
        out: optional [R, Hkv, ≥max_prefix] fp32 destination (may be strided); columns ≥ max_prefix untouched.
        lse_is_log2: the LSE is log2 of the sum of exp (FlashInfer's convention for its returned LSE),
            not the natural log; it is then used as is, with no conversion pass.
        block_n, block_m, num_warps: override the tile (benchmarks/bench_first_step.py sweeps them).

    Returns:
        scores [R, Hkv, max_prefix] fp32 (a view of `out` when given).
    """
    if q.dim() == 2:
        q = q.view(q.shape[0], -1, k_buffer.shape[-1])
    T, Hq, D = q.shape
    Hkv = k_buffer.shape[1]
    R = req_pool_indices.shape[0]
    assert Hq % Hkv == 0, f"q heads {Hq} not a multiple of kv heads {Hkv}"
    assert k_buffer.shape[-1] == D and k_buffer.stride(-1) == 1, "k_buffer must be [S, Hkv, D], last dim contiguous"
    assert q.dtype == k_buffer.dtype, f"q {q.dtype} and k_buffer {k_buffer.dtype} must share a dtype"
    assert lse.shape == (T, Hq), f"lse {tuple(lse.shape)} != {(T, Hq)}"
    G = Hq // Hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if lse.dtype != torch.float32:
        lse = lse.float()
    if out is None:
        out = torch.empty((R, Hkv, max_prefix), dtype=torch.float32, device=q.device)
    else:
        assert out.dtype == torch.float32 and out.shape[:2] == (R, Hkv) and out.shape[2] >= max_prefix
        assert out.stride(-1) == 1, "out must be contiguous in its last dim"
        out = out[:, :, :max_prefix]
    if R == 0 or max_prefix == 0 or Hkv == 0:
        return out

    if block_m is None:
        block_m = min(_MAX_BLOCK_M, max(16, _next_pow2(max(max_extend_len, 1) * G)))
    if block_n is None:
        block_n = _BLOCK_N
    block_d = max(16, _next_pow2(D))
    grid = (triton.cdiv(max_prefix, block_n), R, Hkv)
    _block_mean_scores_kernel[grid](
        q,
        k_buffer,
        qo_indptr,
        req_to_token,
        req_pool_indices,
        prefix_lens,
        lse,
        out,
        float(sm_scale) * _LOG2E,
        1.0 if lse_is_log2 else _LOG2E,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        req_to_token.stride(0),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        max_prefix,
        G=G,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32,
        num_warps=_NUM_WARPS if num_warps is None else num_warps,
    )
    return out
