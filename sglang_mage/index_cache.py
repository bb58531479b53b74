"""The per-request MAGE index cache and the host-side step planner.

Memory is allocated once, at backend start, and bounded:

    rows x layers x kv_heads x (max_selected x 4 + 4) bytes

where rows = SGLang's request-pool size + 1 (row 0 is the pool's padding row) and max_selected =
k + sink_tokens + local_window (vote: vote_max_k + sink_tokens + local_window). A row is addressed by the
request's pool slot (`req_pool_idx`), so no lookup table sits on the GPU path.

Step detection does not depend on the dLLM algorithm. Every request in a dLLM batch starts its block in
the same round, and within a block the prefix length does not change. The planner keeps, per pool slot,
the key (generation, prefix_len):
- a forward whose key differs from the stored one is a block's first forward: exact attention, and
  selection if the block still holds [MASK] (a mask-free prompt block is plain exact prefill);
- the same key again is a later denoising step or the commit pass: sparse.
The generation of a slot is bumped when its request is freed, so a reused slot never matches old keys.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Callable, Optional, Sequence

import torch

from .config import MageConfig


class Phase(enum.Enum):
    DENSE = "dense"  # exact FlashInfer attention, nothing selected
    FIRST = "first"  # exact FlashInfer attention with LSE, then selection into the cache
    SPARSE = "sparse"  # Triton sparse kernel over the cached slots plus the block


@dataclasses.dataclass
class StepPlan:
    phase: Phase
    reason: str


@dataclasses.dataclass
class MageStats:
    dense_forwards: int = 0
    first_forwards: int = 0
    sparse_forwards: int = 0
    # Of those, replayed from a CUDA graph (sglang_mage.cuda_graph); their layers never reach Python, so
    # sparse_layer_calls counts the layers of eager sparse forwards only.
    graph_sparse_forwards: int = 0
    # First steps replayed from a first-step graph (--mage-graph-first-step); their layers skip Python too.
    graph_first_forwards: int = 0
    sparse_layer_calls: int = 0
    select_layer_calls: int = 0
    slots_invalidated: int = 0
    occupancy: int = 0
    # Chunked prompt prefill (sglang_mage.chunked_prefill): forwards that held a multi-block extend.
    block_causal_forwards: int = 0
    block_causal_tokens: int = 0


class MageIndexCache:
    def __init__(self, rows: int, num_layers: int, num_kv_heads: int, cfg: MageConfig, device: str | torch.device):
        self.cfg = cfg
        self.rows, self.num_layers, self.num_kv_heads = rows, num_layers, num_kv_heads
        self.capacity = cfg.max_selected
        self.slots = torch.zeros((rows, num_layers, num_kv_heads, self.capacity), dtype=torch.int32, device=device)
        self.lens = torch.zeros((rows, num_layers, num_kv_heads), dtype=torch.int32, device=device)
        self.generation = [0] * rows
        self.keys: dict[int, tuple[int, int]] = {}
        # Slots whose request must stay exact after its first step (prefix above the budget but below
        # --mage-min-context): the batch they are in runs dense. A prefix within the budget needs no such
        # care: selection keeps all of it and the sparse kernel is exact.
        self.exact_slots: set[int] = set()
        self.stats = MageStats()
        self.stats_path: Optional[str] = os.environ.get("SGLANG_MAGE_STATS_PATH")

    @staticmethod
    def nbytes_for(rows: int, num_layers: int, num_kv_heads: int, cfg: MageConfig) -> int:
        return rows * num_layers * num_kv_heads * (cfg.max_selected * 4 + 4)

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * 4 + self.lens.numel() * 4

    def layer_view(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided [rows, kv_heads, capacity] slots and [rows, kv_heads] lengths of one layer."""
        return self.slots[:, layer_id], self.lens[:, layer_id]

    def occupancy(self) -> int:
        return len(self.keys)

    def invalidate(self, slot: Optional[int]) -> None:
        """Drop a slot's entry (None: every slot, as on a cache flush)."""
        targets = range(self.rows) if slot is None else (slot,)
        for s in targets:
            self.generation[s] += 1
            if self.keys.pop(s, None) is not None:
                self.stats.slots_invalidated += 1
            self.exact_slots.discard(s)
        if slot is None:
            self.lens.zero_()
        else:
            self.lens[slot].zero_()
        self.write_stats()

    def _within_budget(self, prefix_len: int) -> bool:
        """The whole prefix fits in the selected set: selection keeps all of it, so the sparse kernel is exact."""
        cfg = self.cfg
        return prefix_len <= cfg.k + cfg.sink_tokens + cfg.local_window

    def _needs_dense(self, prefix_len: int) -> bool:
        """Above the budget but below --mage-min-context: must stay exact, which only dense attention gives."""
        return not self.cfg.force_sparse and not self._within_budget(prefix_len) and prefix_len < self.cfg.min_context

    def _all_within_budget(self, prefix_lens: Sequence[int]) -> bool:
        # Exact either way; dense FlashInfer is the cheaper way (unless sparse is forced, for testing).
        return not self.cfg.force_sparse and all(self._within_budget(p) for p in prefix_lens)

    def plan(self, slots: Sequence[int], prefix_lens: Sequence[int], has_mask: Callable[[], bool]) -> StepPlan:
        """Decide the phase of one DLLM_EXTEND forward. `has_mask` is called (it syncs with the GPU) at most
        once, and only at a block's first forward or, with sparse commit off, at later forwards."""
        keys = [(self.generation[s], p) for s, p in zip(slots, prefix_lens)]
        is_new = [self.keys.get(s) != key for s, key in zip(slots, keys)]
        if any(is_new):
            if not has_mask():
                self.stats.dense_forwards += 1
                return StepPlan(Phase.DENSE, "mask-free prompt block")
            for s, key in zip(slots, keys):
                self.keys[s] = key
                self.exact_slots.discard(s)
                if self._needs_dense(key[1]):
                    self.exact_slots.add(s)
            if self._all_within_budget(prefix_lens) or all(s in self.exact_slots for s in slots):
                self.stats.dense_forwards += 1
                return StepPlan(Phase.DENSE, "first step; every prefix within the budget or below --mage-min-context")
            self.stats.first_forwards += 1
            return StepPlan(Phase.FIRST, "first step of a block")
        if self._all_within_budget(prefix_lens):
            self.stats.dense_forwards += 1
            return StepPlan(Phase.DENSE, "every prefix within the budget")
        if any(s in self.exact_slots for s in slots):
            # A request that must stay exact shares the batch; the others wait for it at dense cost.
            self.stats.dense_forwards += 1
            return StepPlan(Phase.DENSE, "a request below --mage-min-context")
        if not self.cfg.sparse_commit and not has_mask():
            self.stats.dense_forwards += 1
            return StepPlan(Phase.DENSE, "commit pass (--no-mage-sparse-commit)")
        self.stats.sparse_forwards += 1
        return StepPlan(Phase.SPARSE, "later step of a block")

    def write_stats(self) -> None:
        """Mirror the counters to $SGLANG_MAGE_STATS_PATH (if set) for tests and monitoring: the scheduler
        runs in another process than the one that launched the engine."""
        self.stats.occupancy = self.occupancy()
        if not self.stats_path:
            return
        tmp = f"{self.stats_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self.stats), f)
        os.replace(tmp, self.stats_path)
