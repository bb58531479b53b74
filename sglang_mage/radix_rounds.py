"""Incremental radix caching of dLLM rounds (scheduler hook H5).

Why: SGLang 0.5.14 caches every running dLLM request once per round, i.e. once per block
(`Scheduler.stash_chunked_request` -> `RadixCache.cache_unfinished_req(req, chunked=True)`). That call
inserts the request's whole token sequence from the root and then matches it again from the root. Every
node on the way copies the rest of the key (`key = key[prefix_len:]` in `_insert_helper` and
`_match_prefix_helper`), so one round costs O(nodes x context) in Python. A request gains a node per round:
a 128K prompt prefilled in 512-token shares of a chunk (16 requests in an 8K chunk) holds 256 nodes, one
prefilled block by block holds 4096. `benchmarks/bench_radix_rounds.py` measures it: at 128K and 256 nodes
one request's round costs 14 ms of scheduler time on the H200 host's CPU (181 ms at 4096 nodes), so 16 such
requests spend over 0.2 s per block in the radix tree, about twice mage's whole block at 16 x 128K
(benchmarks/results/radix_rounds.json, e2e.json).

What: when the request's `last_node` is the node that ends exactly at its `cache_protected_len` (what
upstream's previous call left), only the new part of the key, [cache_protected_len, page-aligned fill),
is inserted and matched, below that node, with upstream's own `_insert_helper` and `_match_prefix_helper`.
The path above is locked by this request, so no eviction can have changed it; a split by another request
keeps `last_node` as the lower half, still at the same depth (checked on every call). The path's access
times and priorities are refreshed as upstream's walk from the root refreshes them, and the lock moves
from the old to the new last node by counting only the nodes between them (upstream unlocks the whole path
and locks it again: the same counts). tests/adapters/test_radix_rounds.py runs upstream and this side by
side over shared prefixes, splits and partial pages, and compares the trees, the request fields, the KV
frees and the sizes after every call. Any other case (a first insert, another cache class, EAGLE bigram
keys, a non-chunked call) runs upstream unchanged.

Active with `--attention-backend mage`, and for any backend under the benchmark variable
chunked_prefill.BENCH_ANY_BACKEND_ENV, so that baselines are timed with the same scheduler.
Removal: once SGLang's `cache_unfinished_req` starts from `req.last_node`, or `RadixKey` slices are views.
"""

from __future__ import annotations

import time
from typing import Any

from .chunked_prefill import _global_server_args, scheduler_fixes_on

_SRT = "sglang.srt"
TARGET_MODULE = f"{_SRT}.mem_cache.radix_cache"


def _path_depth_and_touch(cache: Any, node: Any, priority: int, now: float) -> int | None:
    """Tokens from the root to `node`, refreshing each node's access time and priority on the way, as
    upstream's insert and match from the root do. None when `node` is no longer in this tree."""
    depth = 0
    while node is not cache.root_node:
        parent = node.parent
        if parent is None or node.key is None:
            return None
        depth += len(node.key)
        node.last_access_time = now
        node.priority = max(node.priority, priority)
        node = parent
    node.last_access_time = now
    node.priority = max(node.priority, priority)
    return depth


def _move_lock(cache: Any, old: Any, new: Any) -> None:
    """Upstream's dec_lock_ref(old) then inc_lock_ref(new), for `new` at or below `old`: the path down to
    `old` keeps its counts, so only the nodes strictly between gain this request's lock."""
    node = new
    while node is not old:
        if node is cache.root_node or node is None:
            raise RuntimeError("sglang-mage: the radix node matched for a dLLM round is not below the request's "
                               "previous node; please report this with the SGLang version")
        if node.lock_ref == 0:
            cache.evictable_size_ -= len(node.key)
            cache.protected_size_ += len(node.key)
        node.lock_ref += 1
        cache._update_leaf_status(node)
        node = node.parent


def incremental_applies(cache: Any, req: Any, chunked: bool) -> bool:
    from sglang.srt.mem_cache.radix_cache import RadixCache

    return (
        chunked
        and type(cache) is RadixCache  # subclasses (HiCache, LMCache) keep their own bookkeeping
        and not cache.disable
        and not cache.is_eagle
        and getattr(req, "dllm_config", None) is not None
        and req.last_node is not None
        and req.last_node is not cache.root_node
        and req.cache_protected_len > 0
    )


def cache_unfinished_req_incremental(cache: Any, req: Any, chunked: bool = True) -> bool:
    """Upstream's cache_unfinished_req for one dLLM round, walking only the new part of the key. Returns
    False (and changes nothing) when the request's last node cannot be trusted; the caller then runs upstream."""
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey

    start = req.cache_protected_len
    old = req.last_node
    token_ids = req.get_fill_ids()
    aligned = len(token_ids) // cache.page_size * cache.page_size
    if aligned < start or old.key.extra_key != req.extra_key:
        return False
    priority = getattr(req, "priority", 0) or 0
    if _path_depth_and_touch(cache, old, priority, time.monotonic()) != start:
        return False

    row = cache.req_to_token_pool.req_to_token[req.req_pool_idx]
    kv_indices = row[: len(token_ids)]
    suffix = RadixKey(token_ids[start:aligned], req.extra_key)
    values = kv_indices[start:aligned].to(dtype=torch.int64, copy=True)
    new_prefix_len = start + cache._insert_helper(old, suffix, values, priority, chunked)
    # What the tree already held for this request's new tokens stays; the request's duplicate KV goes.
    cache.token_to_kv_pool_allocator.free(kv_indices[start:new_prefix_len])

    tail_values, new_last = cache._match_prefix_helper(old, suffix)
    tail = torch.cat(tail_values) if tail_values else values[:0]
    if start + len(tail) != aligned:
        raise RuntimeError(f"sglang-mage: a dLLM round matched {start + len(tail)} of its {aligned} cached tokens")
    cache.req_to_token_pool.write((req.req_pool_idx, slice(start, aligned)), tail)
    new_indices = torch.cat([row[:start].to(torch.int64), tail])
    req.cache_protected_len = aligned
    _move_lock(cache, old, new_last)
    req.prefix_indices = (torch.cat([new_indices, kv_indices[aligned:]]) if aligned < len(kv_indices)
                          else new_indices)
    req.last_node = new_last
    return True


def cache_unfinished_req_around(original: Any, self: Any, req: Any, chunked: bool = False, **kwargs: Any) -> Any:
    if (not kwargs and incremental_applies(self, req, chunked) and scheduler_fixes_on(_global_server_args())
            and cache_unfinished_req_incremental(self, req, chunked)):
        return None
    return original(self, req, chunked=chunked, **kwargs)


def register_radix_rounds_hook() -> None:
    from sglang.srt.plugins.hook_registry import HookType

    from .compat import hook_when_imported

    hook_when_imported(TARGET_MODULE, f"{TARGET_MODULE}.RadixCache.cache_unfinished_req",
                       cache_unfinished_req_around, HookType.AROUND)
