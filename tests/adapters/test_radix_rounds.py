"""Incremental radix caching of dLLM rounds (sglang_mage/radix_rounds.py) against SGLang's own
`RadixCache.cache_unfinished_req`, on SGLang's real radix tree and request-to-token pool (CPU).

Two identical worlds replay the same scheduler script, one calling upstream and one the incremental
path; after every call the trees (keys, values, locks, priorities), the sizes, the request fields, the
request-to-token rows and the freed KV indices must be identical."""

from __future__ import annotations

import random
from array import array
from types import SimpleNamespace

import pytest
import torch

radix_cache = pytest.importorskip("sglang.srt.mem_cache.radix_cache")
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402

from sglang_mage import radix_rounds  # noqa: E402

PAGE = 32
UPSTREAM = radix_cache.RadixCache.cache_unfinished_req


class Req(SimpleNamespace):
    def get_fill_ids(self):
        return self.tokens[: self.fill_len]


class World:
    """A radix cache, a request-to-token pool, a KV allocator that records frees, and requests."""

    def __init__(self, incremental: bool):
        self.incremental = incremental
        self.freed: list[int] = []
        allocator = SimpleNamespace(device="cpu", free=lambda idx: self.freed.extend(idx.tolist()))
        self.pool = ReqToTokenPool(8, 4096, "cpu", False)
        self.cache = radix_cache.RadixCache(CacheInitParams(
            disable=False, req_to_token_pool=self.pool, token_to_kv_pool_allocator=allocator, page_size=PAGE))
        self.next_kv = 1000
        self.reqs: dict[str, Req] = {}
        self.used_incremental = 0

    def admit(self, name: str, tokens: array, fill_len: int, priority: int = 0) -> None:
        """As SGLang admits a request: match its prefix, lock it, allocate KV for the rest of the extend."""
        slot = self.pool.free_slots.pop(0)
        req = Req(rid=name, tokens=tokens, fill_len=0, req_pool_idx=slot, extra_key=None, priority=priority,
                  dllm_config=object(), cache_protected_len=0, last_node=self.cache.root_node,
                  prefix_indices=torch.empty(0, dtype=torch.int64))
        m = self.cache.match_prefix(MatchPrefixParams(key=radix_cache.RadixKey(tokens[:fill_len])))
        req.prefix_indices, req.last_node = m.device_indices, m.last_device_node
        req.cache_protected_len = len(req.prefix_indices)
        self.cache.inc_lock_ref(req.last_node)
        self.pool.write((slot, slice(0, len(req.prefix_indices))), req.prefix_indices)
        self.reqs[name] = req
        self.extend(name, fill_len)

    def extend(self, name: str, new_fill_len: int) -> None:
        """One round: KV for the tokens past the request's prefix, then the round's caching call."""
        req = self.reqs[name]
        start = len(req.prefix_indices)
        kv = torch.arange(self.next_kv, self.next_kv + new_fill_len - start, dtype=torch.int32)
        self.next_kv += len(kv)
        self.pool.write((req.req_pool_idx, slice(start, new_fill_len)), kv)
        req.fill_len = new_fill_len
        if self.incremental:
            assert radix_rounds.incremental_applies(self.cache, req, True) == (req.cache_protected_len > 0)
            if radix_rounds.incremental_applies(self.cache, req, True):
                assert radix_rounds.cache_unfinished_req_incremental(self.cache, req, True)
                self.used_incremental += 1
                return
        UPSTREAM(self.cache, req, chunked=True)

    def state(self) -> dict:
        nodes = []
        stack = [(self.cache.root_node, ())]
        while stack:
            node, path = stack.pop()
            for child_key in sorted(node.children, key=repr):
                child = node.children[child_key]
                child_path = path + tuple(child.key.token_ids)
                nodes.append((len(path), tuple(child.key.token_ids), tuple(child.value.tolist()), child.lock_ref,
                              child.priority, child.hit_count, child in self.cache.evictable_leaves))
                stack.append((child, child_path))
        reqs = {}
        for name, req in self.reqs.items():
            depth, node = 0, req.last_node
            while node is not self.cache.root_node:
                depth, node = depth + len(node.key), node.parent
            reqs[name] = (req.cache_protected_len, tuple(req.prefix_indices.tolist()), depth,
                          tuple(self.pool.req_to_token[req.req_pool_idx, : req.fill_len].tolist()))
        return dict(nodes=sorted(nodes), reqs=reqs, freed=list(self.freed),
                    sizes=(self.cache.evictable_size_, self.cache.protected_size_))


def tokens(seed: int, n: int, shared: array | None = None) -> array:
    rng = random.Random(seed)
    head = list(shared) if shared is not None else []
    return array("q", head + [rng.randrange(1, 5000) for _ in range(n - len(head))])


def run(script, incremental: bool) -> tuple[list[dict], World]:
    world = World(incremental)
    states = []
    for op, *args in script:
        getattr(world, op)(*args)
        states.append(world.state())
    return states, world


