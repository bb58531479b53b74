"""MAGE on the CPU, through the PyTorch references: `python -m sglang_mage.demo`.

A synthetic block-diffusion step sequence at long context: a prefix of random keys in which a few "needle"
positions match the block's query direction, and queries that drift from step to step the way a block's
queries do while [MASK] tokens are filled. Step 1 is exact and selects the top-k per KV head from its
block-average probabilities; steps 2..n reuse that set. The table shows, per step, the attention mass the
reused set captures, its recall against that step's own top-k (the oracle), and the output error against
dense attention.
"""

from __future__ import annotations

import argparse
import os

import torch

# Without a GPU the Triton parts of the ops (top-k bookkeeping) run in Triton's interpreter; the flag must
# be set before the kernels are first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .ops.selection import block_mean_scores_ref, dense_lse_ref, select_topk  # noqa: E402
from .ops.sparse_attention import sparse_block_attention_ref  # noqa: E402


def build(prefix: int, block: int, hq: int, hkv: int, dim: int, needles: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    slots = prefix + block
    k = torch.randn(slots, hkv, dim, generator=g)
    v = torch.randn(slots, hkv, dim, generator=g)
    direction = torch.randn(hkv, dim, generator=g)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    where = torch.randperm(prefix, generator=g)[:needles]
    k[where] += 4.0 * direction * dim**0.5 / 2
    req_to_token = torch.randperm(slots, generator=g).int().view(1, slots)  # paged: shuffled physical slots
    return k, v, direction, req_to_token, where


def step_queries(direction, block, hq, hkv, dim, noise, g):
    base = direction.repeat_interleave(hq // hkv, dim=0) * dim**0.5 / 2
    return base.unsqueeze(0) + noise * torch.randn(block, hq, dim, generator=g)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, default=8192)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--k", type=int, default=512)
    args = ap.parse_args(argv)
    hq, hkv, dim, scale = 8, 2, 64, 64**-0.5
    k_buf, v_buf, direction, req_to_token, _ = build(args.prefix, args.block, hq, hkv, dim, needles=64, seed=0)
    qo = torch.tensor([0, args.block], dtype=torch.int32)
    rows = torch.zeros(1, dtype=torch.long)
    prefix = torch.tensor([args.prefix], dtype=torch.int32)
    cap = args.k + 16 + 64
    sel_slots = torch.zeros(1, hkv, cap, dtype=torch.int32)
    sel_lens = torch.zeros(1, hkv, dtype=torch.int32)
    all_slots = req_to_token[:, : args.prefix].expand(hkv, -1).unsqueeze(0).contiguous()
    all_lens = torch.full((1, hkv), args.prefix, dtype=torch.int32)
    pos_of_slot = torch.empty(req_to_token.shape[1], dtype=torch.long)
    pos_of_slot[req_to_token[0].long()] = torch.arange(req_to_token.shape[1])
    g = torch.Generator().manual_seed(1)
    print(f"MAGE reference path: prefix {args.prefix}, block {args.block}, k={args.k} (+16 sink, +64 local)")
    print(f"{'step':>4} {'mass captured':>14} {'oracle recall':>14} {'max |err|':>10}")
    for step in range(1, args.steps + 1):
        q = step_queries(direction, args.block, hq, hkv, dim, noise=0.5 + 0.05 * step, g=g)
        lse = dense_lse_ref(q, k_buf, qo, req_to_token, rows, prefix, scale)
        scores = block_mean_scores_ref(q, k_buf, qo, req_to_token, rows, prefix, lse, scale, args.block, args.prefix)
        if step == 1:
            select_topk(scores, prefix, args.k, 16, 64, req_to_token, rows, sel_slots, sel_lens)
        dense = sparse_block_attention_ref(q, k_buf, v_buf, qo, req_to_token, rows, prefix, all_slots, all_lens, scale, args.block)
        sparse = sparse_block_attention_ref(q, k_buf, v_buf, qo, req_to_token, rows, prefix, sel_slots, sel_lens, scale, args.block)
        mass, recall = 0.0, 0.0
        for h in range(hkv):
            chosen = pos_of_slot[sel_slots[0, h, : sel_lens[0, h]].long()]
            mass += scores[0, h, chosen].sum().item() / scores[0, h].sum().item() / hkv
            oracle = set(scores[0, h].topk(args.k).indices.tolist())
            recall += len(oracle & set(chosen.tolist())) / args.k / hkv
        err = (sparse - dense).abs().max().item()
        print(f"{step:>4} {mass:>14.3f} {recall:>14.3f} {err:>10.2e}")


if __name__ == "__main__":
    main()
