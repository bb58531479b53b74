"""Every MAGE option: its default, its validation and its `--mage-*` server flag.

Options reach the scheduler processes as an attribute of SGLang's `ServerArgs` (`server_args.mage_config`),
which is set by the plugin's hooks from either the CLI flags or `sgl.Engine(mage_*=...)` keyword arguments.
The environment variable `SGLANG_MAGE_CONFIG` (a JSON object with the same field names) is read as a base
that flags and keyword arguments override; it is the fallback for launchers that build `ServerArgs` on
their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Mapping

ENV_VAR = "SGLANG_MAGE_CONFIG"
SELECTORS = ("mean", "vote", "fused", "quest", "oracle", "dense")
TOPK_METHODS = ("torch", "radix")
FUSED_PASSES = ("one", "two")
PDL_MODES = ("off", "merge", "full")


class MageConfigError(ValueError):
    """An invalid MAGE option; the message names the flag and the accepted range."""


@dataclasses.dataclass(frozen=True)
class MageConfig:
    # Top-k prefix positions kept per (layer, KV head), on top of the sink and local tokens.
    k: int = 512
    # The first tokens of the context, always kept (attention sinks).
    sink_tokens: int = 16
    # The most recent prefix tokens before the block, always kept.
    local_window: int = 64
    # `mean`: block-average attention probability per KV head (MAGE v2). `vote`: union of per-row top-k,
    # ranked by votes, with the layer-adaptive budget (MAGE v1). `fused`: the first step's exact pass also
    # scores every prefix key by the block-mean query's logit, one pass over K (ops/first_step). `quest`: Quest's page min/max key bounds
    # scored with the block-mean query, re-selected at every step (ops/selection/quest.py). Baselines:
    # `oracle` re-selects the `mean` top-k from every step's own exact attention (an exact pass per step, so
    # slower than dense: it bounds what any first-step selection can reach); `dense` never goes sparse.
    selector: str = "mean"
    # How the k positions are ranked out of the scores: `radix` (ops/selection/radix_topk.py: a radix select
    # over many programs per row, ascending output, no sort) or `torch` (torch.topk, then a sort). On the
    # H200 radix took 30-56 us where torch took 88-96 (batch 1 at 128K, batch 16 at 32K) and tied at 16 x
    # 128K, with the same values (results/first_step_topk.json).
    topk_method: str = "radix"
    # `fused` only: `one` computes exact attention and the block-mean-query scores in one Triton pass over K
    # (ops/first_step); `two` runs FlashInfer's exact attention, then the scores as a GEMV over K
    # (ops/selection/mean_query_scores.py). Same scores; `two` reads K twice but keeps the faster dense kernel:
    # 1.21-1.50x a dense step against 1.45-1.98x for `one` on the H200 (results/first_step*.json), and its
    # first steps replay from the dLLM graph.
    fused_pass: str = "two"
    # `fused` with `two` only: run the scores pass and the top-k on a second CUDA stream beside FlashInfer's
    # exact pass (they read q and the prefix keys, not that pass's output; sglang_mage/side_stream.py). The
    # exact pass runs at ~1.2-1.3 TB/s on these shapes, leaving HBM bandwidth for the GEMV. On the H200 it
    # took the first step from 1.22-1.48x to 1.15-1.35x a dense step (results/raw/first_step_overlap_h200.json);
    # end to end that gain is within run-to-run host spread (run J), and it needs `fused`, so it is opt-in.
    overlap_selection: bool = False
    # Programmatic dependent launch of the sparse step (Hopper and later; ignored elsewhere): `merge` lets the
    # split merge's launch start while the split kernel runs, `full` also starts the split kernel while the
    # kernel before it (the block's KV write) finishes. Each program waits on the device before it reads
    # anything that kernel may write (ops/sparse_attention/kernel.py); the batch plan it reads before that
    # is written before the forward starts. On the H200 `full` was the fastest mode at every point timed
    # (batch 1, k=512: 10.69 -> 9.65 us per layer; results/raw/kernels_merge_unroll_h200.json), and graph
    # and eager engines gave the same tokens with it (results/raw/cuda_graph_check_pdl_full_h200.json).
    pdl: str = "full"
    # Below this prefix length a request's attention stays exact at every step.
    min_context: int = 2048
    # Whether the commit pass (the forward after the last [MASK] is filled, which writes the final KV)
    # uses the cached indices too. Off keeps the committed KV exactly what dense attention gives.
    sparse_commit: bool = True
    # `quest` only: positions per logical page of the min/max key bounds.
    quest_page_size: int = 16
    # `vote` only: per-layer budget floor and cap of the adaptive budget.
    vote_min_k: int = 64
    vote_max_k: int = 2048
    # Testing: run every step after the first through the sparse kernel even when the cached set covers
    # the whole prefix (so k >= context proves slot mapping and layout end to end).
    force_sparse: bool = False
    # Prompt prefill in dLLM mode: tokens of mask-free full prompt blocks one forward may hold (the batch
    # total). None: SGLang's --chunked-prefill-size (else --max-prefill-tokens). 0: one block per forward,
    # as upstream. See `resolve_prefill_chunk_tokens` for the rounding and the cap.
    prefill_chunk_size: int | None = None
    # Also capture a block's first step (exact attention + `mean` selection at a fixed capacity, the context
    # length) in the dLLM CUDA graph, so it replays instead of running eagerly. On by default since the H200
    # runs: greedy tokens equal to eager (cuda_graph_check.json) and faster at every e2e point (e2e.json).
    graph_first_step: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, flag: str, msg: str, value: Any) -> None:
            if not cond:
                raise MageConfigError(f"--mage-{flag}: {msg} (got {value!r})")

        for name in ("k", "sink_tokens", "local_window", "min_context", "vote_min_k", "vote_max_k", "quest_page_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), _flag(name), "must be an integer", value)
        need(1 <= self.k <= 65536, "k", "the budget must be in [1, 65536]", self.k)
        need(0 <= self.sink_tokens <= 4096, "sink-tokens", "must be in [0, 4096]", self.sink_tokens)
        need(0 <= self.local_window <= 65536, "local-window", "must be in [0, 65536]", self.local_window)
        need(self.min_context >= 0, "min-context", "must be >= 0", self.min_context)
        need(self.selector in SELECTORS, "selector", f"must be one of {SELECTORS}", self.selector)
        need(self.topk_method in TOPK_METHODS, "topk-method", f"must be one of {TOPK_METHODS}", self.topk_method)
        need(self.fused_pass in FUSED_PASSES, "fused-pass", f"must be one of {FUSED_PASSES}", self.fused_pass)
        need(self.pdl in PDL_MODES, "pdl", f"must be one of {PDL_MODES}", self.pdl)
        need(1 <= self.vote_min_k <= self.vote_max_k, "vote-min-k", "must be in [1, --mage-vote-max-k]", self.vote_min_k)
        need(self.vote_max_k <= 65536, "vote-max-k", "must be <= 65536", self.vote_max_k)
        need(1 <= self.quest_page_size <= 1024, "quest-page-size", "must be in [1, 1024]", self.quest_page_size)
        for name in ("sparse_commit", "force_sparse", "graph_first_step", "overlap_selection"):
            need(isinstance(getattr(self, name), bool), _flag(name), "must be a boolean", getattr(self, name))
        need(not self.overlap_selection or (self.selector == "fused" and self.fused_pass == "two"),
             "overlap-selection", "needs --mage-selector fused --mage-fused-pass two (the other selectors' scores "
             "need the exact pass's output)", (self.selector, self.fused_pass))
        chunk = self.prefill_chunk_size
        need(chunk is None or (isinstance(chunk, int) and not isinstance(chunk, bool)), "prefill-chunk-size",
             "must be an integer (0 turns chunked prompt prefill off)", chunk)
        need(chunk is None or chunk >= 0, "prefill-chunk-size", "must be >= 0 (0 turns chunked prompt prefill off)",
             chunk)

    @property
    def max_selected(self) -> int:
        """Capacity of one (layer, KV head) row of the index cache: the largest set any selector keeps."""
        topk = self.vote_max_k if self.selector == "vote" else self.k
        return topk + self.sink_tokens + self.local_window

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "MageConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MageConfigError(f"unknown MAGE option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_env(cls) -> dict[str, Any]:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return {}
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as e:
            raise MageConfigError(f"{ENV_VAR} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise MageConfigError(f"{ENV_VAR} must hold a JSON object")
        return values


def resolve_prefill_chunk_tokens(cfg: MageConfig | None, server_args: Any, block_size: int) -> int:
    """Token budget of one chunked dLLM prompt-prefill forward (all requests together); 0 means off.

    An explicit size is capped at `--chunked-prefill-size` when that is set: SGLang's eager runner sizes
    its static input buffers to max(chunked_prefill_size, max_running_requests x block_size), so a larger
    forward would not fit them. Without it the buffers span the whole KV pool and `--max-prefill-tokens`
    is the default budget. The result is a multiple of the block size, and at least one block.
    """
    size = None if cfg is None else cfg.prefill_chunk_size
    if size == 0:
        return 0
    cap = getattr(server_args, "chunked_prefill_size", None)
    cap = cap if cap is not None and cap > 0 else None
    if size is None:
        size = cap if cap is not None else getattr(server_args, "max_prefill_tokens", None)
    elif cap is not None:
        size = min(size, cap)
    if size is None or size <= 0:
        return 0
    return max(block_size, size // block_size * block_size)


def _flag(field_name: str) -> str:
    return field_name.replace("_", "-")


KWARG_PREFIX = "mage_"


def pop_engine_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove `mage_*` keyword arguments (as given to `sgl.Engine` / `ServerArgs`) and return them by field."""
    return {key[len(KWARG_PREFIX):]: kwargs.pop(key) for key in list(kwargs) if key.startswith(KWARG_PREFIX)}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the `--mage-*` flags; idempotent (a parser that already has them is left alone)."""
    if any(a.dest == "mage_k" for a in parser._actions):
        return
    d = MageConfig()
    g = parser.add_argument_group("MAGE sparse attention (sglang-mage, with --attention-backend mage)")
    g.add_argument("--mage-k", type=int, default=None, help=f"Top-k KV positions kept per layer and KV head (default {d.k}).")
    g.add_argument("--mage-sink-tokens", type=int, default=None, help=f"First context tokens always kept (default {d.sink_tokens}).")
    g.add_argument("--mage-local-window", type=int, default=None, help=f"Most recent prefix tokens always kept (default {d.local_window}).")
    g.add_argument("--mage-selector", choices=SELECTORS, default=None,
                   help="mean: block-average attention probability (MAGE v2); vote: union of per-row top-k ranked by "
                        f"votes with the layer-adaptive budget (MAGE v1). Default {d.selector}.")
    g.add_argument("--mage-topk-method", choices=TOPK_METHODS, default=None,
                   help="Top-k of the selection scores: torch (torch.topk + sort) or radix (a Triton radix select "
                        f"over many programs per row, output already ascending). Default {d.topk_method}.")
    g.add_argument("--mage-fused-pass", choices=FUSED_PASSES, default=None,
                   help="fused selector: one (exact attention and block-mean-query scores in one Triton pass) or two "
                        f"(FlashInfer's exact attention, then the scores as a pass over K). Default {d.fused_pass}.")
    g.add_argument("--mage-overlap-selection", action=argparse.BooleanOptionalAction, default=None,
                   help="fused two-pass selector: compute the scores and the top-k on a second CUDA stream beside "
                        f"the exact pass (default {d.overlap_selection}).")
    g.add_argument("--mage-pdl", choices=PDL_MODES, default=None,
                   help="Programmatic dependent launch of the sparse step on Hopper+: merge (the split merge starts "
                        "while the split kernel runs), full (the split kernel also starts while the KV write ends), "
                        f"or off. Default {d.pdl}.")
    g.add_argument("--mage-min-context", type=int, default=None,
                   help=f"Prefix length below which attention stays exact (default {d.min_context}).")
    g.add_argument("--mage-sparse-commit", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Use the cached indices for the commit pass too (default {d.sparse_commit}).")
    g.add_argument("--mage-quest-page-size", type=int, default=None,
                   help=f"quest: positions per page of the min/max key bounds (default {d.quest_page_size}).")
    g.add_argument("--mage-vote-min-k", type=int, default=None, help=f"vote: per-layer budget floor (default {d.vote_min_k}).")
    g.add_argument("--mage-vote-max-k", type=int, default=None, help=f"vote: per-layer budget cap (default {d.vote_max_k}).")
    g.add_argument("--mage-force-sparse", action="store_true", default=None,
                   help="Testing: send every step after the first through the sparse kernel, even when exact.")
    g.add_argument("--mage-graph-first-step", action=argparse.BooleanOptionalAction, default=None,
                   help="Also replay a block's first step (exact attention + mean selection at the "
                        f"context-length capacity) from the dLLM CUDA graph (default {d.graph_first_step}).")
    g.add_argument("--mage-prefill-chunk-size", type=int, default=None,
                   help="dLLM prompt prefill: tokens of mask-free prompt blocks per forward, rounded down to whole "
                        "blocks (default: --chunked-prefill-size, else --max-prefill-tokens; capped at "
                        "--chunked-prefill-size; 0: one block per forward, as SGLang does).")


def values_from_namespace(args: argparse.Namespace) -> dict[str, Any]:
    """The `--mage-*` values the user set on the command line (None means not given)."""
    out = {}
    for f in dataclasses.fields(MageConfig):
        value = getattr(args, KWARG_PREFIX + f.name, None)
        if value is not None:
            out[f.name] = value
    return out


def resolve(explicit: Mapping[str, Any]) -> MageConfig:
    """Environment base, overridden by explicit flags / keyword arguments; validated."""
    values = MageConfig.from_env()
    values.update(explicit)
    return MageConfig.from_mapping(values)
