"""Plain PyTorch reference for MAGE block-sparse attention (the oracle the Triton kernel is tested against).

Deliberately simple: one request and one KV head at a time, fp32 math, host-side indexing. It is not
CUDA-graph safe (it reads lengths with .item()) and is not meant for the serving path.
"""

from __future__ import annotations

import torch


def sparse_block_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    sel_slots: torch.Tensor,
    sel_lens: torch.Tensor,
    sm_scale: float,
    max_extend_len: int,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each block query row attends, without a causal mask, to its KV head's selected prefix slots
    followed by the block's own tokens. `max_extend_len`, `num_splits` and `workspace` only matter to the
    kernel; they are accepted so both functions can be called interchangeably."""
    del num_splits, workspace
    num_tokens, hq, _ = q.shape
    hkv = k_buffer.shape[1]
    group = hq // hkv
    dv = v_buffer.shape[2]
    if out is None:
        out = torch.empty((num_tokens, hq, dv), dtype=q.dtype, device=q.device)

    indptr = qo_indptr.tolist()
    pools = req_pool_indices.tolist()
    prefixes = prefix_lens.tolist()
    for r in range(len(indptr) - 1):
        start, end = indptr[r], indptr[r + 1]
        ext = end - start
        if ext == 0:
            continue
        assert ext <= max_extend_len, f"request {r}: ext_len {ext} > max_extend_len {max_extend_len}"
        pool, prefix = pools[r], prefixes[r]
        own = req_to_token[pool, prefix : prefix + ext].long()
        for h in range(hkv):
            n_sel = int(sel_lens[pool, h].item())
            slots = torch.cat([sel_slots[pool, h, :n_sel].long(), own])
            k = k_buffer[slots, h].float()  # [n, D]
            v = v_buffer[slots, h].float()  # [n, Dv]
            qh = q[start:end, h * group : (h + 1) * group].float()  # [ext, G, D]
            logits = torch.einsum("tgd,nd->tgn", qh, k) * sm_scale
            probs = torch.softmax(logits, dim=-1)
            o = torch.einsum("tgn,nd->tgd", probs, v)
            out[start:end, h * group : (h + 1) * group] = o.to(out.dtype)
    return out
