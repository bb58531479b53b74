"""Model adapters on the GPU: per family, a tiny random config with random weights written to disk, then
- max_abs_logit_err: SGLang's model class (the one the engine would load) on one prompt block plus one [MASK]
  block, against the pure-PyTorch reference forward below (dense families; MoE families: null);
- greedy_match: `sgl.Engine` with `--attention-backend mage` and with `flashinfer` give the same tokens, and
  (dense families) the same tokens as the reference schedule run on the reference forward.
Writes benchmarks/results/adapters.json rows {family, max_abs_logit_err, greedy_match, ...}.

Usage (GPU): python benchmarks/adapters_check.py [--families sdar,fast-dllm-v2,...] [--out PATH]
The reference forward (`reference_forward`) is pure PyTorch and CPU-tested (tests/adapters/test_fast_dllm_v2.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# family -> (architecture, model_type, block, mask, dense?, reference style)
FAMILIES = {
    "sdar": dict(arch="SDARForCausalLM", model_type="qwen3", block=4, mask=151669, qk_norm=True, qkv_bias=False,
                 shift=False),
    "fast-dllm-v2": dict(arch="Fast_dLLM_QwenForCausalLM", model_type="qwen2", block=32, mask=151665,
                         qk_norm=False, qkv_bias=True, shift=True),
    "sdar-moe": dict(arch="SDARMoeForCausalLM", model_type="qwen3_moe", block=4, mask=151669, moe=True),
    "llada2-moe": dict(arch="LLaDA2MoeModelLM", model_type="llada2_moe", block=32, mask=156895, moe=True),
}

TINY = dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_theta=1000000.0, tie_word_embeddings=False, torch_dtype="bfloat16")


# ---- reference forward (pure PyTorch) ------------------------------------------------------------------------


def _rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rope(x, pos, theta):
    # x [L, H, D], rotate-half convention (HF Qwen2/Qwen3)
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x.float() * cos + torch.cat([-x2, x1], -1).float() * sin).to(x.dtype)


def block_causal_mask(length: int, block: int, device=None) -> torch.Tensor:
    pos = torch.arange(length, device=device)
    return (pos[:, None] // block) >= (pos[None, :] // block)


def reference_forward(w: dict, cfg: dict, ids: torch.Tensor, block: int, *, qk_norm: bool, qkv_bias: bool,
                      shift: bool) -> torch.Tensor:
    """Logits [L, V] of a dense Qwen2/Qwen3-style block-diffusion model over a whole sequence (positions
    0..L-1), block-causal attention. `w` uses HF names. With `shift`, row p is the lm_head of hidden p-1 (row
    0 its own), the Fast-dLLM v2 convention."""
    h_n, kv_n = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // h_n
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    length = ids.shape[0]
    pos = torch.arange(length, device=ids.device)
    allowed = block_causal_mask(length, block, ids.device)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = _rms(x, w[p + "input_layernorm.weight"], eps)

        def proj(name):
            out = y @ w[p + f"self_attn.{name}.weight"].T
            return out + w[p + f"self_attn.{name}.bias"] if qkv_bias else out

        q, k, v = (proj(n).view(length, -1, d) for n in ("q_proj", "k_proj", "v_proj"))
        if qk_norm:
            q, k = _rms(q, w[p + "self_attn.q_norm.weight"], eps), _rms(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        k, v = k.repeat_interleave(h_n // kv_n, dim=1), v.repeat_interleave(h_n // kv_n, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(d)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(x.dtype).reshape(length, -1)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        y = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate.float()).to(x.dtype) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    if shift:
        x = torch.cat([x[:1], x[:-1]], 0)
    return (x.float() @ w["lm_head.weight"].float().T)


def random_dense_weights(cfg: dict, *, qk_norm: bool, qkv_bias: bool, dtype=torch.float32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hid, inter, h_n, kv_n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or hid // h_n

    def r(*shape, scale=0.05):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    w = {"model.embed_tokens.weight": r(cfg["vocab_size"], hid, scale=1.0), "model.norm.weight": 1 + r(hid),
         "lm_head.weight": r(cfg["vocab_size"], hid)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + r(hid), p + "post_attention_layernorm.weight": 1 + r(hid),
                  p + "self_attn.q_proj.weight": r(h_n * d, hid), p + "self_attn.k_proj.weight": r(kv_n * d, hid),
                  p + "self_attn.v_proj.weight": r(kv_n * d, hid), p + "self_attn.o_proj.weight": r(hid, h_n * d),
                  p + "mlp.gate_proj.weight": r(inter, hid), p + "mlp.up_proj.weight": r(inter, hid),
                  p + "mlp.down_proj.weight": r(hid, inter)})
        if qkv_bias:
            w.update({p + "self_attn.q_proj.bias": r(h_n * d), p + "self_attn.k_proj.bias": r(kv_n * d),
                      p + "self_attn.v_proj.bias": r(kv_n * d)})
        if qk_norm:
            w.update({p + "self_attn.q_norm.weight": 1 + r(d), p + "self_attn.k_norm.weight": 1 + r(d)})
    return w


def reference_low_confidence(w, cfg, prompt, max_new, block, mask, *, qk_norm, qkv_bias, shift, threshold=0.95):
    """Greedy tokens of SGLang's LowConfidence schedule run on `reference_forward` (no KV cache: every step
    recomputes the sequence, which block-causal attention makes equal to a cached run). Fast-dLLM v2's carried
    first token is its shifted logit row, as in the SGLang model class."""
    seq = list(prompt)
    while len(seq) - len(prompt) < max_new:
        start = len(seq) // block * block
        seq += [mask] * (start + block - len(seq))
        ids = torch.tensor(seq)
        while (ids[start:] == mask).any():
            logits = reference_forward(w, cfg, ids, block, qk_norm=qk_norm, qkv_bias=qkv_bias, shift=shift)[start:]
            probs = logits.softmax(-1)
            conf, tok = probs.max(-1)
            m = ids[start:] == mask
            conf = torch.where(m, conf, float("-inf"))
            transfer = conf > threshold
            if not transfer.any():
                transfer[conf.argmax()] = True
            ids[start:] = torch.where(transfer & m, tok, ids[start:])
        seq = ids.tolist()
    return seq[len(prompt):len(prompt) + max_new]


# ---- GPU checks ------------------------------------------------------------------------------------------------


def write_model(root: str, family: str, weights: dict | None) -> str:
    spec = FAMILIES[family]
    path = os.path.join(root, family)
    os.makedirs(path, exist_ok=True)
    cfg = {**TINY, "architectures": [spec["arch"]], "model_type": spec["model_type"]}
    if family == "fast-dllm-v2":
        cfg["bd_size"] = spec["block"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if weights is not None:
        from safetensors.torch import save_file

        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"))
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    try:  # the tokenizer files of the tiny SDAR example, shared by every family
        from tiny_model import copy_tokenizer  # type: ignore

        copy_tokenizer(path)
    except Exception:  # noqa: BLE001 - engines run with skip_tokenizer_init below
        pass
    return path


def engine_tokens(path: str, backend: str, prompts, max_new: int, algorithm: str = "LowConfidence", **extra):
    import sglang as sgl

    engine = sgl.Engine(model_path=path, dllm_algorithm=algorithm, attention_backend=backend,
                        skip_tokenizer_init=True, max_running_requests=4, disable_cuda_graph=True,
                        load_format="auto" if os.path.exists(os.path.join(path, "model.safetensors")) else "dummy",
                        **extra)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": max_new, "temperature": 0})
        return [o["output_ids"] for o in outs]
    finally:
        engine.shutdown()


def check_family(root: str, family: str, max_new: int = 64) -> dict:
    spec = FAMILIES[family]
    dense = not spec.get("moe")
    cfg = {**TINY}
    weights = random_dense_weights(cfg, qk_norm=spec["qk_norm"], qkv_bias=spec["qkv_bias"]) if dense else None
    path = write_model(root, family, weights)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 150000, (n,), generator=g).tolist() for n in (5, spec["block"] * 2 + 3)]
    mage = engine_tokens(path, "mage", prompts, max_new, mage_k=64, mage_min_context=0)
    dense_ref = engine_tokens(path, "flashinfer", prompts, max_new)
    row = {"family": family, "greedy_match": mage == dense_ref, "max_abs_logit_err": None,
           "mage_vs_flashinfer": mage == dense_ref}
    if family == "fast-dllm-v2":  # the family's own sub-block schedule, mage against the dense reference
        fd = [engine_tokens(path, be, prompts, max_new, algorithm="FastDllmV2", **kw)
              for be, kw in (("mage", dict(mage_k=64, mage_min_context=0)), ("flashinfer", {}))]
        row["fast_dllm_v2_schedule_mage_vs_flashinfer"] = fd[0] == fd[1]
    if dense:
        w = {k: v.to(torch.bfloat16).float() for k, v in weights.items()}
        refs = [reference_low_confidence(w, cfg, p, max_new, spec["block"], spec["mask"], qk_norm=spec["qk_norm"],
                                         qkv_bias=spec["qkv_bias"], shift=spec["shift"]) for p in prompts]
        row["reference_vs_flashinfer"] = [r == d[: len(r)] for r, d in zip(refs, dense_ref)]
        row["greedy_match"] = (row["mage_vs_flashinfer"] and all(row["reference_vs_flashinfer"])
                               and row.get("fast_dllm_v2_schedule_mage_vs_flashinfer", True))
        try:  # SDAR's class also wants SGLang's DP-attention state, which the stub setup does not build yet
            row["max_abs_logit_err"] = model_class_logit_err(path, family, w, cfg)
        except Exception as e:  # noqa: BLE001
            row["logit_err_error"] = repr(e)
    return row


def model_class_logit_err(path: str, family: str, w: dict, cfg: dict) -> float:
    """SGLang's model class with the stub attention of the CPU tests (on the GPU), against reference_forward."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "adapters"))
    from fast_dllm_v2_cpu_forward import run_model_class  # type: ignore

    spec = FAMILIES[family]
    return run_model_class(spec["arch"], cfg, w, spec["block"], spec["mask"], device="cuda")["max_abs_err"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "adapters.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for family in args.families.split(","):
            try:
                rows.append(check_family(root, family))
            except Exception as e:  # noqa: BLE001 - one family's failure is a row, not the end of the run
                rows.append({"family": family, "max_abs_logit_err": None, "greedy_match": False, "error": repr(e)})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
