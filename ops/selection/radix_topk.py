"""Exact top-k by radix select, spread over many programs per row, positions written ascending.

MAGE keeps k + sinks + local positions out of up to a context length of scores per (request, KV head).
torch.topk takes 88-139 us for that on the H200 at 128K, 0.4-0.75 of a dense step at batch 1, and its
indices still need a sort; this select took 30-56 us at batch 1 and at 16 x 32K, and tied at 16 x 128K
(`results/first_step_topk.json`). At batch 1 there are only as many rows as KV heads (2-4),
so one program per row leaves the GPU idle; here every row is cut into chunks, one program each, and the
passes meet through global memory:

  histogram passes (4 of 8 bits by default): the key's top digit, then the next digit among the keys under
       the prefix found so far, and so on. Programs add their chunk's histogram into the row's with atomics;
       the next pass re-derives the prefix from the finished histograms (every program does that small scan
       itself, so no launch is spent on it). After the last pass the prefix is the exact k-th largest key.
  count: per chunk, the keys above it and the keys equal to it.
  write: per chunk, the counts of the chunks before it place its first output slot; it writes every
       position above the k-th key plus the lowest-positioned ties, in position order, so no sort follows.

Keys are fp32 mapped to an order-preserving integer: sign-magnitude bits flipped for negatives, so -inf
(padding) and +inf (forced positions) order like any other value. NaN must be replaced beforehand (the
caller's key kernel squeezes it to the lowest finite value). Launches depend only on shapes, so the whole
select can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Digit width: 8 bits is 4 histogram passes of 256 bins; 11 bits, 3 passes of 2048 bins, was 2.3-4.6x
# slower on the H200 (results/first_step_topk.json): Triton's histogram costs grow with the bin count.
_BITS = 8
_BLOCK = 1024
_TARGET_PROGRAMS = 2 * 132  # about two waves on an H100/H200
_MAX_CHUNK = 8192


@triton.jit
def _ordered_key(x):
    i = x.to(tl.int32, bitcast=True)
    # Negative floats: flipping the 31 magnitude bits makes a larger magnitude a smaller integer.
    i = tl.where(i < 0, i ^ 0x7FFFFFFF, i)
    return i.to(tl.int64) + 2147483648  # [0, 2^32), ordered like the floats


@triton.jit
def _digit_under(hist_row, remaining, NBINS: tl.constexpr):
    """The digit of the k-th largest in a finished pass's histogram, and how many of the top k still lie
    under that digit once the keys of larger digits are taken."""
    bins = tl.arange(0, NBINS)
    hist = tl.load(hist_row + bins)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    digit = tl.sum((at_or_above >= remaining).to(tl.int32), axis=0) - 1
    return digit, remaining - tl.sum(tl.where(bins > digit, hist, 0), axis=0)


@triton.jit
def _kth_prefix(HIST, row, n_top, PASSES_DONE: tl.constexpr, BITS: tl.constexpr, NUM_PASSES: tl.constexpr):
    """The key bits fixed by the finished passes and the count of the top n_top still under that prefix.
    Pass p's digit is the key's bits from BITS * (NUM_PASSES - 1 - p) up (the first one may be narrower)."""
    remaining = n_top + tl.zeros([], dtype=tl.int32)
    prefix = tl.zeros([], dtype=tl.int64)
    for p in tl.static_range(PASSES_DONE):
        d, remaining = _digit_under(HIST + (row * NUM_PASSES + p) * (1 << BITS), remaining, 1 << BITS)
        prefix = prefix | (d.to(tl.int64) << (BITS * (NUM_PASSES - 1 - p)))
    return prefix, remaining


@triton.jit
def _histogram_pass(KEYS, HIST, n, n_top, stride_row, chunk, PASS: tl.constexpr, BITS: tl.constexpr,
                    NUM_PASSES: tl.constexpr, BLOCK: tl.constexpr):
    NBINS: tl.constexpr = 1 << BITS
    SHIFT: tl.constexpr = BITS * (NUM_PASSES - 1 - PASS)
    row = tl.program_id(0).to(tl.int64)
    start0 = tl.program_id(1) * chunk
    prefix, _ = _kth_prefix(HIST, row, n_top, PASS, BITS, NUM_PASSES)
    bins = tl.arange(0, NBINS)
    hist = tl.zeros([NBINS], dtype=tl.int32)
    for start in range(start0, tl.minimum(start0 + chunk, n), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        key = _ordered_key(tl.load(KEYS + row * stride_row + offs, mask=valid, other=0.0))
        if PASS == 0:
            match = valid
        else:
            # Only keys whose bits fixed by the earlier passes equal the prefix's are still in play.
            match = valid & ((key >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS)))
        digit = tl.where(match, (key >> SHIFT) & (NBINS - 1), 0).to(tl.int32)
        # Keys outside the prefix were counted in bin 0; take them out again.
        outside = tl.sum((match == 0).to(tl.int32), axis=0)
        hist += tl.histogram(digit, NBINS) - tl.where(bins == 0, outside, 0)
    tl.atomic_add(HIST + (row * NUM_PASSES + PASS) * NBINS + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _count_pass(KEYS, HIST, COUNTS, n, n_top, stride_row, chunk, num_chunks, BITS: tl.constexpr,
                NUM_PASSES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    kth, _ = _kth_prefix(HIST, row, n_top, NUM_PASSES, BITS, NUM_PASSES)
    above = tl.zeros([], dtype=tl.int32)
    ties = tl.zeros([], dtype=tl.int32)
    for start in range(c * chunk, tl.minimum(c * chunk + chunk, n), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        key = _ordered_key(tl.load(KEYS + row * stride_row + offs, mask=valid, other=0.0))
        above += tl.sum((valid & (key > kth)).to(tl.int32), axis=0)
        ties += tl.sum((valid & (key == kth)).to(tl.int32), axis=0)
    tl.store(COUNTS + (row * num_chunks + c) * 2, above)
    tl.store(COUNTS + (row * num_chunks + c) * 2 + 1, ties)


@triton.jit
def _write_pass(KEYS, HIST, COUNTS, OUT, n, n_top, stride_row, chunk, num_chunks, BITS: tl.constexpr,
                NUM_PASSES: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    kth, ties_kept = _kth_prefix(HIST, row, n_top, NUM_PASSES, BITS, NUM_PASSES)
    earlier = tl.arange(0, CHUNKS_P2)
    before = earlier < c
    counts = COUNTS + row * num_chunks * 2 + earlier * 2
    ties_seen = tl.sum(tl.load(counts + 1, mask=before, other=0), axis=0)
    written = tl.sum(tl.load(counts, mask=before, other=0), axis=0) + tl.minimum(ties_seen, ties_kept)
    out = OUT + row * n_top
    for start in range(c * chunk, tl.minimum(c * chunk + chunk, n), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        key = _ordered_key(tl.load(KEYS + row * stride_row + offs, mask=valid, other=0.0))
        above = valid & (key > kth)
        tie = valid & (key == kth)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0) - 1
        take = above | (tie & (tie_rank < ties_kept))
        slot = written + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out + slot, offs.to(tl.int64), mask=take)
        written += tl.sum(take.to(tl.int32), axis=0)
        ties_seen += tl.sum(tie.to(tl.int32), axis=0)


def default_chunk(num_rows: int, n: int) -> int:
    """Keys per program: enough programs for ~2 waves, at least one BLOCK and at most _MAX_CHUNK each."""
    want = triton.cdiv(num_rows * n, _TARGET_PROGRAMS)
    return min(max(_BLOCK, triton.next_power_of_2(want)), _MAX_CHUNK)


def radix_topk_positions(keys: torch.Tensor, n_top: int, out: torch.Tensor | None = None,
                         chunk: int | None = None, block: int = _BLOCK, bits: int = _BITS) -> torch.Tensor:
    """Positions of the n_top largest keys along the last dim, ascending, [..., n_top] int64.

    keys: fp32, last dim contiguous, no NaN. Among keys equal to the n_top-th largest, the lowest positions
    are kept. `chunk` (keys per program, a multiple of `block`) defaults to default_chunk(); `bits` is the
    digit width (4 to 12). No host sync: it can sit in a captured graph."""
    *lead, n = keys.shape
    assert keys.dtype == torch.float32 and keys.stride(-1) == 1, "keys must be fp32, last dim contiguous"
    assert 0 <= n_top <= n, f"n_top {n_top} outside [0, {n}]"
    rows = keys.reshape(-1, n)
    num_rows = rows.shape[0]
    if out is None:
        out = torch.empty((num_rows, n_top), dtype=torch.int64, device=keys.device)
    if not (num_rows and n_top):
        return out.view(*lead, n_top)
    chunk = chunk or default_chunk(num_rows, n)
    assert chunk % block == 0, f"chunk {chunk} must be a multiple of block {block}"
    assert 4 <= bits <= 12, f"bits {bits} outside [4, 12]"
    num_passes = triton.cdiv(32, bits)
    num_chunks = triton.cdiv(n, chunk)
    hist = torch.zeros((num_rows, num_passes, 1 << bits), dtype=torch.int32, device=keys.device)
    counts = torch.empty((num_rows, num_chunks, 2), dtype=torch.int32, device=keys.device)
    grid = (num_rows, num_chunks)
    common = (n, n_top, rows.stride(0), chunk)
    radix = dict(BITS=bits, NUM_PASSES=num_passes, BLOCK=block, num_warps=4)
    for p in range(num_passes):
        _histogram_pass[grid](rows, hist, *common, PASS=p, **radix)
    _count_pass[grid](rows, hist, counts, *common, num_chunks, **radix)
    _write_pass[grid](rows, hist, counts, out, *common, num_chunks, CHUNKS_P2=max(16, triton.next_power_of_2(num_chunks)),
                      **radix)
    return out.view(*lead, n_top)
