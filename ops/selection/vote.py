"""MAGE v1 `vote` selector with the layer-adaptive budget, in PyTorch.

Pipeline for one layer at a block's first step (see DESIGN.md, "MAGE as published"):
    probs, row_valid = row_probs_padded(...)                 # exact per-row prefix probabilities
    votes, union_size, coverage = vote_candidates(probs, row_valid, prefix_lens, k)
    s_l = layer_score(union_size, coverage)                  # [R]
    budget = online_budget(s_l, running_mean, k, k_min, k_max)   # or adaptive_budgets over all layers
    select_by_votes(votes, budget, prefix_lens, ...)         # writes slots/lens like select_topk

Deviations from the paper, all deliberate:
  * Probabilities are exp(q·k·scale − lse) with the LSE over prefix + block (what the exact pass returns),
    so a row's prefix mass is < 1 and the coverage p_h counts prefix mass against the full softmax. The
    paper does not say which normalisation it uses; ours makes p_h smaller, i.e. layers whose block attends
    to itself look more diffuse, which is the direction the budget rule already rewards.
  * Sinks and a local window can be forced in on top of the budget (n_sink/n_local), as for `mean`; pass 0
    for the paper's behaviour.
  * Ties in votes are broken by the block-mean score when given, else by recency.
  * The budget is applied per (request, layer); the paper describes one sequence.
No host sync anywhere: every shape comes from static arguments (max_extend_len, max_prefix, K_max).
"""

from __future__ import annotations

import torch

from .topk import forced_mask, write_selection


