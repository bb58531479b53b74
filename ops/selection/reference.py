"""Plain PyTorch references for the selection ops: per-request loops in fp32, written for clarity only.

Row ordering everywhere: row m of kv head h is block token m // G, q head h·G + m % G.
"""

from __future__ import annotations

import torch


def _request_logits(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, r, n_keys, sm_scale):
    """fp32 logits [Hkv, ext_len·G, n_keys] of request r against its first n_keys positions."""
    Hkv, D = k_buffer.shape[1], k_buffer.shape[2]
    if q.dim() == 2:
        q = q.view(q.shape[0], -1, D)
    G = q.shape[1] // Hkv
    s, e = int(qo_indptr[r]), int(qo_indptr[r + 1])
    qr = q[s:e].float().reshape(e - s, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, (e - s) * G, D)
    slots = req_to_token[int(req_pool_indices[r]), :n_keys].long()
    kr = k_buffer[slots].float().permute(1, 2, 0)  # [Hkv, D, n_keys]
    return torch.matmul(qr, kr) * sm_scale


def _request_lse(lse, qo_indptr, r, Hkv):
    s, e = int(qo_indptr[r]), int(qo_indptr[r + 1])
    G = lse.shape[1] // Hkv
    return lse[s:e].float().reshape(e - s, Hkv, G).permute(1, 0, 2).reshape(Hkv, (e - s) * G)


def dense_lse_ref(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, prefix_lens, sm_scale):
    """[T, Hq] fp32 natural-log LSE of each query row over prefix + block, the block's own keys sitting at
    positions prefix .. prefix+ext_len−1 of req_to_token (what the exact first-step pass returns)."""
    Hkv, D = k_buffer.shape[1], k_buffer.shape[2]
    if q.dim() == 2:
        q = q.view(q.shape[0], -1, D)
    T, Hq = q.shape[0], q.shape[1]
    out = torch.full((T, Hq), float("nan"), dtype=torch.float32, device=q.device)
    G = Hq // Hkv
    for r in range(req_pool_indices.shape[0]):
        s, e = int(qo_indptr[r]), int(qo_indptr[r + 1])
        if e == s:
            continue
        logits = _request_logits(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, r, int(prefix_lens[r]) + e - s, sm_scale)
        lse_r = torch.logsumexp(logits, dim=-1)  # [Hkv, ext·G]
        out[s:e] = lse_r.reshape(Hkv, e - s, G).permute(1, 0, 2).reshape(e - s, Hq)
    return out


def row_probs_ref(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, prefix_lens, lse, sm_scale):
    """Per-row prefix probabilities: list over r of list over kv heads of fp32 [ext_len·G, prefix_r]
    tensors, exp(q·k·sm_scale − lse)."""
    Hkv = k_buffer.shape[1]
    out = []
    for r in range(req_pool_indices.shape[0]):
        prefix = int(prefix_lens[r])
        logits = _request_logits(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, r, prefix, sm_scale)
        probs = torch.exp(logits - _request_lse(lse, qo_indptr, r, Hkv)[:, :, None])
        out.append([probs[h] for h in range(Hkv)])
    return out


def block_self_mass_ref(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, prefix_lens, lse, sm_scale):
    """[R, Hkv] mean over the block's rows of the probability mass on the block's own keys; with the
    prefix's block-mean scores it sums to 1 when lse is exact."""
    Hkv = k_buffer.shape[1]
    R = req_pool_indices.shape[0]
    out = torch.zeros((R, Hkv), dtype=torch.float32, device=q.device)
    for r in range(R):
        prefix = int(prefix_lens[r])
        ext = int(qo_indptr[r + 1]) - int(qo_indptr[r])
        if ext == 0:
            continue
        logits = _request_logits(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, r, prefix + ext, sm_scale)
        probs = torch.exp(logits[:, :, prefix:] - _request_lse(lse, qo_indptr, r, Hkv)[:, :, None])
        out[r] = probs.sum(-1).mean(-1)
    return out


