"""JIT-compile FlashInfer's bf16 prefill modules (paged and ragged, fa2 and fa3) for the given head dims.

A fresh GPU host compiles each (head dim, backend) module on first use, ~1-2 minutes apiece. The shipped
checkpoint has head_dim 64, and the carried compile cache (.cache/fi.txz) held only head_dim 128 modules, so
its server spent 213 s in start-up on the H200 (benchmarks/results/raw/robustness_*). Running this in the
background during another job builds the modules SGLang's FlashInfer backend loads (same dtype, positional
encoding, no sliding window, no logits cap, fp32 QK reduction: the flags that name a module), and
`tools/gpu_run.sh cache64` packs the resulting .so files for the next machine. GPU only.

Usage: python tools/warm_flashinfer.py [HEAD_DIM ...]   (default: 64)
"""

from __future__ import annotations

import sys
import time

import torch


def warm(head_dim: int, backend: str) -> None:
    import flashinfer

    dev, bf16 = "cuda", torch.bfloat16
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    hq, hkv, tokens, keys = 4, 2, 8, 16
    qo = torch.tensor([0, tokens], dtype=torch.int32)
    kv_indptr = torch.tensor([0, keys], dtype=torch.int32)
    q = torch.randn(tokens, hq, head_dim, dtype=bf16, device=dev)
    k = torch.randn(keys, hkv, head_dim, dtype=bf16, device=dev)
    v = torch.randn(keys, hkv, head_dim, dtype=bf16, device=dev)
    paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    paged.plan(qo, kv_indptr, torch.arange(keys, dtype=torch.int32), torch.ones(1, dtype=torch.int32), hq, hkv,
               head_dim, 1, causal=False, q_data_type=bf16)
    paged.run(q, (k.unsqueeze(1), v.unsqueeze(1)), return_lse=True)
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
    ragged.plan(qo, kv_indptr, hq, hkv, head_dim, causal=True, q_data_type=bf16)
    ragged.run(q, k, v, return_lse=True)
    torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    failures = 0
    for head_dim in [int(a) for a in argv] or [64]:
        for backend in ("fa2", "fa3"):
            t0 = time.time()
            try:
                warm(head_dim, backend)
                print(f"head_dim {head_dim} {backend}: ready in {time.time() - t0:.0f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - report every variant; one failing leaves the others useful
                failures += 1
                print(f"head_dim {head_dim} {backend}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
