"""A tiny SDAR-layout (Qwen3-style) block-diffusion LM in plain PyTorch: for training the shipped checkpoint
and as the CPU reference forward. Parameter names follow the Hugging Face Qwen3 layout, which SGLang's
`SDARForCausalLM` loads (`model.layers.N.self_attn.q_proj.weight`, ...).

Attention is given as a boolean mask, so one module serves both:
- inference on a sequence: `block_causal_mask` (a position sees its whole block and every earlier block);
- block-diffusion training on [noisy | clean] (`training_mask`): noisy block b sees itself and the clean
  blocks before b; clean tokens see clean tokens block-causally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class TinyConfig:
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 65536
    block_size: int = 4
    mask_token_id: int = 3

    def hf_config(self) -> dict:
        """config.json for SGLang: SDAR architecture on the Qwen3 config class; block size and mask id are
        read from it by sglang_mage's adapter table."""
        d = dataclasses.asdict(self)
        d.update(architectures=["SDARForCausalLM"], model_type="qwen3", tie_word_embeddings=False,
                 torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x, positions, theta):
    """Rotary embedding, NeoX layout (halves), as Qwen3 / SGLang's get_rope use: x [T, H, D]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float().unsqueeze(-1) * inv  # [T, D/2]
    cos, sin = ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, positions, mask):
        """x [N, T, hidden]; positions [T]; mask [T, T] bool."""
        c, n, t = self.c, x.shape[0], x.shape[1]
        q = rope(self.q_norm(self.q_proj(x).view(n * t, c.num_attention_heads, c.head_dim)), positions.repeat(n),
                 c.rope_theta).view(n, t, c.num_attention_heads, c.head_dim)
        k = rope(self.k_norm(self.k_proj(x).view(n * t, c.num_key_value_heads, c.head_dim)), positions.repeat(n),
                 c.rope_theta).view(n, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).view(n, t, c.num_key_value_heads, c.head_dim)
        g = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
        o = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.o_proj(o.transpose(1, 2).reshape(n, t, -1))

    def attend(self, q, k, v, mask):
        """q, k, v [N, Hq, T, D] (KV heads already repeated per GQA group). Replaced per instance by
        reference emulations of sparse attention (training/mage_reference.py)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TinySDAR(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.config = c
        self.model = Backbone(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids, positions, mask):
        """input_ids [T] or [N, T]; positions [T]; mask [T, T] bool (True = may attend). Logits [(N,) T, V]."""
        batched = input_ids.dim() == 2
        x = self.model.embed_tokens(input_ids if batched else input_ids.unsqueeze(0))
        for layer in self.model.layers:
            x = layer(x, positions, mask)
        logits = self.lm_head(self.model.norm(x))
        return logits if batched else logits[0]


def block_causal_mask(n: int, block_size: int, device=None) -> torch.Tensor:
    blk = torch.arange(n, device=device) // block_size
    return blk.view(-1, 1) >= blk.view(1, -1)


def training_mask(n: int, block_size: int, device=None) -> torch.Tensor:
    """[2n, 2n] mask over [noisy | clean]: noisy block b sees noisy block b and clean blocks < b; clean sees
    clean block-causally; clean never sees noisy."""
    blk = torch.arange(n, device=device) // block_size
    same = blk.view(-1, 1) == blk.view(1, -1)
    earlier = blk.view(-1, 1) > blk.view(1, -1)
    top = torch.cat([same, earlier], dim=1)
    bottom = torch.cat([torch.zeros(n, n, dtype=torch.bool, device=device), block_causal_mask(n, block_size, device)], 1)
    return torch.cat([top, bottom], dim=0)


@contextlib.contextmanager
def attention_override(model, make_attend):
    """Replace every layer's `attend` by `make_attend(layer_index, attention_module)` for the duration of the
    block (the hook the MAGE / sparse references use), then go back to the class's exact attention."""
    layers = [layer.self_attn for layer in model.model.layers]
    for i, attn in enumerate(layers):
        attn.attend = make_attend(i, attn)
    try:
        yield
    finally:
        for attn in layers:
            del attn.attend
