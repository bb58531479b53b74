"""GPU: block-causal prefill as the backend runs it. FlashInfer's causal ragged prefill (a batch of chunks of
mixed lengths) plus its non-causal paged prefix pass, merged, then `later_in_block_merge` (bf16), against
SGLang's block-by-block prefill computed in fp32 (tolerance: bf16's 2e-2 absolute). Also the op alone in
bf16 against its reference over a grid of shapes."""

import math

import pytest
import torch

from sglang_mage.ops.block_causal_prefill import block_by_block_ref, later_in_block_merge, later_in_block_merge_ref
from tests.utils import assert_close

LN2 = math.log(2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [4, 32])
@pytest.mark.parametrize("hq, hkv, d", [(8, 4, 128), (16, 2, 64)])
def test_op_bf16_matches_reference(B, hq, hkv, d):
    torch.manual_seed(B + hq)
    t = 64 * B
    q, k, v = (torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    o = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(t, hq, device="cuda") * 3 + 5
    ref_o, ref_lse = later_in_block_merge_ref(q.float(), k.float(), v.float(), o.float(), lse, B, d**-0.5)
    out = torch.full_like(o, float("nan"))
    lse_out = torch.full_like(lse, float("nan"))
    later_in_block_merge(q, k, v, o, lse, B, d**-0.5, out=out, lse_out=lse_out)
    assert_close(out, ref_o, torch.bfloat16, "o")
    assert_close(lse_out, ref_lse, torch.bfloat16, "lse")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [4, 32])
@pytest.mark.parametrize("cached", [(0, 40, 8), (16, 40, 8)], ids=["one_without_prefix", "all_with_prefix"])
def test_flashinfer_causal_plus_op_equals_block_by_block(B, cached):
    import flashinfer

    hq, hkv, d = 8, 4, 128
    torch.manual_seed(0)
    # (cached prefix, chunk) per request, both whole blocks. Like SGLang's FlashInfer backend: a token-slot
    # KV pool (page size 1), FlashInfer's auto ragged backend and fa2 for the paged pass.
    reqs = [(c * B, n * B) for c, n in zip(cached, (96, 64, 1))]
    seqs = [[torch.randn(p + n, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv)] for p, n in reqs]
    scale = d**-0.5
    total_prefix = sum(p for p, _ in reqs)
    k_pool = torch.zeros(total_prefix, 1, hkv, d, device="cuda", dtype=torch.bfloat16)
    v_pool = torch.zeros_like(k_pool)
    kv_indptr = [0]
    for (p, _), (q, k, v) in zip(reqs, seqs):
        k_pool[kv_indptr[-1]: kv_indptr[-1] + p, 0] = k[:p]
        v_pool[kv_indptr[-1]: kv_indptr[-1] + p, 0] = v[:p]
        kv_indptr.append(kv_indptr[-1] + p)
    qo = torch.tensor([0] + [sum(n for _, n in reqs[: i + 1]) for i in range(len(reqs))], dtype=torch.int32)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="auto")
    paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
    common = dict(sm_scale=scale, q_data_type=torch.bfloat16)
    ragged.plan(qo, qo, hq, hkv, d, causal=True, **common)
    paged.plan(qo, torch.tensor(kv_indptr, dtype=torch.int32),
               torch.arange(total_prefix, dtype=torch.int32, device="cuda"),
               torch.ones(len(reqs), dtype=torch.int32), hq, hkv, d, 1, causal=False, **common)
    q = torch.cat([s[0][p:] for s, (p, _) in zip(seqs, reqs)])
    k = torch.cat([s[1][p:] for s, (p, _) in zip(seqs, reqs)])
    v = torch.cat([s[2][p:] for s, (p, _) in zip(seqs, reqs)])
    o, lse = ragged.run(q, k, v, return_lse=True)
    ref = torch.cat([block_by_block_ref(*(x.float() for x in s), B, scale)[p:] for s, (p, _) in zip(seqs, reqs)])
    o2, lse2 = paged.run(q, (k_pool, v_pool), return_lse=True)
    # A request without a cached prefix has an empty paged state (lse -inf): the merge keeps the ragged one.
    o, lse = flashinfer.merge_state(o, lse, o2, lse2)
    assert torch.isfinite(lse).all() and torch.isfinite(o.float()).all(), "merged FlashInfer state not finite"
    later_in_block_merge(q, k, v, o, lse, B, scale)
    assert_close(o, ref, torch.bfloat16, "block-causal prefill")
