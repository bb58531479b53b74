"""mage under SGLang's dLLM CUDA graph, on the CPU: which forwards may replay, the planner running once per
forward whichever path SGLang takes, and the graph path's static metadata.

Forwards go through SGLang's own dispatch (`ModelRunner._forward_raw`) and its own
`DecodeCudaGraphRunner.can_run_graph` wrapped by the plugin's hook; only the two ends are stand-ins: the
eager runner (copies the batch, as EagerRunner.load_batch does, then init_forward_metadata + the layers) and
the graph runner's execute (pads the batch to a captured bs in SGLang's registry's way, builds SGLang's
replay view with `build_replay_fb_view`, calls init_forward_metadata_out_graph, then runs the layers on the
padded static batch: what the captured kernels compute with the replay-time buffers). FlashInfer is an
exact PyTorch stand-in and the Triton ops run in the interpreter."""

import bisect
import copy
import functools
import math
import subprocess
import sys
import traceback
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner, build_replay_fb_view

from sglang_mage import hooks
from sglang_mage.backend import MageAttnBackend
from sglang_mage.config import MageConfig
from sglang_mage.cuda_graph import GRAPH_SELECTORS
from sglang_mage.index_cache import MageIndexCache, Phase
from sglang_mage.ops.sparse_attention import sparse_block_attention_ref

B, HQ, HKV, D, LAYERS, MASK = 4, 4, 2, 32, 2, 7
PREFIX = [40, 24]
# First steps eager here (the graph-first path is tests/backend/test_graph_first_step.py).
CFG = dict(k=8, sink_tokens=2, local_window=2, min_context=0, graph_first_step=False)  # budget 12 < both prefixes


