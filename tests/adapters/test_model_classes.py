"""SGLang's model class of every adapted family, built at a tiny config and loaded from HF-named random
weights, against the pure-PyTorch reference forward (benchmarks/reference_models.py), on the CPU in fp32.
Each run is a subprocess: it sets process-wide SGLang state. Fast-dLLM v2's shift and carry are checked in
test_fast_dllm_v2.py; the same comparison in bf16 on the GPU is benchmarks/adapters_check.py."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang_mage.model_adapters.sdar import restore_legacy_rope_attributes

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("family", ["sdar", "sdar-moe", "llada2-moe"])
def test_model_class_matches_reference_forward(family):
    out = subprocess.run([sys.executable, os.path.join(HERE, "model_class_forward.py"), family],
                         capture_output=True, text=True, timeout=600)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, out.stderr[-3000:]
    r = json.loads(line[0][len("RESULT "):])
    assert r["unloaded"] == []  # every parameter written from the HF names (experts, router, bias, fused qkv)
    # fp32 on both sides: only summation order differs.
    assert r["max_abs_err"] < 1e-4 * max(1.0, r["scale"]), r
    assert r["argmax_equal"], r


def test_legacy_rope_attributes_restored_from_rope_parameters():
    # transformers 5: the values live only in rope_parameters.
    cfg = SimpleNamespace(rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    restore_legacy_rope_attributes(cfg)
    assert cfg.rope_theta == 1e6 and getattr(cfg, "rope_scaling", None) is None
    scaled = SimpleNamespace(rope_parameters={"rope_theta": 5e5, "rope_type": "yarn", "factor": 4.0})
    restore_legacy_rope_attributes(scaled)
    assert scaled.rope_theta == 5e5 and scaled.rope_scaling["rope_type"] == "yarn"
    # transformers 4 configs keep their own attributes.
    legacy = SimpleNamespace(rope_theta=1e4, rope_scaling=None, rope_parameters={"rope_theta": 1e6})
    restore_legacy_rope_attributes(legacy)
    assert legacy.rope_theta == 1e4

