"""Triton kernels for MAGE block-sparse attention over a paged KV pool.

One program owns (request, KV head, row tile, key split). Its Q tile stacks the block's tokens times the
G query heads that share the KV head, so every gathered K/V row is reused by all G heads (the point of
grouping by KV head instead of by query head). Its key list is [selected prefix slots | the block's own
slots]; long lists are cut into `num_splits` equal chunks so that small batches still fill the GPU, and a
second kernel merges the chunks by their log-sum-exp (flash-decoding). With one split the first kernel
writes the output itself and the merge is skipped.

Everything the wrapper decides (grid, tile sizes, split count) is a function of tensor shapes only, so a
call can be captured in a CUDA graph; per-request lengths are read on the device.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.3 on CUDA: grid dependency control, for programmatic dependent launch (Hopper and later)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL is simply unavailable
    gdc_launch_dependents = gdc_wait = None

# The split count and tiles come from sweeps on the H200 (7B shape, 128K, B=32, batch 1/16, k 512/2048,
# graph replay: benchmarks/results/kernels_split_sweep.json, raw/kernels_merge_unroll_h200.json). Splitting
# pays only while a launch is short of one wave: at batch 16 one split beat three by 1.5x at k=512. At batch
# 1 the split path is fastest with 64 x 32 tiles (16 programs per split at the 7B shape, so eight splits
# fill most of a wave) and about 75 keys per split: 8 splits at k=512 took 10.69 us against 11.28 at 6.
# The merge is unrolled per split count and runs 16-row tiles: 1.1-1.7 us faster than 32-row tiles at every
# batch-1 point of that sweep. With --mage-pdl full the 8-split step took 9.65 us.
_MIN_KEYS_PER_SPLIT = 72
_WAVE_PROGRAMS = 132  # SMs of an H100/H200
_MAX_SPLITS = 12
_MERGE_BLOCK_M = 16
_DEEP_PIPELINE_SMEM = 200 * 1024  # opt-in shared memory per block that 5 one-split stages need, with margin


def _tile_sizes(group: int, max_extend_len: int, head_dim: int, head_dim_v: int,
                split: bool = False) -> tuple[int, int, int, int, int]:
    """(rows, block_m, block_n, block_d, block_dv) of a launch: `split` for the split path's smaller tiles."""
    rows = max_extend_len * group
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    # A 256x128 fp32 accumulator plus its Q tile does not fit one CTA's registers; cap the row tile and
    # let extra tiles become extra programs (they re-gather the same keys, which L2 mostly absorbs).
    # The split path walks ~75 keys per program, so more, smaller programs beat fewer, fuller ones there.
    cap = 64 if split or max(block_d, block_dv) > 128 else 128
    block_m = min(max(16, triton.next_power_of_2(rows)), cap)
    block_n = 32 if split or max(block_d, block_dv) > 128 else 64
    return rows, block_m, block_n, block_d, block_dv


def _default_num_stages(direct: bool, device: torch.device) -> int:
    """Pipeline depth from the H200 sweeps (results/raw/kernels_stage_sweep_h200.json,
    kernels_pdl_timeline_h200.json and kernels_defaults_h200.json; 7B shape, 128K). Triton puts the
    selection-index loads one stage ahead of the K/V gathers they address, so K/V tiles in flight grow by
    one per two stages. One split, whose program walks the whole selection, gains from depth (batch 16,
    k=2048: 95.8 us at 2 stages, 83.4 at 3, 68.0 at 5, 71.5 at 7; k=512: 26.2 at 3, 24.2 at 5); the split
    path's short walks lose (8 splits, batch 1, k=512: 9.9 us at 2, 10.9 at 5). Five stages hold ~135 KB of
    shared memory per program at 128-row tiles, so they are the default only where a block may opt in to
    _DEEP_PIPELINE_SMEM (Hopper and later datacenter parts, where they were measured); 3 elsewhere."""
    if not direct:
        return 2
    return 5 if _max_shared_mem(device.index) >= _DEEP_PIPELINE_SMEM else 3