def exact(q, k_buf, v_buf, r2t_rows, prefix, scale):
    """Per request: block rows over prefix + block, bidirectional. Returns (o, lse in base 2)."""
    outs, lses = [], []
    for r, p in enumerate(prefix):
        slots = r2t_rows[r, : p + B].long()
        qr = q[r * B:(r + 1) * B].float()
        k = k_buf[slots].float().repeat_interleave(HQ // HKV, 1)
        v = v_buf[slots].float().repeat_interleave(HQ // HKV, 1)
        logits = torch.einsum("qhd,khd->hqk", qr, k) * scale
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), v))
        lses.append((torch.logsumexp(logits, -1) / math.log(2.0)).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


class World:
    """Two requests in pool rows 1 and 2 (row 0 is the pool's padding row), their KV in a 200-slot pool
    whose slot 0 is the padding slot, and SGLang's dispatch around a mage backend."""

    def __init__(self, monkeypatch, cfg: MageConfig, capture_bs=(1, 4), graph=True):
        torch.manual_seed(0)
        self.cfg, self.capture_bs = cfg, list(capture_bs)
        self.r2t = torch.zeros(3, 128, dtype=torch.int32)
        perm = torch.randperm(199).int() + 1
        self.r2t[1, :44], self.r2t[2, :28] = perm[:44], perm[44:72]
        self.k = [torch.randn(200, HKV, D) for _ in range(LAYERS)]
        self.v = [torch.randn(200, HKV, D) for _ in range(LAYERS)]
        self.rows = torch.tensor([1, 2])
        self.scale = D**-0.5
        self.layers = [SimpleNamespace(layer_id=i, tp_q_head_num=HQ, tp_k_head_num=HKV, tp_v_head_num=HKV,
                                       head_dim=D, v_head_dim=D, scaling=self.scale, logit_cap=0.0)
                       for i in range(LAYERS)]
        self.paths, self.plans, self.outputs = [], [], []
        self.backend = self._backend(monkeypatch)
        self.model_runner = self._model_runner(graph)

    def _backend(self, monkeypatch):
        world = self
        pool = SimpleNamespace(req_to_token=self.r2t, free=lambda req: None, clear=lambda: None)
        kv_pool = SimpleNamespace(get_kv_buffer=lambda i: (self.k[i], self.v[i]),
                                  set_kv_buffer=lambda *a, **k: pytest.fail("the model writes KV (save_kv_cache=False)"))

        class Paged:
            def forward_return_lse(self, q, kv, causal, sm_scale, logits_soft_cap):
                return exact(q, kv[0], kv[1], world.r2t[world.rows], PREFIX, sm_scale)

        monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata", lambda self, fb: None)
        monkeypatch.setattr(FlashInferAttnBackend, "forward_extend",
                            lambda self, q, k, v, layer, fb, save_kv_cache=True: torch.zeros_like(q))
        backend = MageAttnBackend.__new__(MageAttnBackend)
        backend.req_to_token_pool, backend.token_to_kv_pool = pool, kv_pool
        backend._setup_mage(self.cfg, SimpleNamespace(block_size=B, mask_id=MASK, max_running_requests=2), LAYERS,
                            HQ, HKV, D, pool, "cpu")
        backend.forward_metadata = SimpleNamespace(prefill_wrappers=[Paged()], use_ragged=False)
        backend._get_wrapper_idx = lambda layer: 0
        plan = backend.index_cache.plan

        def counted_plan(*args, **kwargs):
            out = plan(*args, **kwargs)
            world.plans.append(out.phase)
            return out

        backend.index_cache.plan = counted_plan
        return backend

    def _model_runner(self, graph):
        mr = SimpleNamespace(device="cuda", attn_backend=self.backend, hisparse_coordinator=None, forward_pass_id=0,
                             prefill_cuda_graph_runner=None, _prepare_eager_forward_batch=lambda fb: None,
                             eager_runner=SimpleNamespace(execute=self._eager), decode_cuda_graph_runner=None)
        if graph:
            runner = DecodeCudaGraphRunner.__new__(DecodeCudaGraphRunner)
            vars(runner).update(
                model_runner=mr, attn_backend=self.backend, disable_padding=False, require_mlp_tp_gather=False,
                enable_pdmux=False, max_bs=max(self.capture_bs), require_mlp_sync=False, is_encoder_decoder=False,
                capture_hidden_mode=CaptureHiddenMode.NULL, enable_two_batch_overlap=False,
                execute=self._replay,
            )
            mr.model_runner = mr
            mr.spec_algorithm = SimpleNamespace(is_ngram=lambda: False)
            mr.decode_cuda_graph_runner = runner
            self.backend.init_cuda_graph_state(runner.max_bs, runner.max_bs * B)
        return mr

    def batch(self, masked=True, prefix=PREFIX, extend=(B, B), q=None):
        n = sum(extend)
        return SimpleNamespace(
            forward_mode=ForwardMode.DLLM_EXTEND, batch_size=len(prefix), req_pool_indices=self.rows.clone(),
            extend_prefix_lens_cpu=list(prefix), extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32),
            extend_seq_lens=torch.tensor(extend, dtype=torch.int32), extend_seq_lens_cpu=list(extend),
            seq_lens=torch.tensor([p + e for p, e in zip(prefix, extend)]),
            seq_lens_cpu=torch.tensor([p + e for p, e in zip(prefix, extend)]), seq_lens_sum=None,
            input_ids=torch.full((n,), MASK if masked else 3), out_cache_loc=torch.arange(n) + 150,
            replace_embeds=None, capture_hidden_mode=CaptureHiddenMode.NULL, spec_info=None,
            global_num_tokens_cpu=None, q=torch.randn(n, HQ, D) if q is None else q,
        )

    def forward(self, fb):
        """What ModelRunner.forward does around _forward_raw."""
        self.model_runner.forward_pass_id += 1
        return ModelRunner._forward_raw(self.model_runner, fb, None)

    def _layers(self, q, fb):
        return [self.backend.forward_extend(q, None, None, layer, fb, save_kv_cache=False).view(-1, HQ, D)
                for layer in self.layers]

    def _eager(self, fb, pp_proxy_tensors=None):
        fb = copy.copy(fb)  # EagerRunner.load_batch hands the backend a new batch object
        self.backend.init_forward_metadata(fb)
        self.paths.append("eager")
        if self.backend.block_causal:  # tested in test_block_causal_backend.py
            return []
        out = self._layers(fb.q, fb)
        self.outputs.append(out)
        return out

    def _replay(self, fb, pp_proxy_tensors=None):
        raw = fb.batch_size
        bs = self.capture_bs[bisect.bisect_left(self.capture_bs, raw)]
        mb = max(self.capture_bs)
        # SGLang's registry padding: req_pool_indices and out_cache_loc 0, seq_lens the fill value B.
        buffers = SimpleNamespace(
            input_ids=torch.zeros(mb * B, dtype=torch.int64), req_pool_indices=torch.zeros(mb, dtype=torch.int64),
            seq_lens=torch.full((mb,), B), seq_lens_cpu=torch.full((mb,), B), out_cache_loc=torch.zeros(mb * B),
        )
        buffers.input_ids[: raw * B] = fb.input_ids
        buffers.req_pool_indices[:raw] = fb.req_pool_indices
        buffers.seq_lens[:raw], buffers.seq_lens_cpu[:raw] = fb.seq_lens, fb.seq_lens_cpu
        buffers.out_cache_loc[: raw * B] = fb.out_cache_loc
        view = build_replay_fb_view(forward_batch=fb, buffers=buffers, bs=bs, raw_bs=raw, num_tokens=bs * B,
                                    seq_len_fill_value=B, capture_forward_mode=ForwardMode.DLLM_EXTEND,
                                    is_encoder_decoder=False)
        self.backend.init_forward_metadata_out_graph(view)
        self.paths.append("graph")
        static = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, req_pool_indices=buffers.req_pool_indices[:bs],
                                 out_cache_loc=buffers.out_cache_loc[: bs * B])
        q = torch.randn(bs * B, HQ, D)  # padding rows' queries are whatever the static buffer holds
        q[: raw * B] = fb.q
        with no_host_sync():
            out = self._layers(q, static)
        self.outputs.append(out)
        return [o[: raw * B] for o in out]

    def sparse_ref(self, fb, layer):
        qo = torch.tensor([0, B, 2 * B], dtype=torch.int32)
        cache = self.backend.index_cache
        return sparse_block_attention_ref(fb.q, self.k[layer], self.v[layer], qo, self.r2t, self.rows,
                                          fb.extend_prefix_lens, cache.slots[:, layer], cache.lens[:, layer],
                                          self.scale, B)


