"""`later_in_block_merge` (Triton) against its PyTorch reference over a grid of shapes, and the whole
block-causal prefill it completes (token-causal state + the op) against SGLang's block-by-block prefill.

Tolerances: tests/utils.TOLERANCES per dtype (fp32 1e-4, fp16 2e-3); the composed fp32 check uses the
issue's 1e-5. Output buffers are NaN-filled so that a row the kernel never writes fails."""

import math

import pytest
import torch

from sglang_mage.ops.block_causal_prefill import (
    block_by_block_ref,
    later_in_block_merge,
    later_in_block_merge_ref,
    plan_chunks,
)
from sglang_mage.ops.block_causal_prefill.reference import _attend
from tests.utils import DEVICE, assert_close, max_abs_err

LN2 = math.log(2.0)


def _causal_state(q, k, v, scale):
    """Token-causal attention (what FlashInfer's causal prefill returns): fp32 o and base-2 lse."""
    n = q.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    o, lse = _attend(q, k, v, causal, scale)
    return o, (lse / LN2).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [4, 8, 32])
@pytest.mark.parametrize("hq, hkv, d", [(4, 4, 64), (8, 2, 128), (14, 2, 32), (6, 1, 80)])
@pytest.mark.parametrize("nblocks", [1, 3])
def test_kernel_matches_reference(dtype, B, hq, hkv, d, nblocks):
    t = B * nblocks
    g = torch.Generator().manual_seed(B * 1000 + hq * 10 + nblocks)
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g)
    v = torch.randn(t, hkv, d, generator=g)
    scale = d**-0.5
    o, lse = _causal_state(q, k, v, scale)
    ref_o, ref_lse = later_in_block_merge_ref(q, k, v, o, lse, B, scale)
    qd, kd, vd, od = (x.to(dtype).to(DEVICE) for x in (q, k, v, o))
    out = torch.full_like(od, float("nan"))
    lse_out = torch.full((t, hq), float("nan"), device=DEVICE)
    later_in_block_merge(qd, kd, vd, od, lse.to(DEVICE), B, scale, out=out, lse_out=lse_out)
    # Inputs are rounded to `dtype`, so compare with the reference run on those rounded inputs.
    ref_o, ref_lse = later_in_block_merge_ref(qd.float().cpu(), kd.float().cpu(), vd.float().cpu(),
                                              od.float().cpu(), lse, B, scale)
    assert_close(out, ref_o, dtype, "o")
    assert_close(lse_out, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")


def test_last_token_of_each_block_is_untouched():
    B, t, hq, hkv, d = 4, 12, 4, 2, 32
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g)
    o, lse = _causal_state(q, k, v, d**-0.5)
    o_dev, lse_dev = o.clone().to(DEVICE), lse.clone().to(DEVICE)
    later_in_block_merge(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), o_dev, lse_dev, B, d**-0.5)  # in place
    last = torch.arange(B - 1, t, B)
    assert torch.equal(o_dev.cpu()[last], o[last]) and torch.equal(lse_dev.cpu()[last], lse[last])
    assert max_abs_err(o_dev.cpu()[last - 1], o[last - 1]) > 1e-3  # the others did change


@pytest.mark.parametrize("bad", ["ragged", "lse_dtype", "heads"])
def test_rejects_bad_input(bad):
    B, t, d = 4, 8, 16
    q, k, v = torch.randn(t, 4, d), torch.randn(t, 2, d), torch.randn(t, 2, d)
    o, lse = torch.zeros(t, 4, d), torch.zeros(t, 4)
    if bad == "ragged":
        q, k, v, o, lse = q[:6], k[:6], v[:6], o[:6], lse[:6]
    elif bad == "lse_dtype":
        lse = lse.half()
    else:
        k, v = torch.randn(t, 3, d), torch.randn(t, 3, d)
    with pytest.raises(ValueError):
        later_in_block_merge(q, k, v, o, lse, B, 1.0)


@pytest.mark.parametrize("B, chunk", [(4, 8), (4, 10), (8, 24), (32, 64)])
def test_causal_plus_op_equals_block_by_block_for_a_mixed_batch(B, chunk):
    """A batch of requests with different prompt lengths and cached prefixes, each prefilled chunk by
    chunk (`chunk` 10 is not a multiple of B=4: plan_chunks snaps it between blocks): for every chunk the
    causal state over prefix + chunk, completed by the op on the concatenated batch, equals block-by-block
    prefill (fp32, <= 1e-5)."""
    hq, hkv, d = 4, 2, 32
    scale = d**-0.5
    reqs = [(3 * B + 1, 0), (7 * B, B), (5 * B + B // 2, 2 * B)]  # (prompt length, cached prefix)
    seqs = []
    for i, (prompt, _) in enumerate(reqs):
        g = torch.Generator().manual_seed(i)
        seqs.append([torch.randn(prompt, h, d, generator=g) for h in (hq, hkv, hkv)])
    plans = [plan_chunks(cached, prompt, B, chunk) for prompt, cached in reqs]
    for step in range(max(len(p) for p in plans)):
        qs, ks, vs, os_, lses, refs = [], [], [], [], [], []
        for (q, k, v), plan in zip(seqs, plans):
            if step >= len(plan):
                continue
            s, e = plan[step]
            n = e - s
            allowed = torch.arange(e).view(1, -1) <= (s + torch.arange(n)).view(-1, 1)
            o, lse = _attend(q[s:e], k[:e], v[:e], allowed, scale)
            qs.append(q[s:e]), ks.append(k[s:e]), vs.append(v[s:e]), os_.append(o), lses.append(lse / LN2)
            refs.append(block_by_block_ref(q, k, v, B, scale)[s:e])
        cat = [torch.cat(x).to(DEVICE) for x in (qs, ks, vs, os_, lses)]
        out = torch.full_like(cat[3], float("nan"))
        later_in_block_merge(*cat, B, scale, out=out, lse_out=torch.empty_like(cat[4]))
        err = max_abs_err(out, torch.cat(refs))
        assert err <= 1e-5, f"chunk step {step}: max abs err {err:.2e}"
