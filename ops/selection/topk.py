"""Top-k of prefix scores with forced sinks and local window, written into the index cache as slots.

Shapes are fixed by static arguments and nothing reads a device value on the host, so this runs with no
host sync and can sit inside a captured graph. It runs once per layer of an eager first-step forward, so
host time counts as much as device time: the elementwise work before the top-k and the slot mapping after
it are one small Triton kernel each (measured on an H100 host, the ~30 equivalent torch ops took 0.4–0.7 ms
of host time per call against ~0.13 ms of device time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .radix_topk import radix_topk_positions

_BLOCK = 1024
TOPK_METHODS = ("torch", "radix")  # sglang_mage.config.TOPK_METHODS names the same choices for --mage-topk-method


@triton.jit
def _topk_keys_kernel(
    SCORES, PREFIX_LENS, KEYS, stride_sr, stride_sh, n_pos, n_sink, n_local, HKV: tl.constexpr, BLOCK: tl.constexpr
):
    # +inf exactly at the forced positions and −inf exactly at the padding; every valid score is squeezed
    # into the finite range (NaN to the lowest), so neither class can be confused with a real score.
    pid = tl.program_id(0)
    rh = tl.program_id(1)
    r = rh // HKV
    h = rh % HKV
    prefix = tl.load(PREFIX_LENS + r)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_pos
    s = tl.load(SCORES + r.to(tl.int64) * stride_sr + h * stride_sh + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.where(s != s, -3.4028234663852886e38, s)
    s = tl.minimum(tl.maximum(s, -3.4028234663852886e38), 3.4028234663852886e38)
    forced = (offs < n_sink) | (offs >= prefix - n_local)
    s = tl.where(forced, float("inf"), s)
    s = tl.where(offs < prefix, s, float("-inf"))
    tl.store(KEYS + rh.to(tl.int64) * n_pos + offs, s, mask=mask)


@triton.jit
def _write_slots_kernel(
    POSITIONS,
    PREFIX_LENS,
    LENS_IN,
    REQ_TO_TOKEN,
    REQ_POOL_INDICES,
    CACHE_ROWS,
    OUT_SLOTS,
    OUT_LENS,
    LENS_OUT,
    n_top,
    n_keep,
    max_pos,
    stride_r2t,
    stride_os_r,
    stride_os_h,
    stride_ol_r,
    stride_ol_h,
    HKV: tl.constexpr,
    RAGGED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rh = tl.program_id(1)
    r = rh // HKV
    h = rh % HKV
    if RAGGED:
        n = tl.load(LENS_IN + rh)
    else:
        n = tl.minimum(tl.load(PREFIX_LENS + r), n_keep)
    n = tl.maximum(n, 0)
    row = tl.load(CACHE_ROWS + r).to(tl.int64)
    pool = tl.load(REQ_POOL_INDICES + r).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    # Entries past the length are left as they were: readers stop at the length.
    mask = offs < n
    pos = tl.load(POSITIONS + rh.to(tl.int64) * n_top + offs, mask=mask, other=0)
    pos = tl.minimum(pos, max_pos)
    slot = tl.load(REQ_TO_TOKEN + pool * stride_r2t + pos, mask=mask, other=0)
    tl.store(OUT_SLOTS + row * stride_os_r + h * stride_os_h + offs, slot, mask=mask)
    if pid == 0:
        tl.store(OUT_LENS + row * stride_ol_r + h * stride_ol_h, n)
        tl.store(LENS_OUT + rh, n)


def forced_mask(prefix_lens: torch.Tensor, n_pos: int, n_sink: int, n_local: int) -> torch.Tensor:
    """[R, 1, n_pos] bool: the attention sinks [0, n_sink) and the local window [prefix − n_local, prefix),
    both clipped to the prefix. An overlap of the two is one set of positions, so nothing is counted twice."""
    pos = torch.arange(n_pos, device=prefix_lens.device)
    prefix = prefix_lens.to(torch.int64).view(-1, 1, 1)
    valid = pos < prefix
    return valid & ((pos < n_sink) | (pos >= prefix - n_local))


def write_selection(
    keys: torch.Tensor,
    prefix_lens: torch.Tensor,
    n_keep,
    n_top: int,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    out_slots: torch.Tensor,
    out_lens: torch.Tensor,
    cache_rows: torch.Tensor | None,
    topk_method: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per (r, h), the n_keep highest-key prefix positions, ascending, as slots in the index cache.

    keys: [R, Hkv, N] with every position ≥ prefix_lens[r] at −inf and every valid one above −inf, so the
    valid positions win any tie with padding. n_keep: int, or int tensor broadcastable to [R, Hkv] (ragged
    budgets); it is clipped to the prefix and to n_top, the static width of the top-k (≤ N, ≤ K_max).

    Writes out_slots[cache_rows[r], h, :len] (int32; entries past the length are not touched) and
    out_lens[cache_rows[r], h] = len. Both may be strided views whose last dim is contiguous.
    Returns (positions [R, Hkv, n_top] int64, ascending, the first len of them kept; lens [R, Hkv] int32).
    """
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {topk_method!r}")
    R, Hkv, N = keys.shape
    device = keys.device
    if cache_rows is None:
        cache_rows = req_pool_indices
    assert n_top <= N and n_top <= out_slots.shape[-1], f"top-k width {n_top} exceeds N={N} or K_max={out_slots.shape[-1]}"
    assert out_slots.stride(-1) == 1 and req_to_token.stride(-1) == 1
    lens = torch.empty((R, Hkv), dtype=torch.int32, device=device)
    if R == 0 or Hkv == 0:
        return torch.empty((R, Hkv, n_top), dtype=torch.int64, device=device), lens
    # A budget that fills the whole top-k width needs no cut: the top-k then holds every valid position it
    # can, and the padding it picks lies past the prefix, so the ascending sort already puts it last.
    ragged = n_top > 0 and (torch.is_tensor(n_keep) or n_keep < n_top)
    lens_in = lens
    if n_top == 0:
        positions = torch.empty((R, Hkv, 0), dtype=torch.int64, device=device)
    elif ragged:
        # Ranked by key first so that the tail can be cut; cut entries become N and sort behind the kept.
        prefix = prefix_lens.to(device=device, dtype=torch.int64).view(R, 1)
        if torch.is_tensor(n_keep):
            lens_in = torch.minimum(prefix, n_keep.to(device=device, dtype=torch.int64)).clamp(0, n_top)
        else:  # an int stays on the host: a tensor made from it would be a host-to-device copy
            lens_in = prefix.clamp(0, min(n_keep, n_top))
        lens_in = lens_in.to(torch.int32).expand(R, Hkv).contiguous()
        top = torch.topk(keys, n_top, dim=-1, sorted=True).indices
        top = torch.where(torch.arange(n_top, device=device) >= lens_in.unsqueeze(-1), N, top)
        positions = top.sort(dim=-1).values
    else:
        if topk_method == "radix":  # ascending already
            positions = radix_topk_positions(keys.contiguous(), n_top)
        else:
            positions = torch.topk(keys, n_top, dim=-1, sorted=False).indices.sort(dim=-1).values
    positions = positions.contiguous()
    grid = (max(1, triton.cdiv(n_top, _BLOCK)), R * Hkv)
    _write_slots_kernel[grid](
        positions,
        prefix_lens,
        lens_in,
        req_to_token,
        req_pool_indices,
        cache_rows,
        out_slots,
        out_lens,
        lens,
        n_top,
        0 if ragged else min(int(n_keep), n_top),
        min(N, req_to_token.shape[1]) - 1,
        req_to_token.stride(0),
        out_slots.stride(0),
        out_slots.stride(1),
        out_lens.stride(0),
        out_lens.stride(1),
        HKV=Hkv,
        RAGGED=ragged,
        BLOCK=_BLOCK,
    )
    return positions, lens


