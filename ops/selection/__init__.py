"""Prefix selection for MAGE: block-mean scores (v2 `mean`), top-k with sinks/local window, and the v1
`vote` selector with its layer-adaptive budget. Imports only torch and triton."""

from .mean_query_scores import block_mean_query_triton, mean_query_scores
from .reference import (
    block_mean_scores_ref,
    block_self_mass_ref,
    dense_lse_ref,
    mean_query_scores_ref,
    pad_row_probs,
    row_probs_ref,
    vote_candidates_ref,
)
from .scores import block_mean_scores
from .radix_topk import radix_topk_positions
from .topk import forced_mask, select_topk, write_selection
from .vote import (
    adaptive_budgets,
    layer_score,
    mean_layer_score,
    online_budget,
    row_probs_padded,
    select_by_votes,
    vote_candidates,
)

__all__ = [
    "adaptive_budgets",
    "block_mean_query_triton",
    "block_mean_scores",
    "block_mean_scores_ref",
    "block_self_mass_ref",
    "dense_lse_ref",
    "forced_mask",
    "layer_score",
    "mean_layer_score",
    "mean_query_scores",
    "mean_query_scores_ref",
    "online_budget",
    "pad_row_probs",
    "row_probs_padded",
    "row_probs_ref",
    "select_by_votes",
    "radix_topk_positions",
    "select_topk",
    "vote_candidates",
    "vote_candidates_ref",
    "write_selection",
]
