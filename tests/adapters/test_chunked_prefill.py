"""Chunked dLLM prompt prefill (sglang_mage/chunked_prefill.py), scheduler side: SGLang's real Req,
PrefillAdder, DllmManager and SchedulerDllmMixin (`get_new_batch_dllm`), and ForwardBatch.init_new for the
positions, with the hooks applied; a page-aligned prefix cache and the dLLM algorithm's result are stand-ins.
Each round records what the forward would see, and chunking off / other backends must equal a run with
SGLang's original functions restored."""

from __future__ import annotations

import importlib
from array import array
from types import SimpleNamespace

import pytest
import torch

from sglang_mage import chunked_prefill as cp
from sglang_mage.config import MageConfig

B, MASK = 4, 999
PROMPT0 = 100  # request k's prompt is PROMPT0 + 1000 k + position; its outputs 10_000 (k + 1) + position


class Args:
    """ServerArgs stand-in (also the global one): flags SGLang reads and we do not set are off."""

    def __init__(self, backend="mage", chunk=None, chunked_prefill_size=8192, max_prefill_tokens=16384):
        self.attention_backend = backend
        self.mage_config = MageConfig(prefill_chunk_size=chunk)
        self.chunked_prefill_size = chunked_prefill_size
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_max_requests = None
        self.dllm_algorithm = "LowConfidence"

    def __getattr__(self, name):
        return False if name.startswith(("enable", "is_", "disable")) else None


