"""Chunked dLLM prompt prefill, option and forward side: `--mage-prefill-chunk-size` and its resolution, the
positions (H2) and logits (H4) hooks, the dLLM algorithms' one-forward path on a multi-block mask-free batch
(FixedSteps included), the scheduler's handling of that result, and lazy hook registration."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sglang_mage import chunked_prefill as cp
from sglang_mage import config
from sglang_mage.config import MageConfig, MageConfigError, resolve_prefill_chunk_tokens

B, MASK = 4, 99


class Namespace:
    """Attributes SGLang reads and a test does not set are off / None."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __getattr__(self, name):
        return False if name.startswith(("enable", "is_", "disable", "return_")) else None


def server_args(backend="mage", chunk=None, chunked_prefill_size=8192, max_prefill_tokens=16384):
    return Namespace(attention_backend=backend, mage_config=MageConfig(prefill_chunk_size=chunk),
                           chunked_prefill_size=chunked_prefill_size, max_prefill_tokens=max_prefill_tokens)


# The option ------------------------------------------------------------------------------------------------


def test_option_default_and_valid_values():
    assert MageConfig().prefill_chunk_size is None
    assert MageConfig(prefill_chunk_size=0).prefill_chunk_size == 0
    assert MageConfig.from_mapping(json.loads(MageConfig(prefill_chunk_size=512).to_json())).prefill_chunk_size == 512


@pytest.mark.parametrize("value", [-1, -4096, True, 2.5, "8"])
def test_invalid_chunk_size_names_the_flag(value):
    with pytest.raises(MageConfigError, match="--mage-prefill-chunk-size"):
        MageConfig(prefill_chunk_size=value)


def test_cli_flag_engine_kwarg_and_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    config.add_cli_args(parser)
    assert "--mage-prefill-chunk-size" in parser.format_help()
    values = config.values_from_namespace(parser.parse_args(["--mage-prefill-chunk-size", "1024"]))
    assert values == {"prefill_chunk_size": 1024} and config.resolve(values).prefill_chunk_size == 1024
    assert config.values_from_namespace(parser.parse_args(["--mage-prefill-chunk-size", "0"])) == {"prefill_chunk_size": 0}
    with pytest.raises(MageConfigError, match="--mage-prefill-chunk-size"):
        config.resolve(config.values_from_namespace(parser.parse_args(["--mage-prefill-chunk-size", "-8"])))
    kwargs = {"model_path": "m", "mage_prefill_chunk_size": 64}
    assert config.pop_engine_kwargs(kwargs) == {"prefill_chunk_size": 64} and kwargs == {"model_path": "m"}
    monkeypatch.setenv(config.ENV_VAR, json.dumps({"prefill_chunk_size": 0}))
    assert config.resolve({}).prefill_chunk_size == 0
    assert config.resolve({"prefill_chunk_size": 32}).prefill_chunk_size == 32


@pytest.mark.parametrize(
    "chunk, chunked_prefill_size, max_prefill_tokens, block, expect",
    [
        (None, 8192, 16384, 4, 8192),    # default: --chunked-prefill-size
        (None, None, 16384, 4, 16384),   # chunked prefill off: --max-prefill-tokens
        (None, -1, 16384, 32, 16384),
        (None, 0, 1000, 32, 992),        # rounded down to whole blocks
        (None, None, None, 4, 0),        # nothing to go by: off
        (None, 8192, 16384, 8192 * 2, 16384),  # at least one block
        (0, 8192, 16384, 4, 0),          # off
        (100, 8192, 16384, 32, 96),
        (10, 8192, 16384, 32, 32),       # at least one block
        (20000, 8192, 16384, 4, 8192),   # capped at --chunked-prefill-size (the eager runner's buffers)
        (20000, None, 16384, 4, 20000),  # without it the buffers span the KV pool; the adder bounds the batch
    ],
)
def test_resolve_prefill_chunk_tokens(chunk, chunked_prefill_size, max_prefill_tokens, block, expect):
    args = server_args(chunk=chunk, chunked_prefill_size=chunked_prefill_size, max_prefill_tokens=max_prefill_tokens)
    assert resolve_prefill_chunk_tokens(args.mage_config, args, block) == expect
    assert resolve_prefill_chunk_tokens(None, args, block) == resolve_prefill_chunk_tokens(MageConfig(), args, block)