class no_host_sync:
    """Inside a captured region nothing may read a device value on the host; on the CPU such a read is
    free, so the project's own reads are made to fail (the Triton interpreter's reads are its business)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")

    def __enter__(self):
        self.saved = {n: (getattr(torch.Tensor, n), n in vars(torch.Tensor)) for n in self.NAMES}

        def forbid(name, original):
            def fail(t, *a, **k):
                caller = traceback.extract_stack()[-2].filename
                if "sglang_mage" in caller:
                    raise AssertionError(f"host sync (Tensor.{name}) on the graph path, from {caller}")
                return original(t, *a, **k)
            return fail

        for n, (original, _) in self.saved.items():
            setattr(torch.Tensor, n, forbid(n, original))
        return self

    def __exit__(self, *exc):
        for n, (original, own) in self.saved.items():
            if own:
                setattr(torch.Tensor, n, original)
            else:
                delattr(torch.Tensor, n)


@pytest.fixture(autouse=True)
def hooked_can_run_graph(monkeypatch):
    """The plugin's hook around SGLang's real DecodeCudaGraphRunner.can_run_graph (in-process, as
    HookRegistry's AROUND wrapper does; the subprocess test below checks the registration itself)."""
    original = DecodeCudaGraphRunner.can_run_graph

    @functools.wraps(original)
    def wrapped(self, forward_batch):
        return hooks.can_run_graph_around(original, self, forward_batch)

    monkeypatch.setattr(DecodeCudaGraphRunner, "can_run_graph", wrapped)


def test_first_step_eager_then_sparse_steps_replay_and_the_planner_runs_once_per_forward(monkeypatch):
    w = World(monkeypatch, MageConfig(**CFG))
    first = w.batch()
    out1 = w.forward(first)
    for i in range(LAYERS):
        assert torch.allclose(out1.logits_output[i], exact(first.q, w.k[i], w.v[i], w.r2t[w.rows], PREFIX,
                                                           w.scale)[0], atol=1e-5)
    for _ in range(3):
        fb = w.batch()
        out = w.forward(fb)
        for i in range(LAYERS):
            assert torch.allclose(out.logits_output[i], w.sparse_ref(fb, i), atol=1e-4)
    assert w.plans == [Phase.FIRST, Phase.SPARSE, Phase.SPARSE, Phase.SPARSE]
    assert w.paths == ["eager", "graph", "graph", "graph"]
    stats = w.backend.index_cache.stats
    assert stats.first_forwards == 1 and stats.sparse_forwards == 3 and stats.graph_sparse_forwards == 3
    assert stats.sparse_layer_calls == 0  # replayed layers never reach Python
    assert w.backend._pending is None
    # Padding rows (pool row 0, prefix 0, slot 0) give finite output.
    for padded in w.outputs[1:]:
        assert all(o.shape[0] == 4 * B and torch.isfinite(o).all() for o in padded)


def test_a_batch_the_graph_cannot_hold_runs_eagerly_on_the_parked_plan(monkeypatch):
    w = World(monkeypatch, MageConfig(**CFG), capture_bs=(1,))  # two requests, only bs 1 captured
    w.forward(w.batch())
    fb = w.batch()
    out = w.forward(fb)
    assert w.plans == [Phase.FIRST, Phase.SPARSE] and w.paths == ["eager", "eager"]
    assert w.backend.plan.phase == Phase.SPARSE and w.backend.index_cache.stats.graph_sparse_forwards == 0
    assert w.backend.index_cache.stats.sparse_layer_calls == LAYERS
    for i in range(LAYERS):
        assert torch.allclose(out.logits_output[i], w.sparse_ref(fb, i), atol=1e-4)


def test_without_a_graph_runner_init_forward_metadata_plans_itself(monkeypatch):
    w = World(monkeypatch, MageConfig(**CFG), graph=False)
    for _ in range(3):
        w.forward(w.batch())
    assert w.plans == [Phase.FIRST, Phase.SPARSE, Phase.SPARSE] and w.paths == ["eager"] * 3


@pytest.mark.parametrize("selector", ["mean", "fused", "vote", "quest", "oracle"])
def test_only_sparse_steps_of_host_free_selectors_replay(monkeypatch, selector):
    w = World(monkeypatch, MageConfig(**CFG, selector=selector, quest_page_size=4))
    w.forward(w.batch())
    for _ in range(2):
        fb = w.batch()
        out = w.forward(fb)
        for i in range(LAYERS):  # quest and oracle re-select at every step: the cache holds this step's set
            assert torch.allclose(out.logits_output[i], w.sparse_ref(fb, i), atol=1e-4)
    replay = selector in GRAPH_SELECTORS
    assert w.plans == [Phase.FIRST, Phase.SPARSE, Phase.SPARSE]
    assert w.paths == ["eager"] + (["graph"] * 2 if replay else ["eager"] * 2)


def test_dense_mask_free_and_block_causal_forwards_stay_eager(monkeypatch):
    w = World(monkeypatch, MageConfig(**CFG))
    w.forward(w.batch(masked=False))  # a mask-free prompt block at a new key: dense
    w.forward(w.batch(masked=False, prefix=[32, 16], extend=(8, 8)))  # chunked prompt prefill: block-causal
    assert w.paths == ["eager", "eager"] and w.plans == [Phase.DENSE]
    assert w.backend.index_cache.stats.block_causal_forwards == 1
    dense = World(monkeypatch, MageConfig(**CFG, selector="dense"))
    for _ in range(2):
        dense.forward(dense.batch())
    assert dense.paths == ["eager", "eager"] and dense.plans == []  # the dense selector never plans


def test_within_budget_and_min_context_steps_stay_eager_unless_forced_sparse(monkeypatch):
    for cfg, phases in [
        (MageConfig(k=4096, min_context=0, graph_first_step=False), [Phase.DENSE, Phase.DENSE]),
        (MageConfig(**{**CFG, "min_context": 100}), [Phase.DENSE, Phase.DENSE]),
    ]:
        w = World(monkeypatch, cfg)
        w.forward(w.batch())
        w.forward(w.batch())
        assert w.plans == phases and w.paths == ["eager", "eager"]
    forced = World(monkeypatch, MageConfig(k=4096, min_context=0, force_sparse=True, graph_first_step=False))
    fbs = [forced.batch() for _ in range(2)]
    outs = [forced.forward(fb) for fb in fbs]
    assert forced.paths == ["eager", "graph"]
    for i in range(LAYERS):  # k >= context: the replayed sparse step is exact
        assert torch.allclose(outs[1].logits_output[i], exact(fbs[1].q, forced.k[i], forced.v[i],
                                                              forced.r2t[forced.rows], PREFIX, forced.scale)[0],
                              atol=1e-4)


def test_sparse_step_dump_runs_eagerly_then_steps_replay(monkeypatch, tmp_path):
    monkeypatch.setenv("SGLANG_MAGE_DUMP_DIR", str(tmp_path))
    w = World(monkeypatch, MageConfig(**CFG))
    for _ in range(3):
        w.forward(w.batch())
    assert w.paths == ["eager", "eager", "graph"]
    assert len(list(tmp_path.glob("sparse_step_*.pt"))) == 1


def test_eager_and_replay_fill_the_metadata_the_same_way_padding_rows_included(monkeypatch):
    w = World(monkeypatch, MageConfig(**CFG))
    w.forward(w.batch())
    fb = w.batch()
    backend = w.backend
    # The same sparse step twice (a later step's plan changes no state): eagerly, then as a padded replay.
    backend.init_forward_metadata(copy.copy(fb))
    eager_qo, eager_prefix = backend.qo_indptr.clone(), backend.prefix_lens.clone()
    eager_out = w._layers(fb.q, fb)
    assert backend.mage_graph_gate(fb) is True
    w._replay(fb)
    assert backend.qo_indptr.data_ptr() == backend._cg_qo_indptr.data_ptr()  # the captured buffers
    assert backend.prefix_lens.data_ptr() == backend._cg_prefix_lens.data_ptr()
    assert eager_qo.tolist() == [0, B, 2 * B] and eager_prefix.tolist() == PREFIX
    assert backend.qo_indptr.tolist() == [0, B, 2 * B, 3 * B, 4 * B]  # bs 2 padded to 4: B tokens a row
    assert backend.prefix_lens.tolist() == PREFIX + [0, 0]
    assert backend.index_cache.lens[0].eq(0).all()  # the padding row selects nothing
    assert w.plans == [Phase.FIRST, Phase.SPARSE, Phase.SPARSE]
    for e, g in zip(eager_out, w.outputs[-1]):
        assert torch.equal(e, g[: 2 * B]) and torch.isfinite(g).all()


def test_capture_records_the_sparse_path_without_touching_state(monkeypatch):
    w = World(monkeypatch, MageConfig(**CFG, selector="quest", quest_page_size=4))
    backend = w.backend
    bs = 4
    capture = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=bs,
                              req_pool_indices=torch.zeros(bs, dtype=torch.int64), seq_lens=torch.full((bs,), B),
                              out_cache_loc=torch.zeros(bs * B, dtype=torch.int64), positions=torch.zeros(bs * B))
    before = (backend.index_cache.slots.clone(), backend.index_cache.lens.clone())
    backend.init_forward_metadata_out_graph(capture, in_capture=True)
    assert backend.plan.phase == Phase.SPARSE and backend.prefix_lens.tolist() == [0] * bs
    with no_host_sync():
        for _ in range(3):  # SGLang's two warm-ups and the capture itself
            outs = w._layers(torch.randn(bs * B, HQ, D), capture)
    assert all(torch.isfinite(o).all() for o in outs)
    assert w.plans == [] and backend._pending is None
    stats = backend.index_cache.stats
    assert stats.sparse_layer_calls == stats.select_layer_calls == stats.graph_sparse_forwards == 0
    assert torch.equal(before[0], backend.index_cache.slots) and torch.equal(before[1], backend.index_cache.lens)
    # An idle DP rank replays on padding rows only: nothing was planned for it, and it counts as no forward.
    idle = SimpleNamespace(**vars(capture), actual_forward_mode=ForwardMode.IDLE, num_padding=bs,
                           seq_lens_cpu=torch.full((bs,), B))
    backend.init_forward_metadata_out_graph(idle)
    assert backend.plan.phase == Phase.SPARSE and backend.prefix_lens.tolist() == [0] * bs
    assert stats.graph_sparse_forwards == 0 and w.plans == []


