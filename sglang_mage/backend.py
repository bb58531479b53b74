"""`MageAttnBackend`: SGLang's FlashInfer backend plus MAGE's first-step selection and sparse later steps.

Per DLLM_EXTEND forward, `decide` plans the phase exactly once (index_cache.MageIndexCache.plan), before
SGLang chooses between its dLLM CUDA graph and the eager runner (see cuda_graph.py):
- DENSE: FlashInfer exactly as SGLang runs it (mask-free prompt blocks, short prefixes). Eager.
- FIRST: FlashInfer exact attention that also returns the LSE; from the same q, the paged K and that LSE the
  selection op scores every prefix position per KV head, and the top set goes into the index cache. Eager.
- SPARSE: the Triton kernel attends each block to its cached slots plus its own tokens. With the graph on
  and a mean/fused/vote selector this replays a captured graph; quest and oracle (host work per step) and
  a batch the graph cannot hold run it eagerly.
A forward whose extends span several mask-free prompt blocks (chunked prompt prefill, see
sglang_mage/chunked_prefill.py) runs block-causal: FlashInfer's causal prefill completed by the
`later_in_block_merge` Triton op, so it computes what block-by-block prefill computes. Eager.
Other forward modes (none in dLLM serving) fall through to FlashInfer untouched.
"""

from __future__ import annotations

import logging
import os

import torch
from sglang.srt.layers.attention import flashinfer_backend as _flashinfer_backend
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from . import config as mage_config
from .chunked_prefill import holds_prompt_chunk
from .cuda_graph import ForwardDecision, MageCudaGraphMixin, fill_block_metadata, graph_eligible
from .hooks import install_slot_free_listener
from .index_cache import MageIndexCache, Phase, StepPlan
from .kv_dump import ENV as KV_DUMP_ENV
from .kv_dump import KVDumper
from .ops.block_causal_prefill import later_in_block_merge
from .ops.first_step import fused_first_step
from .ops.selection import block_mean_scores, mean_query_scores, select_topk
from .ops.selection.quest import block_mean_query, page_bounds, quest_position_scores
from .ops.sparse_attention import alloc_batch_workspace, pdl_available, sparse_block_attention
from .selectors import VoteSelector
from .side_stream import SideStream

logger = logging.getLogger("sglang_mage")


def rank_head_counts(model_config, attn_tp_size: int) -> tuple[int, int]:
    """Query and KV heads that one attention-TP rank holds, as SGLang's FlashInfer backend splits them:
    the index cache, the sparse workspace and every selection are per rank and never cross ranks. With
    fewer KV heads than ranks, SGLang replicates a KV head on several ranks (get_num_kv_heads)."""
    tp = max(1, int(attn_tp_size))
    if model_config.num_attention_heads % tp:
        raise RuntimeError(f"{model_config.num_attention_heads} attention heads do not split over {tp} ranks")
    return model_config.num_attention_heads // tp, model_config.get_num_kv_heads(tp)


def batch_slots(forward_batch) -> tuple:
    """The pool slots of the batch's requests. Reading them from the device is a sync, and SGLang's dLLM
    algorithms run every step of a block on the same ForwardBatch, so they are read once per batch and kept
    on it, with the tensor they came from: a sync per step would stop the host queuing the next step's
    forward while the GPU runs this one, which at batch 1 costs more than a sparse step's attention."""
    indices = forward_batch.req_pool_indices
    kept = getattr(forward_batch, "_mage_slots", None)
    if kept is not None and kept[0] is indices:
        return kept[1]
    slots = tuple(indices.tolist())
    forward_batch._mage_slots = (indices, slots)
    return slots


