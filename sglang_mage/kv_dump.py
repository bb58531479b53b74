"""Debug aid for GPU correctness runs: with $SGLANG_MAGE_KV_DUMP_DIR set, the backend saves every finished
request's KV cache (first and last layer) when its pool slot is freed, so a test can compare the KV that two
engines wrote for the same prompt (chunked vs per-block prefill). Off by default; costs one host sync per
forward that starts a request while on."""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch

ENV = "SGLANG_MAGE_KV_DUMP_DIR"
_HEAD_TOKENS = 16  # enough of the prompt to tell a batch's requests apart


class KVDumper:
    def __init__(self, dump_dir: str, token_to_kv_pool: Any, req_to_token: torch.Tensor, num_layers: int):
        self.dir, self.pool, self.req_to_token, self.num_layers = dump_dir, token_to_kv_pool, req_to_token, num_layers
        self.seq_len: dict[int, int] = {}
        self.head: dict[int, list[int]] = {}
        self.counter = itertools.count()
        os.makedirs(dump_dir, exist_ok=True)

    def on_forward(self, forward_batch: Any) -> None:
        offset = 0
        slots = forward_batch.req_pool_indices.tolist()
        for slot, p, n in zip(slots, forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu):
            self.seq_len[slot] = max(self.seq_len.get(slot, 0) if p else 0, p + n)
            if p == 0:
                self.head[slot] = forward_batch.input_ids[offset:offset + min(n, _HEAD_TOKENS)].tolist()
            offset += n

    def on_free(self, slot: int | None) -> None:
        if slot is None or slot not in self.seq_len:
            return
        n = self.seq_len.pop(slot)
        locs = self.req_to_token[slot, :n].long()
        record = {"head_tokens": self.head.pop(slot, []), "seq_len": n}
        for name, layer in (("first", 0), ("last", self.num_layers - 1)):
            k, v = self.pool.get_kv_buffer(layer)
            record[f"k_{name}"], record[f"v_{name}"] = k[locs].cpu(), v[locs].cpu()
        torch.save(record, os.path.join(self.dir, f"kv_pid{os.getpid()}_{next(self.counter)}.pt"))


def load_dumps(dump_dir: str) -> dict[tuple[int, ...], dict]:
    """Records keyed by their first prompt tokens (the last record wins for a repeated prompt)."""
    out = {}
    for name in sorted(os.listdir(dump_dir)):
        if name.startswith("kv_") and name.endswith(".pt"):
            rec = torch.load(os.path.join(dump_dir, name))
            out[tuple(rec["head_tokens"])] = rec
    return out