def test_a_replay_needs_a_parked_sparse_plan_and_a_parked_plan_must_run(monkeypatch):
    w = World(monkeypatch, MageConfig(**CFG))
    w.forward(w.batch())
    fb = w.batch()
    with pytest.raises(RuntimeError, match="without a graph-eligible sparse plan"):
        w._replay(fb)
    assert w.backend.mage_graph_gate(fb, token=7) is True
    assert w.backend.mage_graph_gate(fb, token=7) is True  # asked twice for one forward: planned once
    assert w.plans == [Phase.FIRST, Phase.SPARSE]
    with pytest.raises(RuntimeError, match="never run"):
        w.backend.mage_graph_gate(fb, token=8)
    other = w.batch(prefix=[44, 28])
    with pytest.raises(RuntimeError, match="is not the one that runs"):
        w.backend.init_forward_metadata(other)


def test_graph_state_grows_the_sparse_workspace_to_the_captured_batch(monkeypatch):
    w = World(monkeypatch, MageConfig(**CFG), capture_bs=(1, 2, 8))
    from sglang_mage.ops.sparse_attention import alloc_batch_workspace

    o_part, lse = w.backend.workspace
    want_o, want_lse = alloc_batch_workspace(8, *w.backend.workspace_shape, "cpu")
    assert w.backend.workspace_reqs == 8 and o_part.shape == want_o.shape and lse.shape == want_lse.shape
    assert w.backend._cg_qo_indptr.shape == (9,) and w.backend._cg_prefix_lens.shape == (8,)
    with pytest.raises(RuntimeError, match="block size"):
        w.backend.init_cuda_graph_state(8, 8 * B + 1)


