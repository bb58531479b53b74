"""Glue between the backend and the `vote` selector ops: per-request state of the layer-adaptive budget.

`vote` (MAGE v1) sizes each layer's budget by how diffuse that layer's first-step attention is. The exact
rule needs every layer's score before any layer selects; inside one forward we use the online variant
(`ops.selection.online_budget`): the divisor is the mean layer score of the same request's previous block.
A request's first block gives every layer k. The state is one float per pool slot, reset on slot free.
"""

from __future__ import annotations

import torch

from .config import MageConfig
from .ops.selection import block_mean_scores, layer_score, online_budget, row_probs_padded, select_by_votes, vote_candidates


class VoteSelector:
    def __init__(self, cfg: MageConfig, num_layers: int, rows: int, device):
        self.cfg = cfg
        self.num_layers = num_layers
        self.prev_mean = torch.zeros(rows, dtype=torch.float64, device=device)
        self.cur_sum = torch.zeros(rows, dtype=torch.float64, device=device)

    def invalidate(self, slot) -> None:
        if slot is None:
            self.prev_mean.zero_()
            self.cur_sum.zero_()
        else:
            self.prev_mean[slot] = 0
            self.cur_sum[slot] = 0

    def select(self, layer_id, q3, k_buf, qo_indptr, req_to_token, req_pool_indices, prefix_lens, lse, sm_scale,
               block_size, max_prefix, sel_slots, sel_lens) -> None:
        cfg = self.cfg
        rows = req_pool_indices.long()
        if layer_id == 0:
            # A new block starts: last block's layer scores become the budget's reference.
            done = self.cur_sum[rows] > 0
            self.prev_mean[rows] = torch.where(done, self.cur_sum[rows] / self.num_layers, self.prev_mean[rows])
            self.cur_sum[rows] = 0
        tie = block_mean_scores(q3, k_buf, qo_indptr, req_to_token, req_pool_indices, prefix_lens, lse, sm_scale,
                                block_size, max_prefix, lse_is_log2=True)
        # One request at a time bounds the per-row probability tensor to Hq x B x prefix floats.
        for r in range(rows.shape[0]):
            sl = slice(r, r + 1)
            probs, row_valid = row_probs_padded(q3, k_buf, qo_indptr[r:r + 2], req_to_token, req_pool_indices[sl],
                                                prefix_lens[sl], lse, sm_scale, block_size, max_prefix,
                                                lse_is_log2=True)
            votes, union_size, coverage = vote_candidates(probs, row_valid, prefix_lens[sl], cfg.k)
            s_l = layer_score(union_size, coverage)
            self.cur_sum[rows[sl]] += s_l.double()
            budget = online_budget(s_l, self.prev_mean[rows[sl]], cfg.k, cfg.vote_min_k, cfg.vote_max_k)
            select_by_votes(votes, budget, prefix_lens[sl], req_to_token, req_pool_indices[sl], sel_slots, sel_lens,
                            scores=tie[sl], n_sink=cfg.sink_tokens, n_local=cfg.local_window)
