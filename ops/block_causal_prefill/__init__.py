"""Block-causal chunked prompt prefill: references first (the FlashInfer-backed op follows them)."""

from .reference import (
    block_by_block_ref,
    block_causal_decomposed_ref,
    block_causal_mask,
    chunked_ref,
    merge_states,
    plan_chunks,
)

__all__ = [
    "block_by_block_ref",
    "block_causal_decomposed_ref",
    "block_causal_mask",
    "chunked_ref",
    "merge_states",
    "plan_chunks",
]
