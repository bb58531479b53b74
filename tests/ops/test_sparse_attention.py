"""Triton block-sparse attention vs its PyTorch reference, and the reference vs plain dense attention.

On a machine without CUDA the kernels run under the Triton interpreter, so sizes are kept small there.
"""

# Without CUDA the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET before any
# test module imports them.
import pytest
import torch

from tests.utils import DEVICE, ON_GPU, assert_close, max_abs_err  # noqa: E402

from sglang_mage.ops.sparse_attention import (  # noqa: E402
    PDL_MODES,
    alloc_workspace,
    default_num_splits,
    pdl_available,
    sparse_block_attention,
    sparse_block_attention_ref,
)

# max prefix length, K_max (selection capacity), requests, KV heads
SIZES = dict(max_prefix=4096, k_max=512, num_reqs=4, hkv=4) if ON_GPU else dict(
    max_prefix=100, k_max=48, num_reqs=3, hkv=2
)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
NUM_LAYERS, LAYER = 3, 1  # the selection cache holds every layer; the op sees one layer's strided view


def make_inputs(block, group, head_dim, dtype, *, seed, short_last=False, all_prefix=False, sizes=SIZES):
    """A paged batch: shuffled physical slots, mixed prefix lengths, ragged per-head selections that are
    strided views of a [P', L, Hkv, K_max] cache with garbage past each sel_len, and pool rows that are
    neither arange nor the same count as the selection cache's rows."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    num_reqs, hkv, k_max, max_prefix = sizes["num_reqs"], sizes["hkv"], sizes["k_max"], sizes["max_prefix"]
    if all_prefix:
        prefixes = [randint(0, k_max) for _ in range(num_reqs)]
        prefixes[0] = k_max
    else:
        # one prefix longer than any selection, one that a full selection covers, one empty block start
        mixed = [randint(k_max + 1, max_prefix), randint(1, k_max), 0]
        prefixes = (mixed + [randint(0, max_prefix) for _ in range(num_reqs)])[:num_reqs]
    ext_lens = [block] * num_reqs
    if short_last:
        ext_lens[-1] = randint(1, block - 1)

    pool_rows = num_reqs + 2
    req_pool_indices = torch.arange(pool_rows - 1, pool_rows - 1 - num_reqs, -1)  # reversed, rows 0-1 idle
    max_context = max(p + e for p, e in zip(prefixes, ext_lens)) + 7
    num_slots = sum(p + e for p, e in zip(prefixes, ext_lens)) + 33
    # slot 0 stays unused (SGLang's padding slot); every request gets a scattered set of physical slots
    perm = (torch.randperm(num_slots - 1, generator=g) + 1).to(torch.int32)
    req_to_token = torch.full((pool_rows, max_context), 10**9, dtype=torch.int32)
    used = 0
    for r in range(num_reqs):
        n = prefixes[r] + ext_lens[r]
        req_to_token[req_pool_indices[r], :n] = perm[used : used + n]
        used += n

    sel_rows = pool_rows + 1
    junk = torch.where(torch.rand(sel_rows, NUM_LAYERS, hkv, k_max, generator=g) < 0.5, 2**30, -7)
    sel_full = junk.to(torch.int32)
    lens_full = torch.full((sel_rows, NUM_LAYERS, hkv), 10**6, dtype=torch.int32)
    for r in range(num_reqs):
        row, prefix = int(req_pool_indices[r]), prefixes[r]
        cap = min(prefix, k_max)
        for h in range(hkv):
            # cycle through none / all the capacity / a random amount so each case sees all three
            kind = 0 if all_prefix else (r + h + seed) % 3
            n = cap if kind == 0 else (0 if kind == 1 else randint(0, cap))
            pick = torch.randperm(prefix, generator=g)[:n]
            sel_full[row, LAYER, h, :n] = req_to_token[row, pick]
            lens_full[row, LAYER, h] = n

    hq = hkv * group
    qo_indptr = torch.tensor([0] + ext_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    num_tokens = int(qo_indptr[-1])
    q = torch.randn(num_tokens, hq, head_dim, generator=g)
    k = torch.randn(num_slots, hkv, head_dim, generator=g) * 1.5  # a little sharper than uniform softmax
    v = torch.randn(num_slots, hkv, head_dim, generator=g)
    dev = DEVICE
    return dict(
        q=q.to(dev, dtype),
        k_buffer=k.to(dev, dtype),
        v_buffer=v.to(dev, dtype),
        qo_indptr=qo_indptr.to(dev),
        req_to_token=req_to_token.to(dev),
        req_pool_indices=req_pool_indices.to(dev),  # int64 here; int32 is exercised separately
        prefix_lens=torch.tensor(prefixes, dtype=torch.int32, device=dev),
        sel_slots=sel_full.to(dev)[:, LAYER],
        sel_lens=lens_full.to(dev)[:, LAYER],
        sm_scale=head_dim**-0.5,
        max_extend_len=block,
    )


def nan_out(inp):
    t, hq, _ = inp["q"].shape
    return torch.full((t, hq, inp["v_buffer"].shape[2]), float("nan"), dtype=inp["q"].dtype, device=DEVICE)


def run_both(inp, **kw):
    out = sparse_block_attention(**inp, out=nan_out(inp), **kw)
    ref = sparse_block_attention_ref(**inp, out=nan_out(inp))
    return out, ref


GRID = [
    pytest.param(b, grp, d, id=f"B{b}-G{grp}-D{d}") for b in (4, 32) for grp in (1, 2, 7) for d in (64, 128)
]


@pytest.mark.parametrize("num_splits", [None, 3], ids=["splits-auto", "splits-3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("block,group,head_dim", GRID)
def test_matches_reference(block, group, head_dim, dtype, num_splits):
    seed = block * 100 + group * 10 + head_dim // 64
    inp = make_inputs(block, group, head_dim, dtype, seed=seed, short_last=group != 2)
    out, ref = run_both(inp, num_splits=num_splits)
    assert_close(out, ref, dtype, name=f"B{block} G{group} D{head_dim}")


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block,group,head_dim", [(4, 2, 64), (32, 7, 128), (32, 1, 64)], ids=str)
def test_num_splits(block, group, head_dim, num_splits):
    inp = make_inputs(block, group, head_dim, torch.float32, seed=7 + block + group, short_last=True)
    out, ref = run_both(inp, num_splits=num_splits)
    assert_close(out, ref, name=f"splits={num_splits}")


@pytest.mark.parametrize("block_m,block_n,num_splits", [(16, 16, 1), (32, 16, 5), (64, 32, 2)], ids=str)
def test_tile_overrides(block_m, block_n, num_splits):
    # Row tiles smaller than B x G (several row programs per KV head) and key tiles smaller than the default.
    inp = make_inputs(32, 2, 64, torch.float32, seed=11 + block_m + block_n, short_last=True)
    out, ref = run_both(inp, num_splits=num_splits, block_m=block_m, block_n=block_n)
    assert_close(out, ref, name=f"tile {block_m}x{block_n} splits={num_splits}")


@pytest.mark.parametrize("num_stages,num_warps", [(3, 8), (4, 4), (1, 2)], ids=str)
def test_launch_overrides(num_stages, num_warps):
    # The stage/warp sweep's settings must not change the result (the interpreter ignores them; the GPU
    # marker run compiles each).
    inp = make_inputs(32, 7, 128, torch.float32, seed=13 + num_stages, short_last=True)
    out, ref = run_both(inp, num_splits=2, num_stages=num_stages, num_warps=num_warps)
    assert_close(out, ref, name=f"stages={num_stages} warps={num_warps}")


@pytest.mark.parametrize("num_splits,merge_block_m", [(2, 16), (5, None), (12, 64)], ids=str)
def test_merge_unrolled_per_split_count(num_splits, merge_block_m):
    # The merge is compiled per split count (its loops unroll); each count and merge tile must merge right,
    # empty trailing splits included (12 splits of a short list).
    inp = make_inputs(32, 7, 64, torch.float32, seed=19 + num_splits, short_last=True)
    out, ref = run_both(inp, num_splits=num_splits, merge_block_m=merge_block_m)
    assert_close(out, ref, name=f"splits={num_splits} merge tile {merge_block_m}")


def test_pdl_falls_back_where_unavailable():
    # The interpreter (and pre-Hopper GPUs) run no grid dependency control: every mode must still give the
    # reference's output, launched plainly.
    inp = make_inputs(32, 7, 64, torch.float32, seed=17, short_last=True)
    if not ON_GPU:
        assert not pdl_available(DEVICE)
    for mode in PDL_MODES:
        for splits in (1, 3):
            out, ref = run_both(inp, num_splits=splits, pdl=mode)
            assert_close(out, ref, name=f"pdl={mode} splits={splits}")
    with pytest.raises(AssertionError, match="pdl must be one of"):
        sparse_block_attention(**inp, pdl="on")


def test_tile_override_must_be_power_of_two():
    inp = make_inputs(4, 2, 64, torch.float32, seed=1)
    with pytest.raises(AssertionError, match="power of two"):
        sparse_block_attention(**inp, block_n=48)


def test_splits_outnumber_keys():
    # More splits than key tiles: most splits are empty and must contribute nothing (no NaN in the merge).
    inp = make_inputs(4, 2, 64, torch.float32, seed=3, short_last=True)
    out, ref = run_both(inp, num_splits=12)
    assert_close(out, ref, name="empty splits")


def test_preallocated_workspace_and_int32_pool_indices():
    inp = make_inputs(32, 7, 64, torch.float16, seed=11, short_last=True)
    inp["req_pool_indices"] = inp["req_pool_indices"].to(torch.int32)
    num_reqs, hkv = SIZES["num_reqs"], SIZES["hkv"]
    # Larger than needed and NaN-filled: only rows of live requests may be read, and each fully rewritten.
    ws = alloc_workspace(num_reqs + 3, hkv, 32, 7, 64, 4, DEVICE)
    for t in ws:
        t.fill_(float("nan"))
    out, ref = run_both(inp, workspace=ws)  # split count taken from the workspace
    assert_close(out, ref, torch.float16, name="workspace")
    again = sparse_block_attention(**inp, workspace=ws)  # out=None allocates
    assert_close(again, ref, torch.float16, name="out=None")


@pytest.mark.parametrize("num_reqs", [1, 2, SIZES["num_reqs"]])
def test_flat_batch_workspace_at_every_batch_size(num_reqs):
    # One flat buffer serves each batch size at that size's own default split count.
    from sglang_mage.ops.sparse_attention import alloc_batch_workspace

    # k_max large enough that the default count splits (>= 2 x _MIN_KEYS_PER_SPLIT keys)
    sizes = dict(SIZES, num_reqs=num_reqs, k_max=max(SIZES["k_max"], 200), max_prefix=max(SIZES["max_prefix"], 300))
    assert default_num_splits(num_reqs, sizes["hkv"], 7, 32, sizes["k_max"]) > 1
    inp = make_inputs(32, 7, 64, torch.float32, seed=13 + num_reqs, sizes=sizes)
    ws = alloc_batch_workspace(SIZES["num_reqs"] + 1, sizes["hkv"], 32, 7, 64, 64, sizes["k_max"], DEVICE)
    for t in ws:
        t.fill_(float("nan"))
    out, ref = run_both(inp, workspace=ws)
    assert_close(out, ref, name=f"flat workspace, {num_reqs} requests")
    with pytest.raises(AssertionError, match="too small"):
        sparse_block_attention(**inp, num_splits=64, workspace=ws)


@pytest.mark.parametrize("block,group,head_dim,num_splits,block_m",
                         [(32, 7, 64, 3, None), (4, 2, 64, 5, None), (32, 2, 64, 4, 16)], ids=str)
def test_last_program_merge_matches_reference_and_rezeroes_counters(block, group, head_dim, num_splits, block_m):
    # The last split of each row tile merges (one launch); a second call on the same counters must work too.
    from sglang_mage.ops.sparse_attention import alloc_merge_counters

    inp = make_inputs(block, group, head_dim, torch.float32, seed=17 + num_splits, short_last=True)
    counters = alloc_merge_counters(SIZES["num_reqs"], SIZES["hkv"], block, group, head_dim, DEVICE, block_m=block_m)
    for _ in range(2):
        out, ref = run_both(inp, num_splits=num_splits, block_m=block_m, merge_counters=counters)
        assert_close(out, ref, name=f"last-program merge, {num_splits} splits")
        assert int(counters.abs().sum()) == 0, "counters left non-zero"


def test_default_num_splits_is_shape_only():
    assert default_num_splits(1, 8, 4, 32, 4096) == 8  # 16 programs per split: one wave at 8
    assert default_num_splits(1, 4, 7, 32, 592) == 8  # the 7B shape at k=512, batch 1: ~75 keys per split
    assert default_num_splits(1, 4, 7, 32, 2128) == 8  # k=2048: the wave, not the keys, caps it
    assert default_num_splits(1, 1, 1, 4, 4096) == 12  # one small program: the split cap
    assert default_num_splits(16, 4, 7, 32, 2128) == 1  # batch 16: 128 programs already fill a wave
    assert default_num_splits(64, 8, 7, 32, 4096) == 1
    assert default_num_splits(1, 1, 1, 4, 16) == 1  # too few keys to split
    for args in [(1, 2, 7, 32, 512), (3, 2, 1, 4, 48), (256, 4, 7, 32, 2048)]:
        assert 1 <= default_num_splits(*args) <= 12


def dense_attention(inp):
    """Plain softmax over the request's whole context (prefix + block) in logical order, fp32."""
    q, k, v = inp["q"].float(), inp["k_buffer"].float(), inp["v_buffer"].float()
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    out = torch.empty(q.shape[0], hq, v.shape[2], device=q.device)
    indptr = inp["qo_indptr"].tolist()
    for r in range(len(indptr) - 1):
        s, e = indptr[r], indptr[r + 1]
        ctx = int(inp["prefix_lens"][r]) + (e - s)
        slots = inp["req_to_token"][int(inp["req_pool_indices"][r]), :ctx].long()
        kk = k[slots].repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        vv = v[slots].repeat_interleave(group, dim=1)
        logits = torch.einsum("thd,nhd->htn", q[s:e], kk) * inp["sm_scale"]
        out[s:e] = torch.einsum("htn,nhd->thd", logits.softmax(-1), vv)
    return out