def compare(script) -> World:
    upstream, _ = run(script, incremental=False)
    ours, world = run(script, incremental=True)
    for i, (a, b) in enumerate(zip(upstream, ours)):
        assert a == b, f"step {i} ({script[i]}): the incremental path left another state than upstream"
    return world


def test_one_request_chunked_prompt_then_blocks():
    # A prompt that ends mid-page (1000 tokens), prefilled in 256-token shares, then 32-token blocks.
    t = tokens(0, 1000 + 12 * 32)
    script = [("admit", "a", t, 256)] + [("extend", "a", n) for n in (512, 768, 1000)]
    script += [("extend", "a", 1000 + 32 * i) for i in range(1, 13)]
    world = compare(script)
    assert world.used_incremental == len(script) - 1


def test_shared_prefix_splits_the_other_requests_nodes():
    # b shares a's first 300 tokens: its insert splits a's nodes inside a page-aligned 288, a's last node
    # included, while both keep going.
    a = tokens(1, 1600)
    b = tokens(2, 1600, shared=a[:300])
    script = [("admit", "a", a, 512), ("extend", "a", 640), ("admit", "b", b, 320)]
    for i in range(1, 9):
        script += [("extend", "a", 640 + 64 * i), ("extend", "b", 320 + 96 * i)]
    compare(script)


def test_identical_prompts_share_the_tree_and_free_duplicates():
    # Two requests with the same prompt admitted before either is cached: the second one's rounds find the
    # first one's nodes, keep the tree's KV and free its own.
    t = tokens(3, 1400)
    u = array("q", t)
    script = [("admit", "a", t, 256), ("admit", "b", u, 256)]
    for n in range(384, 1400, 128):
        script += [("extend", "a", n), ("extend", "b", n)]
    world = compare(script)
    assert world.freed, "the duplicate KV of the second request was never freed"


def test_priority_and_access_time_refresh_the_whole_path():
    t = tokens(4, 900)
    script = [("admit", "a", t, 256), ("extend", "a", 512), ("admit", "b", array("q", t), 512, 7),
              ("extend", "b", 640), ("extend", "b", 896)]
    compare(script)
    world = World(incremental=True)
    world.admit("a", t, 512)
    before = {id(n): n.last_access_time for n in _path(world, "a")}
    world.extend("a", 640)
    after = {id(n): n.last_access_time for n in _path(world, "a")}
    assert all(after[k] >= v for k, v in before.items() if k in after)


def _path(world: World, name: str) -> list:
    node, out = world.reqs[name].last_node, []
    while node is not world.cache.root_node:
        out.append(node)
        node = node.parent
    return out


def test_untrusted_last_node_falls_back_without_changes():
    world = World(incremental=True)
    t = tokens(5, 800)
    world.admit("a", t, 256)
    world.extend("a", 512)
    req = world.reqs["a"]
    req.cache_protected_len -= PAGE  # no longer the depth of its last node
    req.fill_len = 640
    before = world.state()
    assert not radix_rounds.cache_unfinished_req_incremental(world.cache, req, True)
    assert world.state() == before


def test_only_chunked_dllm_rounds_on_a_plain_radix_cache():
    world = World(incremental=True)
    t = tokens(6, 600)
    world.admit("a", t, 256)
    world.extend("a", 512)
    req = world.reqs["a"]
    assert radix_rounds.incremental_applies(world.cache, req, True)
    assert not radix_rounds.incremental_applies(world.cache, req, False)
    assert not radix_rounds.incremental_applies(world.cache, SimpleNamespace(**{**vars(req), "dllm_config": None}), True)
    world.cache.is_eagle = True
    assert not radix_rounds.incremental_applies(world.cache, req, True)


def test_hook_calls_upstream_unless_the_server_runs_the_plugin(monkeypatch):
    calls = []

    def original(cache, req, chunked=False):
        calls.append(chunked)

    world = World(incremental=True)
    t = tokens(7, 600)
    world.admit("a", t, 256)
    world.extend("a", 512)
    req = world.reqs["a"]
    req.fill_len = 576
    world.pool.write((req.req_pool_idx, slice(512, 576)), torch.arange(64, dtype=torch.int32) + 90000)
    monkeypatch.setattr(radix_rounds, "_global_server_args", lambda: SimpleNamespace(attention_backend="flashinfer"))
    monkeypatch.delenv("SGLANG_MAGE_BENCH_ANY_BACKEND", raising=False)
    radix_rounds.cache_unfinished_req_around(original, world.cache, req, chunked=True)
    assert calls == [True] and req.cache_protected_len == 512
    monkeypatch.setattr(radix_rounds, "_global_server_args", lambda: SimpleNamespace(attention_backend="mage"))
    radix_rounds.cache_unfinished_req_around(original, world.cache, req, chunked=True)
    assert calls == [True] and req.cache_protected_len == 576
