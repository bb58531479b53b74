"""GPU: the LSE convention the backend relies on. FlashInfer's `forward_return_lse` returns the log-sum-exp
in base 2; the selection op is told so (`lse_is_log2=True`). If a FlashInfer upgrade changed the base, the
block-mean scores would be silently mis-normalised: this test catches it."""

import math

import pytest
import torch


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, kv_len", [(4, 300), (32, 1000)])
def test_ragged_prefill_lse_is_base_2(q_len, kv_len):
    import flashinfer

    hq, hkv, d = 8, 2, 128
    torch.manual_seed(0)
    q = torch.randn(q_len, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(kv_len, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(kv_len, hkv, d, device="cuda", dtype=torch.bfloat16)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
    qo = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    kv = torch.tensor([0, kv_len], dtype=torch.int32, device="cuda")
    scale = d**-0.5
    wrapper.plan(qo, kv, hq, hkv, d, causal=False, sm_scale=scale, q_data_type=torch.bfloat16)
    _, lse = wrapper.run_return_lse(q, k, v)
    kf = k.float().repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("qhd,khd->qhk", q.float(), kf) * scale
    natural = torch.logsumexp(logits, dim=-1)
    assert torch.allclose(lse.float() * math.log(2.0), natural, atol=2e-2, rtol=1e-3), (lse[:2, :2], natural[:2, :2])