@pytest.mark.parametrize("block,group", [(4, 2), (32, 7)])
def test_full_selection_equals_dense(block, group):
    inp = make_inputs(block, group, 64, torch.float32, seed=5 + group, all_prefix=True, short_last=True)
    dense = dense_attention(inp)
    out, ref = run_both(inp, num_splits=2)
    assert_close(ref, dense, torch.float32, name="reference vs dense")
    assert_close(out, dense, torch.float32, name="kernel vs dense")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits,num_stages", [(None, None), (1, None), (1, 5), (3, 5)],
                         ids=["default-splits", "one-split", "one-split-5-stages", "3-splits-5-stages"])
@pytest.mark.parametrize("block,group,head_dim", GRID)
def test_gpu_bf16_error_bound(block, group, head_dim, num_splits, num_stages):
    # one-split: the direct path, compiled at its own pipeline depth (3 stages), which small shapes' default
    # split counts never reach; 5 stages: the depth that timed fastest with one split (three K/V tiles in
    # flight), whose output the interpreter cannot check (it ignores num_stages)
    seed = block * 100 + group * 10 + head_dim // 64 + 1
    inp = make_inputs(block, group, head_dim, torch.bfloat16, seed=seed, short_last=group != 2)
    out = sparse_block_attention(**inp, out=nan_out(inp), num_splits=num_splits, num_stages=num_stages)
    ref32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inp.items()}
    ref = sparse_block_attention_ref(**ref32)
    assert not torch.isnan(out).any()
    err = max_abs_err(out, ref)
    assert err <= 2e-2, f"bf16 max abs err {err:.3e} > 2e-2"


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    # Captured once, replayed on new data: proves the wrapper neither syncs nor allocates inside capture.
    inp = make_inputs(32, 7, 128, torch.bfloat16, seed=21, short_last=True)
    ws = alloc_workspace(SIZES["num_reqs"], SIZES["hkv"], 32, 7, 128, 3, DEVICE)
    out = nan_out(inp)
    sparse_block_attention(**inp, out=out, workspace=ws)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_block_attention(**inp, out=out, workspace=ws)
    inp["q"].copy_(torch.randn_like(inp["q"]))
    inp["sel_lens"][inp["req_pool_indices"][0]] //= 2  # lengths are read on the device, so may change
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = sparse_block_attention_ref(**inp)
    assert max_abs_err(out, ref) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1], ids=["default-splits", "one-split"])
