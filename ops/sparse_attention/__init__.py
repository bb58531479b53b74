"""MAGE block-sparse attention: block queries attend to per-KV-head selected prefix slots plus the block."""

from .kernel import (
    PDL_MODES,
    alloc_batch_workspace,
    alloc_merge_counters,
    alloc_workspace,
    default_num_splits,
    pdl_available,
    sparse_block_attention,
)
from .reference import sparse_block_attention_ref

__all__ = [
    "PDL_MODES",
    "alloc_batch_workspace",
    "alloc_merge_counters",
    "alloc_workspace",
    "default_num_splits",
    "pdl_available",
    "sparse_block_attention",
    "sparse_block_attention_ref",
]
