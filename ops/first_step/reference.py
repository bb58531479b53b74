"""PyTorch reference of the fused first step (kernel.py): exact block attention + block-mean-query logits."""

from __future__ import annotations

import torch

from ..selection.reference import mean_query_scores_ref


def fused_first_step_ref(q, k_buffer, v_buffer, qo_indptr, req_to_token, req_pool_indices, prefix_lens, sm_scale,
                         block_size, max_prefix):
    t, hq, d = q.shape
    hkv = k_buffer.shape[1]
    g = hq // hkv
    out = torch.empty((t, hq, v_buffer.shape[2]), dtype=torch.float32)
    for r in range(qo_indptr.shape[0] - 1):
        s, e = int(qo_indptr[r]), int(qo_indptr[r + 1])
        n = int(prefix_lens[r]) + (e - s)
        slots = req_to_token[int(req_pool_indices[r]), :n].long()
        k = k_buffer[slots].float().repeat_interleave(g, dim=1)
        v = v_buffer[slots].float().repeat_interleave(g, dim=1)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * sm_scale, dim=-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v)
    scores = mean_query_scores_ref(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, prefix_lens, sm_scale,
                                   max_prefix)
    return out, scores
