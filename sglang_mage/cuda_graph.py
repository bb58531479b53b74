"""CUDA graphs for mage's DLLM_EXTEND steps (SGLang's dLLM decode graph, `DecodeCudaGraphRunner`).

A sparse step is ~3 small kernels per layer (KV write, sparse attention, split merge) plus the model's own,
so eager sparse steps are bound by launches; one graph replay per step removes that. Sparse steps replay,
and with --mage-graph-first-step (the default; the `mean` selector, and `fused` with --mage-fused-pass two)
so does a block's first forward (exact attention + selection); prompt prefill, dense forwards and other
selectors' first steps stay eager, exactly as with the graph off. A first step replays from a second graph per batch size: FlashInfer's own
captured DLLM_EXTEND prefill (its graph state and planning, as with --attention-backend flashinfer) for the
exact pass, then scoring and top-k over a fixed width, the context length, so that nothing in it depends on
a host value. hooks.py's capture_one_shape_around captures that variant and resolve_graph_variant_around
picks it at replay.

How SGLang 0.5.14 dispatches a forward (`ModelRunner._forward_raw`): it asks
`DecodeCudaGraphRunner.can_run_graph(fb)` once; if True, `execute` -> `load_batch` copies the batch into
static buffers (padded to a captured bs) and calls `init_forward_metadata_out_graph(view)` on the backend,
then replays; if False, the eager runner copies the batch and calls `init_forward_metadata(copy)`. The
planner (`MageIndexCache.plan`) must run once per forward and before that choice, because the choice
depends on its phase and it mutates the per-slot keys at a block's first forward. So the `can_run_graph`
hook (hooks.can_run_graph_around) calls `mage_graph_gate`, which plans and parks the decision; whichever
path then runs takes it (`take_decision`). With no graph runner (graph off) nothing is parked and
`init_forward_metadata` plans itself.

The graph path's metadata is two static buffers, filled by the same builder as the eager path
(`fill_block_metadata`): qo_indptr [max_bs+1] and prefix_lens [max_bs]. Under the graph every request
extends by exactly B tokens, so prefix = seq_len - B. Padding rows (SGLang pads to the next captured bs)
get req_pool_index 0, seq_len B, out_cache_loc 0 from SGLang's registry, hence prefix 0: the sparse kernel
reads index-cache row 0 (the pool's padding row, never allocated to a request, so its lengths stay 0) and
attends the B tokens at req_to_token[0, :B], all slot 0, the KV pool's padding slot. Finite, and discarded.
A first-step replay's padding rows select nothing (prefix 0) into that same row.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from .index_cache import Phase, StepPlan
from .ops.sparse_attention import alloc_batch_workspace

logger = logging.getLogger("sglang_mage")

# `quest` re-scores pages on the host-built bounds at every step and `oracle` runs an exact pass per step;
# both need per-batch host values, so their sparse steps stay eager. `dense` never goes sparse.
GRAPH_SELECTORS = frozenset({"mean", "fused", "vote"})
# --mage-graph-first-step: selectors whose first step (FlashInfer exact pass + scoring + top-k) has static
# shapes once the scores span a fixed capacity. `vote` sizes its budget per layer on the host; `fused` only
# in its two-pass form (first_step_capturable), the one-pass Triton kernel has not been checked under replay.
GRAPH_FIRST_SELECTORS = frozenset({"mean", "fused"})


def first_step_capturable(cfg) -> bool:
    """Whether --mage-graph-first-step can capture this configuration's first steps."""
    return cfg.selector in GRAPH_FIRST_SELECTORS and (cfg.selector != "fused" or cfg.fused_pass == "two")
# SGLang keys captured graphs by (bs, stream, variant label); first-step graphs are a second variant per bs.
FIRST_STEP_VARIANT = "mage_first_step"


@dataclasses.dataclass
class ForwardDecision:
    """Everything decided on the host for one forward batch, before SGLang picks graph or eager."""

    plan: StepPlan
    prefix_lens: tuple = ()
    slots: tuple = ()
    block_causal: bool = False
    graphable: bool = False
    # The model runner's forward_pass_id when the graph gate parked it: a second gate call for the same
    # forward reuses the decision, one for another forward means a parked decision was never taken.
    token: Any = None

    @property
    def key(self) -> tuple:
        return (self.slots, self.prefix_lens)

    @property
    def max_prefix(self) -> int:
        return max(self.prefix_lens, default=0)