def test_hook_keeps_mage_and_the_users_graph_setting_for_capturable_models():
    disabled = "disabled"

    def upstream(self):  # SGLang: swap to flashinfer while the decode graph is on
        if self.cuda_graph_config.decode.backend != disabled:
            if self.attention_backend != "flashinfer":
                self.attention_backend = "flashinfer"
                self.swapped = True

    def args(setting, arch):
        model_config = SimpleNamespace(hf_config=SimpleNamespace(architectures=[arch]))
        return SimpleNamespace(attention_backend="mage", dllm_algorithm="LowConfidence", max_running_requests=None,
                               cuda_graph_config=SimpleNamespace(decode=SimpleNamespace(backend=setting)),
                               get_model_config=lambda: model_config)

    for setting in ("full", disabled):
        for arch in sorted(hooks.GRAPH_CAPTURABLE_ARCHITECTURES):
            a = args(setting, arch)
            hooks.handle_dllm_inference_around(upstream, a)
            assert a.attention_backend == "mage" and a.cuda_graph_config.decode.backend == setting
            assert not hasattr(a, "swapped") and a.max_running_requests == hooks.DEFAULT_MAX_RUNNING_REQUESTS
    # A plugin-added model class (Fast-dLLM v2 reads extend_start_loc in its forward): eager, as before.
    a = args("full", "Fast_dLLM_QwenForCausalLM")
    hooks.handle_dllm_inference_around(upstream, a)
    assert a.attention_backend == "mage" and a.cuda_graph_config.decode.backend == disabled
    # ... and with flashinfer too, whose dLLM graph would capture it the same way.
    f = args("full", "Fast_dLLM_QwenForCausalLM")
    f.attention_backend = "flashinfer"
    hooks.handle_dllm_inference_around(upstream, f)
    assert f.attention_backend == "flashinfer" and f.cuda_graph_config.decode.backend == disabled
    # SGLang's own dLLM classes under other backends are SGLang's business.
    g = args("full", "SDARForCausalLM")
    g.attention_backend = "flashinfer"
    hooks.handle_dllm_inference_around(upstream, g)
    assert g.cuda_graph_config.decode.backend == "full"


