"""Fast-dLLM v2 (`Fast_dLLM_QwenForCausalLM`, Qwen2.5-based): denoising parameters, token shift, sub-block
schedule and registration. This module stays light (torch only); the SGLang model class lives in
fast_dllm_v2_model.py and the dLLM algorithm in fast_dllm_v2_algorithm.py, both imported lazily.

What the reference does (read: the HF remote code `modeling.py` of Efficient-Large-Model/Fast_dLLM_v2_7B as
mirrored in github Satgoy152/DualDiffusion `FastDLLM_inferencing/Fast_dLLM_v2_7B/modeling.py`; the demo
`v2/run_chatbot.py` of NVlabs/Fast-dLLM and the HF model card call `generate(small_block_size=8, threshold=0.9)`):

* Architecture: plain Qwen2 (q/k/v bias, no q/k norm, RoPE, SwiGLU, RMSNorm); config class
  `Fast_dLLM_QwenConfig` (model_type `Fast_dLLM_Qwen`) adds `bd_size` (32), the block size.
* Attention at inference (`eval_block_diff_mask`): query block >= key block, blocks of `block_size` aligned
  to absolute positions: bidirectional inside a block, causal across blocks, the same pattern as SDAR. So the
  model runs in SGLang with ENCODER_ONLY attention exactly as SDAR does.
* Token shift: the logit that fills position p comes from the hidden state of p-1
  (`logits = cat([logits[:, :1], logits[:, :-1]])` before sampling). A block's first position is never left
  to denoising: after the prompt's aligned part and after each block's commit forward, the reference takes
  `argmax(logits[:, -1])` (the last hidden state predicting the next position) and appends it, so every new
  block starts with that token plus B-1 [MASK]. (Only if a [MASK] did sit at a block's first position would
  its own logits be used: the `logits[:, :1]` of the shift.)
* Schedule (`generate`, no block cache): per block, sub-blocks of `small_block_size` left to right; while the
  sub-block holds [MASK]: one forward of the whole block, shifted logits, greedy token and its softmax
  probability at each [MASK] of the sub-block; unmask those with probability > `threshold`, and always the
  most probable one. When no [MASK] is left in the block, a commit forward writes its KV. Decoding stops once
  `stop_token` (151645, `<|im_end|>`) has appeared with no [MASK] before it; the output is cut after it.
* [MASK] = 151665, block 32.

How it maps onto SGLang's dLLM engine (which starts every block as B [MASK] after the prompt's tail, and
forgets hidden states between forwards):
* The model class applies the shift itself: row p of its logits comes from hidden state p-1 of the same
  forward; for the first row of a request's segment it uses the hidden state of the previous position kept
  from the request's previous forward (`CarryState`, one row per request-pool slot, checked by position and
  by the KV slot of that position, and dropped as soon as that KV slot is rewritten). Every dLLM algorithm
  (LowConfidence, JointThreshold, FixedSteps) therefore sees, at each [MASK], the logits that predict it.
  Without a carried state (e.g. a prompt served whole from the radix cache) the row's own hidden state is
  used, as the reference's shift does.
* The `FastDllmV2` algorithm (fast_dllm_v2_algorithm.py) reproduces the reference schedule: it first fills a
  block's leading [MASK] with the carried argmax token (the reference's appended token), then decodes the
  sub-blocks by threshold, stops at the stop token, and commits. This needs the algorithm, not only the model:
  the token must be known before the block's first forward.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .spec import AdapterSpec

ARCHITECTURE = "Fast_dLLM_QwenForCausalLM"
MASK_ID = 151665
STOP_TOKEN = 151645
BLOCK_SIZE = 32
ALGORITHM_NAME = "FastDllmV2"
DEFAULT_SMALL_BLOCK_SIZE = 8
DEFAULT_THRESHOLD = 0.9

SPECS = (AdapterSpec("fast-dllm-v2", (ARCHITECTURE,), block_size=BLOCK_SIZE, mask_id=MASK_ID),)


# ---- schedule -------------------------------------------------------------------------------------------------


def parse_schedule(algorithm_config: Mapping[str, Any], block_size: int) -> tuple[int, float, Optional[int]]:
    """(small_block_size, threshold, stop_token) from `--dllm-algorithm-config`; ValueError names the key."""
    small = algorithm_config.get("small_block_size", min(DEFAULT_SMALL_BLOCK_SIZE, block_size))
    if isinstance(small, bool) or not isinstance(small, int) or small < 1 or block_size % small:
        raise ValueError(f"{ALGORITHM_NAME}: 'small_block_size' must be a positive divisor of the block size "
                         f"{block_size} (got {small!r})")
    threshold = algorithm_config.get("threshold", DEFAULT_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"{ALGORITHM_NAME}: 'threshold' must be a number in [0, 1] (got {threshold!r})")
    stop = algorithm_config.get("stop_token", STOP_TOKEN)
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop < 0):
        raise ValueError(f"{ALGORITHM_NAME}: 'stop_token' must be a token id or null (got {stop!r})")
    return small, float(threshold), stop


def sub_block_step(ids: torch.Tensor, logits: torch.Tensor, mask_id: int, lo: int, hi: int,
                   threshold: float) -> torch.Tensor:
    """One reference denoising step on positions [lo, hi) of each row. ids [R, B] (updated copy returned),
    logits [R, B, V] already shifted. Unmasks every [MASK] whose greedy probability exceeds `threshold`, and
    the most probable [MASK] of the row (ties: the earlier position); rows without [MASK] there are left."""
    out = ids.clone()
    sub = ids[:, lo:hi]
    mask = sub == mask_id
    probs = torch.softmax(logits[:, lo:hi].float(), dim=-1)
    conf, token = probs.max(dim=-1)
    conf = torch.where(mask, conf, float("-inf"))
    transfer = conf > threshold
    transfer[torch.arange(sub.shape[0], device=sub.device), conf.argmax(dim=-1)] = True
    transfer &= mask
    out[:, lo:hi] = torch.where(transfer, token.to(ids.dtype), sub)
    return out


def stopped_rows(ids: torch.Tensor, mask_id: int, stop_token: Optional[int]) -> torch.Tensor:
    """[R] bool: the row holds `stop_token` with no [MASK] before its first occurrence (the reference's
    end-of-generation test, applied to the block)."""
    if stop_token is None:
        return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    is_stop = ids == stop_token
    first = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1), ids.shape[1])
    before = torch.arange(ids.shape[1], device=ids.device)[None, :] < first[:, None]
    return is_stop.any(dim=1) & ~((ids == mask_id) & before).any(dim=1)


# ---- token shift ----------------------------------------------------------------------------------------------


def segment_rows(extend_start_loc: torch.Tensor, extend_seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last row of each request's segment in a flattened extend batch."""
    first = extend_start_loc.long()
    return first, first + extend_seq_lens.long() - 1


