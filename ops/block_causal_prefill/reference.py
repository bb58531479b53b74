"""PyTorch references for block-causal chunked prompt prefill (one request; dense [L, H, D] tensors).

Block-diffusion models prefill the prompt's mask-free blocks with block-causal attention: the token at
position p sees every position below (floor(p / B) + 1) * B, i.e. its whole block and all earlier blocks.
SGLang 0.5.14 computes this one block per forward. A chunk of several blocks gives the same result in one
forward, provided chunk boundaries fall between blocks (`plan_chunks` snaps them there).

`block_causal_decomposed_ref` mirrors the FlashInfer plan of the kernel path, three attention states merged
by their log-sum-exp:
  (a) token-causal attention inside the chunk (FlashInfer's ordinary causal prefill, ragged),
  (b) each block's strictly-later tokens, j > i within the block (a B x B custom mask per block),
  (c) the cached prefix before the chunk, non-causal (FlashInfer's paged pass).
(a) + (b) cover exactly the block-causal set inside the chunk, without overlap.
"""

from __future__ import annotations

import math

import torch


def plan_chunks(cached_len: int, prompt_len: int, block_size: int, chunk_size: int) -> list[tuple[int, int]]:
    """Chunks [start, end) covering the prompt's mask-free full blocks after `cached_len` (a multiple of B).

    Every boundary lies between blocks: a chunk size that is not a multiple of B is rounded down to one
    (at least one block). The tail of the prompt that does not fill a block is left out: it joins the first
    [MASK] block, as SGLang does today."""
    if block_size < 1 or chunk_size < 1:
        raise ValueError(f"block_size and chunk_size must be >= 1 (got {block_size}, {chunk_size})")
    if cached_len % block_size:
        raise ValueError(f"cached prefix {cached_len} is not a multiple of the block size {block_size}")
    step = max(block_size, chunk_size // block_size * block_size)
    end_all = prompt_len // block_size * block_size
    return [(s, min(s + step, end_all)) for s in range(cached_len, end_all, step)]


def _attend(q, k, v, allowed, sm_scale):
    """Masked attention over given keys: (out [L, Hq, D] fp32, lse [L, Hq] natural log; -inf where empty)."""
    hq, hkv = q.shape[1], k.shape[1]
    kf = k.float().repeat_interleave(hq // hkv, dim=1)
    vf = v.float().repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), kf) * sm_scale
    logits = logits.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [Hq, L]
    probs = torch.where(torch.isfinite(lse).unsqueeze(-1), torch.exp(logits - lse.unsqueeze(-1)), 0.0)
    out = torch.einsum("hqk,khd->qhd", probs, vf)
    return out, lse.transpose(0, 1)


def merge_states(o_a, lse_a, o_b, lse_b):
    """Combine two attention states over disjoint key sets (natural-log LSE; -inf marks an empty set)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    w_a = torch.where(torch.isfinite(lse_a), torch.exp(lse_a - safe), 0.0).unsqueeze(-1)
    w_b = torch.where(torch.isfinite(lse_b), torch.exp(lse_b - safe), 0.0).unsqueeze(-1)
    return o_a * w_a + o_b * w_b, lse


def block_by_block_ref(q, k, v, block_size: int, sm_scale: float | None = None) -> torch.Tensor:
    """What SGLang computes today: one forward per block, each block attending to all earlier positions and
    to itself, bidirectionally. q: [L, Hq, D]; k, v: [L, Hkv, D] (the whole sequence). Returns fp32 [L, Hq, D]."""
    n = q.shape[0]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for s in range(0, n, block_size):
        e = min(s + block_size, n)
        allowed = torch.ones(e - s, e, dtype=torch.bool, device=q.device)
        out[s:e] = _attend(q[s:e], k[:e], v[:e], allowed, scale)[0]
    return out


def block_causal_mask(start: int, end: int, block_size: int, device=None) -> torch.Tensor:
    """[end-start, end] mask for queries at positions start..end-1 over keys 0..end-1."""
    p = torch.arange(start, end, device=device).view(-1, 1)
    j = torch.arange(end, device=device).view(1, -1)
    return j < (p // block_size + 1) * block_size


def chunked_ref(q, k, v, chunks, block_size: int, sm_scale: float | None = None) -> torch.Tensor:
    """Chunk by chunk, each chunk's queries over [0, end) with the block-causal mask."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.full(q.shape, float("nan"), dtype=torch.float32, device=q.device)
    for s, e in chunks:
        mask = block_causal_mask(s, e, block_size, q.device)
        out[s:e] = _attend(q[s:e], k[:e], v[:e], mask, scale)[0]
    return out


def block_causal_decomposed_ref(q, k, v, chunks, block_size: int, sm_scale: float | None = None) -> torch.Tensor:
    """The three-state plan of the kernel path (module docstring), chunk by chunk."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.full(q.shape, float("nan"), dtype=torch.float32, device=q.device)
    for s, e in chunks:
        n = e - s
        i = torch.arange(n, device=q.device).view(-1, 1)
        j = torch.arange(n, device=q.device).view(1, -1)
        causal = j <= i
        later_in_block = (j > i) & ((s + j) // block_size == (s + i) // block_size)
        o, lse = _attend(q[s:e], k[s:e], v[s:e], causal, scale)
        o, lse = merge_states(o, lse, *_attend(q[s:e], k[s:e], v[s:e], later_in_block, scale))
        if s > 0:
            prefix = torch.ones(n, s, dtype=torch.bool, device=q.device)
            o, lse = merge_states(o, lse, *_attend(q[s:e], k[:s], v[:s], prefix, scale))
        out[s:e] = o
    return out


def later_in_block_merge_ref(q, k, v, o, lse_log2, block_size: int, sm_scale: float):
    """Reference of `later_in_block_merge`: extend tokens laid out block after block; each query attends
    to the later tokens of its own block, and that state is merged into (o, lse_log2). Returns fp32
    (o, lse) with the LSE in base 2, like FlashInfer's."""
    n = q.shape[0]
    i = torch.arange(n, device=q.device).view(-1, 1)
    j = torch.arange(n, device=q.device).view(1, -1)
    later = (j > i) & (j // block_size == i // block_size)
    o_b, lse_b = _attend(q, k, v, later, sm_scale)
    merged, lse = merge_states(o.float(), lse_log2.float() * math.log(2.0), o_b, lse_b)
    return merged, lse / math.log(2.0)
