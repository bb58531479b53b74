"""SDAR and SDAR-MoE / TraDo: SGLang 0.5.14's own model classes (`sglang.srt.models.sdar`, `sdar_moe`) serve
them; the plugin only supplies their denoising parameters. Block size 4 and [MASK] 151669 are the defaults
SGLang hard-codes; a model's config.json (`block_size` / `bd_size`, `mask_token_id` / `mask_id`) overrides them."""

from __future__ import annotations

from .spec import AdapterSpec

SPECS = (
    AdapterSpec("sdar", ("SDARForCausalLM",), block_size=4, mask_id=151669),
    AdapterSpec("sdar-moe", ("SDARMoeForCausalLM",), block_size=4, mask_id=151669),
)
