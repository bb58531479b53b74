"""Pure-PyTorch reference forwards of the four block-diffusion families, from Hugging Face-named weights.

Each family's architecture is written out from its published modeling code's semantics (not SGLang's
classes), so that SGLang's model class can be checked against it: benchmarks/adapters_check.py on the GPU,
tests/adapters/ on the CPU.
- sdar:         Qwen3 layout (q/k RMSNorm, no qkv bias), dense SwiGLU MLP.
- fast-dllm-v2: Qwen2 layout (qkv bias, no q/k norm); logits at position p come from the hidden state at p-1.
- sdar-moe:     Qwen3-MoE layout: softmax router, top-k experts, renormalised when norm_topk_prob.
- llada2-moe:   LLaDA2 / BailingMoeV2 layout: fused query_key_value, query/key RMSNorm, partial rotary,
                the first `first_k_dense_replace` layers dense; later layers route by sigmoid scores plus an
                expert bias, restricted to the best `topk_group` of `n_group` expert groups (a group scores the
                sum of its top two), weights from the unbiased scores, renormalised, times
                `routed_scaling_factor`, plus always-on shared experts.
Attention is block-causal over the whole sequence (a position sees its own block and every earlier one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Layout:
    embed: str = "model.embed_tokens.weight"
    attn: str = "self_attn"  # module name of the attention block
    fused_qkv: bool = False  # one query_key_value projection instead of q_proj / k_proj / v_proj
    out_proj: str = "o_proj"
    qk_norm: tuple[str, str] | None = ("q_norm", "k_norm")
    qkv_bias: bool = False
    moe: str | None = None  # None, "qwen3_moe" or "llada2_moe"
    shift: bool = False


LAYOUTS = {
    "sdar": Layout(),
    "fast-dllm-v2": Layout(qk_norm=None, qkv_bias=True, shift=True),
    "sdar-moe": Layout(moe="qwen3_moe"),
    "llada2-moe": Layout(embed="model.word_embeddings.weight", attn="attention", fused_qkv=True, out_proj="dense",
                         qk_norm=("query_layernorm", "key_layernorm"), moe="llada2_moe"),
}


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x, pos, theta, rotary_dim=None):
    """x [L, H, D]; rotate-half (NeoX) convention on the first `rotary_dim` channels, the rest passed through."""
    d = x.shape[-1]
    r = rotary_dim or d
    inv = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float32, device=x.device) / r))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    xr = x[..., :r].float()
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
    return torch.cat([rotated, x[..., r:]], -1) if r < d else rotated


def block_causal_mask(length: int, block: int, device=None) -> torch.Tensor:
    pos = torch.arange(length, device=device)
    return (pos[:, None] // block) >= (pos[None, :] // block)


def _swiglu(x, w, prefix):
    gate, up = x @ w[prefix + "gate_proj.weight"].T, x @ w[prefix + "up_proj.weight"].T
    return (F.silu(gate.float()).to(x.dtype) * up) @ w[prefix + "down_proj.weight"].T


def route(logits: torch.Tensor, cfg: dict, moe: str, bias: torch.Tensor | None = None):
    """(weights [T, k] fp32, expert ids [T, k]) for router logits [T, E]."""
    top_k = cfg["num_experts_per_tok"]
    if moe == "qwen3_moe":
        probs = logits.float().softmax(-1)
        weights, ids = probs.topk(top_k, dim=-1)
        if cfg["norm_topk_prob"]:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, ids
    scores = logits.float().sigmoid()
    choice = scores + (bias.float() if bias is not None else 0.0)
    groups, top_groups = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    t, e = choice.shape
    group_score = choice.view(t, groups, e // groups).topk(min(2, e // groups), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(top_groups, dim=-1).indices, True)
    allowed = keep[:, :, None].expand(t, groups, e // groups).reshape(t, e)
    ids = choice.masked_fill(~allowed, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg["norm_topk_prob"]:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * cfg.get("routed_scaling_factor", 1.0), ids


def moe_mlp(x, w, cfg, layer_prefix, moe):
    p = layer_prefix + "mlp."
    logits = x.float() @ w[p + "gate.weight"].float().T
    weights, ids = route(logits, cfg, moe, w.get(p + "gate.expert_bias"))
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(cfg["num_experts"]):
        rows, slot = (ids == e).nonzero(as_tuple=True)
        if rows.numel():
            out[rows] += weights[rows, slot, None] * _swiglu(x[rows], w, p + f"experts.{e}.").float()
    if moe == "llada2_moe" and cfg.get("num_shared_experts"):
        out += _swiglu(x, w, p + "shared_experts.").float()
    return out.to(x.dtype)


def layer_is_moe(cfg: dict, layout: Layout, i: int) -> bool:
    if layout.moe == "llada2_moe":
        return i >= cfg.get("first_k_dense_replace", 0)
    return layout.moe is not None


def reference_forward(w: dict, cfg: dict, ids: torch.Tensor, block: int, layout: Layout | str) -> torch.Tensor:
    """Logits [L, V] over a whole sequence (positions 0..L-1), block-causal attention. With `layout.shift`,
    row p is the LM head of hidden p-1 (row 0 its own), the Fast-dLLM v2 convention."""
    lay = LAYOUTS[layout] if isinstance(layout, str) else layout
    h_n, kv_n = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // h_n
    rotary_dim = int(d * cfg.get("partial_rotary_factor", 1.0))
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    length = ids.shape[0]
    pos = torch.arange(length, device=ids.device)
    allowed = block_causal_mask(length, block, ids.device)
    x = w[lay.embed][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + lay.attn + "."
        y = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        if lay.fused_qkv:
            qkv = y @ w[a + "query_key_value.weight"].T
            q, k, v = qkv.split([h_n * d, kv_n * d, kv_n * d], -1)
        else:
            q, k, v = (y @ w[a + f"{n}.weight"].T + (w[a + f"{n}.bias"] if lay.qkv_bias else 0)
                       for n in ("q_proj", "k_proj", "v_proj"))
        q, k, v = q.reshape(length, h_n, d), k.reshape(length, kv_n, d), v.reshape(length, kv_n, d)
        if lay.qk_norm:
            q, k = rms_norm(q, w[a + lay.qk_norm[0] + ".weight"], eps), rms_norm(k, w[a + lay.qk_norm[1] + ".weight"], eps)
        q, k = rope(q, pos, theta, rotary_dim), rope(k, pos, theta, rotary_dim)
        k, v = k.repeat_interleave(h_n // kv_n, dim=1), v.repeat_interleave(h_n // kv_n, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(d)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(x.dtype).reshape(length, -1)
        x = x + attn @ w[a + lay.out_proj + ".weight"].T
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + (moe_mlp(y, w, cfg, p, lay.moe) if layer_is_moe(cfg, lay, i) else _swiglu(y, w, p + "mlp."))
    x = rms_norm(x, w["model.norm.weight"], eps)
    if lay.shift:
        x = torch.cat([x[:1], x[:-1]], 0)
    return x.float() @ w["lm_head.weight"].float().T


def random_weights(cfg: dict, layout: Layout | str, *, dtype=torch.float32, seed=0) -> dict:
    """HF-named random weights for `cfg` in `layout`; norms near 1, projections ~N(0, 0.05), and router
    weights large enough that top-k choices are not decided by rounding."""
    lay = LAYOUTS[layout] if isinstance(layout, str) else layout
    g = torch.Generator().manual_seed(seed)
    hid, h_n, kv_n = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or hid // h_n

    def r(*shape, scale=0.05):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def mlp(prefix, inter):
        return {prefix + "gate_proj.weight": r(inter, hid), prefix + "up_proj.weight": r(inter, hid),
                prefix + "down_proj.weight": r(hid, inter)}

    w = {lay.embed: r(cfg["vocab_size"], hid, scale=1.0), "model.norm.weight": 1 + r(hid),
         "lm_head.weight": r(cfg["vocab_size"], hid)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + lay.attn + "."
        w.update({p + "input_layernorm.weight": 1 + r(hid), p + "post_attention_layernorm.weight": 1 + r(hid),
                  a + lay.out_proj + ".weight": r(hid, h_n * d)})
        if lay.fused_qkv:
            w[a + "query_key_value.weight"] = r((h_n + 2 * kv_n) * d, hid)
        else:
            w.update({a + "q_proj.weight": r(h_n * d, hid), a + "k_proj.weight": r(kv_n * d, hid),
                      a + "v_proj.weight": r(kv_n * d, hid)})
        if lay.qkv_bias:
            w.update({a + "q_proj.bias": r(h_n * d), a + "k_proj.bias": r(kv_n * d), a + "v_proj.bias": r(kv_n * d)})
        if lay.qk_norm:
            w.update({a + lay.qk_norm[0] + ".weight": 1 + r(d), a + lay.qk_norm[1] + ".weight": 1 + r(d)})
        if not layer_is_moe(cfg, lay, i):
            w.update(mlp(p + "mlp.", cfg["intermediate_size"]))
            continue
        w[p + "mlp.gate.weight"] = r(cfg["num_experts"], hid, scale=1.0)
        for e in range(cfg["num_experts"]):
            w.update(mlp(p + f"mlp.experts.{e}.", cfg["moe_intermediate_size"]))
        if lay.moe == "llada2_moe":
            # SGLang keeps the expert bias in fp32 (the checkpoint's dtype is kept by its loader).
            w[p + "mlp.gate.expert_bias"] = r(cfg["num_experts"], scale=0.5).float()
            if cfg.get("num_shared_experts"):
                w.update(mlp(p + "mlp.shared_experts.", cfg["moe_intermediate_size"] * cfg["num_shared_experts"]))
    return w


# Tiny configs of each family (CPU tests: as below; GPU check: head_dim 128, the shape the FlashInfer kernels of
# the other GPU runs are compiled for). Block size and [MASK] id are the families' defaults.
BLOCK_MASK = {"sdar": (4, 151669), "fast-dllm-v2": (32, 151665), "sdar-moe": (4, 151669), "llada2-moe": (32, 156895)}
_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)


def tiny_config(family: str, **overrides) -> dict:
    cfg = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
               rope_theta=50000.0, tie_word_embeddings=False)
    if family == "sdar-moe":
        cfg.update(_MOE)
    elif family == "llada2-moe":
        cfg.update(_MOE, vocab_size=157184, partial_rotary_factor=0.5, num_shared_experts=1, n_group=2, topk_group=1,
                   first_k_dense_replace=1, routed_scaling_factor=2.5, score_function="sigmoid",
                   moe_router_enable_expert_bias=True, router_dtype="fp32", use_qk_norm=True)
    cfg.update(overrides)
    return cfg