def fill_block_metadata(
    qo_indptr: torch.Tensor, prefix_lens: torch.Tensor, extend_lens: torch.Tensor, prefix_src: torch.Tensor
) -> None:
    """The sparse path's metadata for n = len(extend_lens) requests: qo_indptr[:n+1] (int32 prefix sums of
    the extend lengths) and prefix_lens[:n] (int32). Device ops only, no host sync: the eager path passes
    fresh tensors, capture and replay pass slices of the static buffers."""
    n = extend_lens.shape[0]
    qo_indptr[:1].zero_()
    torch.cumsum(extend_lens, dim=0, out=qo_indptr[1 : n + 1])
    prefix_lens[:n].copy_(prefix_src)


def graph_eligible(plan: StepPlan, selector: str, extend_lens, block_size: int, first_capacity: Optional[int] = None,
                   max_prefix: int = 0) -> bool:
    """Whether a graph captured for bs x B tokens computes this forward: a sparse step of a host-free selector,
    or, with first-step graphs captured (`first_capacity`: their scores' fixed width), a first step whose
    prefixes fit that width."""
    if not extend_lens or any(n != block_size for n in extend_lens):
        return False
    if plan.phase == Phase.SPARSE:
        return selector in GRAPH_SELECTORS
    return (plan.phase == Phase.FIRST and first_capacity is not None and selector in GRAPH_FIRST_SELECTORS
            and max_prefix <= first_capacity)


