"""Scheduler time that SGLang's radix cache spends per dLLM round, upstream against the plugin's incremental
caching (sglang_mage/radix_rounds.py). CPU only: it is host work, and it runs on SGLang's real RadixCache.

A request of `context` tokens is cached the way the dLLM scheduler caches it: its prompt in rounds of
`share` tokens (the request's share of a chunked-prefill forward: 512 for 16 requests in an 8K chunk; 32 for
block-by-block prefill), which leaves context / share nodes on its path. Then each timed round adds one
32-token block and makes the round's caching call, `cache_unfinished_req(req, chunked=True)`, as
`Scheduler.stash_chunked_request` does. The figure is ms per request per round: a batch of 16 pays it 16
times per block.

Writes benchmarks/results/radix_rounds.json (rows {context, share, nodes, method, ms_per_round}) and prints
a table. Usage: python benchmarks/bench_radix_rounds.py [--contexts 32768 131072] [--shares 512 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from array import array
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from results_io import write_json  # noqa: E402

BLOCK = 32


def build(context: int, share: int, rounds: int):
    """A radix cache holding one request's `context` tokens cached in rounds of `share`, and that request."""
    import torch
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache

    from sglang_mage import radix_rounds

    total = context + (rounds + 1) * BLOCK
    pool = ReqToTokenPool(2, total, "cpu", False)
    cache = RadixCache(CacheInitParams(disable=False, req_to_token_pool=pool, page_size=BLOCK,
                                       token_to_kv_pool_allocator=SimpleNamespace(device="cpu", free=lambda _: None)))
    rng = random.Random(context + share)
    tokens = array("q", [rng.randrange(1, 150000) for _ in range(total)])
    pool.write((1, slice(0, total)), torch.arange(1, total + 1, dtype=torch.int32))
    req = SimpleNamespace(tokens=tokens, fill_len=0, req_pool_idx=1, extra_key=None, priority=0,
                          dllm_config=object(), cache_protected_len=0, last_node=cache.root_node,
                          prefix_indices=torch.empty(0, dtype=torch.int64))
    req.get_fill_ids = lambda: req.tokens[: req.fill_len]
    for fill in range(share, context + 1, share):
        req.fill_len = fill
        if not (radix_rounds.incremental_applies(cache, req, True)
                and radix_rounds.cache_unfinished_req_incremental(cache, req, True)):
            RadixCache.cache_unfinished_req(cache, req, chunked=True)
    return cache, req


def time_rounds(context: int, share: int, method: str, rounds: int) -> tuple[float, int]:
    from sglang.srt.mem_cache.radix_cache import RadixCache

    from sglang_mage import radix_rounds

    cache, req = build(context, share, rounds)
    nodes = sum(1 for _ in _walk(cache.root_node)) - 1
    times = []
    for _ in range(rounds):
        req.fill_len += BLOCK
        t0 = time.perf_counter()
        if method == "upstream":
            RadixCache.cache_unfinished_req(cache, req, chunked=True)
        else:
            assert radix_rounds.cache_unfinished_req_incremental(cache, req, True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, nodes


def _walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    ap.add_argument("--shares", nargs="+", type=int, default=[512, 32],
                    help="prompt tokens per request per prefill round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "radix_rounds.json"))
    args = ap.parse_args(argv)
    import sglang
    from tqdm import tqdm

    points = [(c, s, m) for c in args.contexts for s in args.shares for m in ("upstream", "incremental")]
    rows = []
    for context, share, method in tqdm(points, desc="radix rounds", unit="point"):
        ms, nodes = time_rounds(context, share, method, args.rounds)
        rows.append({"context": context, "share": share, "nodes": nodes, "method": method,
                     "ms_per_round": round(ms, 3)})
    print(f"{'context':>8} {'share':>6} {'nodes':>6} {'upstream ms':>12} {'incremental ms':>15}")
    for context in args.contexts:
        for share in args.shares:
            up, inc = (next(r for r in rows if (r["context"], r["share"], r["method"]) == (context, share, m))
                       for m in ("upstream", "incremental"))
            print(f"{context:>8} {share:>6} {up['nodes']:>6} {up['ms_per_round']:>12.3f} {inc['ms_per_round']:>15.3f}")
    write_json(args.out, {
        "environment": {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "sglang": sglang.__version__},
        "config": {"page_size": BLOCK, "rounds": args.rounds, "statistic": "median ms per request per round",
                   "call": "RadixCache.cache_unfinished_req(req, chunked=True), as stash_chunked_request"},
        "rows": rows,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
