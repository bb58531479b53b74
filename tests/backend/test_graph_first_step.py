"""--mage-graph-first-step on the CPU: a block's first step replays from its own captured graph (SGLang's
FlashInfer DLLM_EXTEND graph planning for the exact pass, then scoring and top-k over the fixed capacity),
with the same output and the same selected slots as the eager first step, and no host read on the way.

The dispatch is test_cuda_graph_plan's World: SGLang's own `_forward_raw` and `can_run_graph` (hooked),
stand-ins only for FlashInfer's kernels and its graph planning."""

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

from sglang_mage import hooks
from sglang_mage.config import MageConfig
from sglang_mage.cuda_graph import FIRST_STEP_VARIANT, graph_eligible
from sglang_mage.index_cache import Phase, StepPlan

from .test_cuda_graph_plan import CFG, LAYERS, PREFIX, B, World, exact, hooked_can_run_graph  # noqa: F401

CAPACITY = 128  # the stand-in model's context length: the first-step graph's scores span it


@pytest.fixture
def flashinfer_graph_planning(monkeypatch):
    """FlashInfer's graph state and its capture/replay planning, recorded instead of run (its kernels are
    the World's exact PyTorch stand-in either way)."""
    calls = []
    monkeypatch.setattr(FlashInferAttnBackend, "max_context_len", CAPACITY, raising=False)
    monkeypatch.setattr(FlashInferAttnBackend, "init_cuda_graph_state",
                        lambda self, max_bs, max_num_tokens, kv_indices_buf=None: calls.append(("state", max_bs)))
    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata_out_graph",
                        lambda self, fb, in_capture=False: calls.append(("plan", fb.batch_size, in_capture)))
    return calls


@pytest.mark.parametrize("selector", [{"selector": "mean"}, {"selector": "fused", "fused_pass": "two"},
                                      {"selector": "fused", "fused_pass": "two", "overlap_selection": True}],
                         ids=["mean", "fused-two-pass", "fused-two-pass-overlapped"])
def test_first_step_replays_with_the_eager_output_and_selection(monkeypatch, flashinfer_graph_planning, selector):
    graph = World(monkeypatch, MageConfig(**{**CFG, **selector, "graph_first_step": True}), capture_bs=(2,))
    eager = World(monkeypatch, MageConfig(**{**CFG, **selector, "graph_first_step": False}), capture_bs=(2,))
    assert graph.backend.graph_first_capacity == CAPACITY and eager.backend.graph_first_capacity is None
    assert flashinfer_graph_planning == [("state", 2)]
    first = graph.batch()
    eager_first = SimpleNamespace(**vars(first))
    out_graph, out_eager = graph.forward(first), eager.forward(eager_first)
    assert graph.paths == ["graph"] and eager.paths == ["eager"] and graph.plans == [Phase.FIRST]
    assert graph.backend.graph_variant == FIRST_STEP_VARIANT and graph.backend.max_prefix == CAPACITY
    assert flashinfer_graph_planning[-1] == ("plan", 2, False)
    for i in range(LAYERS):
        ref = exact(first.q, graph.k[i], graph.v[i], graph.r2t[graph.rows], PREFIX, graph.scale)[0]
        assert torch.allclose(out_graph.logits_output[i], ref, atol=1e-5)
        assert torch.allclose(out_graph.logits_output[i], out_eager.logits_output[i], atol=1e-6)
    g, e = graph.backend.index_cache, eager.backend.index_cache
    assert torch.equal(g.lens, e.lens) and g.lens[1:3].eq(12).all()
    for row in (1, 2):
        for layer in range(LAYERS):
            for h in range(g.lens.shape[2]):
                assert set(g.slots[row, layer, h, :12].tolist()) == set(e.slots[row, layer, h, :12].tolist())
    stats = graph.backend.index_cache.stats
    assert stats.first_forwards == 1 and stats.graph_first_forwards == 1 and stats.select_layer_calls == 0
    # The block's later steps replay the sparse graph, on the cached selection.
    fb = graph.batch()
    out = graph.forward(fb)
    assert graph.paths == ["graph", "graph"] and graph.backend.graph_variant is None
    for i in range(LAYERS):
        assert torch.allclose(out.logits_output[i], graph.sparse_ref(fb, i), atol=1e-4)
    assert stats.graph_sparse_forwards == 1 and flashinfer_graph_planning[-1][0] == "plan"


def test_a_batch_the_first_step_graph_cannot_hold_runs_eagerly(monkeypatch, flashinfer_graph_planning):
    w = World(monkeypatch, MageConfig(**{**CFG, "graph_first_step": True}), capture_bs=(1,))
    w.forward(w.batch())  # two requests, only bs 1 captured
    assert w.paths == ["eager"] and w.backend.index_cache.stats.graph_first_forwards == 0
    assert w.backend.index_cache.stats.select_layer_calls == LAYERS


