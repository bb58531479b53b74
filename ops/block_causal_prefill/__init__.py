"""Block-causal chunked prompt prefill: PyTorch references and the Triton op that completes FlashInfer's
causal prefill into block-causal attention (`later_in_block_merge`)."""

from .kernel import later_in_block_merge
from .reference import (
    block_by_block_ref,
    block_causal_decomposed_ref,
    block_causal_mask,
    chunked_ref,
    later_in_block_merge_ref,
    merge_states,
    plan_chunks,
)

__all__ = [
    "later_in_block_merge",
    "later_in_block_merge_ref",
    "block_by_block_ref",
    "block_causal_decomposed_ref",
    "block_causal_mask",
    "chunked_ref",
    "merge_states",
    "plan_chunks",
]
