"""GPU: benchmarks/cuda_graph_check.py as a test (`pytest -m gpu tests/gpu`): the same greedy tokens from a
mage engine whose sparse steps replay SGLang's dLLM CUDA graph and from an eager one, with replays counted."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.gpu
def test_sparse_steps_under_the_cuda_graph_match_eager():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda_graph_check.py")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, (proc.stdout[-4000:], proc.stderr[-4000:])
