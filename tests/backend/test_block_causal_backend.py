"""MageAttnBackend on a chunked prompt-prefill batch (extends of several mask-free blocks), on the CPU:
FlashInfer's causal ragged/paged passes are replaced by exact PyTorch stand-ins, the Triton op runs in the
interpreter. The backend's output must equal SGLang's block-by-block prefill (fp32, <= 1e-5), through both
of SGLang's FlashInfer layouts (ragged extend + paged prefix, and paged over prefix + extend)."""

import math
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention import flashinfer_backend as fib
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

from sglang_mage.backend import MageAttnBackend
from sglang_mage.config import MageConfig
from sglang_mage.ops.block_causal_prefill import block_by_block_ref
from sglang_mage.ops.block_causal_prefill.reference import _attend, merge_states

B, HQ, HKV, D = 4, 4, 2, 32
LN2 = math.log(2.0)


def _segments(lens):
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    return list(zip(starts[:-1], starts[1:]))


@pytest.mark.parametrize("use_ragged", [True, False])
def test_chunked_prefill_batch_equals_block_by_block(monkeypatch, use_ragged):
    torch.manual_seed(0)
    prefix, extend = [8, 0, 4], [12, 8, 4]  # a cached prefix, a fresh prompt, and a single-block request
    total = [p + n for p, n in zip(prefix, extend)]
    seqs = [[torch.randn(n, h, D) for h in (HQ, HKV, HKV)] for n in total]
    scale = D**-0.5
    # The KV pool holds every request's prefix and, once written, its extend (slots req-major).
    slot_of = [torch.arange(sum(total[:i]), sum(total[: i + 1])) for i in range(3)]
    k_buf, v_buf = torch.zeros(sum(total), HKV, D), torch.zeros(sum(total), HKV, D)
    for (q, k, v), s, p in zip(seqs, slot_of, prefix):
        k_buf[s[:p]], v_buf[s[:p]] = k[:p], v[:p]

    def write(layer, loc, k, v, *a):
        for (s, e), slots, p in zip(_segments(extend), slot_of, prefix):
            k_buf[slots[p:]], v_buf[slots[p:]] = k[s:e], v[s:e]

    def per_request(q, fn):
        outs, lses = [], []
        for i, (s, e) in enumerate(_segments(extend)):
            o, lse = fn(i, q[s:e])
            outs.append(o), lses.append(lse / LN2)
        return torch.cat(outs), torch.cat(lses).contiguous()

    def keys(i, lo, hi):
        return k_buf[slot_of[i][lo:hi]], v_buf[slot_of[i][lo:hi]]

    class Ragged:
        def forward_return_lse(self, q, k, v, causal, sm_scale, logits_soft_cap):
            assert causal is True
            def fn(i, qi):
                s, e = _segments(extend)[i]
                n = e - s
                return _attend(qi, k[s:e], v[s:e], torch.ones(n, n, dtype=torch.bool).tril(), sm_scale)
            return per_request(q, fn)

    class Paged:
        def forward_return_lse(self, q, kv, causal, sm_scale, logits_soft_cap):
            def fn(i, qi):
                n, p = extend[i], prefix[i]
                if use_ragged:  # prefix only, non-causal
                    assert causal is False
                    return _attend(qi, *keys(i, 0, p), torch.ones(n, p, dtype=torch.bool), sm_scale)
                assert causal is True  # prefix + extend, causal aligned to the end
                allowed = torch.arange(p + n).view(1, -1) <= (p + torch.arange(n)).view(-1, 1)
                return _attend(qi, *keys(i, 0, p + n), allowed, sm_scale)
            return per_request(q, fn)

    def merge(o1, s1, o2, s2):
        o, lse = merge_states(o1, s1 * LN2, o2, s2 * LN2)
        return o, (lse / LN2).contiguous()

    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata", lambda self, fb: None)
    monkeypatch.setattr(fib, "_safe_merge_state", merge, raising=False)
    pool = SimpleNamespace(req_to_token=torch.zeros(4, 64, dtype=torch.int32), free=lambda r: None, clear=lambda: None)
    backend = MageAttnBackend.__new__(MageAttnBackend)
    backend.req_to_token_pool = pool
    backend.token_to_kv_pool = SimpleNamespace(get_kv_buffer=lambda i: (k_buf, v_buf), set_kv_buffer=write)
    backend._setup_mage(MageConfig(), SimpleNamespace(block_size=B, mask_id=7, max_running_requests=3), 1, HQ, HKV,
                        D, pool, "cpu")
    backend.prefill_wrapper_ragged = Ragged()
    backend.forward_metadata = SimpleNamespace(prefill_wrappers=[Paged()], use_ragged=use_ragged,
                                               extend_no_prefix=False)
    backend._get_wrapper_idx = lambda layer: 0
    batch = SimpleNamespace(
        forward_mode=SimpleNamespace(is_dllm_extend=lambda: True), req_pool_indices=torch.tensor([1, 2, 3]),
        extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=extend, out_cache_loc=None,
        input_ids=torch.zeros(sum(extend), dtype=torch.long),
    )
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=HQ, tp_k_head_num=HKV, tp_v_head_num=HKV, head_dim=D,
                            v_head_dim=D, scaling=scale, logit_cap=0.0, k_scale=None, v_scale=None)
    q = torch.cat([s[0][p:] for s, p in zip(seqs, prefix)])
    k = torch.cat([s[1][p:] for s, p in zip(seqs, prefix)])
    v = torch.cat([s[2][p:] for s, p in zip(seqs, prefix)])

    backend.init_forward_metadata(batch)
    assert backend.block_causal and backend.index_cache.stats.block_causal_tokens == sum(extend)
    out = backend.forward_extend(q.view(-1, HQ * D), k, v, layer, batch).view(-1, HQ, D)

    ref = torch.cat([block_by_block_ref(qq, kk, vv, B, scale)[p:] for (qq, kk, vv), p in zip(seqs, prefix)])
    err = (out - ref).abs().max().item()
    assert err <= 1e-5, f"max abs err {err:.2e}"


def test_misaligned_multi_block_extend_is_rejected(monkeypatch):
    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata", lambda self, fb: None)
    pool = SimpleNamespace(req_to_token=torch.zeros(2, 16, dtype=torch.int32), free=lambda r: None, clear=lambda: None)
    backend = MageAttnBackend.__new__(MageAttnBackend)
    backend._setup_mage(MageConfig(), SimpleNamespace(block_size=B, mask_id=7, max_running_requests=1), 1, HQ, HKV,
                        D, pool, "cpu")
    batch = SimpleNamespace(forward_mode=SimpleNamespace(is_dllm_extend=lambda: True),
                            req_pool_indices=torch.tensor([1]), extend_prefix_lens_cpu=[2], extend_seq_lens_cpu=[8])
    with pytest.raises(RuntimeError, match="block boundaries"):
        backend.init_forward_metadata(batch)
