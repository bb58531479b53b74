"""LLaDA2-MoE: SGLang 0.5.14's own model class (`sglang.srt.models.llada2`) serves it; the plugin supplies
its denoising parameters (block 32, [MASK] 156895, as SGLang hard-codes; config.json overrides them)."""

from __future__ import annotations

from .spec import AdapterSpec

SPECS = (AdapterSpec("llada2-moe", ("LLaDA2MoeModelLM",), block_size=32, mask_id=156895),)