def test_only_mage_turns_chunking_on():
    assert cp.chunk_tokens(server_args(), B) == 8192 and cp.chunking_on(server_args())
    assert cp.chunk_tokens(server_args(backend="flashinfer"), B) == 0
    assert cp.chunk_tokens(server_args(chunk=0), B) == 0 and not cp.chunking_on(server_args(chunk=0))
    assert cp.chunk_tokens(None, B) == 0


def test_the_benchmark_switch_chunks_another_backend_too(monkeypatch):
    monkeypatch.setenv(cp.BENCH_ANY_BACKEND_ENV, "1")
    assert cp.chunk_tokens(server_args(backend="flashinfer"), B) == 8192
    monkeypatch.setenv(cp.BENCH_ANY_BACKEND_ENV, "0")
    assert cp.chunk_tokens(server_args(backend="flashinfer"), B) == 0


# H2: positions ---------------------------------------------------------------------------------------------


@pytest.fixture
def hooks_applied(monkeypatch):
    import sglang.srt.model_executor.forward_batch_info as fbi
    import sglang.srt.server_args as sglang_server_args

    for hook in cp.HOOKS:
        __import__(hook.module)
    cp.register_chunked_prefill_hooks()
    monkeypatch.setattr(fbi, "enable_num_token_non_padded", lambda: False)
    monkeypatch.setattr(fbi, "compute_position", lambda backend, p, n, total: fbi.compute_position_torch(p, n))
    monkeypatch.setattr(sglang_server_args, "_global_server_args", None)
    monkeypatch.setattr(cp, "_block_sizes", {})
    return sglang_server_args


def init_forward_batch(args, prefix_lens, extend_lens, original=False):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    n = sum(extend_lens)
    reqs = [Namespace(dllm_block_offset=p, rid=str(i)) for i, p in enumerate(prefix_lens)]
    seq = torch.tensor([p + e for p, e in zip(prefix_lens, extend_lens)])
    batch = Namespace(forward_mode=ForwardMode.DLLM_EXTEND, reqs=reqs, dllm_config=SimpleNamespace(block_size=B),
                      prefix_lens=prefix_lens, extend_lens=extend_lens, input_ids=torch.arange(n), extend_num_tokens=n,
                      seq_lens=seq, seq_lens_cpu=seq, req_pool_indices=torch.arange(len(reqs)),
                      out_cache_loc=torch.arange(n), extend_logprob_start_lens=[0] * len(reqs),
                      multimodal_inputs=[None] * len(reqs))
    runner = Namespace(device="cpu", server_args=args, use_ngram_embedding=False, model_is_mrope=False)
    init_new = ForwardBatch.init_new.__func__
    if original:
        return init_new.__wrapped__(ForwardBatch, batch, runner)
    return init_new(ForwardBatch, batch, runner)


def test_positions_follow_prefix_and_extend_lengths(hooks_applied):
    got = init_forward_batch(server_args(), [0, 8, 12], [8, 4, 12])
    assert got.positions.tolist() == list(range(0, 8)) + list(range(8, 12)) + list(range(12, 24))
    assert got.positions.dtype == torch.int32  # upstream's dtype on CUDA (int64 on HIP/NPU is kept likewise)
    # Single-block batches: the same positions as upstream's offset-based override.
    for args in (server_args(), server_args(chunk=0), server_args(backend="triton")):
        ours = init_forward_batch(args, [0, 8], [4, 4])
        theirs = init_forward_batch(args, [0, 8], [4, 4], original=True)
        assert torch.equal(ours.positions, theirs.positions) and ours.positions.dtype == theirs.positions.dtype
    # Off: SGLang's override, untouched (B positions per request, whatever the extend).
    off = init_forward_batch(server_args(chunk=0), [8], [4])
    assert off.positions.tolist() == [8, 9, 10, 11]


# H4: logits ------------------------------------------------------------------------------------------------


def test_logits_skipped_only_for_multi_block_batches(hooks_applied, monkeypatch):
    from sglang.srt.dllm.config import DllmConfig
    from sglang.srt.layers.logits_processor import LogitsProcessor

    lookups = []

    def from_server_args(args):
        lookups.append(args)
        return DllmConfig("LowConfidence", {}, B, MASK, 1)

    monkeypatch.setattr(DllmConfig, "from_server_args", staticmethod(from_server_args))
    computed = []
    processor = SimpleNamespace(return_full_logits=True,
                                _get_logits=lambda h, lm_head, md: computed.append(h.shape[0]) or torch.ones(h.shape[0], 7))

    def logits(args, lens):
        hooks_applied._global_server_args = args
        hidden = torch.zeros(sum(lens), 3)
        return LogitsProcessor._get_dllm_logits(processor, hidden, None, SimpleNamespace(extend_seq_lens_cpu=lens))

    mage = server_args()
    for _ in range(3):
        out = logits(mage, [8, 4])
        assert out.full_logits is None and out.next_token_logits is None
    assert computed == [] and lookups == [mage]  # B looked up once per ServerArgs, not per forward
    assert logits(mage, [4, 4]).full_logits.shape == (8, 7)  # single-block batches keep their logits
    assert logits(server_args(chunk=0), [8]).full_logits.shape == (8, 7)
    assert logits(server_args(backend="flashinfer"), [8]).full_logits.shape == (8, 7)
    assert computed == [8, 8, 8]


