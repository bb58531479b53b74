"""Shared test helpers: one tolerance table and one assert_close that explains a failure."""

from __future__ import annotations

import os

import torch

# (atol, rtol) per dtype of the tensors under comparison. bf16 keeps 8 mantissa bits, so attention outputs
# of magnitude ~1 differ from an fp32 reference by up to ~1e-2; the bound for bf16 is 2e-2 absolute.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

# The Triton interpreter runs kernels on the CPU when no GPU is present.
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, name: str = "") -> None:
    """Assert closeness with the table's tolerance; on failure report max abs error, relative RMS and the
    first mismatching indices. NaN in `actual` always fails (outputs are NaN-filled before kernels run)."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan = torch.isnan(a) & ~torch.isnan(e)
    bad = nan | ((a - e).abs() > atol + rtol * e.abs())
    if bad.any():
        diff = (a - e).abs().nan_to_num(float("inf"))
        rel_rms = ((a - e).nan_to_num(0).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-12)).item()
        first = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs err {diff.max().item():.3e}, rel RMS {rel_rms:.3e}, NaN {int(nan.sum())}; first at {first}"
        )


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().float().cpu() - expected.detach().float().cpu()).abs().max().item()
