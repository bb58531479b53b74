"""bench_e2e's CPU-side logic: the engine grid, the ratios issue 6's targets are stated in, the JSON it
writes after every point, and the plot."""

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))

import bench_e2e  # noqa: E402
from roofline import roofline_bound  # noqa: E402


def test_one_engine_per_shape_and_backend_with_batch16_only_for_the_1_5b_shape():
    runs = bench_e2e.plan_runs(["fast-dllm-v2-7b", "fast-dllm-v2-1.5b"], [131072, 8192], [32768],
                               ["flashinfer", "mage"])
    assert [(s, b) for s, b, _ in runs] == [("fast-dllm-v2-7b", "flashinfer"), ("fast-dllm-v2-7b", "mage"),
                                            ("fast-dllm-v2-1.5b", "flashinfer"), ("fast-dllm-v2-1.5b", "mage")]
    assert runs[0][2] == [(8192, 1), (131072, 1)]
    # batch 16 x 32K (512K tokens) sorts after 1 x 128K: points grow in KV size, so a failure at a size
    # still leaves every smaller row measured
    assert runs[2][2] == [(8192, 1), (131072, 1), (32768, 16)]


def test_ratios_against_flashinfer_at_the_same_point():
    rows = [{"shape": "fast-dllm-v2-1.5b", "context": 131072, "batch": 16, "backend": b, "block_ms": ms,
             "roofline_bound": 4.7} for b, ms in (("flashinfer", 100.0), ("mage", 25.0), ("triton", 200.0),
                                                  ("mage_quest", None))]
    rows.append({"shape": "fast-dllm-v2-1.5b", "context": 8192, "batch": 1, "backend": "mage", "block_ms": 5.0,
                 "roofline_bound": 1.1})  # no flashinfer row at this point
    bench_e2e.add_ratios(rows)
    by = {(r["backend"], r["context"]): r for r in rows}
    assert by["mage", 131072]["speedup_vs_flashinfer"] == 4.0
    assert by["mage", 131072]["fraction_of_bound"] == pytest.approx(4.0 / 4.7, abs=1e-3)
    assert by["triton", 131072]["speedup_vs_flashinfer"] == 0.5 and by["triton", 131072]["fraction_of_bound"] is None
    assert by["mage_quest", 131072]["speedup_vs_flashinfer"] is None
    assert by["mage", 8192]["speedup_vs_flashinfer"] is None and by["mage", 8192]["fraction_of_bound"] is None


def test_results_json_is_written_atomically_and_plot_writes_png(tmp_path):
    rows = [{"shape": s, "context": c, "batch": 1, "backend": b, "block_ms": ms * c / 8192, "tokens_per_s": 1.0,
             "roofline_bound": round(roofline_bound(s, 1, c), 2)}
            for s in ("fast-dllm-v2-1.5b", "fast-dllm-v2-7b") for c in (8192, 131072)
            for b, ms in (("flashinfer", 10.0), ("mage", 6.0), ("triton", 12.0))]
    bench_e2e.add_ratios(rows)
    out = tmp_path / "e2e.json"
    bench_e2e.write_json(str(out), {"rows": rows})
    assert json.loads(out.read_text())["rows"] == rows and not (tmp_path / "e2e.json.tmp").exists()
    pytest.importorskip("matplotlib")
    bench_e2e.plot({"rows": rows}, str(tmp_path / "e2e.png"))
    assert os.path.getsize(tmp_path / "e2e.png") > 1000
    os.remove(tmp_path / "e2e.png")
    # --replot redraws a results file without a GPU (the GPU host's matplotlib can fail inside SGLang)
    assert bench_e2e.main(["--replot", str(out)]) == 0
    assert os.path.getsize(tmp_path / "e2e.png") > 1000


def test_no_gpu_is_a_clear_exit_not_a_traceback(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only exit")
    assert bench_e2e.main(["--out", os.devnull]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_sdar_model_class_keeps_the_shape_and_block_and_is_graph_capturable(tmp_path):
    from sglang_mage.hooks import GRAPH_CAPTURABLE_ARCHITECTURES

    from roofline import SHAPES

    for shape in ("fast-dllm-v2-1.5b", "fast-dllm-v2-7b", "sdar-1.7b"):
        native, sdar = bench_e2e.model_config(shape, "native"), bench_e2e.model_config(shape, "sdar")
        assert sdar["architectures"][0] in GRAPH_CAPTURABLE_ARCHITECTURES
        for key in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads"):
            assert sdar[key] == native[key]
        s = SHAPES[shape]
        assert sdar["head_dim"] == s.head_dim and sdar["num_key_value_heads"] == s.kv_heads
        assert sdar["block_size"] == bench_e2e.BLOCK[shape]
    assert bench_e2e.model_config("fast-dllm-v2-1.5b", "native")["architectures"] == ["Fast_dLLM_QwenForCausalLM"]
    path = bench_e2e.write_model(str(tmp_path), "fast-dllm-v2-7b", 131072)
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    assert cfg["architectures"] == ["SDARForCausalLM"] and cfg["max_position_embeddings"] >= 131072 + 32
    assert "bd_size" not in cfg


def test_sdar_body_resolves_to_block_32_through_the_adapter_registry(tmp_path):
    """The registry reads config.json's block_size for SDAR (SGLang's own table says 4)."""
    import types

    from sglang_mage.model_adapters.registry import find_adapter, resolve_block_params

    cfg = bench_e2e.model_config("fast-dllm-v2-1.5b", "sdar")
    spec = find_adapter(cfg["architectures"][0])
    assert resolve_block_params(spec, types.SimpleNamespace(**cfg), {})[0] == 32


class _RadixCachedEngine:
    """generate() costs prefill on a prompt's first sight (then it is cached) plus a fixed time per block;
    the clock is simulated through time.perf_counter."""

    def __init__(self, clock, prefill_s, block_s, block):
        self.clock, self.prefill_s, self.block_s, self.block, self.seen = clock, prefill_s, block_s, block, set()

    def generate(self, input_ids, sampling_params):
        key = tuple(map(tuple, input_ids))
        if key not in self.seen:
            self.seen.add(key)
            self.clock[0] += self.prefill_s
        self.clock[0] += 0.3 + self.block_s * (sampling_params["max_new_tokens"] // self.block)  # + request overhead


def test_time_per_block_times_only_warm_calls_so_the_prefill_does_not_leak_into_it(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench_e2e.time, "perf_counter", lambda: clock[0])
    engine = _RadixCachedEngine(clock, prefill_s=90.0, block_s=0.05, block=32)
    per_block, prefill = bench_e2e.time_per_block(engine, "fast-dllm-v2-1.5b", 256, 2, blocks=4)
    assert per_block == pytest.approx(0.05)
    assert prefill == pytest.approx(90.0)