def test_real_server_args_keep_mage_with_the_graph_on_and_honour_disable_cuda_graph(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["SDARForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    }))
    code = (
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry\n"
        "from sglang.srt.server_args import ServerArgs\n"
        "from sglang.srt.model_executor.cuda_graph_config import Backend\n"
        "for off in (False, True):\n"
        f"    sa = ServerArgs(model_path={str(tmp_path)!r}, attention_backend='mage', dllm_algorithm='LowConfidence',"
        " device='cuda', skip_tokenizer_init=True, disable_cuda_graph=off)\n"
        "    assert sa.attention_backend == 'mage', sa.attention_backend\n"
        "    assert (sa.cuda_graph_config.decode.backend == Backend.DISABLED) == off, sa.cuda_graph_config.decode\n"
        "target = 'sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph'\n"
        "assert target not in HookRegistry._patched\n"
        "import sglang.srt.model_executor.runner.decode_cuda_graph_runner\n"
        "assert target in HookRegistry._patched, 'the can_run_graph hook is not applied on import'\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_padding_row_zero_is_never_a_request_slot():
    """The padding rows' harmlessness rests on SGLang never giving pool row 0 to a request."""
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    pool = ReqToTokenPool(size=4, max_context_len=16, device="cpu", enable_memory_saver=False)
    assert 0 not in pool.free_slots and pool.req_to_token.shape[0] == 5
    cache = MageIndexCache(pool.req_to_token.shape[0], 1, 1, MageConfig(**CFG), "cpu")
    assert cache.lens[0].eq(0).all()
