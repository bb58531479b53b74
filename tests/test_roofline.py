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


def test_attention_intensity_is_block_times_group_and_sits_at_the_ridge():
    from roofline import DEVICES, SHAPES, attention_intensity

    assert attention_intensity(SHAPES["fast-dllm-v2-7b"], 32) == 224
    assert attention_intensity(SHAPES["fast-dllm-v2-1.5b"], 32) == 192
    assert round(DEVICES["h200"].ridge) == 206 and round(DEVICES["h100"].ridge) == 295


@pytest.mark.parametrize("device", ["h100", "h200"])
@pytest.mark.parametrize("shape, batch, context", [("fast-dllm-v2-1.5b", 1, 131072), ("fast-dllm-v2-1.5b", 16, 32768),
                                                   ("fast-dllm-v2-1.5b", 16, 131072), ("fast-dllm-v2-7b", 1, 131072)])
def test_compute_aware_bound_never_exceeds_the_memory_bound(device, shape, batch, context):
    from roofline import compute_aware_bound

    assert 1.0 < compute_aware_bound(shape, device, batch, context) <= roofline_bound(shape, batch, context) + 1e-9


def test_batch16_is_compute_bound_and_batch1_is_not():
    """At batch 1 every forward is memory-bound, so both bounds agree; at 16 x 32K the later steps' linear
    layers (512 tokens) are compute-bound and the gain left is well under the memory table's 3.1x."""
    from roofline import compute_aware_bound

    assert compute_aware_bound("fast-dllm-v2-1.5b", "h200", 1, 131072) == pytest.approx(
        roofline_bound("fast-dllm-v2-1.5b", 1, 131072), rel=1e-3)  # keys include the block itself
    assert compute_aware_bound("fast-dllm-v2-1.5b", "h200", 16, 32768) == pytest.approx(2.2, abs=0.05)
    assert compute_aware_bound("fast-dllm-v2-1.5b", "h100", 16, 32768) == pytest.approx(2.34, abs=0.05)
