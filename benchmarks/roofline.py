"""Memory-roofline bound on MAGE's gain in time per block over dense attention (issue 6's table).

At long context a denoising step is memory-bound: it reads the weights once plus every KV byte it attends
to. Per block, with `steps` denoising forwards plus a commit pass:
  dense:  (steps + 1) x (W + batch x context x kv_bytes_per_token)
  mage:   first step: W + batch x context x kv_bytes (exact) + the K half again to score (0 if fused)
          each later forward (steps - 1 + commit): W + batch x k x kv_bytes
The bound is dense / mage (bandwidth cancels). Pure Python, so CPU tests pin the table.

That table ignores arithmetic. A step's attention does 4 x d FLOPs per (query row, key) against 4 x d bytes
of K/V per (KV head, key), so its intensity is B x G FLOP/byte (G query heads per KV head): 224 for the 7B
shape at B=32, 192 for the 1.5B one, at or above the H200's ridge (989 TFLOP/s / 4.8 TB/s = 206) and close
to the H100's (295). Batch 16 also makes the linear layers compute-bound (16 x 32 tokens = 512 FLOP/byte).
`block_seconds` therefore costs each forward max(bytes / bandwidth, FLOPs / peak), and `compute_aware_bound`
is the gain that remains once both ceilings count.
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


@dataclass(frozen=True)
class Device:
    name: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float  # dense tensor-core peak, no sparsity

    @property
    def ridge(self) -> float:
        """FLOP per byte above which a kernel is compute-bound."""
        return self.bf16_flops_per_s / self.hbm_bytes_per_s


DEVICES = {
    "h100": Device("H100 SXM", 3.35e12, 989e12),
    "h200": Device("H200", 4.8e12, 989e12),
}


def attention_intensity(shape: ModelShape, block: int) -> float:
    """FLOP per K/V byte of one step's attention: block x G."""
    return block * shape.q_heads / shape.kv_heads


def forward_flops(shape: ModelShape, batch: int, block: int, keys: int) -> float:
    """One forward of `batch` blocks of `block` tokens, each attending to `keys` keys: linear layers
    (2 x params per token, LM head included) plus attention (QK and PV, 2 x d each per row and key)."""
    tokens = batch * block
    return 2 * shape.params * tokens + 4 * shape.layers * shape.q_heads * shape.head_dim * tokens * keys


def block_seconds(shape: ModelShape, device: Device, batch: int, context: int, steps: int = 8, block: int = 32,
                  k: int | None = None, fused_selection: bool = False) -> float:
    """Lower bound on the time of one block: every forward at max(its bytes / bandwidth, its FLOPs / peak)."""
    kv = shape.kv_bytes_per_token

    def forward(keys: int, extra_bytes: float = 0.0, extra_flops: float = 0.0) -> float:
        nbytes = shape.weight_bytes + batch * keys * kv + extra_bytes
        flops = forward_flops(shape, batch, block, keys) + extra_flops
        return max(nbytes / device.hbm_bytes_per_s, flops / device.bf16_flops_per_s)

    if k is None:
        return (steps + 1) * forward(context + block)
    # Selection scores: the block-mean query against every key (1 row per query head), reading K again
    # unless fused into the exact pass.
    score_flops = 2 * shape.layers * shape.q_heads * shape.head_dim * batch * context
    first = forward(context + block, 0 if fused_selection else batch * context * kv / 2, score_flops)
    return first + steps * forward(min(k, context) + block)


def compute_aware_bound(shape: ModelShape | str, device: Device | str, batch: int, context: int, steps: int = 8,
                        k: int = 512, block: int = 32, fused_selection: bool = False) -> float:
    s = SHAPES[shape] if isinstance(shape, str) else shape
    d = DEVICES[device] if isinstance(device, str) else device
    return (block_seconds(s, d, batch, context, steps, block)
            / block_seconds(s, d, batch, context, steps, block, k, fused_selection))
