"""GPU: the end-to-end checks of benchmarks/e2e_correctness.py, as a test (`pytest -m gpu tests/gpu`).

Starts several `sgl.Engine`s on a dummy-weight tiny SDAR model; the script writes the results JSON that is
committed under benchmarks/results/. Set MAGE_E2E_ALGORITHMS to run a subset."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.gpu
def test_e2e_correctness(tmp_path):
    out = tmp_path / "e2e_correctness.json"
    algorithms = os.environ.get("MAGE_E2E_ALGORITHMS", "LowConfidence,JointThreshold")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "e2e_correctness.py"), "--out", str(out),
         "--algorithms", algorithms],
        capture_output=True, text=True, timeout=3600,
    )
    assert out.exists(), proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert not result["failures"], result["failures"]
    names = {c["name"].split("/", 1)[1] for c in result["cases"]}
    assert {"k_ge_context", "k_ge_context_force_sparse", "k64_4k_prompts"} <= names
    for case in result["cases"]:
        assert case["stats"]["occupancy"] == 0
        if "force_sparse" in case["name"] or "k64" in case["name"]:
            assert case["sparse_steps"] > 0
        if case["reference_backend"]:
            assert case["greedy_match"] is True
    assert proc.returncode == 0, proc.stdout[-4000:]