@pytest.mark.parametrize("selector", [{"selector": "vote"}, {"selector": "fused", "fused_pass": "one"}],
                         ids=["vote", "fused-one-pass"])
def test_other_selectors_keep_eager_first_steps(monkeypatch, flashinfer_graph_planning, selector):
    w = World(monkeypatch, MageConfig(**{**CFG, **selector, "graph_first_step": True}), capture_bs=(2,))
    assert w.backend.graph_first_capacity is None and flashinfer_graph_planning == []
    w.forward(w.batch())
    w.forward(w.batch())
    assert w.paths == ["eager", "graph"]


def test_eligibility_of_first_steps():
    first, sparse = StepPlan(Phase.FIRST, ""), StepPlan(Phase.SPARSE, "")
    assert not graph_eligible(first, "mean", [B, B], B)  # no first-step graphs captured
    assert graph_eligible(first, "mean", [B, B], B, first_capacity=64, max_prefix=64)
    assert not graph_eligible(first, "mean", [B, B], B, first_capacity=64, max_prefix=65)
    assert graph_eligible(first, "fused", [B, B], B, first_capacity=64, max_prefix=8)
    assert not graph_eligible(first, "vote", [B, B], B, first_capacity=64, max_prefix=8)
    assert not graph_eligible(first, "mean", [B, 2 * B], B, first_capacity=64, max_prefix=8)
    assert graph_eligible(sparse, "fused", [B], B) and not graph_eligible(sparse, "quest", [B], B)
    assert not graph_eligible(StepPlan(Phase.DENSE, ""), "mean", [B], B, first_capacity=64)


def test_capture_hook_adds_the_first_step_variant_only_for_mage_with_first_step_graphs():
    seen = []

    def original(self, size, forward, stream_idx=None, variant_label=None):
        seen.append((size, variant_label, self.attn_backend.capture_first_step))

    runner = SimpleNamespace(attn_backend=SimpleNamespace(graph_first_capacity=CAPACITY, capture_first_step=False))
    hooks.capture_one_shape_around(original, runner, 4, None, None, None)
    assert seen == [(4, None, False), (4, FIRST_STEP_VARIANT, True)]
    assert runner.attn_backend.capture_first_step is False
    seen.clear()
    runner.attn_backend.graph_first_capacity = None
    hooks.capture_one_shape_around(original, runner, 4, None, None, None)
    other = SimpleNamespace(attn_backend=SimpleNamespace(capture_first_step=False))  # another backend
    hooks.capture_one_shape_around(original, other, 2, None, None, None)
    assert seen == [(4, None, False), (2, None, False)]


def test_replay_key_hook_names_the_planned_variant():
    def original(self, fb):
        return "lora-or-none"

    mage = SimpleNamespace(attn_backend=SimpleNamespace(graph_variant=FIRST_STEP_VARIANT))
    assert hooks.resolve_graph_variant_around(original, mage, None) == FIRST_STEP_VARIANT
    mage.attn_backend.graph_variant = None
    assert hooks.resolve_graph_variant_around(original, mage, None) == "lora-or-none"
    assert hooks.resolve_graph_variant_around(original, SimpleNamespace(attn_backend=object()), None) == "lora-or-none"
    assert {"capture_one_shape", "_resolve_lora_variant", "can_run_graph"} <= set(vars(DecodeCudaGraphRunner))


def test_first_step_capture_plans_flashinfer_and_touches_only_the_padding_row(monkeypatch, flashinfer_graph_planning):
    from .test_cuda_graph_plan import HQ, D, no_host_sync
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    w = World(monkeypatch, MageConfig(**{**CFG, "graph_first_step": True}), capture_bs=(2,))
    backend, bs = w.backend, 2
    capture = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=bs,
                              req_pool_indices=torch.zeros(bs, dtype=torch.int64), seq_lens=torch.full((bs,), B),
                              out_cache_loc=torch.zeros(bs * B, dtype=torch.int64), positions=torch.zeros(bs * B))
    before = backend.index_cache.slots[1:].clone(), backend.index_cache.lens.clone()
    backend.capture_first_step = True
    # SGLang's dummy batch: every row is the padding row, prefix 0; the stand-in exact pass sees the World's
    # two requests, which is all the layers need to run.
    backend.init_forward_metadata_out_graph(capture, in_capture=True)
    assert backend.plan.phase == Phase.FIRST and backend.graph_variant == FIRST_STEP_VARIANT
    assert flashinfer_graph_planning[-1] == ("plan", bs, True) and backend.prefix_lens.tolist() == [0, 0]
    with no_host_sync():
        for _ in range(3):  # two warm-ups and the capture
            outs = w._layers(torch.randn(bs * B, HQ, D), capture)
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.equal(backend.index_cache.slots[1:], before[0]) and torch.equal(backend.index_cache.lens, before[1])
    stats = backend.index_cache.stats
    assert stats.select_layer_calls == stats.graph_first_forwards == stats.first_forwards == 0 and w.plans == []
