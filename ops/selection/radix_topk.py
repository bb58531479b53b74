"""Exact top-k by radix select, one Triton program per row, positions written ascending.

MAGE keeps k + sinks + local positions out of up to a context length of scores per (request, KV head).
torch.topk takes 88-139 us for that on the H200 at 128K (`results/first_step.json`), 0.4-0.75 of a dense
step at batch 1, and its indices still need a sort. Here each row finds its exact k-th largest key in four
8-bit radix passes (histograms of the digit under the prefix found so far), then one compaction pass writes
every position above it plus the first positions equal to it, in position order, so no sort follows.

Keys are fp32 mapped to an order-preserving integer: sign-magnitude bits flipped for negatives, so -inf
(padding) and +inf (forced positions) order like any other value. NaN must be replaced beforehand (the
caller's key kernel squeezes it to the lowest finite value).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048
_NUM_WARPS = 8


@triton.jit
def _ordered_key(x):
    i = x.to(tl.int32, bitcast=True)
    # Negative floats: flipping the 31 magnitude bits makes a larger magnitude a smaller integer.
    i = tl.where(i < 0, i ^ 0x7FFFFFFF, i)
    return i.to(tl.int64) + 2147483648  # [0, 2^32), ordered like the floats


@triton.jit
def _radix_topk_kernel(KEYS, OUT, n, n_top, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = KEYS + row * stride_row
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], dtype=tl.int64)
    remaining = n_top + tl.zeros([], dtype=tl.int32)  # of the top n_top, how many lie under `prefix`
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        high = 32 - 8 * p  # key bits >= high are already fixed by `prefix`
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n
            key = _ordered_key(tl.load(base + offs, mask=valid, other=0.0))
            match = valid & ((key >> high) == (prefix >> high))
            digit = tl.where(match, (key >> shift) & 255, 0).to(tl.int32)
            # Elements outside the prefix were counted in bin 0; take them out again.
            outside = tl.sum((match == 0).to(tl.int32), axis=0)
            hist += tl.histogram(digit, 256) - tl.where(bins == 0, outside, 0)
        total = tl.sum(hist, axis=0)
        at_or_above = total - tl.cumsum(hist, axis=0) + hist  # matching elements with digit >= bin
        digit_k = tl.sum((at_or_above >= remaining).to(tl.int32), axis=0) - 1
        remaining -= tl.sum(tl.where(bins > digit_k, hist, 0), axis=0)
        prefix = prefix | (digit_k.to(tl.int64) << shift)
    # `prefix` is now the k-th largest key and `remaining` the number of its ties to keep.
    written = tl.zeros([], dtype=tl.int32)
    ties_seen = tl.zeros([], dtype=tl.int32)
    out = OUT + row * n_top
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        key = _ordered_key(tl.load(base + offs, mask=valid, other=0.0))
        above = valid & (key > prefix)
        tie = valid & (key == prefix)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0) - 1
        take = above | (tie & (tie_rank < remaining))
        slot = written + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out + slot, offs.to(tl.int64), mask=take)
        written += tl.sum(take.to(tl.int32), axis=0)
        ties_seen += tl.sum(tie.to(tl.int32), axis=0)


def radix_topk_positions(keys: torch.Tensor, n_top: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the n_top largest keys along the last dim, ascending, [..., n_top] int64.

    keys: fp32, last dim contiguous, no NaN. Among keys equal to the n_top-th largest, the lowest positions
    are kept. No host sync: it can sit in a captured graph."""
    *lead, n = keys.shape
    assert keys.dtype == torch.float32 and keys.stride(-1) == 1, "keys must be fp32, last dim contiguous"
    assert 0 <= n_top <= n, f"n_top {n_top} outside [0, {n}]"
    rows = keys.reshape(-1, n)
    if out is None:
        out = torch.empty((rows.shape[0], n_top), dtype=torch.int64, device=keys.device)
    if rows.shape[0] and n_top:
        _radix_topk_kernel[(rows.shape[0],)](rows, out, n, n_top, rows.stride(0), BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out.view(*lead, n_top)
