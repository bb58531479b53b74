"""The roofline model reproduces issue 6's table of bounds (H100, 8 steps + commit per 32-token block, k=512)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from roofline import block_bytes, roofline_bound  # noqa: E402


@pytest.mark.parametrize(
    "shape, batch, context, fused, expected",
    [
        ("fast-dllm-v2-1.5b", 1, 131072, False, 1.8),
        ("fast-dllm-v2-1.5b", 16, 32768, False, 3.1),
        ("fast-dllm-v2-1.5b", 16, 131072, False, 4.7),
        ("fast-dllm-v2-7b", 1, 131072, False, 1.4),
        ("fast-dllm-v2-1.5b", 16, 131072, True, 6.3),
    ],
)
def test_reproduces_the_issue_table(shape, batch, context, fused, expected):
    assert round(roofline_bound(shape, batch, context, fused_selection=fused), 1) == expected


def test_bound_grows_with_context_and_batch_and_is_one_without_sparsity():
    b = [roofline_bound("fast-dllm-v2-1.5b", 1, c) for c in (8192, 32768, 131072)]
    assert b[0] < b[1] < b[2]
    assert roofline_bound("fast-dllm-v2-1.5b", 16, 32768) > roofline_bound("fast-dllm-v2-1.5b", 1, 32768)
    # k >= context with fused selection reads exactly what dense reads.
    s = "sdar-1.7b"
    from roofline import SHAPES
    assert block_bytes(SHAPES[s], 4, 1024, k=4096, fused_selection=True) == pytest.approx(block_bytes(SHAPES[s], 4, 1024))