@pytest.mark.parametrize("pdl", ["merge", "full"])
def test_gpu_pdl_waits_for_its_producers(pdl, num_splits):
    # Captured as the engine runs it: kernels that write Q and shrink the selection lengths come right before
    # the step (quest and oracle select there). A PDL launch that read either before its wait would race.
    inp = make_inputs(32, 7, 128, torch.bfloat16, seed=23, short_last=True)
    out = nan_out(inp)
    new_q, new_lens = torch.randn_like(inp["q"]), inp["sel_lens"] // 2
    big_q = torch.randn_like(inp["q"]) * 4

    def step():
        inp["q"].copy_(new_q)
        inp["sel_lens"].copy_(new_lens)
        sparse_block_attention(**inp, out=out, num_splits=num_splits, pdl=pdl)

    step()  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        inp["q"].copy_(big_q)
        inp["sel_lens"].fill_(0)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert max_abs_err(out, sparse_block_attention_ref(**inp)) <= 2e-2
    assert torch.equal(inp["q"], new_q)


@pytest.mark.gpu
def test_gpu_int64_slot_addressing():
    # A pool big enough that slot * stride passes 2**31 elements: int32 address math would wrap.
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~20 GiB of GPU memory")
    inp = make_inputs(4, 2, 128, torch.bfloat16, seed=9, sizes=dict(max_prefix=200, k_max=64, num_reqs=3, hkv=2))
    big = 2**31 // (2 * 128) + 4096  # slots; each slot holds 2*128 elements
    shift = big - inp["k_buffer"].shape[0]
    for name in ("k_buffer", "v_buffer"):
        grown = torch.empty(big, 2, 128, dtype=torch.bfloat16, device=DEVICE)
        grown[shift:] = inp[name]
        inp[name] = grown
    inp["req_to_token"] = torch.where(inp["req_to_token"] < 10**9, inp["req_to_token"] + shift, 10**9)
    valid = torch.arange(inp["sel_slots"].shape[-1], device=DEVICE) < inp["sel_lens"][..., None]
    sel = inp["sel_slots"].clone()
    sel[valid] += shift
    inp["sel_slots"] = sel
    out = sparse_block_attention(**inp, out=nan_out(inp), num_splits=2)
    ref = sparse_block_attention_ref(**inp)
    assert max_abs_err(out, ref) <= 2e-2