def select_topk(
    scores: torch.Tensor,
    prefix_lens: torch.Tensor,
    k: int,
    n_sink: int,
    n_local: int,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    out_slots: torch.Tensor,
    out_lens: torch.Tensor,
    cache_rows: torch.Tensor | None = None,
    topk_method: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAGE v2 selection: sinks + local window + top-k of the rest, per (request, kv head).

    Args:
        scores: [R, Hkv, max_prefix] fp32 (block_mean_scores' output; −inf/NaN past the prefix is ignored),
            last dim contiguous.
        prefix_lens: [R] int. k, n_sink, n_local: static ints.
        req_to_token: [P, max_ctx] int32; req_pool_indices: [R].
        out_slots: [P', Hkv, K_max] int32, may be a strided view (e.g. one layer of the index cache);
            needs K_max ≥ min(k + n_sink + n_local, max_prefix).
        out_lens: [P', Hkv] int32 view. cache_rows: [R] rows of out_slots/out_lens (default req_pool_indices).

    Kept per (r, h): min(prefix_r, K_total) positions, K_total = min(k + n_sink + n_local, max_prefix); when
    prefix_r ≤ k + n_sink + n_local that is the whole prefix. The sinks and local window are always in, and
    the remaining K_total − |forced| entries are the highest-scoring other positions. The kept positions
    are written ascending, mapped to slots through req_to_token.
    topk_method: "torch" (torch.topk, then a sort) or "radix" (radix_topk.py: a multi-program radix select
    whose output is ascending already). A two-stage torch.topk (per chunk, then over the candidates) was
    slower than either at every point timed (benchmarks/results/first_step.json) and is gone.

    Returns (positions [R, Hkv, K_total] int64, lens [R, Hkv] int32), as write_selection.
    """
    R, Hkv, N = scores.shape
    n_total = min(k + n_sink + n_local, N)
    keys = torch.empty((R, Hkv, N), dtype=torch.float32, device=scores.device)
    if R * Hkv * N:
        assert scores.stride(-1) == 1, "scores must be contiguous in its last dim"
        _topk_keys_kernel[(triton.cdiv(N, _BLOCK), R * Hkv)](
            scores, prefix_lens, keys, scores.stride(0), scores.stride(1), N, n_sink, n_local, HKV=Hkv, BLOCK=_BLOCK
        )
    return write_selection(
        keys, prefix_lens, n_total, n_total, req_to_token, req_pool_indices, out_slots, out_lens, cache_rows,
        topk_method,
    )