class Namespace:
    """Attributes SGLang reads and the test does not set are None."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __getattr__(self, name):
        return False if name.startswith(("enable", "is_", "disable", "return_")) else None


class PrefixCache:
    """Radix-cache stand-in: page-aligned longest-prefix match over every inserted sequence."""

    disable = False

    def __init__(self, page=B):
        self.page, self.store, self.inserts = page, set(), []

    def insert(self, rid, tokens):
        aligned = tuple(tokens)[: len(tokens) // self.page * self.page]
        self.store.add(aligned)
        self.inserts.append((rid, aligned))

    def match_prefix(self, params):
        key = params.key
        tokens = list(key.token_ids[: key.limit] if key.limit is not None else key.token_ids)
        best = 0
        for seq in self.store:
            n = 0
            while n < min(len(seq), len(tokens)) and seq[n] == tokens[n]:
                n += 1
            best = max(best, n // self.page * self.page)
        return SimpleNamespace(device_indices=torch.arange(best), last_device_node=None, last_host_node=None,
                               best_match_node=None, host_hit_length=0, swa_host_hit_length=0,
                               mamba_host_hit_length=0, mamba_branching_seqlen=None, cache_protected_len=None)

    def cache_unfinished_req(self, req, chunked=False):
        self.insert(req.rid, req.get_fill_ids())
        req.prefix_indices = torch.arange(req.fill_len)  # as the radix cache leaves it: one index per fill token

    def supports_mamba(self):
        return False

    def is_tree_cache(self):
        return False

    def evictable_size(self):
        return 0

    full_evictable_size = evictable_size

    def inc_lock_ref(self, node):
        return SimpleNamespace(swa_uuid_for_lock=None)

    def dec_lock_ref(self, node, *args):
        pass


def scheduler_cls():
    from sglang.srt.dllm.mixin.scheduler import DllmManager, SchedulerDllmMixin

    class Scheduler(SchedulerDllmMixin):
        def __init__(self, args, max_running, available, max_prefill_tokens=16384):
            from sglang.srt.dllm.config import DllmConfig

            self.server_args = args
            self.dllm_config = DllmConfig("LowConfidence", {}, B, MASK, max_running)
            self.dllm_manager = DllmManager(self.dllm_config)
            self.running_batch = SimpleNamespace(reqs=[], batch_is_full=False, batch_size=lambda: 0)
            self.waiting_queue, self.page_size, self.tree_cache = [], B, PrefixCache()
            self.policy = SimpleNamespace(calc_priority=lambda q: None)
            self.token_to_kv_pool_allocator = SimpleNamespace(available_size=lambda: self.available)
            self.available = available
            self.new_token_ratio_tracker = SimpleNamespace(current=0.5)
            self.max_prefill_tokens, self.chunked_prefill_size = max_prefill_tokens, args.chunked_prefill_size
            self.is_mixed_chunk = self.enable_priority_preemption = self.enable_priority_scheduling = False
            self.priority_scheduling_preemption_threshold, self.truncation_align_size = 0, None
            self.adders, self.books = [], []

        def get_num_allocatable_reqs(self, running_bs):
            return 64

        def _add_request_to_queue(self, req):
            raise AssertionError("nothing is preempted here")

        def _create_dllm_batch(self, reqs, forward_mode):
            # Instead of ScheduleBatch: the lengths and ids prepare_for_extend derives from the same requests.
            from sglang.srt.model_executor.forward_batch_info import ForwardBatch

            self.adders.append(self.adder)
            self.books.append((self.adder.log_input_tokens, sum(r.extend_input_len for r in reqs)))
            prefix = [len(r.prefix_indices) for r in reqs]
            ids = [t for r, p in zip(reqs, prefix) for t in r.get_fill_ids()[p:]]
            batch = Namespace(forward_mode=forward_mode, reqs=reqs, dllm_config=self.dllm_config,
                              prefix_lens=prefix, extend_lens=[r.extend_input_len for r in reqs],
                              input_ids=torch.tensor(ids), extend_num_tokens=len(ids),
                              seq_lens=torch.tensor([r.fill_len for r in reqs]),
                              seq_lens_cpu=torch.tensor([r.fill_len for r in reqs]),
                              req_pool_indices=torch.arange(len(reqs)), out_cache_loc=torch.arange(len(ids)),
                              extend_logprob_start_lens=[0] * len(reqs), multimodal_inputs=[None] * len(reqs))
            runner = Namespace(device="cpu", server_args=self.server_args, use_ngram_embedding=False,
                               model_is_mrope=False)
            return batch, ForwardBatch.init_new(batch, runner)

    return Scheduler


@pytest.fixture(autouse=True)
def sglang_env(monkeypatch):
    import sglang.srt.model_executor.forward_batch_info as fbi
    import sglang.srt.server_args as server_args

    for hook in cp.HOOKS:
        importlib.import_module(hook.module)
    cp.register_chunked_prefill_hooks()  # the modules are imported: hooks are applied at once
    from sglang.srt.dllm.mixin.scheduler import SchedulerDllmMixin

    assert hasattr(SchedulerDllmMixin._process_dllm_batches, "__wrapped__")
    # Outside a launched server: no expert-parallel group, and positions through SGLang's torch reference.
    monkeypatch.setattr(fbi, "enable_num_token_non_padded", lambda: False)
    monkeypatch.setattr(fbi, "compute_position", lambda backend, p, n, total: fbi.compute_position_torch(p, n))
    monkeypatch.setattr(server_args, "_global_server_args", None)
    yield server_args


def restore_upstream(monkeypatch):
    for hook in cp.HOOKS:
        owner_name, attr = hook.target.rsplit(".", 1)
        owner = getattr(importlib.import_module(hook.module), owner_name)
        raw = owner.__dict__[attr]
        if isinstance(raw, classmethod):
            monkeypatch.setattr(owner, attr, classmethod(raw.__func__.__wrapped__))
        else:
            monkeypatch.setattr(owner, attr, raw.__wrapped__)


def make_req(rid, tokens, max_new, dllm_config):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new)
    params.normalize(None)
    return Req(rid, "", array("q", tokens), params, dllm_config=dllm_config, vocab_size=100_000)


def serve(sglang_env, args, prompts, max_new=4, max_running=None, cached=(), available=10**6, rounds=40,
          max_prefill_tokens=16384, before_round=None):
    """Run scheduler rounds until every request is done; returns (rounds, scheduler, requests). A round is
    [(rid, phase, prefix, dllm_block_offset, extend, positions, extend tokens with 'M' for [MASK])]."""
    sglang_env._global_server_args = args
    sched = scheduler_cls()(args, max_running or len(prompts), available, max_prefill_tokens)
    for seq in cached:
        sched.tree_cache.insert("cached", seq)
    reqs = [make_req(f"r{k}", p if isinstance(p, list) else list(range(PROMPT0 + 1000 * k, PROMPT0 + 1000 * k + p)),
                     max_new, sched.dllm_config) for k, p in enumerate(prompts)]
    sched.waiting_queue.extend(reqs)
    trace = []
    for n in range(rounds):
        if before_round:
            before_round(n, sched)
        sched.dllm_manager.filter_finished_reqs()
        for req in sched.dllm_manager.staging_queue:  # Scheduler.stash_chunked_request
            sched.tree_cache.cache_unfinished_req(req, chunked=True)
        out = sched.get_new_batch_dllm()
        if out is None:
            break
        batch, forward_batch = out
        positions = forward_batch.positions.tolist()
        assert forward_batch.positions.dtype == torch.int32  # upstream's dtype on CUDA (and here)
        assert len(positions) == len(forward_batch.input_ids) == sum(batch.extend_lens)
        rows = []
        for req, prefix, extend in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            ids = list(req.get_fill_ids()[prefix:])
            rows.append((req.rid, req.dllm_phase.value, prefix, req.dllm_block_offset, extend,
                         positions[:extend], ["M" if t == MASK else t for t in ids]))
            positions = positions[extend:]
            masks = [i for i, t in enumerate(ids) if t == MASK]
            if masks:  # LowConfidence's result: the block's masks, now tokens, from its first mask on
                assert extend == B, "a block with [MASK] must be exactly one block"
                k = int(req.rid[1:])
                new = [10_000 * (k + 1) + prefix + i for i in range(masks[0], B)]
                req.full_untruncated_fill_ids[req.fill_len - len(new): req.fill_len] = array("q", new)
                req.output_ids.extend(new)
                req.update_finish_state(new_accepted_len=len(new))
                if req.finished():  # release_kv_cache -> cache_finished_req
                    sched.tree_cache.insert(req.rid, list(req.origin_input_ids + req.output_ids)[: req.fill_len])
        trace.append(rows)
    assert all(r.finished() for r in reqs), "requests left unfinished"
    return trace, sched, reqs


def extends(trace, rid):
    return [row[4] for rnd in trace for row in rnd if row[0] == rid]


def check_invariants(trace, budget):
    """What the attention side relies on, per forward."""
    for rnd in trace:
        if any(row[4] > B for row in rnd):  # a grown batch: no [MASK] anywhere, at most C tokens
            assert all("M" not in row[6] for row in rnd) and sum(row[4] for row in rnd) <= budget
        for rid, phase, prefix, offset, extend, positions, ids in rnd:
            assert offset == prefix and prefix % B == 0 and extend % B == 0
            assert positions == list(range(prefix, prefix + extend))


@pytest.mark.parametrize(
    "length, chunk, expect",
    [
        (18, 8, [8, 8, 4, 4]),           # boundaries between blocks; 2-token tail joins the first mask block
        (18, 12, [12, 4, 4, 4]),         # the chunk ends where the full blocks end
        (10, None, [8, 4, 4]),           # default: --chunked-prefill-size
        (16, None, [16, 4]),             # an exact multiple of B: every prompt block in one forward
        (3, None, [4, 4]),               # shorter than B: its first block is t0 t1 t2 M, as upstream
        (40, 10, [8, 8, 8, 8, 8, 4]),    # C rounded down to whole blocks
        (7, None, [4, 4, 4]),            # one full block: nothing to grow
    ],
)
def test_rounds_for_prompt_lengths_and_chunk_sizes(sglang_env, length, chunk, expect):
    trace, _, _ = serve(sglang_env, Args(chunk=chunk), [length], max_new=4)
    assert extends(trace, "r0") == expect
    check_invariants(trace, chunk or 8192)
    tail = next(row for rnd in trace for row in rnd if "M" in row[6])
    assert tail[2] == length // B * B and tail[6][: length % B] == list(range(PROMPT0 + length // B * B, PROMPT0 + length))


def test_round_by_round_l18_c8_and_tree_inserts(sglang_env):
    trace, sched, _ = serve(sglang_env, Args(chunk=8), [18], max_new=4)
    p = list(range(PROMPT0, PROMPT0 + 18))
    assert [(r[0][1], r[0][2], r[0][5], r[0][6]) for r in trace] == [
        ("staging_prefill", 0, list(range(0, 8)), p[0:8]),
        ("staging_prefill", 8, list(range(8, 16)), p[8:16]),
        ("staging_decode", 16, list(range(16, 20)), p[16:18] + ["M", "M"]),
        ("staging_decode", 20, list(range(20, 24)), ["M"] * 4),
    ]
    outputs = [10_000 + pos for pos in range(18, 24)]  # request 0 writes 10_000 + position; whole blocks
    assert sched.tree_cache.inserts == [
        ("r0", tuple(p[:8])), ("r0", tuple(p[:16])), ("r0", tuple(p + outputs[:2])),
        ("r0", tuple(p + outputs)),  # finished: (origin + output)[:fill_len]
    ]


def test_same_tokens_and_kv_positions_as_upstream(sglang_env, monkeypatch):
    # What chunking must not change: every request's final tokens, the cache's final sequences, and the
    # [MASK] rounds (same prefix, positions, tokens); only the prompt rounds merge.
    prompts, cached = [30, 9, 17, 3], [tuple(range(PROMPT0, PROMPT0 + 8))]
    ours, our_sched, ours_reqs = serve(sglang_env, Args(chunk=16), prompts, max_new=6, cached=cached)
    check_invariants(ours, 16)
    restore_upstream(monkeypatch)
    theirs, their_sched, their_reqs = serve(sglang_env, Args(chunk=16), prompts, max_new=6, cached=cached)
    assert [list(r.output_ids) for r in ours_reqs] == [list(r.output_ids) for r in their_reqs]
    finals = [{rid: seq for rid, seq in s.tree_cache.inserts} for s in (our_sched, their_sched)]
    assert finals[0] == finals[1] and len(finals[0]) == 5  # four requests and the pre-cached sequence
    masked = [sorted(row for row in rnd if "M" in row[6]) for rnd in theirs]
    assert [sorted(row for row in rnd if "M" in row[6]) for rnd in ours if any("M" in row[6] for row in rnd)] == \
        [m for m in masked if m]
    assert len(ours) < len(theirs)


def test_cached_prefix_then_one_chunk(sglang_env):
    trace, _, _ = serve(sglang_env, Args(), [21], cached=[tuple(range(PROMPT0, PROMPT0 + 8))])
    assert [(r[0][2], r[0][4], r[0][5][0], r[0][5][-1]) for r in trace[:2]] == [(8, 12, 8, 19), (20, 4, 20, 23)]
    assert trace[1][0][6] == [PROMPT0 + 20, "M", "M", "M"]


def test_batch_shares_the_chunk_budget(sglang_env):
    # Three prompts admitted together (one block each: 12 of C = 16); the 4 left go to the first request.
    # Requests in their [MASK] phase wait while any prompt is being prefilled (upstream's rule), so a
    # batch never mixes the two.
    trace, sched, _ = serve(sglang_env, Args(chunk=16), [30, 9, 17], max_new=4)
    assert [[(row[0], row[2], row[4]) for row in rnd] for rnd in trace[:4]] == [
        [("r0", 0, 8), ("r1", 0, 4), ("r2", 0, 4)],
        [("r0", 8, 8), ("r1", 4, 4), ("r2", 4, 4)],
        [("r0", 16, 12), ("r2", 8, 4)],  # r1's next block holds its tail and masks: it waits
        [("r2", 12, 4)],
    ]
    assert [sorted(row[0] for row in rnd) for rnd in trace[4:]] == [["r0", "r1", "r2"]] * 2
    check_invariants(trace, 16)
    for rid, length in (("r0", 30), ("r1", 9), ("r2", 17)):
        prompt_rounds = [row for rnd in trace for row in rnd if row[0] == rid and "M" not in row[6]]
        assert sum(row[4] for row in prompt_rounds) == length // B * B
    # The adder's books hold every grown token: memory offsets and the prefill metrics (log_input_tokens).
    assert [booked for booked, _ in sched.books] == [total for _, total in sched.books]


def test_memory_budget_limits_growth(sglang_env):
    def shrink(n, sched):  # from round 1 on, little KV is left for the staging request
        if n == 1:
            sched.available = 20

    trace, sched, _ = serve(sglang_env, Args(chunk=16), [64], max_new=4, before_round=shrink)
    # Round 1 admits one block (4 + one page of overhead: 12 left); of those one page stays free: 8 more.
    assert extends(trace, "r0") == [16, 12, 12, 12, 12, 4]
    check_invariants(trace, 16)
    for adder in sched.adders[1:5]:  # the grown rounds book the KV that is left, and no more
        assert adder.rem_total_tokens == 0 and adder.cur_rem_tokens == 0


def test_max_prefill_tokens_limits_growth(sglang_env):
    trace, _, _ = serve(sglang_env, Args(chunk=64), [40], max_prefill_tokens=12)
    assert extends(trace, "r0") == [12, 12, 12, 4, 4]


def test_mixed_batch_is_not_grown(sglang_env, monkeypatch):
    # Trap T1: r0's 12 tokens are all cached, so its block after the match is MMMM, yet it is admitted as a
    # prefill request next to r1's prompt block. Growing r1 would break LowConfidence's i*B indexing.
    cached = [tuple(range(PROMPT0, PROMPT0 + 12))]
    ours, _, _ = serve(sglang_env, Args(), [12, 16], cached=cached)
    r1 = list(range(PROMPT0 + 1000, PROMPT0 + 1004))
    assert [(row[0], row[4], row[6]) for row in ours[0]] == [("r0", 4, ["M"] * 4), ("r1", 4, r1)]
    assert extends(ours, "r1")[1] == 12  # next round the batch is mask-free again: grown
    restore_upstream(monkeypatch)
    theirs, _, _ = serve(sglang_env, Args(), [12, 16], cached=cached)
    assert ours[0] == theirs[0]


@pytest.mark.parametrize("at, expect_first", [(9, 8), (2, 4), (12, 12)])
def test_prompt_holding_mask_id_stops_before_its_block(sglang_env, at, expect_first):
    # Trap T7: SGLang treats a prompt block that holds mask_id as a decode block; chunks stop before it.
    prompt = list(range(PROMPT0, PROMPT0 + 20))
    prompt[at] = MASK
    sched_args = Args()
    sglang_env._global_server_args = sched_args
    sched = scheduler_cls()(sched_args, 1, 10**6)
    req = make_req("r0", prompt, 4, sched.dllm_config)
    sched.waiting_queue.append(req)
    batch, _ = sched.get_new_batch_dllm()
    assert batch.extend_lens == [expect_first]
    sched.tree_cache.cache_unfinished_req(req)
    batch, forward_batch = sched.get_new_batch_dllm()
    assert batch.prefix_lens == [expect_first] and req.dllm_block_offset == expect_first
    if at // B * B == expect_first:  # the block with mask_id: one block, as upstream
        assert batch.extend_lens == [B] and req.dllm_phase.value == "staging_decode"
    assert forward_batch.positions.tolist()[:1] == [expect_first]


@pytest.mark.parametrize("args", [Args(chunk=0), Args(backend="flashinfer"), Args(backend="triton", chunk=64),
                                  Args(chunk=None, chunked_prefill_size=None, max_prefill_tokens=0)])
def test_off_and_other_backends_are_exactly_upstream(sglang_env, monkeypatch, args):
    prompts, cached = [18, 3, 9, 12], [tuple(range(PROMPT0, PROMPT0 + 12))]
    ours, sched, _ = serve(sglang_env, args, prompts, max_new=5, cached=cached)
    assert all(row[4] == B for rnd in ours for row in rnd)
    restore_upstream(monkeypatch)
    theirs, their_sched, _ = serve(sglang_env, args, prompts, max_new=5, cached=cached)
    assert ours == theirs
    assert sched.tree_cache.inserts == their_sched.tree_cache.inserts


def test_grow_prompt_extends_needs_aligned_single_blocks(sglang_env):
    # Partial blocks (trap T5: extend < B when memory is short) or misaligned prefixes are left alone.
    from sglang.srt.dllm.config import DllmConfig

    req = make_req("r0", list(range(PROMPT0, PROMPT0 + 40)), 4, DllmConfig("LowConfidence", {}, B, MASK, 1))
    req.init_next_round_input(None)
    adder = SimpleNamespace(rem_total_tokens=10**6, cur_rem_tokens=10**6, rem_input_tokens=10**6, page_size=B,
                            ceil_paged_tokens=lambda n: n, _update_prefill_budget=lambda *a: None)
    for extend, prefix in ((2, 0), (B, 2)):
        req.prefix_indices, req.extend_input_len, req.fill_len = torch.arange(prefix), extend, prefix + extend
        assert cp.grow_prompt_extends(adder, [req], B, MASK, 64) == 0 and req.extend_input_len == extend
    req.prefix_indices, req.extend_input_len, req.fill_len = torch.arange(0), B, B
    assert cp.grow_prompt_extends(adder, [req], B, MASK, 64) == 36 and req.fill_len == 40
