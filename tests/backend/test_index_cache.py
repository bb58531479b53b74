"""Host-side step planning and the index cache's lifecycle, with no GPU and no SGLang."""

import json
from types import SimpleNamespace

import pytest

from sglang_mage.config import MageConfig
from sglang_mage.hooks import install_slot_free_listener
from sglang_mage.index_cache import MageIndexCache, Phase

CFG = MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0)  # budget 12


def make(cfg=CFG, rows=5):
    return MageIndexCache(rows, num_layers=3, num_kv_heads=2, cfg=cfg, device="cpu")


def masked():
    return True


def mask_free():
    return False


def test_memory_is_bounded_and_matches_formula():
    cache = make()
    assert cache.slots.shape == (5, 3, 2, 12)
    assert cache.nbytes == MageIndexCache.nbytes_for(5, 3, 2, CFG) == 5 * 3 * 2 * (12 * 4 + 4)


def test_block_lifecycle_first_then_sparse():
    cache = make()
    slots, prefix = [1, 3], [40, 100]
    assert cache.plan(slots, prefix, masked).phase == Phase.FIRST
    for _ in range(3):  # later denoising steps and the commit pass
        assert cache.plan(slots, prefix, masked).phase == Phase.SPARSE
    assert cache.plan(slots, [44, 104], masked).phase == Phase.FIRST  # the next block
    assert cache.occupancy() == 2
    assert (cache.stats.first_forwards, cache.stats.sparse_forwards) == (2, 3)


def test_mask_free_prompt_block_is_plain_dense_and_not_cached():
    cache = make()
    calls = []

    def probe():
        calls.append(1)
        return False

    plan = cache.plan([1], [40], probe)
    assert plan.phase == Phase.DENSE and calls == [1]
    assert cache.occupancy() == 0


def test_has_mask_is_not_probed_on_later_steps_with_sparse_commit():
    cache = make()
    cache.plan([1], [40], masked)

    def boom():
        raise AssertionError("no GPU sync expected on a later step")

    assert cache.plan([1], [40], boom).phase == Phase.SPARSE


def test_commit_pass_dense_when_sparse_commit_off():
    cache = make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=0, sparse_commit=False))
    cache.plan([1], [40], masked)
    assert cache.plan([1], [40], masked).phase == Phase.SPARSE
    assert cache.plan([1], [40], mask_free).phase == Phase.DENSE


@pytest.mark.parametrize("prefix, expect", [(0, Phase.DENSE), (12, Phase.DENSE), (13, Phase.FIRST)])
def test_prefix_within_budget_stays_exact(prefix, expect):
    cache = make()
    assert cache.plan([2], [prefix], masked).phase == expect
    later = cache.plan([2], [prefix], masked).phase
    assert later == (Phase.DENSE if expect == Phase.DENSE else Phase.SPARSE)


def test_min_context_keeps_attention_exact():
    cache = make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=1000))
    assert cache.plan([1], [500], masked).phase == Phase.DENSE
    assert cache.plan([1], [500], masked).phase == Phase.DENSE
    # A batch that mixes an exact request with a sparse one runs dense after the first step.
    assert cache.plan([1, 2], [504, 2000], masked).phase == Phase.FIRST
    assert cache.plan([1, 2], [504, 2000], masked).phase == Phase.DENSE


def test_force_sparse_sends_short_prefixes_to_the_sparse_kernel():
    cache = make(MageConfig(k=4096, min_context=0, force_sparse=True))
    assert cache.plan([1, 2], [3, 40], masked).phase == Phase.FIRST
    assert cache.plan([1, 2], [3, 40], masked).phase == Phase.SPARSE


def test_free_invalidates_and_reused_slot_starts_fresh():
    cache = make()
    cache.plan([1], [40], masked)
    cache.lens[1].fill_(7)
    cache.invalidate(1)
    assert cache.occupancy() == 0 and int(cache.lens[1].sum()) == 0
    # A new request in the same slot with the same prefix length is a new block, not a later step.
    assert cache.plan([1], [40], masked).phase == Phase.FIRST


def test_flush_drops_everything():
    cache = make()
    cache.plan([1, 2, 3], [40, 50, 60], masked)
    cache.lens.fill_(1)
    cache.invalidate(None)
    assert cache.occupancy() == 0 and int(cache.lens.sum()) == 0


def test_slot_free_listener_wraps_only_the_given_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_MAGE_STATS_PATH", str(tmp_path / "stats.json"))
    freed = []

    class Pool:
        def free(self, req):
            freed.append(req.req_pool_idx)
            req.req_pool_idx = None

        def clear(self):
            freed.append("all")

    pool, other = Pool(), Pool()
    cache = make()
    install_slot_free_listener(pool, cache.invalidate)
    for i in range(200):  # sequential requests reusing slots 1..4
        slot = 1 + i % 4
        cache.plan([slot], [40 + 4 * (i % 3)], masked)
        cache.plan([slot], [40 + 4 * (i % 3)], masked)
        pool.free(SimpleNamespace(req_pool_idx=slot))
    assert cache.occupancy() == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["occupancy"] == 0 and stats["first_forwards"] == 200 and stats["sparse_forwards"] == 200
    cache.plan([1], [40], masked)
    pool.clear()
    assert cache.occupancy() == 0 and freed[-1] == "all"
    other.free(SimpleNamespace(req_pool_idx=2))  # another pool: untouched, no listener
    assert not hasattr(other, "_mage_listeners")


def test_short_and_long_requests_share_sparse_steps():
    # A prefix within the budget is kept whole by selection, so the sparse kernel stays exact for it and the
    # long request next to it keeps its sparse steps.
    cache = make(MageConfig(k=8, sink_tokens=2, local_window=2, min_context=100))
    assert cache.plan([1, 2], [8, 400], masked).phase == Phase.FIRST
    assert cache.plan([1, 2], [8, 400], masked).phase == Phase.SPARSE