def block_mean_scores_ref(
    q, k_buffer, qo_indptr, req_to_token, req_pool_indices, prefix_lens, lse, sm_scale, max_extend_len, max_prefix
):
    """Reference of scores.block_mean_scores: [R, Hkv, max_prefix] fp32, −inf past each prefix."""
    Hkv = k_buffer.shape[1]
    R = req_pool_indices.shape[0]
    out = torch.full((R, Hkv, max_prefix), float("-inf"), dtype=torch.float32, device=q.device)
    rows = row_probs_ref(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, prefix_lens, lse, sm_scale)
    for r in range(R):
        for h in range(Hkv):
            p = rows[r][h]
            if p.shape[1] == 0:
                continue
            out[r, h, : p.shape[1]] = p.mean(0) if p.shape[0] else 0.0
    return out


def pad_row_probs(rows, max_rows, max_prefix):
    """Pack row_probs_ref's nested lists into vote.vote_candidates' padded form:
    probs [R, Hkv, max_rows, max_prefix] fp32 (zeros outside) and row_valid [R, max_rows] bool."""
    R = len(rows)
    Hkv = len(rows[0]) if R else 0
    device = rows[0][0].device if R and Hkv else "cpu"
    probs = torch.zeros((R, Hkv, max_rows, max_prefix), dtype=torch.float32, device=device)
    row_valid = torch.zeros((R, max_rows), dtype=torch.bool, device=device)
    for r in range(R):
        for h in range(Hkv):
            m, n = rows[r][h].shape
            probs[r, h, :m, :n] = rows[r][h]
            row_valid[r, :m] = True
    return probs, row_valid


def vote_candidates_ref(rows, prefix_lens, k, max_prefix):
    """Brute-force Python loop over rows of row_probs_ref's output: (votes [R, Hkv, max_prefix] int64,
    union_size [R, Hkv], coverage [R, Hkv]). Coverage is the mean over rows of the row's mass on U_h."""
    R = len(rows)
    Hkv = len(rows[0]) if R else 0
    votes = torch.zeros((R, Hkv, max_prefix), dtype=torch.int64)
    union = torch.zeros((R, Hkv), dtype=torch.int64)
    cov = torch.zeros((R, Hkv), dtype=torch.float32)
    for r in range(R):
        for h in range(Hkv):
            a = rows[r][h].cpu()
            m, n = a.shape
            for i in range(m):
                for p in torch.topk(a[i], min(k, n)).indices.tolist():
                    votes[r, h, p] += 1
            chosen = [p for p in range(n) if votes[r, h, p] > 0]
            union[r, h] = len(chosen)
            if m:
                cov[r, h] = sum(float(a[i, chosen].sum()) for i in range(m)) / m
    return votes, union, cov


def mean_query_scores_ref(q, k_buffer, qo_indptr, req_to_token, req_pool_indices, prefix_lens, sm_scale, max_prefix):
    """[R, Hkv, max_prefix] fp32 block-mean-query logits q̄·k·sm_scale, −inf past each prefix; q̄ the mean of
    request r's block rows over its tokens and the G query heads of KV head h (the `fused` selector)."""
    hkv, d = k_buffer.shape[1], k_buffer.shape[2]
    g = q.shape[1] // hkv
    scores = torch.full((req_pool_indices.shape[0], hkv, max_prefix), float("-inf"))
    for r in range(req_pool_indices.shape[0]):
        s, e = int(qo_indptr[r]), int(qo_indptr[r + 1])
        p = int(prefix_lens[r])
        slots = req_to_token[int(req_pool_indices[r]), :p].long()
        for h in range(hkv):
            qbar = q[s:e, h * g:(h + 1) * g].float().reshape(-1, d).mean(0)
            scores[r, h, :p] = k_buffer[slots, h].float() @ qbar * sm_scale
    return scores