class MageCudaGraphMixin:
    """Graph side of MageAttnBackend (listed before FlashInferAttnBackend among its bases). The backend
    provides `decide(fb) -> ForwardDecision`, `block_size`, `index_cache`, `workspace`, `mage`."""

    graph_mode: str = "eager"  # "eager" | "capture" | "replay": host work and counters run in eager only
    _pending: Optional[ForwardDecision] = None
    _cg_max_bs: Optional[int] = None
    # --mage-graph-first-step: the scores' fixed width once first-step graphs exist (hooks.capture_one_shape_around
    # captures them), and the variant label the replay of the current forward uses (None: the sparse graphs).
    graph_first_capacity: Optional[int] = None
    capture_first_step: bool = False
    graph_variant: Optional[str] = None

    # ---- deciding, once per forward ------------------------------------------------------------------------
    def mage_graph_gate(self, forward_batch, token: Any = None) -> bool:
        """Plan this DLLM_EXTEND batch and park the decision for whichever path runs it; True if it may
        replay a graph."""
        pending = self._pending
        if pending is not None:
            if token is not None and pending.token == token:
                return pending.graphable
            raise RuntimeError(
                "sglang-mage: a planned dLLM forward was never run (its decision is still parked); the "
                "index-cache state is no longer known. Please report this with the SGLang version."
            )
        decision = self.decide(forward_batch)
        decision.token = token
        decision.graphable = decision.graphable and self._cg_max_bs is not None and not self._dump_pending(decision)
        self._pending = decision
        return decision.graphable

    def take_decision(self, forward_batch) -> ForwardDecision:
        """The eager path's decision: the parked one (checked against this batch), else planned now."""
        decision, self._pending = self._pending, None
        if decision is None:
            return self.decide(forward_batch)
        dllm = forward_batch.forward_mode.is_dllm_extend()
        got = tuple(forward_batch.extend_prefix_lens_cpu) if dllm else forward_batch.forward_mode
        if got != decision.prefix_lens:
            raise RuntimeError(f"sglang-mage: the planned batch (prefixes {decision.prefix_lens}) is not the "
                               f"one that runs ({got})")
        return decision

    def _take_replay_decision(self, view) -> ForwardDecision:
        decision, self._pending = self._pending, None
        if decision is None or not decision.graphable:
            raise RuntimeError("sglang-mage: a CUDA graph replay without a graph-eligible sparse plan "
                               f"({None if decision is None else decision.plan})")
        # SGLang's replay view has no extend lengths; the host copy of seq_lens is enough to check the batch.
        raw = view.batch_size - (getattr(view, "num_padding", 0) or 0)
        if view.seq_lens_cpu is not None:
            got = tuple(int(s) - self.block_size for s in view.seq_lens_cpu[:raw].tolist())
            if got != decision.prefix_lens:
                raise RuntimeError(f"sglang-mage: the planned batch (prefixes {decision.prefix_lens}) is not the "
                                   f"one replayed (prefixes {got})")
        return decision

    def _dump_pending(self, decision: ForwardDecision) -> bool:
        """$SGLANG_MAGE_DUMP_DIR saves one sparse step from the host (backend._maybe_dump): that step runs eagerly."""
        cfg = self.mage
        return bool(self._dump_dir) and not self._dumped and (
            decision.max_prefix > cfg.k + cfg.sink_tokens + cfg.local_window
        )

    # ---- SGLang's graph interface ------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None):
        """Static buffers for bs <= max_bs. FlashInfer's own graph state (kv indices of max_num_tokens x
        context length, its wrappers) is allocated only for first-step graphs, whose exact pass is FlashInfer's
        captured DLLM_EXTEND prefill; sparse graphs call no FlashInfer kernel."""
        if max_num_tokens != max_bs * self.block_size:
            raise RuntimeError(f"sglang-mage: the dLLM graph holds {max_num_tokens} tokens for bs {max_bs}, "
                               f"not bs x block size {self.block_size}")
        device = self.index_cache.slots.device
        self._cg_qo_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=device)
        self._cg_prefix_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self._cg_extend_lens = torch.full((max_bs,), self.block_size, dtype=torch.int32, device=device)
        if max_bs > self.workspace_reqs:
            # Captured sizes can exceed max_running_requests (TP alignment pads them): size for the largest.
            self.workspace_reqs = max_bs
            self.workspace = alloc_batch_workspace(max_bs, *self.workspace_shape, device)
        self._cg_max_bs = max_bs
        if self.mage.graph_first_step and first_step_capturable(self.mage):
            super().init_cuda_graph_state(max_bs, max_num_tokens, kv_indices_buf)
            # A prefix never exceeds the context length; scores and top-k span that width in every replay.
            self.graph_first_capacity = int(self.max_context_len)
        elif self.mage.graph_first_step:
            logger.info("sglang-mage: --mage-graph-first-step covers the mean selector and fused with "
                        "--mage-fused-pass two; --mage-selector %s (fused pass %s) keeps its first steps eager",
                        self.mage.selector, self.mage.fused_pass)
        if self.mage.selector not in GRAPH_SELECTORS:
            logger.info("sglang-mage: --mage-selector %s does host work at every sparse step; its steps run "
                        "eagerly and the captured dLLM graphs stay unused", self.mage.selector)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Capture (SGLang's dummy batch) and replay (its padded view of the live batch) of the sparse path, and
        of the first-step path when first-step graphs exist; `mage_graph_gate` lets only those batches replay."""
        if not forward_batch.forward_mode.is_dllm_extend():
            raise RuntimeError(f"sglang-mage: no CUDA graph for {forward_batch.forward_mode} forwards")
        bs = forward_batch.batch_size
        actual = getattr(forward_batch, "actual_forward_mode", None)
        if in_capture:
            first = self.capture_first_step
            self.plan = StepPlan(Phase.FIRST if first else Phase.SPARSE, "CUDA graph capture")
            self.graph_mode = "capture"
        elif actual is not None and actual.is_idle():
            # An idle DP rank replays the graph on padding rows only to join the collectives; nothing was planned.
            self.plan = StepPlan(Phase.SPARSE, "idle batch (padding rows only)")
            self.graph_mode = "replay"
        else:
            self.plan = self._take_replay_decision(forward_batch).plan
            self.graph_mode = "replay"
            if self.plan.phase == Phase.FIRST:
                self.index_cache.stats.graph_first_forwards += 1
            else:
                self.index_cache.stats.graph_sparse_forwards += 1
        self.block_causal = False
        first = self.plan.phase == Phase.FIRST
        self.graph_variant = FIRST_STEP_VARIANT if first else None
        if first:
            # FlashInfer's own capture/replay planning of its DLLM_EXTEND prefill wrappers (host work, as with
            # --attention-backend flashinfer); selection then spans the fixed capacity.
            super().init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
        # The sparse path never reads it, and knowing the real maximum would cost a host sync.
        self.max_prefix = self.graph_first_capacity if first else 0
        qo_indptr, prefix_lens = self._cg_qo_indptr[: bs + 1], self._cg_prefix_lens[:bs]
        fill_block_metadata(qo_indptr, prefix_lens, self._cg_extend_lens[:bs],
                            forward_batch.seq_lens[:bs] - self.block_size)
        self.qo_indptr, self.prefix_lens = qo_indptr, prefix_lens

    def init_forward_metadata_in_graph(self, forward_batch):
        """Nothing: the buffers are written before replay, outside the graph."""
