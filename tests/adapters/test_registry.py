"""The adapter table: lookup, block size / mask id from defaults, config.json and overrides, and errors; and
SGLang's DllmConfig built from it (in fresh processes, through the plugin loader)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang_mage.model_adapters.registry import (
    ADAPTERS,
    UnsupportedArchitectureError,
    find_adapter,
    resolve_block_params,
    supported_architectures,
)


def test_lookup_and_error_names_supported_architectures():
    assert find_adapter("SDARForCausalLM").family == "sdar"
    assert find_adapter("LLaDA2MoeModelLM").block_size == 32
    with pytest.raises(UnsupportedArchitectureError) as e:
        find_adapter("Qwen3ForCausalLM")
    for arch in supported_architectures():
        assert arch in str(e.value)


@pytest.mark.parametrize(
    "config, overrides, expect",
    [
        ({}, {}, (4, 151669)),
        ({"block_size": 8}, {}, (8, 151669)),
        ({"bd_size": 16, "mask_token_id": 5}, {}, (16, 5)),
        ({"block_size": 8}, {"block_size": 32, "mask_id": 7}, (32, 7)),
    ],
)
def test_resolve_precedence(config, overrides, expect):
    hf = SimpleNamespace(vocab_size=151936, **config)
    assert resolve_block_params(ADAPTERS["sdar"], hf, overrides) == expect


@pytest.mark.parametrize(
    "config, overrides, match",
    [
        ({"block_size": 0}, {}, "config.json"),
        ({}, {"block_size": "4"}, "--dllm-algorithm-config"),
        ({}, {"mask_id": 200000}, "outside the vocabulary"),
        ({"mask_token_id": -1}, {}, "invalid mask_id"),
    ],
)
def test_resolve_rejects_bad_values(config, overrides, match):
    hf = SimpleNamespace(vocab_size=151936, **config)
    with pytest.raises(ValueError, match=match):
        resolve_block_params(ADAPTERS["sdar"], hf, overrides)


CONFIG = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def run_server_args(model_dir, extra=""):
    code = (
        "import sys\n"
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "assert 'sglang.srt.dllm.config' not in sys.modules, 'imported at registration'\n"
        "from sglang.srt.server_args import ServerArgs\n"
        f"sa = ServerArgs(model_path={str(model_dir)!r}, dllm_algorithm='LowConfidence', device='cpu'{extra})\n"
        "from sglang.srt.dllm.config import DllmConfig\n"
        "c = DllmConfig.from_server_args(sa)\n"
        "print('RESULT', c.block_size, c.mask_id, sa.page_size)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def write(tmp_path, name, **extra):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**CONFIG, **extra}))
    return path


def test_dllm_config_reads_adapter_table(tmp_path):
    out = run_server_args(write(tmp_path, "sdar", architectures=["SDARForCausalLM"]))
    assert "RESULT 4 151669 4" in out.stdout, out.stderr[-3000:]
    out = run_server_args(write(tmp_path, "sdar8", architectures=["SDARForCausalLM"], block_size=8))
    assert "RESULT 8 151669 8" in out.stdout, out.stderr[-3000:]
    yaml = tmp_path / "algo.yaml"
    yaml.write_text("mask_id: 42\nthreshold: 0.9\n")
    out = run_server_args(tmp_path / "sdar", f", dllm_algorithm_config={str(yaml)!r}")
    assert "RESULT 4 42 4" in out.stdout, out.stderr[-3000:]


def test_unknown_architecture_fails_at_startup_naming_the_supported_ones(tmp_path):
    out = run_server_args(write(tmp_path, "qwen", architectures=["Qwen3ForCausalLM"]))
    assert out.returncode != 0
    assert "no block-diffusion adapter for architecture 'Qwen3ForCausalLM'" in out.stderr
    assert "SDARForCausalLM" in out.stderr and "LLaDA2MoeModelLM" in out.stderr
