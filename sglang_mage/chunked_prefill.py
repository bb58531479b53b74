"""Chunked prompt prefill for dLLM requests served with `--attention-backend mage` (issue 4).

SGLang 0.5.14 advances every dLLM request by one block (B tokens) per forward, the prompt included. With
mage, the prompt's mask-free full blocks are prefilled in chunks of up to C tokens per forward (the batch
total; C from `--mage-prefill-chunk-size`, see `config.resolve_prefill_chunk_tokens`). The prompt tail that
does not fill a block still joins the first [MASK] block, as upstream. All scheduler-side changes are the
AROUND hooks below. Each calls SGLang's original unchanged unless the server runs
`--attention-backend mage` with C > 0, so other backends never see them.

| hook | target | why | what it changes |
|---|---|---|---|
| H1 | `dllm.mixin.scheduler.SchedulerDllmMixin._process_dllm_batches` | upstream admission caps every extend at B (`PrefillAdder._add_dllm_req` / `add_dllm_staging_req`); here, after admission and before any allocation, the whole batch is known | if no admitted request has a [MASK] in its block (LowConfidence/JointThreshold index request i as tokens [i*B, (i+1)*B) as soon as one does), grows each request whose extend is exactly B over its following mask-free full blocks, stopping before a block that holds mask_id, within the adder's memory budgets and a batch total of C |
| H2 | `model_executor.forward_batch_info.ForwardBatch.init_new` | the dLLM override builds exactly B positions per request from `dllm_block_offset` | for DLLM_EXTEND batches, positions are arange(prefix, prefix + extend) per request (same dtype and device); equal to upstream for single-block extends |
| H3 | `dllm.mixin.req.ReqDllmMixin._init_fill_ids_for_dllm` | upstream advances `dllm_block_offset` by a fixed B per round | after a round, `dllm_block_offset = len(prefix_indices)` (the previous `fill_len` once the scheduler has cached the request), which upstream's +B equals whenever extends are B |
| H4 | `layers.logits_processor.LogitsProcessor._get_dllm_logits` | full-vocab logits for every extend token (and an fp32 copy) are never read on the mask-free fast path: a few GB for an 8K chunk | a batch whose longest extend exceeds B (only an all-mask-free chunked batch) gets an empty `LogitsProcessorOutput` |

Targets are under `sglang.srt.`; each is patched right after its module's first import
(`compat.hook_when_imported`), as those modules pull in about a thousand others. All four can go once
SGLang's dLLM scheduler prefills prompts in chunks itself (with block-causal attention).

What the attention side can rely on: a DLLM_EXTEND batch holding any extend longer than B holds no
mask_id token at all; every request in it starts at a multiple of B (its prefix) and extends by a positive
multiple of B, and the batch total is at most C. Such a batch may mix single-block and multi-block
requests. Every batch with a [MASK] keeps upstream's B tokens per request.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from . import BACKEND_NAME
from .config import resolve_prefill_chunk_tokens

_SRT = "sglang.srt"


# Benchmarks only (benchmarks/bench_e2e.py): apply the plugin's scheduler-side changes (this chunked prompt
# prefill, and radix_rounds' incremental caching) to any backend's server, so baselines run the same
# scheduler. Chunking first: SGLang alone needs
# one forward per 32-token block, and its 1 x 128K prompt had not finished prefilling after 4 minutes on the
# H200 (results/raw/e2e_flashinfer_prefill_stall_h200.log), so the flashinfer baseline could not be timed.
# Another backend computes a chunk's attention bidirectionally, not block-causally: its prompt KV is not the
# model's. With dummy weights that is irrelevant to timing, and the blocks after the prompt run unchanged.
BENCH_ANY_BACKEND_ENV = "SGLANG_MAGE_BENCH_ANY_BACKEND"


def scheduler_fixes_on(server_args: Any) -> bool:
    """Whether this server's scheduler runs the plugin's changes: it serves mage, or a benchmark asked."""
    if server_args is None:
        return False
    return getattr(server_args, "attention_backend", None) == BACKEND_NAME or os.environ.get(BENCH_ANY_BACKEND_ENV) == "1"


def chunk_tokens(server_args: Any, block_size: int) -> int:
    """C for this server, or 0 when chunked prompt prefill is off (another backend, or the option is 0)."""
    if not scheduler_fixes_on(server_args):
        return 0
    return resolve_prefill_chunk_tokens(getattr(server_args, "mage_config", None), server_args, block_size)


def holds_prompt_chunk(extend_lens: Any, block_size: int) -> bool:
    """Whether a DLLM_EXTEND batch with these extend lengths is a chunked prompt forward: only those extend a
    request by more than one block (upstream's batches extend each by at most B)."""
    return bool(extend_lens) and max(int(n) for n in extend_lens) > block_size


def chunking_on(server_args: Any) -> bool:
    # Rounding to blocks never turns a positive size into 0, so the block size does not matter here.
    return chunk_tokens(server_args, 1) > 0


def _global_server_args() -> Any:
    from sglang.srt.server_args import get_global_server_args

    try:
        return get_global_server_args()
    except ValueError:  # not set in this process: nothing is served here
        return None


# H1 ---------------------------------------------------------------------------------------------------------


def grow_prompt_extends(adder: Any, reqs: list, block_size: int, mask_id: int, budget: int) -> int:
    """Extend the admitted single-block prompt extends of `reqs` over their next mask-free full blocks.

    Returns the tokens added. Nothing changes unless every request extends exactly one block from a
    block boundary and no block holds mask_id: a batch with a [MASK] block (trap T1: a cache hit can put
    one next to prompt blocks) must keep one block per request for the dLLM algorithms' indexing.
    """
    for req in reqs:
        prefix = len(req.prefix_indices)
        if req.extend_input_len != block_size or prefix % block_size or req.fill_len != prefix + block_size:
            return 0
        if mask_id in req.full_untruncated_fill_ids[prefix : req.fill_len]:
            return 0
    left = budget - block_size * len(reqs)
    added = 0
    for req in reqs:
        if left < block_size:
            break
        # As PrefillAdder books an extend: KV for the paged length plus one page of overhead, and the paged
        # length against --max-prefill-tokens.
        room = min(int(min(adder.rem_total_tokens, adder.cur_rem_tokens)) - adder.page_size,
                   int(adder.rem_input_tokens))
        real_len = len(req.origin_input_ids) + len(req.output_ids)
        extra = max(0, min(real_len - req.fill_len, left, room)) // block_size * block_size
        window = req.full_untruncated_fill_ids[req.fill_len : req.fill_len + extra]
        if mask_id in window:  # trap T7: a prompt token equal to mask_id makes its block a decode block
            extra = window.index(mask_id) // block_size * block_size
        while extra > 0 and adder.ceil_paged_tokens(extra) > room:
            extra -= block_size
        if extra <= 0:
            continue
        # Keeps the adder's memory offsets and its prefill metrics (log_input_tokens) true.
        adder._update_prefill_budget(0, extra, 0, req.retracted_stain)
        req.extend_input_len += extra
        req.fill_len += extra
        left -= extra
        added += extra
    return added


def process_dllm_batches_around(original: Any, self: Any, adder: Any) -> Any:
    forward_mode = original(self, adder)
    dllm_config = getattr(self, "dllm_config", None)
    if adder.can_run_list and dllm_config is not None:
        budget = chunk_tokens(self.server_args, dllm_config.block_size)
        if budget:
            grow_prompt_extends(adder, adder.can_run_list, dllm_config.block_size, dllm_config.mask_id, budget)
    return forward_mode


# H2 ---------------------------------------------------------------------------------------------------------


def extend_positions(prefix_lens: list, extend_lens: list) -> Any:
    import torch

    return torch.cat([torch.arange(p, p + n, dtype=torch.int64) for p, n in zip(prefix_lens, extend_lens)])


def forward_batch_init_new_around(original: Any, cls: Any, batch: Any, model_runner: Any, *args: Any,
                                  **kwargs: Any) -> Any:
    ret = original(cls, batch, model_runner, *args, **kwargs)
    dllm_config = getattr(batch, "dllm_config", None)
    if dllm_config is None or ret.positions is None or not ret.forward_mode.is_dllm_extend():
        return ret
    if not chunk_tokens(model_runner.server_args, dllm_config.block_size):
        return ret
    positions = extend_positions(list(batch.prefix_lens), list(batch.extend_lens))
    ret.positions = positions.to(ret.positions.dtype).to(ret.positions.device, non_blocking=True)
    return ret


# H3 ---------------------------------------------------------------------------------------------------------


def init_fill_ids_around(original: Any, self: Any) -> Any:
    previous_fill_len = self.fill_len
    out = original(self)
    if (previous_fill_len and self.dllm_config is not None
            and chunk_tokens(_global_server_args(), self.dllm_config.block_size)):
        self.dllm_block_offset = len(self.prefix_indices)
    return out


# H4 ---------------------------------------------------------------------------------------------------------

# Block size per ServerArgs object (kept alive next to it, so that an id is never reused while cached):
# the logits processor sees no DllmConfig, and building one reads the model config.
_block_sizes: dict[int, tuple[Any, int]] = {}


def block_size_for(server_args: Any) -> int:
    hit = _block_sizes.get(id(server_args))
    if hit is None or hit[0] is not server_args:
        from sglang.srt.dllm.config import DllmConfig

        hit = (server_args, DllmConfig.from_server_args(server_args).block_size)
        _block_sizes[id(server_args)] = hit
    return hit[1]


def get_dllm_logits_around(original: Any, self: Any, hidden_states: Any, lm_head: Any, logits_metadata: Any,
                           *args: Any, **kwargs: Any) -> Any:
    lens = getattr(logits_metadata, "extend_seq_lens_cpu", None)
    server_args = _global_server_args()
    if lens and chunking_on(server_args) and holds_prompt_chunk(lens, block_size_for(server_args)):
        from sglang.srt.layers.logits_processor import LogitsProcessorOutput

        return LogitsProcessorOutput(next_token_logits=None, full_logits=None)
    return original(self, hidden_states, lm_head, logits_metadata, *args, **kwargs)


# Registration -----------------------------------------------------------------------------------------------


class Hook(NamedTuple):
    module: str
    target: str
    function: Any


HOOKS = (
    Hook(f"{_SRT}.dllm.mixin.scheduler", "SchedulerDllmMixin._process_dllm_batches", process_dllm_batches_around),
    Hook(f"{_SRT}.model_executor.forward_batch_info", "ForwardBatch.init_new", forward_batch_init_new_around),
    Hook(f"{_SRT}.dllm.mixin.req", "ReqDllmMixin._init_fill_ids_for_dllm", init_fill_ids_around),
    Hook(f"{_SRT}.layers.logits_processor", "LogitsProcessor._get_dllm_logits", get_dllm_logits_around),
)


def register_chunked_prefill_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookType

    from .compat import hook_when_imported

    for hook in HOOKS:
        hook_when_imported(hook.module, f"{hook.module}.{hook.target}", hook.function, HookType.AROUND)