def row_probs_padded(
    q,
    k_buffer,
    qo_indptr,
    req_to_token,
    req_pool_indices,
    prefix_lens,
    lse,
    sm_scale,
    max_extend_len,
    max_prefix,
    lse_is_log2=False,
):
    """Per-row prefix probabilities, padded: (probs [R, Hkv, max_extend_len·G, max_prefix] fp32, zero at
    invalid rows and positions; row_valid [R, max_extend_len·G] bool). Row m is token m // G, q head
    h·G + m % G. Memory is R·Hq·max_extend_len·max_prefix·4 bytes: call it on slices of the batch (slice
    qo_indptr/req_pool_indices/prefix_lens together; qo_indptr keeps absolute offsets) when that is large.
    lse as in scores.block_mean_scores (natural log unless lse_is_log2)."""
    Hkv, D = k_buffer.shape[1], k_buffer.shape[2]
    if q.dim() == 2:
        q = q.view(q.shape[0], -1, D)
    T, Hq = q.shape[0], q.shape[1]
    G = Hq // Hkv
    R = req_pool_indices.shape[0]
    device = q.device
    B = max_extend_len
    start = qo_indptr[:R].to(torch.int64).view(R, 1)
    ext = (qo_indptr[1 : R + 1].to(torch.int64) - qo_indptr[:R].to(torch.int64)).view(R, 1)
    t = torch.arange(B, device=device).view(1, B)
    tok_valid = t < ext  # [R, B]
    tok = (start + t).clamp(0, max(T - 1, 0))
    qr = q[tok].float()  # [R, B, Hq, D]
    qr = qr.view(R, B, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(R, Hkv, B * G, D)
    lr = lse[tok].float().view(R, B, Hkv, G).permute(0, 2, 1, 3).reshape(R, Hkv, B * G)
    if lse_is_log2:
        lr = lr * 0.6931471805599453
    pos = torch.arange(max_prefix, device=device)
    pos_valid = pos.view(1, -1) < prefix_lens.to(device=device, dtype=torch.int64).view(R, 1)
    slots = req_to_token[req_pool_indices.to(torch.int64).view(R, 1), pos.view(1, -1)].to(torch.int64)
    kr = k_buffer[slots].float().permute(0, 2, 3, 1)  # [R, Hkv, D, N]
    logits = torch.matmul(qr, kr) * sm_scale - lr.unsqueeze(-1)
    row_valid = tok_valid.repeat_interleave(G, dim=1)  # [R, B·G]
    mask = row_valid.view(R, 1, B * G, 1) & pos_valid.view(R, 1, 1, -1)
    probs = torch.where(mask, torch.exp(logits), 0.0)
    return probs, row_valid


def vote_candidates(probs: torch.Tensor, row_valid: torch.Tensor, prefix_lens: torch.Tensor, k: int):
    """Union of per-row top-k and its votes and coverage, per (request, kv head).

    probs: [R, Hkv, M, N] ≥ 0 (row_probs_padded). row_valid: [R, M]. k: per-row budget (the paper's K).
    Returns votes [R, Hkv, N] int32 (how many valid rows picked each position; U_h = votes > 0),
    union_size [R, Hkv] int64, coverage [R, Hkv] fp32 = mean over valid rows of Σ_{i∈U_h} probs[row, i].
    A row whose prefix is shorter than k picks the whole prefix."""
    R, Hkv, M, N = probs.shape
    device = probs.device
    kk = min(k, N)
    votes = torch.zeros((R, Hkv, N), dtype=torch.int32, device=device)
    if kk == 0 or M == 0:
        return votes, votes.sum(-1, dtype=torch.int64), torch.zeros((R, Hkv), dtype=torch.float32, device=device)
    prefix = prefix_lens.to(device=device, dtype=torch.int64).view(R, 1, 1, 1)
    pos_valid = torch.arange(N, device=device) < prefix
    # −1 sits below every probability, so padding is picked only when a row has fewer than k valid positions;
    # such picks and those of padding rows carry zero weight.
    keyed = torch.where(pos_valid, probs, -1.0)
    idx = torch.topk(keyed, kk, dim=-1, sorted=False).indices  # [R, Hkv, M, kk]
    weight = (idx < prefix) & row_valid.view(R, 1, M, 1)
    votes.scatter_add_(-1, idx.reshape(R, Hkv, M * kk), weight.reshape(R, Hkv, M * kk).to(torch.int32))
    union = votes > 0
    union_size = union.sum(-1, dtype=torch.int64)
    row_mass = torch.matmul(probs, union.to(probs.dtype).unsqueeze(-1)).squeeze(-1)  # [R, Hkv, M]
    row_mass = torch.where(row_valid.view(R, 1, M), row_mass, 0.0)
    n_rows = row_valid.sum(-1).clamp_min(1).view(R, 1).to(torch.float32)
    coverage = row_mass.sum(-1).float() / n_rows
    return votes, union_size, coverage


def layer_score(union_size: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """s_l = max_h |U_h| · (1 − log p_h), per request: [R] fp32. A larger union that still misses mass means
    a diffuse layer that should get more budget. Heads with an empty union (prefix 0) score 0; p_h is
    floored at 1e-30 so that a union holding no representable mass gives a large finite score, not inf."""
    p = coverage.float().clamp_min(1e-30)
    u = union_size.float()
    s = torch.where(u > 0, u * (1.0 - torch.log(p)), 0.0)
    return s.max(dim=-1).values


def adaptive_budgets(layer_scores: torch.Tensor, k: int, k_min: int) -> torch.Tensor:
    """The paper's K_l = max(k_min, ⌊s_l / Σ_l' s_l' · k · L⌋), per request: [L, R] → [L, R] int64.

    layer_scores holds the L layers that select (the paper keeps the first layer dense; leave it out). The
    total over layers is at most k·L plus the k_min top-ups. A request whose layers all score 0 (empty
    prefix) gets k everywhere. Needs every layer's score, i.e. a pass over all layers before any selection:
    see online_budget for the per-layer variant a forward can use."""
    L = layer_scores.shape[0]
    s = layer_scores.double().clamp_min(0)
    total = s.sum(dim=0, keepdim=True)
    share = torch.where(total > 0, s / total.clamp_min(1e-300), 1.0 / max(L, 1))
    budget = torch.floor(share * (k * L)).to(torch.int64)
    return budget.clamp_min(k_min)


def online_budget(
    layer_score_l: torch.Tensor, running_mean_score: torch.Tensor, k: int, k_min: int, k_max: int
) -> torch.Tensor:
    """Per-layer budget usable inside one forward: K_l = clamp(⌊s_l / s̄ · k⌋, k_min, k_max), per request.

    Deviation from the paper: the exact rule divides by Σ_l' s_l' over the *current* block's layers, which is
    unknown while layer l selects (selection overlaps the forward). Since Σ_l' s_l' = L · s̄, we substitute
    s̄ = running_mean_score, the mean layer score of the same request's previous block (or any running
    average the caller keeps), which gives the same K_l whenever the scores' mean moves little between
    blocks. Where s̄ is not positive and finite (a request's first block), every layer gets k. The budgets
    then sum to ≈ k·L only on average; k_max caps them at the index cache's width.

    layer_score_l: [R]; running_mean_score: [R] or scalar tensor. Returns [R] int64."""
    s = layer_score_l.double().clamp_min(0)
    mean = torch.as_tensor(running_mean_score, device=s.device).double()
    known = torch.isfinite(mean) & (mean > 0)
    budget = torch.where(known, torch.floor(s / torch.where(known, mean, 1.0) * k), float(k))
    return budget.clamp(k_min, k_max).to(torch.int64)


def select_by_votes(
    votes: torch.Tensor,
    budget,
    prefix_lens: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    out_slots: torch.Tensor,
    out_lens: torch.Tensor,
    cache_rows: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    n_sink: int = 0,
    n_local: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T_{l,h}: the top-`budget` positions of U_h by votes, padded with the most recent prefix positions when
    budget > |U_h|, plus forced sinks/local window; written ascending as slots like select_topk.

    votes: [R, Hkv, N] (vote_candidates). budget: int or tensor broadcastable to [R, Hkv] (e.g. [R, 1]).
    scores: optional [R, Hkv, N] tie-break among equal votes (higher first; block_mean_scores fits); without
    it, later positions win ties. Lengths are min(prefix, budget + n_sink + n_local, K_max, N): ragged per
    request/head, capped at out_slots' width. Returns (positions, lens int32) as topk.write_selection."""
    R, Hkv, N = votes.shape
    device = votes.device
    pos = torch.arange(N, device=device, dtype=torch.float64)
    recency = (pos + 1) / (N + 1)  # in (0, 1): ranks non-union padding and breaks ties without scores
    v = votes.to(torch.float64)
    tie = recency if scores is None else scores.double().nan_to_num(0.0).clamp(0.0, 1.0) * (1 - 1e-9)
    # Union positions score votes + tie ≥ 1, every non-union position less than 1, so padding never displaces
    # a voted position; float64 keeps a tie-break below one vote even at thousands of rows.
    keys = torch.where(v > 0, v + tie, recency)
    valid = torch.arange(N, device=device) < prefix_lens.to(device=device, dtype=torch.int64).view(R, 1, 1)
    keys = torch.where(valid, keys, float("-inf"))
    keys = torch.where(forced_mask(prefix_lens.to(device), N, n_sink, n_local), float("inf"), keys)
    n_top = min(N, out_slots.shape[-1])
    if torch.is_tensor(budget):
        n_keep = budget.to(device=device, dtype=torch.int64) + (n_sink + n_local)
        n_keep = n_keep.view(-1, 1) if n_keep.dim() == 1 else n_keep
    else:  # a Python int stays one: no host-to-device copy, and write_selection may skip the cut
        n_keep = int(budget) + n_sink + n_local
    return write_selection(
        keys, prefix_lens, n_keep, n_top, req_to_token, req_pool_indices, out_slots, out_lens, cache_rows
    )


def mean_layer_score(layer_scores: torch.Tensor) -> torch.Tensor:
    """[L, R] → [R] mean over layers: the running_mean_score online_budget wants for the next block."""
    return layer_scores.float().mean(dim=0) if layer_scores.shape[0] else torch.zeros(layer_scores.shape[1:])

