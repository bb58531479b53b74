"""MageAttnBackend's per-forward logic on the CPU: FlashInfer is replaced by an exact PyTorch stand-in, the
Triton ops run in the interpreter. One block of a 2-request batch goes through its first step (exact +
selection into the index cache) and a later step (sparse kernel over the cached slots)."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

from sglang_mage.backend import MageAttnBackend
from sglang_mage.config import MageConfig
from sglang_mage.index_cache import Phase
from sglang_mage.ops.sparse_attention import sparse_block_attention_ref

B, HQ, HKV, D, LAYERS, MASK = 4, 4, 2, 32, 2, 7


def exact(q, k_buf, v_buf, r2t, prefix, scale):
    """Per request: block rows over prefix + block, bidirectional. Returns (o, lse in base 2)."""
    outs, lses = [], []
    for r, p in enumerate(prefix):
        slots = r2t[r, : p + B].long()
        qr = q[r * B:(r + 1) * B].float()
        k = k_buf[slots].float().repeat_interleave(HQ // HKV, 1)
        v = v_buf[slots].float().repeat_interleave(HQ // HKV, 1)
        logits = torch.einsum("qhd,khd->hqk", qr, k) * scale
        lse = torch.logsumexp(logits, -1)
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), v))
        lses.append((lse / math.log(2.0)).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


@pytest.fixture
def world(monkeypatch):
    torch.manual_seed(0)
    prefix = [40, 24]
    slots = 200
    r2t = torch.zeros(3, 128, dtype=torch.int32)
    perm = torch.randperm(slots).int()
    r2t[1, :44], r2t[2, :28] = perm[:44], perm[44:72]
    k_bufs = [torch.randn(slots, HKV, D) for _ in range(LAYERS)]
    v_bufs = [torch.randn(slots, HKV, D) for _ in range(LAYERS)]
    pool = SimpleNamespace(req_to_token=r2t, free=lambda req: None, clear=lambda: None)
    kv_pool = SimpleNamespace(get_kv_buffer=lambda i: (k_bufs[i], v_bufs[i]), set_kv_buffer=lambda *a, **k: None)
    rows = torch.tensor([1, 2])
    r2t_batch = r2t[rows]
    scale = D**-0.5

    class Paged:
        def forward_return_lse(self, q, kv, causal, sm_scale, logits_soft_cap):
            assert causal is False
            return exact(q, kv[0], kv[1], r2t_batch, prefix, sm_scale)

    def make(cfg):
        backend = MageAttnBackend.__new__(MageAttnBackend)
        backend.req_to_token_pool, backend.token_to_kv_pool = pool, kv_pool
        backend._setup_mage(cfg, SimpleNamespace(block_size=B, mask_id=MASK, max_running_requests=2), LAYERS, HQ,
                            HKV, D, pool, "cpu")
        backend.forward_metadata = SimpleNamespace(prefill_wrappers=[Paged()], use_ragged=False)
        backend._get_wrapper_idx = lambda layer: 0
        return backend

    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata", lambda self, fb: None)
    monkeypatch.setattr(FlashInferAttnBackend, "forward_extend",
                        lambda self, q, k, v, layer, fb, save_kv_cache=True: pytest.fail("no dense call expected"))
    batch = SimpleNamespace(
        forward_mode=SimpleNamespace(is_dllm_extend=lambda: True), req_pool_indices=rows,
        extend_prefix_lens_cpu=prefix, extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32),
        extend_seq_lens=torch.tensor([B, B], dtype=torch.int32), extend_seq_lens_cpu=[B, B], input_ids=torch.full((2 * B,), MASK),
        out_cache_loc=None, seq_lens=torch.tensor([p + B for p in prefix]),
    )
    layers = [SimpleNamespace(layer_id=i, tp_q_head_num=HQ, tp_k_head_num=HKV, tp_v_head_num=HKV, head_dim=D,
                              v_head_dim=D, scaling=scale, logit_cap=0.0) for i in range(LAYERS)]
    return SimpleNamespace(make=make, batch=batch, layers=layers, k=k_bufs, v=v_bufs, r2t=r2t, rows=rows,
                           prefix=prefix, scale=scale, pool=pool)


def step(backend, w, q):
    backend.init_forward_metadata(w.batch)
    return [backend.forward_extend(q, None, None, layer, w.batch, save_kv_cache=False).view(-1, HQ, D)
            for layer in w.layers]


@pytest.mark.parametrize("topk_method", ["torch", "radix"])
def test_first_step_is_exact_and_selects_then_later_steps_are_sparse(world, topk_method):
    w = world
    backend = w.make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0, topk_method=topk_method))
    q1 = torch.randn(2 * B, HQ, D)
    out1 = step(backend, w, q1)
    assert backend.plan.phase == Phase.FIRST
    for i, o in enumerate(out1):
        assert torch.allclose(o, exact(q1, w.k[i], w.v[i], w.r2t[w.rows], w.prefix, w.scale)[0], atol=1e-5)
    slots, lens = backend.index_cache.slots, backend.index_cache.lens
    assert lens[1:3].eq(12).all() and lens[0].eq(0).all()  # k + sinks + local, per layer and head
    for r, row in enumerate((1, 2)):
        owned = set(w.r2t[row, : w.prefix[r]].tolist())
        for layer in range(LAYERS):
            for h in range(HKV):
                chosen = slots[row, layer, h, :12].tolist()
                assert len(set(chosen)) == 12 and set(chosen) <= owned
                forced = w.r2t[row, [0, 1, w.prefix[r] - 2, w.prefix[r] - 1]].tolist()
                assert set(forced) <= set(chosen)

    q2 = torch.randn(2 * B, HQ, D)
    out2 = step(backend, w, q2)
    assert backend.plan.phase == Phase.SPARSE and backend.index_cache.stats.sparse_layer_calls == LAYERS
    qo = torch.tensor([0, B, 2 * B], dtype=torch.int32)
    for i, o in enumerate(out2):
        ref = sparse_block_attention_ref(q2, w.k[i], w.v[i], qo, w.r2t, w.rows, w.batch.extend_prefix_lens,
                                         slots[:, i], lens[:, i], w.scale, B)
        assert torch.allclose(o, ref, atol=1e-4)


def test_force_sparse_with_budget_over_context_equals_exact(world):
    w = world
    backend = w.make(MageConfig(k=4096, min_context=0, force_sparse=True))
    step(backend, w, torch.randn(2 * B, HQ, D))
    q2 = torch.randn(2 * B, HQ, D)
    out2 = step(backend, w, q2)
    assert backend.plan.phase == Phase.SPARSE
    for i, o in enumerate(out2):
        assert torch.allclose(o, exact(q2, w.k[i], w.v[i], w.r2t[w.rows], w.prefix, w.scale)[0], atol=1e-4)


def test_slot_free_through_the_pool_empties_the_cache(world):
    w = world
    backend = w.make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0))
    step(backend, w, torch.randn(2 * B, HQ, D))
    assert backend.index_cache.occupancy() == 2
    for slot in (1, 2):
        w.pool.free(SimpleNamespace(req_pool_idx=slot))
    assert backend.index_cache.occupancy() == 0 and backend.index_cache.lens.sum() == 0


def test_oracle_reselects_every_step_from_that_steps_exact_attention(world):
    w = world
    cfg = MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0, selector="oracle")
    backend = w.make(cfg)
    step(backend, w, torch.randn(2 * B, HQ, D))
    q2 = torch.randn(2 * B, HQ, D)
    out2 = step(backend, w, q2)
    assert backend.plan.phase == Phase.SPARSE
    # What a first step with q2's queries selects is what the oracle's later step must use.
    fresh = w.make(cfg)
    step(fresh, w, q2)
    rows = w.rows
    got = backend.index_cache.slots[rows].sort(-1).values
    want = fresh.index_cache.slots[rows].sort(-1).values
    assert torch.equal(got, want) and torch.equal(backend.index_cache.lens[rows], fresh.index_cache.lens[rows])
    assert backend.index_cache.stats.select_layer_calls == 2 * LAYERS
    qo = torch.tensor([0, B, 2 * B], dtype=torch.int32)
    for i, o in enumerate(out2):
        ref = sparse_block_attention_ref(q2, w.k[i], w.v[i], qo, w.r2t, rows, w.batch.extend_prefix_lens,
                                         backend.index_cache.slots[:, i], backend.index_cache.lens[:, i], w.scale, B)
        assert torch.allclose(o, ref, atol=1e-4)


def test_dense_selector_never_selects_or_goes_sparse(world, monkeypatch):
    w = world
    calls = []
    monkeypatch.setattr(FlashInferAttnBackend, "forward_extend",
                        lambda self, q, k, v, layer, fb, save_kv_cache=True: calls.append(layer.layer_id) or q)
    backend = w.make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0, selector="dense"))
    for _ in range(3):
        step(backend, w, torch.randn(2 * B, HQ, D))
        assert backend.plan.phase == Phase.DENSE
    stats = backend.index_cache.stats
    assert calls == list(range(LAYERS)) * 3
    assert stats.dense_forwards == 3 and stats.select_layer_calls == 0 and stats.sparse_forwards == 0


def assert_kept_top_scores(backend, w, layer, scores, k=8, sink=2, local=2):
    """Layer `layer` of the index cache holds, per request and KV head, the sinks, the local window and the
    k other positions with the highest `scores` (compared by score mass, since equal scores may tie)."""
    for r, row in enumerate(w.rows.tolist()):
        n = w.prefix[r]
        for h in range(HKV):
            chosen = backend.index_cache.slots[row, layer, h, : k + sink + local].tolist()
            positions = {w.r2t[row, :n].tolist().index(s) for s in chosen}
            forced = set(range(sink)) | set(range(n - local, n))
            rest = scores[r, h, :n].clone()
            rest[list(forced)] = float("-inf")
            assert forced <= positions and len(positions) == k + sink + local
            got = rest[sorted(positions - forced)].sum()
            assert torch.isclose(got, torch.topk(rest, k).values.sum(), rtol=1e-5)


def test_quest_rescores_pages_with_every_steps_block_mean_query(world):
    from sglang_mage.ops.selection.quest import block_mean_query, page_bounds, quest_position_scores

    w = world
    cfg = MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0, selector="quest", quest_page_size=4)
    backend = w.make(cfg)
    step(backend, w, torch.randn(2 * B, HQ, D))
    q2 = torch.randn(2 * B, HQ, D) * 3
    out2 = step(backend, w, q2)
    assert backend.plan.phase == Phase.SPARSE and backend.index_cache.stats.select_layer_calls == 2 * LAYERS
    qo = torch.tensor([0, B, 2 * B], dtype=torch.int32)
    prefix = w.batch.extend_prefix_lens
    for i, o in enumerate(out2):
        # The set the later step used: the top pages of q2's bound, plus sinks and the local window.
        kmin, kmax = page_bounds(w.k[i], w.r2t, w.rows, prefix, 4, max(w.prefix))
        scores = quest_position_scores(block_mean_query(q2, qo, HKV, B), kmin, kmax, prefix, 4, max(w.prefix))
        assert_kept_top_scores(backend, w, i, scores)
        ref = sparse_block_attention_ref(q2, w.k[i], w.v[i], qo, w.r2t, w.rows, prefix,
                                         backend.index_cache.slots[:, i], backend.index_cache.lens[:, i], w.scale, B)
        assert torch.allclose(o, ref, atol=1e-4)


@pytest.mark.parametrize("fused_pass,overlap", [("one", False), ("two", False), ("two", True)],
                         ids=["one-pass", "two-pass", "two-pass-overlapped"])
def test_fused_first_step_is_exact_and_selects_by_block_mean_query_logits(world, fused_pass, overlap):
    from sglang_mage.ops.first_step import fused_first_step_ref

    w = world
    # pass two's exact pass is the `mean` selector's (the paged stand-in); the fixture fails any dense call.
    # Overlapped, the selection is queued before the exact pass (on a side stream; inline on the CPU).
    backend = w.make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0, selector="fused",
                                fused_pass=fused_pass, overlap_selection=overlap))
    q1 = torch.randn(2 * B, HQ, D)
    out1 = step(backend, w, q1)
    assert backend.plan.phase == Phase.FIRST
    qo = torch.tensor([0, B, 2 * B], dtype=torch.int32)
    prefix = w.batch.extend_prefix_lens
    for i, o in enumerate(out1):
        assert torch.allclose(o, exact(q1, w.k[i], w.v[i], w.r2t[w.rows], w.prefix, w.scale)[0], atol=1e-4)
        _, scores = fused_first_step_ref(q1, w.k[i], w.v[i], qo, w.r2t, w.rows, prefix, w.scale, B, max(w.prefix))
        assert_kept_top_scores(backend, w, i, scores)
    q2 = torch.randn(2 * B, HQ, D)
    out2 = step(backend, w, q2)
    assert backend.plan.phase == Phase.SPARSE
    for i, o in enumerate(out2):
        ref = sparse_block_attention_ref(q2, w.k[i], w.v[i], qo, w.r2t, w.rows, prefix,
                                         backend.index_cache.slots[:, i], backend.index_cache.lens[:, i], w.scale, B)
        assert torch.allclose(o, ref, atol=1e-4)


def test_pool_slots_are_read_from_the_device_once_per_batch(world):
    """Every step of a block runs on the same ForwardBatch; only its first forward may read the slots."""
    from sglang_mage.backend import batch_slots

    reads = []

    class Indices:
        def __init__(self, values):
            self.values = values

        def tolist(self):
            reads.append(self.values)
            return list(self.values)

    batch = SimpleNamespace(req_pool_indices=Indices([1, 2]))
    assert batch_slots(batch) == (1, 2) and batch_slots(batch) == (1, 2) and len(reads) == 1
    batch.req_pool_indices = Indices([3])  # a batch whose requests change is read again
    assert batch_slots(batch) == (3,) and len(reads) == 2
    w = world
    backend = w.make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0))
    step(backend, w, torch.randn(2 * B, HQ, D))
    step(backend, w, torch.randn(2 * B, HQ, D))
    assert backend.plan.phase == Phase.SPARSE and w.batch._mage_slots[1] == (1, 2)


def test_setup_log_names_the_effective_pdl_mode(world, caplog):
    # --mage-pdl full is the default, but a CPU (or pre-Hopper GPU) launches plainly: the log must say so.
    with caplog.at_level(logging.INFO, logger="sglang_mage"):
        world.make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0))
    assert "pdl=off (needs a Hopper-or-later GPU)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sglang_mage"):
        world.make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0, pdl="off"))
    assert "pdl=off;" in caplog.text