def shift_hidden(hidden: torch.Tensor, first_rows: torch.Tensor, carried: Optional[torch.Tensor] = None,
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row p of the result is hidden row p-1 (the hidden state that predicts position p); a segment's first
    row takes the carried state of the previous position where `valid`, else its own row."""
    src = torch.arange(hidden.shape[0], device=hidden.device) - 1
    src[first_rows] = first_rows
    out = hidden[src]
    if carried is not None:
        out[first_rows] = torch.where(valid[:, None], carried.to(hidden.dtype), hidden[first_rows])
    return out


class CarryState:
    """Per request-pool slot: the final hidden state of the last position a forward computed, that position
    and its KV slot. Lives on the model's device; every update is a tensor op (no host sync)."""

    def __init__(self, slots: int, hidden_size: int, dtype: torch.dtype, device: Any):
        self.hidden = torch.zeros(slots, hidden_size, dtype=dtype, device=device)
        self.pos = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.loc = torch.full((slots,), -1, dtype=torch.long, device=device)

    def lookup(self, slots: torch.Tensor, first_pos: torch.Tensor, prev_loc: torch.Tensor):
        """(hidden [bs, H], valid [bs]) for segments starting at `first_pos` whose previous position lives in
        KV slot `prev_loc`."""
        valid = (first_pos > 0) & (self.pos[slots] == first_pos - 1) & (self.loc[slots] == prev_loc)
        return self.hidden[slots], valid

    def store(self, slots: torch.Tensor, last_pos: torch.Tensor, last_loc: torch.Tensor, last_hidden: torch.Tensor,
              written_locs: torch.Tensor) -> None:
        # A KV slot written now holds a new token: any state keyed by it (another slot's stale request) is void.
        stale = torch.isin(self.loc, written_locs.long())
        self.pos.masked_fill_(stale, -1)
        self.loc.masked_fill_(stale, -1)
        self.hidden[slots] = last_hidden.to(self.hidden.dtype)
        self.pos[slots] = last_pos.long()
        self.loc[slots] = last_loc.long()


# ---- registration ---------------------------------------------------------------------------------------------

MODEL_REGISTRY_MODULE = "sglang.srt.models.registry"
ALGORITHM_PACKAGE = "sglang.srt.dllm.algorithm"


def _add_model(module) -> None:
    from .fast_dllm_v2_model import Fast_dLLM_QwenForCausalLM

    module.ModelRegistry.models.setdefault(ARCHITECTURE, Fast_dLLM_QwenForCausalLM)


def _add_algorithm(package) -> None:
    from .fast_dllm_v2_algorithm import FastDllmV2

    package.algo_name_to_cls.setdefault(ALGORITHM_NAME, FastDllmV2)


def register_fast_dllm_v2() -> None:
    """Why: SGLang 0.5.14 finds model classes only in its own `sglang.srt.models` package (or one package
    named by SGLANG_EXTERNAL_MODEL_PACKAGE) and dLLM algorithms only in its own table. Adds ours to both right
    after those modules' first import in each process, so registration imports neither. Remove when SGLang
    ships the model and has plugin registries for models and algorithms."""
    from sglang_mage.compat import when_imported

    when_imported(MODEL_REGISTRY_MODULE, _add_model)
    when_imported(ALGORITHM_PACKAGE, _add_algorithm)