class MageAttnBackend(MageCudaGraphMixin, FlashInferAttnBackend):
    def __init__(self, model_runner, *args, **kwargs):
        super().__init__(model_runner, *args, **kwargs)
        server_args = model_runner.server_args
        cfg = getattr(server_args, "mage_config", None) or mage_config.resolve({})
        if self.dllm_config is None:
            raise RuntimeError(
                "--attention-backend mage needs a block-diffusion model served with --dllm-algorithm"
            )
        kv_dtype = model_runner.kv_cache_dtype
        if kv_dtype not in (torch.bfloat16, torch.float16):
            raise RuntimeError(f"--attention-backend mage supports bf16/fp16 KV caches, not {kv_dtype}")
        from sglang.srt.runtime_context import get_parallel

        mc = model_runner.model_config
        q_heads, kv_heads = rank_head_counts(mc, get_parallel().attn_tp_size)
        self._setup_mage(
            cfg, self.dllm_config, mc.num_hidden_layers, q_heads, kv_heads, mc.head_dim,
            model_runner.req_to_token_pool, model_runner.device,
        )

    def _setup_mage(self, cfg, dllm_config, num_layers, num_q_heads, num_kv_heads, head_dim, req_to_token_pool, device):
        """MAGE's own state, apart from FlashInfer's: the index cache (registered with the pool for slot frees),
        the sparse kernel's workspace, and the vote selector's budget state."""
        self.mage = cfg
        self.block_size = dllm_config.block_size
        self.mask_id = dllm_config.mask_id
        self.num_kv_heads, self.num_q_heads, self.num_layers = num_kv_heads, num_q_heads, num_layers
        rows = req_to_token_pool.req_to_token.shape[0]
        self.index_cache = MageIndexCache(rows, num_layers, num_kv_heads, cfg, device)
        install_slot_free_listener(req_to_token_pool, self.index_cache.invalidate)
        # dLLM batches hold at most DllmConfig.max_running_requests requests (1 unless the user raises it).
        max_reqs = max(1, int(dllm_config.max_running_requests))
        group = num_q_heads // num_kv_heads
        # Flat: each batch size runs at its own default split count (graph captures bake theirs per size).
        self.workspace_shape = (num_kv_heads, self.block_size, group, head_dim, head_dim, cfg.max_selected)
        self.workspace_reqs = max_reqs
        self.workspace = alloc_batch_workspace(max_reqs, *self.workspace_shape, device)
        self.side_stream = SideStream()  # --mage-overlap-selection
        if cfg.overlap_selection:
            self.side_stream.prepare(device)
        self.vote = None
        if cfg.selector == "vote":
            self.vote = VoteSelector(cfg, num_layers, rows, device)
            install_slot_free_listener(req_to_token_pool, self.vote.invalidate)
        self.plan: StepPlan = StepPlan(Phase.DENSE, "not planned")
        self.block_causal = False
        # CUDA-graph side (cuda_graph.py): static buffers come with init_cuda_graph_state, if SGLang captures.
        self.graph_mode, self._pending, self._cg_max_bs = "eager", None, None
        self.graph_first_capacity, self.capture_first_step, self.graph_variant = None, False, None
        # quest: per layer, the page bounds of the current batch's prefixes (valid for its block's steps).
        self.quest_bounds: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self.batch_key: tuple = ()
        self.kv_dumper = None
        if os.environ.get(KV_DUMP_ENV):
            self.kv_dumper = KVDumper(os.environ[KV_DUMP_ENV], self.token_to_kv_pool, req_to_token_pool.req_to_token,
                                      num_layers)
            install_slot_free_listener(req_to_token_pool, self.kv_dumper.on_free)
        self._dump_dir = os.environ.get("SGLANG_MAGE_DUMP_DIR")
        self._dumped = False
        # The kernel falls back to plain launches where PDL is unavailable; say so once rather than per call.
        pdl = cfg.pdl if cfg.pdl == "off" or pdl_available(device) else "off (needs a Hopper-or-later GPU)"
        logger.info(
            "sglang-mage: k=%d sink=%d local=%d selector=%s min_context=%d sparse_commit=%s pdl=%s; index cache "
            "%.1f MiB (%d rows x %d layers x %d kv heads x %d)", cfg.k, cfg.sink_tokens, cfg.local_window,
            cfg.selector, cfg.min_context, cfg.sparse_commit, pdl, self.index_cache.nbytes / 2**20, rows,
            num_layers, num_kv_heads, cfg.max_selected,
        )

    # ---- per forward batch ------------------------------------------------------------------------------
    def decide(self, forward_batch) -> ForwardDecision:
        """The host-side part of a forward batch. It mutates the planner's per-slot keys at a block's first
        forward, so it runs exactly once per forward: from the graph gate, or else from init_forward_metadata."""
        if not forward_batch.forward_mode.is_dllm_extend():
            return ForwardDecision(StepPlan(Phase.DENSE, "not a dLLM forward"))
        slots = batch_slots(forward_batch)
        prefix_lens = tuple(forward_batch.extend_prefix_lens_cpu)
        extend_lens = list(forward_batch.extend_seq_lens_cpu)
        if self.kv_dumper is not None:
            self.kv_dumper.on_forward(forward_batch)
        if holds_prompt_chunk(extend_lens, self.block_size):
            self._check_block_aligned(prefix_lens, extend_lens)
            # Only whole mask-free prompt blocks are chunked, so there is nothing to select or reuse here.
            self.index_cache.stats.block_causal_forwards += 1
            self.index_cache.stats.block_causal_tokens += sum(extend_lens)
            return ForwardDecision(StepPlan(Phase.DENSE, "chunked prompt prefill (block-causal)"), prefix_lens,
                                   slots, block_causal=True)
        if self.mage.selector == "dense":
            self.index_cache.stats.dense_forwards += 1
            return ForwardDecision(StepPlan(Phase.DENSE, "--mage-selector dense"), prefix_lens, slots)
        plan = self.index_cache.plan(
            slots, prefix_lens, lambda: bool((forward_batch.input_ids == self.mask_id).any().item())
        )
        return ForwardDecision(plan, prefix_lens, slots, graphable=graph_eligible(
            plan, self.mage.selector, extend_lens, self.block_size, self.graph_first_capacity, max(prefix_lens, default=0)))

    def init_forward_metadata(self, forward_batch):
        """Eager forwards (the graph path is cuda_graph.MageCudaGraphMixin.init_forward_metadata_out_graph)."""
        self.graph_mode = "eager"
        decision = self.take_decision(forward_batch)
        self.plan, self.block_causal = decision.plan, decision.block_causal
        if not forward_batch.forward_mode.is_dllm_extend() or decision.block_causal:
            return super().init_forward_metadata(forward_batch)
        self.batch_key = decision.key
        if self.plan.phase != Phase.SPARSE or self.mage.selector == "oracle":
            super().init_forward_metadata(forward_batch)
        if self.plan.phase != Phase.DENSE:
            self._build_block_metadata(forward_batch, decision.max_prefix)

    def _check_block_aligned(self, prefix_lens, extend_lens) -> None:
        b = self.block_size
        if any(p % b for p in prefix_lens) or any(n % b for n in extend_lens):
            raise RuntimeError(
                f"sglang-mage: a multi-block dLLM extend must start and end on {b}-token block boundaries "
                f"(prefix lengths {prefix_lens}, extend lengths {extend_lens})"
            )

    def _build_block_metadata(self, forward_batch, max_prefix: int) -> None:
        seq = forward_batch.extend_seq_lens
        n = seq.shape[0]
        self.qo_indptr = torch.empty(n + 1, dtype=torch.int32, device=seq.device)
        self.prefix_lens = torch.empty(n, dtype=torch.int32, device=seq.device)
        fill_block_metadata(self.qo_indptr, self.prefix_lens, seq, forward_batch.extend_prefix_lens)
        self.max_prefix = max_prefix

    # ---- per layer --------------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if self.block_causal:
            return self._block_causal_extend(q, k, v, layer, forward_batch, save_kv_cache)
        phase = self.plan.phase
        if phase == Phase.DENSE:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        q3 = q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim)
        if phase == Phase.FIRST and self.mage.selector == "fused":
            return self._fused_first(q3, k, v, layer, forward_batch, save_kv_cache)
        if phase == Phase.FIRST:
            o, lse = self._exact_with_lse(q3, k, v, layer, forward_batch, save_kv_cache)
            self._select(q3, lse, layer, forward_batch)
            return o.view(-1, layer.tp_q_head_num * layer.head_dim)
        # Under capture (the only graph path that runs Python) just the KV write and the kernel are recorded:
        # selectors with per-step host work never replay (cuda_graph.GRAPH_SELECTORS).
        eager = self.graph_mode == "eager"
        if eager and self.mage.selector == "oracle":
            # This step's own exact attention picks its set (the per-step oracle); that pass writes the KV.
            _, lse = self._exact_with_lse(q3, k, v, layer, forward_batch, save_kv_cache)
            self._select(q3, lse, layer, forward_batch)
        else:
            if save_kv_cache and k is not None:
                self._write_kv(layer, forward_batch, k, v)
            if eager and self.mage.selector == "quest":  # Quest is query-aware: every step re-scores its pages
                self._select(q3, None, layer, forward_batch)
        k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        sel_slots, sel_lens = self.index_cache.layer_view(layer.layer_id)
        out = torch.empty_like(q3) if layer.v_head_dim == layer.head_dim else q3.new_empty(
            (q3.shape[0], layer.tp_q_head_num, layer.v_head_dim))
        o = sparse_block_attention(
            q3, k_buf, v_buf, self.qo_indptr, self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices, self.prefix_lens, sel_slots, sel_lens, layer.scaling,
            self.block_size, out=out, workspace=self.workspace, pdl=self.mage.pdl,
        )
        if eager:  # replays bypass Python; they are counted in stats.graph_sparse_forwards
            self.index_cache.stats.sparse_layer_calls += 1
            self._maybe_dump(q3, k_buf, v_buf, sel_slots, sel_lens, o, layer, forward_batch)
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _write_kv(self, layer, forward_batch, k, v) -> None:
        self.token_to_kv_pool.set_kv_buffer(
            layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v, layer.k_scale, layer.v_scale
        )

    def _exact_with_lse(self, q3, k, v, layer, forward_batch, save_kv_cache):
        """FlashInfer's exact bidirectional block attention, as SGLang's own forward_extend computes it, but
        keeping the log-sum-exp of every query row over all its keys (prefix + block)."""
        md = self.forward_metadata
        paged = md.prefill_wrappers[self._get_wrapper_idx(layer)]
        kv = dict(causal=False, sm_scale=layer.scaling, logits_soft_cap=layer.logit_cap)
        if not md.use_ragged:
            if save_kv_cache and k is not None:
                self._write_kv(layer, forward_batch, k, v)
            o, lse = paged.forward_return_lse(q3, self.token_to_kv_pool.get_kv_buffer(layer.layer_id), **kv)
        else:
            if k is None:
                k, v = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
            k3 = k.view(-1, layer.tp_k_head_num, layer.head_dim)
            v3 = v.view(-1, layer.tp_v_head_num, layer.v_head_dim)
            o, lse = self.prefill_wrapper_ragged.forward_return_lse(q3, k3, v3, **kv)
            if not md.extend_no_prefix:
                o2, lse2 = paged.forward_return_lse(q3, self.token_to_kv_pool.get_kv_buffer(layer.layer_id), **kv)
                # SGLang defines its merge helper on CUDA builds only; look it up when it is needed.
                o, lse = _flashinfer_backend._safe_merge_state(o, lse, o2, lse2)
            if save_kv_cache:
                self._write_kv(layer, forward_batch, k, v)
        return o, lse

    def _block_causal_extend(self, q, k, v, layer, forward_batch, save_kv_cache):
        """Block-causal prefill of whole prompt blocks: FlashInfer's causal prefill (every key at or before
        the query, prefix included) with its LSE, then each query's later same-block keys folded in."""
        if layer.logit_cap:
            raise NotImplementedError("sglang-mage chunked prompt prefill does not support logit soft-capping")
        md = self.forward_metadata
        paged = md.prefill_wrappers[self._get_wrapper_idx(layer)]
        q3 = q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim)
        k3 = k.view(-1, layer.tp_k_head_num, layer.head_dim)
        v3 = v.view(-1, layer.tp_v_head_num, layer.v_head_dim)
        kw = dict(sm_scale=layer.scaling, logits_soft_cap=layer.logit_cap)
        if md.use_ragged:
            o, lse = self.prefill_wrapper_ragged.forward_return_lse(q3, k3, v3, causal=True, **kw)
            if not md.extend_no_prefix:
                o2, lse2 = paged.forward_return_lse(
                    q3, self.token_to_kv_pool.get_kv_buffer(layer.layer_id), causal=False, **kw
                )
                o, lse = _flashinfer_backend._safe_merge_state(o, lse, o2, lse2)
            if save_kv_cache:
                self._write_kv(layer, forward_batch, k, v)
        else:
            # The paged plan spans prefix + extend; causal aligns the extend to the end of that range.
            if save_kv_cache:
                self._write_kv(layer, forward_batch, k, v)
            o, lse = paged.forward_return_lse(
                q3, self.token_to_kv_pool.get_kv_buffer(layer.layer_id), causal=True, **kw
            )
        later_in_block_merge(q3, k3, v3, o, lse, self.block_size, layer.scaling)
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _fused_first(self, q3, k, v, layer, forward_batch, save_kv_cache):
        """`fused` selector: exact attention and block-mean-query scores, in one Triton pass over K or (with
        --mage-fused-pass two) FlashInfer's exact pass followed by a scores pass over K."""
        if self.mage.fused_pass == "two":
            # The `mean` selector's exact pass (its LSE unused here): the path first-step graphs capture.
            if self.mage.overlap_selection and self.max_prefix:
                # Scores and top-k read q and the prefix keys only (not the block's KV the exact pass writes),
                # so they run on a side stream beside the exact pass and join before the layer returns.
                with self.side_stream.fork(q3.device):
                    self._select_by_mean_query(q3, layer, forward_batch)
                o, _ = self._exact_with_lse(q3, k, v, layer, forward_batch, save_kv_cache)
                self.side_stream.join(q3.device)
            else:
                o, _ = self._exact_with_lse(q3, k, v, layer, forward_batch, save_kv_cache)
                if self.max_prefix:
                    self._select_by_mean_query(q3, layer, forward_batch)
        else:
            req_to_token = self.req_to_token_pool.req_to_token
            if save_kv_cache and k is not None:
                self._write_kv(layer, forward_batch, k, v)
            k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
            o, scores = fused_first_step(
                q3, k_buf, v_buf, self.qo_indptr, req_to_token, forward_batch.req_pool_indices, self.prefix_lens,
                layer.scaling, self.block_size, max(self.max_prefix, 1),
            )
            if self.max_prefix:
                self._write_selection(scores, layer, forward_batch)
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _select_by_mean_query(self, q3, layer, forward_batch) -> None:
        """The fused selector's second pass: block-mean-query logits over the prefix keys, then the top-k."""
        k_buf, _ = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        scores = mean_query_scores(
            q3, k_buf, self.qo_indptr, self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
            self.prefix_lens, layer.scaling, self.block_size, self.max_prefix,
        )
        self._write_selection(scores, layer, forward_batch)

    def _write_selection(self, scores, layer, forward_batch) -> None:
        """Top-k of one layer's prefix scores (plus sinks and local window) into its index-cache rows."""
        cfg = self.mage
        sel_slots, sel_lens = self.index_cache.layer_view(layer.layer_id)
        select_topk(
            scores, self.prefix_lens, cfg.k, cfg.sink_tokens, cfg.local_window, self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices, sel_slots, sel_lens, topk_method=cfg.topk_method,
        )
        if self.graph_mode == "eager":  # a replayed first step never reaches Python
            self.index_cache.stats.select_layer_calls += 1

    def _select(self, q3, lse, layer, forward_batch) -> None:
        """`lse` is FlashInfer's, in base 2 (tests/gpu/test_flashinfer_lse.py pins that convention)."""
        if self.max_prefix == 0:
            return
        cfg = self.mage
        k_buf, _ = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        if cfg.selector == "quest":
            cached = self.quest_bounds.get(layer.layer_id)
            if self.plan.phase == Phase.FIRST or cached is None or cached[0] != self.batch_key:
                cached = (self.batch_key, *page_bounds(
                    k_buf, req_to_token, forward_batch.req_pool_indices, self.prefix_lens, cfg.quest_page_size,
                    self.max_prefix,
                ))
                self.quest_bounds[layer.layer_id] = cached
            _, kmin, kmax = cached
            q_mean = block_mean_query(q3, self.qo_indptr, self.num_kv_heads, self.block_size)
            scores = quest_position_scores(q_mean, kmin, kmax, self.prefix_lens, cfg.quest_page_size, self.max_prefix)
            self._write_selection(scores, layer, forward_batch)
        elif self.vote is not None:
            sel_slots, sel_lens = self.index_cache.layer_view(layer.layer_id)
            self.vote.select(
                layer.layer_id, q3, k_buf, self.qo_indptr, req_to_token, forward_batch.req_pool_indices,
                self.prefix_lens, lse, layer.scaling, self.block_size, self.max_prefix, sel_slots, sel_lens,
            )
            if self.graph_mode == "eager":  # as in _write_selection
                self.index_cache.stats.select_layer_calls += 1
        else:
            scores = block_mean_scores(
                q3, k_buf, self.qo_indptr, req_to_token, forward_batch.req_pool_indices, self.prefix_lens,
                lse, layer.scaling, self.block_size, self.max_prefix, lse_is_log2=True,
            )
            self._write_selection(scores, layer, forward_batch)

    def _maybe_dump(self, q3, k_buf, v_buf, sel_slots, sel_lens, o, layer, forward_batch) -> None:
        """With $SGLANG_MAGE_DUMP_DIR set, save the inputs and output of the first sparse call of layer 1 whose
        prefix exceeds the budget, so a test can recompute it with the PyTorch reference. The KV rows are
        saved compactly: only the slots that the batch's requests own."""
        cfg = self.mage
        if not self._dump_dir or self._dumped or layer.layer_id != min(1, self.num_layers - 1):
            return
        if self.max_prefix <= cfg.k + cfg.sink_tokens + cfg.local_window:
            return
        self._dumped = True
        rows = forward_batch.req_pool_indices.long()
        seq_lens = forward_batch.seq_lens.tolist()
        r2t = self.req_to_token_pool.req_to_token[rows, : max(seq_lens)].long()
        owned = torch.unique(torch.cat([r2t[i, :n] for i, n in enumerate(seq_lens)]))
        remap = torch.full((k_buf.shape[0],), -1, dtype=torch.long, device=k_buf.device)
        remap[owned] = torch.arange(owned.numel(), device=k_buf.device)
        sel = sel_slots[rows].long()
        sel_compact = torch.where(sel >= 0, remap[sel.clamp(0, k_buf.shape[0] - 1)], -1)
        r2t_compact = torch.where(r2t >= 0, remap[r2t.clamp(0, k_buf.shape[0] - 1)], -1)
        os.makedirs(self._dump_dir, exist_ok=True)
        torch.save(
            {
                "q": q3.cpu(), "k": k_buf[owned].cpu(), "v": v_buf[owned].cpu(), "out": o.cpu(),
                "qo_indptr": self.qo_indptr.cpu(), "req_to_token": r2t_compact.int().cpu(),
                "prefix_lens": self.prefix_lens.cpu(), "sel_slots": sel_compact.int().cpu(),
                "sel_lens": sel_lens[rows].cpu(), "sm_scale": layer.scaling, "block_size": self.block_size,
                "layer_id": layer.layer_id, "config": cfg.to_json(),
            },
            os.path.join(self._dump_dir, f"sparse_step_pid{os.getpid()}.pt"),
        )
        logger.info("sglang-mage: dumped one sparse step to %s", self._dump_dir)

