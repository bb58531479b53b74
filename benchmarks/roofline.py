"""Memory-roofline bound on MAGE's gain in time per block over dense attention (issue 6's table).

At long context a denoising step is memory-bound: it reads the weights once plus every KV byte it attends
to. Per block, with `steps` denoising forwards plus a commit pass:
  dense:  (steps + 1) x (W + batch x context x kv_bytes_per_token)
  mage:   first step: W + batch x context x kv_bytes (exact) + the K half again to score (0 if fused)
          each later forward (steps - 1 + commit): W + batch x k x kv_bytes
The bound is dense / mage (bandwidth cancels). Pure Python, so CPU tests pin the table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float  # parameter count (weights read once per forward, bf16)
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def weight_bytes(self) -> float:
        return self.params * 2

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2  # K and V, bf16


SHAPES = {
    s.name: s
    for s in (
        ModelShape("fast-dllm-v2-1.5b", 1.54e9, 28, 12, 2, 128),  # Qwen2.5-1.5B body
        ModelShape("fast-dllm-v2-7b", 7.62e9, 28, 28, 4, 128),  # Qwen2.5-7B body
        ModelShape("sdar-1.7b", 1.72e9, 28, 16, 8, 128),  # Qwen3-1.7B body
    )
}


def block_bytes(shape: ModelShape, batch: int, context: int, steps: int = 8, k: int | None = None,
                fused_selection: bool = False) -> float:
    """Bytes one block reads: dense when k is None, else MAGE with budget k."""
    kv = shape.kv_bytes_per_token
    dense_step = shape.weight_bytes + batch * context * kv
    if k is None:
        return (steps + 1) * dense_step
    first = dense_step + (0 if fused_selection else batch * context * kv / 2)
    later = steps * (shape.weight_bytes + batch * min(k, context) * kv)  # steps - 1 denoising + commit
    return first + later


def roofline_bound(shape: ModelShape | str, batch: int, context: int, steps: int = 8, k: int = 512,
                   fused_selection: bool = False) -> float:
    s = SHAPES[shape] if isinstance(shape, str) else shape
    return block_bytes(s, batch, context, steps) / block_bytes(s, batch, context, steps, k, fused_selection)
