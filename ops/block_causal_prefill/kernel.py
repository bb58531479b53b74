"""Triton op that turns token-causal prefill attention into block-causal attention.

Block-diffusion prompt prefill is block-causal: the token at position p sees every position below
(floor(p / B) + 1) * B. FlashInfer's ordinary causal prefill (ragged over the chunk, merged with the paged
prefix, or paged over prefix + chunk) already covers every key j <= p. What is missing is, for each query,
the later tokens of its own block: at most B - 1 keys, all inside the chunk. `later_in_block_merge` attends
each query to exactly those keys and folds the result into FlashInfer's (o, lse) by log-sum-exp, so the
whole prefill costs one causal FlashInfer pass plus O(T * B * D) extra work.

Contract: the T extend tokens are laid out block after block, i.e. every request's extend starts at a block
boundary and has a multiple of B tokens (the chunked-prefill scheduler hooks guarantee it); the op never
needs per-request lengths. `lse` is FlashInfer's, base 2.

One program owns (block, KV head, row tile). Its rows stack the block's B tokens times the G query heads of
the KV head, so each of the block's B keys is loaded once per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _later_in_block_merge_kernel(
    Q, K, V, O, LSE, O_OUT, LSE_OUT,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_oot, stride_ooh, stride_lot,
    scale_log2,
    BLOCK: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    blk = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < BLOCK * GROUP
    q_tok = rows // GROUP  # token index inside the block
    q_head = kvh * GROUP + rows % GROUP
    tok0 = blk * BLOCK

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    q = tl.load(
        Q + (tok0 + q_tok)[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    keys = tl.arange(0, BLOCK_N)
    key_ok = keys < BLOCK
    k = tl.load(
        K + (tok0 + keys)[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
        mask=key_ok[:, None] & d_ok[None, :], other=0.0,
    )
    v = tl.load(
        V + (tok0 + keys)[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :],
        mask=key_ok[:, None] & dv_ok[None, :], other=0.0,
    )

    s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2
    later = (keys[None, :] > q_tok[:, None]) & key_ok[None, :] & row_ok[:, None]
    s = tl.where(later, s, float("-inf"))
    has_later = tl.sum(later.to(tl.int32), axis=1) > 0
    m_new = tl.where(has_later, tl.max(s, axis=1), 0.0)
    p = tl.where(later, tl.exp2(s - m_new[:, None]), 0.0)
    l_new = tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v).to(tl.float32)

    o_ptr = O + (tok0 + q_tok)[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_dv[None, :]
    o_old = tl.load(o_ptr, mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
    lse_old = tl.load(LSE + (tok0 + q_tok) * stride_lt + q_head, mask=row_ok, other=0.0)

    # Rows without later keys (the block's last token) keep FlashInfer's state bit for bit.
    m_all = tl.where(has_later, tl.maximum(lse_old, m_new), lse_old)
    w_old = tl.exp2(lse_old - m_all)
    w_new = tl.where(has_later, tl.exp2(m_new - m_all), 0.0)
    denom = w_old + w_new * l_new
    o = (o_old * w_old[:, None] + acc * w_new[:, None]) / denom[:, None]
    lse = m_all + tl.log2(denom)

    tl.store(
        O_OUT + (tok0 + q_tok)[:, None] * stride_oot + q_head[:, None] * stride_ooh + offs_dv[None, :],
        o.to(O_OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :],
    )
    tl.store(LSE_OUT + (tok0 + q_tok) * stride_lot + q_head, lse, mask=row_ok)


def later_in_block_merge(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    block_size: int,
    sm_scale: float,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold each query's later same-block keys into a token-causal attention state.

    q: [T, Hq, D]; k: [T, Hkv, D]; v: [T, Hkv, Dv] (the extend tokens, block-aligned, T % B == 0);
    o: [T, Hq, Dv] and lse: [T, Hq] fp32 base 2, FlashInfer's causal result. Writes into out / lse_out
    (default: o and lse, in place) and returns them."""
    t, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    if t % block_size:
        raise ValueError(f"{t} extend tokens are not a whole number of {block_size}-token blocks")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    out = o if out is None else out
    lse_out = lse if lse_out is None else lse_out
    for name, x in (("lse", lse), ("lse_out", lse_out)):
        if x.dtype != torch.float32 or x.shape != (t, hq) or x.stride(1) != 1:
            raise ValueError(f"{name} must be fp32 [{t}, {hq}] with unit head stride")
    if t == 0:
        return out, lse_out
    for name, x in (("q", q), ("k", k), ("v", v), ("o", o), ("out", out)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    group = hq // hkv
    block_n = max(16, triton.next_power_of_2(block_size))
    block_m = min(64, max(16, triton.next_power_of_2(block_size * group)))
    grid = (t // block_size, hkv, triton.cdiv(block_size * group, block_m))
    _later_in_block_merge_kernel[grid](
        q, k, v, o, lse, out, lse_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), lse.stride(0), out.stride(0), out.stride(1), lse_out.stride(0),
        sm_scale * _LOG2E,
        BLOCK=block_size, GROUP=group, HEAD_DIM=d, HEAD_DIM_V=dv,
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
    )
    return out, lse_out