def test_pdl_modes_equal_the_flag_choices():
    from sglang_mage.config import PDL_MODES as FLAG_CHOICES

    assert PDL_MODES == FLAG_CHOICES



def test_default_batch1_launch_is_the_measured_one():
    # P1's 9.65 us (raw/kernels_merge_unroll_h200.json: 7B shape, batch 1, k=512 + 16 sink + 64 local)
    # was timed at 64 x 32 tiles, 8 splits, 16-row merge tiles; the defaults must launch exactly that.
    from sglang_mage.ops.sparse_attention import kernel

    assert default_num_splits(1, 4, 7, 32, 592, 128) == 8
    assert kernel._tile_sizes(7, 32, 128, 128, split=True)[1:3] == (64, 32)
    assert kernel._tile_sizes(7, 32, 128, 128)[1:3] == (128, 64)  # one split (batch 16): the big tile
    assert kernel._MERGE_BLOCK_M == 16 and kernel._default_num_stages(False, torch.device("cuda", 0)) == 2


def test_deep_pipeline_only_where_shared_memory_allows(monkeypatch):
    # One split at 5 stages (68.0 us against 83.4 at 3; raw/kernels_defaults_h200.json) holds ~135 KB of
    # shared memory per program: an A100 or a consumer part must get the depth that fits.
    from sglang_mage.ops.sparse_attention import kernel

    gpu = torch.device("cuda", 0)
    for smem, direct_stages in ((227 * 1024, 5), (163 * 1024, 3), (99 * 1024, 3), (0, 3)):
        monkeypatch.setattr(kernel, "_max_shared_mem", lambda index, smem=smem: smem)
        assert kernel._default_num_stages(True, gpu) == direct_stages, smem
        assert kernel._default_num_stages(False, gpu) == 2, smem
    monkeypatch.undo()
    if not torch.cuda.is_available():
        assert kernel._max_shared_mem(None) == 0