# The algorithms and the scheduler on a multi-block mask-free batch ----------------------------------------


def one_forward_runner():
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    calls = []

    def forward(forward_batch, pp_proxy_tensors=None):
        calls.append(forward_batch.input_ids.numel())
        return SimpleNamespace(logits_output=LogitsProcessorOutput(next_token_logits=None, full_logits=None),
                               can_run_graph=False)

    return SimpleNamespace(forward=forward), calls


@pytest.mark.parametrize("algorithm", ["LowConfidence", "JointThreshold", "FixedSteps"])
def test_algorithms_take_one_forward_on_a_chunked_batch(algorithm):
    from sglang.srt.dllm.algorithm import get_algorithm
    from sglang.srt.dllm.config import DllmConfig

    if algorithm == "FixedSteps":
        from sglang_mage.model_adapters.fixed_steps_algorithm import FixedSteps

        algo = FixedSteps(DllmConfig(algorithm, {"steps": 2}, B, MASK, 2))
    else:
        algo = get_algorithm(DllmConfig(algorithm, {}, B, MASK, 2))
    runner, calls = one_forward_runner()
    # Two requests: 12 and 4 prompt tokens (no [MASK]); 16 ids for a batch of 2, not 2 x B.
    batch = SimpleNamespace(batch_size=2, input_ids=torch.arange(16))
    logits_output, next_token_ids, _ = algo.run(runner, batch)
    assert calls == [16] and list(next_token_ids) == [] and logits_output.full_logits is None


def test_scheduler_result_needs_no_logits_on_the_fast_path():
    from sglang.srt.dllm.mixin.scheduler import SchedulerDllmMixin
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.managers.utils import GenerationBatchResult

    reports = []
    sched = SimpleNamespace(metrics_reporter=SimpleNamespace(report_prefill_stats=lambda **kw: reports.append(kw)))
    req = SimpleNamespace(output_ids=[], fill_len=12)
    batch = SimpleNamespace(reqs=[req], prefill_stats="stats", dp_cooperation_info=None, batch_size=lambda: 1)
    result = GenerationBatchResult(logits_output=LogitsProcessorOutput(next_token_logits=None), next_token_ids=[])
    SchedulerDllmMixin.process_batch_result_dllm(sched, batch, result)
    assert req.output_ids == [] and req.fill_len == 12
    assert [r["prefill_stats"] for r in reports] == ["stats"]


# Registration ----------------------------------------------------------------------------------------------


def test_hooks_are_installed_after_first_import_in_a_fresh_process():
    code = (
        "import sys, inspect\n"
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "from sglang_mage import chunked_prefill as cp\n"
        "mods = [h.module for h in cp.HOOKS]\n"
        "early = [m for m in mods if m in sys.modules]\n"
        "assert not early, ('imported at registration', early)\n"
        "from sglang.srt.managers.schedule_batch import Req\n"
        "from sglang.srt.dllm.mixin.scheduler import SchedulerDllmMixin\n"
        "from sglang.srt.model_executor.forward_batch_info import ForwardBatch\n"
        "from sglang.srt.layers.logits_processor import LogitsProcessor\n"
        "assert Req._init_fill_ids_for_dllm.__wrapped__.__qualname__ == 'ReqDllmMixin._init_fill_ids_for_dllm'\n"
        "assert SchedulerDllmMixin._process_dllm_batches.__wrapped__\n"
        "assert LogitsProcessor._get_dllm_logits.__wrapped__\n"
        "assert isinstance(inspect.getattr_static(ForwardBatch, 'init_new'), classmethod)\n"
        "assert ForwardBatch.init_new.__func__.__wrapped__\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry\n"
        "HookRegistry.apply_hooks()\n"  # SGLang's loader applying again must not wrap twice
        "assert not hasattr(Req._init_fill_ids_for_dllm.__wrapped__, '__wrapped__')\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