@functools.lru_cache(maxsize=None)
def _max_shared_mem(index: int | None) -> int:
    """Opt-in shared memory per block in bytes; 0 where there is no compiled CUDA launch (CPU, interpreter)."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    try:
        index = torch.cuda.current_device() if index is None else index
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # an older Triton without the query: keep the depth that fits everywhere
        return 0


def default_num_splits(
    num_reqs: int, num_kv_heads: int, group: int, max_extend_len: int, k_max: int, head_dim: int = 128
) -> int:
    """Split count used when the caller gives none: as many splits as keep the launch within one wave, but
    never so many that a split holds fewer than _MIN_KEYS_PER_SPLIT keys, programs counted at the split
    path's tiles. Pure function of shapes (CUDA-graph safe)."""
    rows, block_m, *_ = _tile_sizes(group, max_extend_len, head_dim, head_dim, split=True)
    programs = max(1, num_reqs * num_kv_heads * triton.cdiv(rows, block_m))
    by_keys = max(1, (k_max + max_extend_len) // _MIN_KEYS_PER_SPLIT)
    return max(1, min(_WAVE_PROGRAMS // programs, by_keys, _MAX_SPLITS))


PDL_MODES = ("off", "merge", "full")


def pdl_available(device: torch.device | str) -> bool:
    """Programmatic dependent launch needs a Hopper-or-later CUDA GPU, a Triton with grid dependency control,
    and compiled code (the interpreter runs no inline PTX)."""
    if gdc_wait is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    device = torch.device(device)
    return device.type == "cuda" and _capability_major(device.index) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(index: int | None) -> int:
    # Cached: eager steps ask once per layer call, and the host time of an eager step is the step's floor.
    return torch.cuda.get_device_capability(index)[0] if torch.cuda.is_available() else 0


def alloc_workspace(
    max_reqs: int,
    num_kv_heads: int,
    max_extend_len: int,
    group: int,
    head_dim_v: int,
    num_splits: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 buffers for the split path: partial O [max_reqs, Hkv, splits, max_extend_len*G, Dv] (each
    split's softmax-normalised output) and LSE [max_reqs, Hkv, splits, max_extend_len*G] (base-2)."""
    rows = max_extend_len * group
    o_part = torch.empty((max_reqs, num_kv_heads, num_splits, rows, head_dim_v), dtype=torch.float32, device=device)
    lse = torch.empty((max_reqs, num_kv_heads, num_splits, rows), dtype=torch.float32, device=device)
    return o_part, lse


def alloc_batch_workspace(
    max_reqs: int,
    num_kv_heads: int,
    max_extend_len: int,
    group: int,
    head_dim: int,
    head_dim_v: int,
    k_max: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 (partial O, LSE) buffers that hold the split path of any batch of up to max_reqs requests at
    its own default split count: sparse_block_attention views them as [R, Hkv, splits(R), rows, Dv] per call.
    The split count then follows the batch (6 splits at batch 1, 1 at batch 16 on the 7B shape) instead of
    being fixed by the largest batch, and the size stays about one wave of programs' worth of rows."""
    rows = max_extend_len * group
    most = max(r * default_num_splits(r, num_kv_heads, group, max_extend_len, k_max, head_dim)
               for r in range(1, max(1, max_reqs) + 1))
    n = most * num_kv_heads * rows
    return (torch.empty(n * head_dim_v, dtype=torch.float32, device=device),
            torch.empty(n, dtype=torch.float32, device=device))


def alloc_merge_counters(max_reqs: int, num_kv_heads: int, max_extend_len: int, group: int, head_dim: int,
                         device: torch.device | str, block_m: int | None = None) -> torch.Tensor:
    """Zeroed int32 arrival counters for sparse_block_attention(merge_counters=...): one per row tile."""
    rows, default_m, *_ = _tile_sizes(group, max_extend_len, head_dim, head_dim, split=True)
    return torch.zeros(max_reqs * num_kv_heads * triton.cdiv(rows, block_m or default_m), dtype=torch.int32,
                       device=device)


@triton.jit
def _sparse_block_attn_fwd(
    q_ptr, k_ptr, v_ptr, out_ptr, o_part_ptr, lse_ptr, merge_counter_ptr,
    qo_indptr_ptr, r2t_ptr, pool_idx_ptr, prefix_ptr, sel_ptr, sel_len_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
    stride_r2t, stride_sel0, stride_sel1, stride_sel2, stride_sl0, stride_sl1,
    stride_pr, stride_ph, stride_ps, stride_pm, stride_lr, stride_lh, stride_ls,
    qk_scale, num_splits, num_m_tiles, M_ROWS,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DIRECT: tl.constexpr, IEEE_DOT: tl.constexpr, LAST_MERGES: tl.constexpr,
    PDL_WAIT: tl.constexpr, PDL_TRIGGER: tl.constexpr, MERGE_SPLITS: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1) // num_m_tiles
    mt = tl.program_id(1) % num_m_tiles
    split = tl.program_id(2)

    if PDL_TRIGGER:  # the merge launch may start now; its programs wait for this grid before reading
        gdc_launch_dependents()
    q_start = tl.load(qo_indptr_ptr + r)
    ext_len = tl.load(qo_indptr_ptr + r + 1) - q_start
    pool = tl.load(pool_idx_ptr + r).to(tl.int64)
    prefix = tl.load(prefix_ptr + r)
    if PDL_WAIT:
        # Launched before the previous kernel finished: only the per-batch plan (written before the forward
        # began) is read above. Everything below may come from that kernel: the selection (quest and oracle
        # select right before this step), the block's K/V write, Q, and the buffers a previous merge reads.
        gdc_wait()
    sel_len = tl.load(sel_len_ptr + pool * stride_sl0 + h * stride_sl1)
    total = sel_len + ext_len
    # Chunks are rounded to whole key tiles so only a list's last tile is partial; trailing splits of a
    # short list come out empty and are handled as such.
    chunk = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    key_start = split * chunk
    key_end = tl.minimum(key_start + chunk, total)

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = offs_m // G
    head = h * G + offs_m % G
    row_ok = (tok < ext_len) & (offs_m < M_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    q_rows = (q_start + tok).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    sel_base = sel_ptr + pool * stride_sel0 + h * stride_sel1
    own_base = r2t_ptr + pool * stride_r2t + prefix - sel_len
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    for n0 in range(key_start, key_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < key_end
        from_sel = offs_n < sel_len
        # Only entries below sel_len are read: the rest of a selection row is stale garbage.
        sel_ids = tl.load(sel_base + offs_n.to(tl.int64) * stride_sel2, mask=n_ok & from_sel, other=0)
        own_ids = tl.load(own_base + offs_n, mask=n_ok & (offs_n >= sel_len), other=0)
        # int64 before scaling by the stride: slot * stride overflows int32 on large pools.
        slot = tl.where(from_sel, sel_ids, own_ids).to(tl.int64)

        kt = tl.load(
            k_ptr + slot[None, :] * stride_ks + h * stride_kh + offs_d[:, None],
            mask=n_ok[None, :] & d_ok[:, None], other=0.0,
        )
        if IEEE_DOT:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))

        # Every tile holds at least one valid key, so m_new is finite and alpha never sees -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(
            v_ptr + slot[:, None] * stride_vs + h * stride_vh + offs_dv[None, :],
            mask=n_ok[:, None] & dv_ok[None, :], other=0.0,
        )
        if IEEE_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # An empty split has l_i == 0: it must publish O = 0 and LSE = -inf, never 0/0.
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    store_mask = row_ok[:, None] & dv_ok[None, :]
    if DIRECT:
        o_rows = (q_start + tok).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(out_ptr + o_rows[:, None] + offs_dv[None, :], o.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part = r.to(tl.int64) * stride_pr + h * stride_ph + split * stride_ps
        tl.store(o_part_ptr + part + offs_m[:, None] * stride_pm + offs_dv[None, :], o, mask=store_mask)
        lse_off = r.to(tl.int64) * stride_lr + h * stride_lh + split * stride_ls
        tl.store(lse_ptr + lse_off + offs_m, lse, mask=row_ok)
        if LAST_MERGES:
            # One launch instead of two: the tile's last split to finish merges them all. The barrier lets
            # every thread's partial stores land before the release; the acquire orders the merge's loads.
            tl.debug_barrier()
            counter = merge_counter_ptr + r.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                part0 = o_part_ptr + r.to(tl.int64) * stride_pr + h * stride_ph
                o_rows = (q_start + tok).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
                _merge_tile(out_ptr, lse_ptr + r.to(tl.int64) * stride_lr + h * stride_lh + offs_m,
                            part0 + offs_m[:, None] * stride_pm + offs_dv[None, :], o_rows, row_ok, dv_ok,
                            stride_ls, stride_ps, MERGE_SPLITS, BLOCK_M, BLOCK_DV)
                tl.store(counter, 0)  # ready for the next call (and the next graph replay)


@triton.jit
def _split_lse(lse_base, s, stride_ls, row_ok):
    return tl.load(lse_base + s * stride_ls, mask=row_ok, other=float("-inf"), cache_modifier=".cg")


@triton.jit
def _add_split(acc, den, m, lse_base, part_base, s, stride_ls, stride_ps, row_ok, dv_ok):
    w = tl.exp2(_split_lse(lse_base, s, stride_ls, row_ok) - m)
    # An empty split has w == 0; it stored O = 0, and the where() keeps it harmless regardless.
    o = tl.load(part_base + s * stride_ps, mask=row_ok[:, None] & dv_ok[None, :], other=0.0, cache_modifier=".cg")
    return acc + tl.where(w[:, None] > 0.0, o * w[:, None], 0.0), den + w


@triton.jit
def _merge_tile(out_ptr, lse_base, part_base, o_rows, row_ok, dv_ok, stride_ls, stride_ps,
                NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out rows of one row tile = the splits' partial outputs weighted by their LSE (flash-decoding). Loads
    bypass L1 (.cg): in the last-program merge they read partials other programs wrote moments before.
    The split count is a constant, so the loops unroll and every split's loads are in flight at once; a
    runtime loop waited out one load latency per split (4.8 of a 12.7 us batch-1 step on the H200,
    results/raw/kernels_pdl_timeline_h200.json)."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        m = tl.maximum(m, _split_lse(lse_base, s, stride_ls, row_ok))
    # Rows with no keys anywhere (only padding rows, in practice) keep m = -inf; shift by 0 so that
    # exp2(-inf - 0) = 0 instead of NaN.
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        acc, den = _add_split(acc, den, m, lse_base, part_base, s, stride_ls, stride_ps, row_ok, dv_ok)
    o = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    tl.store(out_ptr + o_rows[:, None] + tl.arange(0, BLOCK_DV)[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _merge_splits(
    out_ptr, o_part_ptr, lse_ptr, qo_indptr_ptr,
    stride_ot, stride_oh, stride_pr, stride_ph, stride_ps, stride_pm, stride_lr, stride_lh, stride_ls,
    num_m_tiles, M_ROWS,
    HEAD_DIM_V: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    PDL_WAIT: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1) // num_m_tiles
    mt = tl.program_id(1) % num_m_tiles
    q_start = tl.load(qo_indptr_ptr + r)
    ext_len = tl.load(qo_indptr_ptr + r + 1) - q_start

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = offs_m // G
    head = h * G + offs_m % G
    row_ok = (tok < ext_len) & (offs_m < M_ROWS)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_base = lse_ptr + r.to(tl.int64) * stride_lr + h * stride_lh + offs_m
    part_base = o_part_ptr + r.to(tl.int64) * stride_pr + h * stride_ph + offs_m[:, None] * stride_pm + offs_dv[None, :]
    o_rows = (q_start + tok).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
    if PDL_WAIT:  # launched while the split kernel still runs: its partials are complete only past this
        gdc_wait()
    _merge_tile(out_ptr, lse_base, part_base, o_rows, row_ok, offs_dv < HEAD_DIM_V, stride_ls, stride_ps,
                NUM_SPLITS, BLOCK_M, BLOCK_DV)


def sparse_block_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    sel_slots: torch.Tensor,
    sel_lens: torch.Tensor,
    sm_scale: float,
    max_extend_len: int,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    merge_counters: torch.Tensor | None = None,
    num_stages: int | None = None,
    num_warps: int | None = None,
    pdl: str = "off",
    merge_block_m: int | None = None,
) -> torch.Tensor:
    """Block queries attend to [selected prefix slots of their KV head | the block's own tokens].

    Shapes: q [T, Hq, D]; k_buffer/v_buffer [S, Hkv, D/Dv]; qo_indptr [R+1]; req_to_token [P, ctx];
    req_pool_indices/prefix_lens [R]; sel_slots [P', Hkv, K_max] and sel_lens [P', Hkv] (any strides,
    indexed by req_pool_indices). Every ext_len must be <= max_extend_len. With num_splits None the split
    count is a 5-D workspace's if one is given, else default_num_splits() of this call's shapes (a flat
    workspace from alloc_batch_workspace is viewed at that count). block_m / block_n override the row
    and key tiles (powers of two >= 16; for tile sweeps, `bench_kernels.py --split-sweep`). With
    `merge_counters` (int32, zeroed once, >= R x Hkv x row tiles; alloc_merge_counters) the last split of each
    row tile merges the splits itself, one launch instead of two; every call leaves them zeroed again. It
    measured 1-9 us slower than two launches under graph replay on the H200 (kernels_split_sweep.json), so
    it is off by default. num_stages / num_warps override the launch (pipeline depth: _default_num_stages,
    warps: 8 for 128x128 tiles, else 4), for sweeps. `pdl` (PDL_MODES) uses programmatic dependent
    launch where pdl_available(): "merge" lets the merge launch start while the split kernel runs, "full"
    also launches the split kernel itself before the previous kernel ends. It then reads qo_indptr,
    req_pool_indices and prefix_lens before waiting for that kernel, so with "full" they must not come
    from the kernel launched just before (the backend plans them before the forward); everything else is
    read after the wait. Elsewhere it is "off", the default here. merge_block_m overrides the merge's row
    tile (a power of two >= 16; default _MERGE_BLOCK_M). No host sync: graph-capturable.
    """
    num_tokens, hq, head_dim = q.shape
    _, hkv, head_dim_k = k_buffer.shape
    head_dim_v = v_buffer.shape[2]
    assert head_dim_k == head_dim and hq % hkv == 0, "q/k head dims or GQA ratio do not match"
    group = hq // hkv
    num_reqs = qo_indptr.shape[0] - 1
    k_max = sel_slots.shape[2]
    unit_last = (q, k_buffer, v_buffer, req_to_token, qo_indptr, req_pool_indices, prefix_lens)
    assert all(t.stride(-1) == 1 for t in unit_last), "q, k/v, req_to_token and 1-D metadata need unit last stride"
    if out is None:
        out = torch.empty((num_tokens, hq, head_dim_v), dtype=q.dtype, device=q.device)
    assert out.shape == (num_tokens, hq, head_dim_v) and out.stride(-1) == 1
    if num_reqs == 0:
        return out

    for name, tile in (("block_m", block_m), ("block_n", block_n), ("merge_block_m", merge_block_m)):
        assert tile is None or (tile >= 16 and tile & (tile - 1) == 0), f"{name} must be a power of two >= 16"
    flat = workspace is not None and workspace[0].dim() == 1
    if num_splits is None:
        num_splits = workspace[0].shape[2] if workspace is not None and not flat else default_num_splits(
            num_reqs, hkv, group, max_extend_len, k_max, head_dim
        )
    direct = num_splits == 1
    rows, default_m, default_n, block_d, block_dv = _tile_sizes(group, max_extend_len, head_dim, head_dim_v,
                                                                split=not direct)
    block_m, block_n = block_m or default_m, block_n or default_n
    num_m_tiles = triton.cdiv(rows, block_m)
    if flat and not direct:
        n = num_reqs * hkv * num_splits * rows
        assert workspace[0].numel() >= n * head_dim_v and workspace[1].numel() >= n, (
            f"flat workspace too small for {num_reqs} requests x {num_splits} splits")
        workspace = (workspace[0][: n * head_dim_v].view(num_reqs, hkv, num_splits, rows, head_dim_v),
                     workspace[1][:n].view(num_reqs, hkv, num_splits, rows))
    if direct:
        o_part, lse = out, out  # unused by the kernel on this path; any pointer will do
        part_strides = (0, 0, 0, 0)
        lse_strides = (0, 0, 0)
    else:
        if workspace is None:
            workspace = alloc_workspace(num_reqs, hkv, max_extend_len, group, head_dim_v, num_splits, q.device)
        o_part, lse = workspace
        assert o_part.dtype == lse.dtype == torch.float32
        assert o_part.shape[0] >= num_reqs and o_part.shape[1] == hkv and o_part.shape[2] >= num_splits
        assert o_part.shape[3] >= rows and o_part.shape[4] == head_dim_v and o_part.stride(-1) == 1
        assert lse.shape[:3] == o_part.shape[:3] and lse.shape[3] >= rows and lse.stride(-1) == 1
        part_strides = o_part.stride()[:4]
        lse_strides = lse.stride()[:3]

    ieee = q.dtype == torch.float32
    assert (num_stages is None or num_stages >= 1) and (num_warps is None or num_warps in (1, 2, 4, 8, 16)), (
        "bad num_stages / num_warps")
    num_warps = num_warps or (8 if block_m * max(block_d, block_dv) >= 128 * 128 else 4)
    num_stages = num_stages or _default_num_stages(direct, q.device)
    assert pdl in PDL_MODES, f"pdl must be one of {PDL_MODES}, got {pdl!r}"
    if pdl != "off" and not pdl_available(q.device):
        pdl = "off"
    pdl_merge = pdl != "off" and not direct and merge_counters is None
    # launch_pdl only where it is on: the interpreter's launcher takes no such option.
    main_launch = {"launch_pdl": True} if pdl == "full" else {}
    grid = (num_reqs, hkv * num_m_tiles, num_splits)
    last_merges = merge_counters is not None and not direct
    if last_merges:
        assert merge_counters.dtype == torch.int32 and merge_counters.numel() >= num_reqs * hkv * num_m_tiles, (
            "merge_counters must be int32 with >= requests x KV heads x row tiles entries")
    _sparse_block_attn_fwd[grid](
        q, k_buffer, v_buffer, out, o_part, lse, merge_counters if last_merges else lse,
        qo_indptr, req_to_token, req_pool_indices, prefix_lens, sel_slots, sel_lens,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), out.stride(0), out.stride(1),
        req_to_token.stride(0), sel_slots.stride(0), sel_slots.stride(1), sel_slots.stride(2),
        sel_lens.stride(0), sel_lens.stride(1),
        *part_strides, *lse_strides,
        sm_scale * math.log2(math.e), num_splits, num_m_tiles, rows,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, G=group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        DIRECT=direct, IEEE_DOT=ieee, LAST_MERGES=last_merges, PDL_WAIT=pdl == "full", PDL_TRIGGER=pdl_merge,
        MERGE_SPLITS=num_splits if last_merges else 0,  # a constant only where it is used: one compile otherwise
        num_warps=num_warps, num_stages=num_stages, **main_launch,
    )
    if not direct and not last_merges:
        merge_m = merge_block_m or _MERGE_BLOCK_M
        merge_tiles = triton.cdiv(rows, merge_m)
        _merge_splits[(num_reqs, hkv * merge_tiles)](
            out, o_part, lse, qo_indptr,
            out.stride(0), out.stride(1), *part_strides, *lse_strides,
            merge_tiles, rows,
            HEAD_DIM_V=head_dim_v, G=group, BLOCK_M=merge_m, BLOCK_DV=block_dv, PDL_WAIT=pdl_merge,
            NUM_SPLITS=num_splits, num_warps=4,
            **({"launch_pdl": True} if pdl_merge else {}),
        )
    return out
