"""Runs an SGLang dLLM model class (built and loaded exactly as SGLang's loader would, from HF-named weights)
over a prompt block and then a [MASK] block, with a stub attention backend that keeps K/V by KV slot and
attends block-causally, and compares its logits with `benchmarks/reference_models.reference_forward` over the
whole sequence. Used by tests/adapters/ in a subprocess (it sets process-wide SGLang state: the distributed
group, global server args, DP-attention and MoE settings) and by benchmarks/adapters_check.py on the GPU.

`python model_class_forward.py [FAMILY] [--device cuda --dtype bf16 --config JSON]` prints one JSON line. On
the CPU, SGLang's MoE layers run through its native fallback, which leaves `routed_scaling_factor` out (see
main)."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
from reference_models import BLOCK_MASK, LAYOUTS, Layout, random_weights, reference_forward, tiny_config  # noqa: E402

ARCH = {"sdar": "SDARForCausalLM", "fast-dllm-v2": "Fast_dLLM_QwenForCausalLM", "sdar-moe": "SDARMoeForCausalLM",
        "llada2-moe": "LLaDA2MoeModelLM"}


class _Batch:
    """The ForwardBatch fields the model, RadixAttention and LogitsProcessor read; anything else is off."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __getattr__(self, name):
        return False if name.startswith(("is_", "return_", "enable")) else None


class StubAttention:
    """Block-causal attention over a KV store indexed by KV slot, like a dLLM backend with ENCODER_ONLY layers."""

    def __init__(self, slots: int, block: int, req_to_token: torch.Tensor):
        self.k, self.v, self.block, self.slots = {}, {}, block, slots
        # The backend contract: models reach the pools through the forward context's backend, never through
        # the ForwardBatch (SGLang 0.5.14's has no pool attributes).
        self.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)
        # Models ask the pool whether the rotary kernel may write K/V itself (CUDA, bf16 pools). A pool that
        # says fp32 keeps K/V on the attention call, where this stub stores them.
        self.token_to_kv_pool = SimpleNamespace(dtype=torch.float32)

    def forward(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        lid, d = layer.layer_id, layer.head_dim
        if lid not in self.k:
            self.k[lid] = torch.zeros(self.slots, layer.tp_k_head_num, d, dtype=k.dtype, device=k.device)
            self.v[lid] = torch.zeros(self.slots, layer.tp_v_head_num, d, dtype=v.dtype, device=v.device)
        self.k[lid][fb.out_cache_loc] = k.view(-1, layer.tp_k_head_num, d)
        self.v[lid][fb.out_cache_loc] = v.view(-1, layer.tp_v_head_num, d)
        q = q.view(q.shape[0], -1, d)
        out = torch.empty_like(q)
        group = q.shape[1] // layer.tp_k_head_num
        for i in range(fb.batch_size):
            s, n = int(fb.extend_start_loc[i]), int(fb.extend_seq_lens[i])
            pos = fb.positions[s:s + n]
            end = int(pos[-1]) + 1
            locs = self.req_to_token_pool.req_to_token[fb.req_pool_indices[i], :end]
            kk = self.k[lid][locs].repeat_interleave(group, 1).float()
            vv = self.v[lid][locs].repeat_interleave(group, 1).float()
            scores = torch.einsum("qhd,khd->hqk", q[s:s + n].float(), kk) * layer.scaling
            allowed = (pos[:, None] // self.block) >= (torch.arange(end, device=q.device)[None] // self.block)
            scores = scores.masked_fill(~allowed[None], float("-inf"))
            out[s:s + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).to(q.dtype)
        return out.view(out.shape[0], -1)


def setup_sglang(device: str, hidden_size: int = 64, dtype=torch.float32) -> None:
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.plugins import load_plugins
    from sglang.srt.layers.dp_attention import initialize_dp_attention
    from sglang.srt.layers.moe import initialize_moe_config
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    load_plugins()  # the installed sglang-mage, with its hooks on SGLang's model classes, as in a server
    if device == "cpu":
        # SGLang's platform probe finds no CPU engine here; its rotary op would then want vllm's kernel.
        import sglang.srt.layers.rotary_embedding.base as rope_base

        rope_base._is_cpu = True
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo" if device == "cpu" else "nccl",
                                 distributed_init_method=f"tcp://127.0.0.1:{29500 + os.getpid() % 1000}")
    initialize_model_parallel(1, 1)
    server_args = ServerArgs(model_path="dummy", device=device)
    if server_args.cuda_graph_config is None:  # read by apply_qk_norm on CUDA; the engine resolves it at launch
        from sglang.srt.model_executor.cuda_graph_config import default_cuda_graph_config

        server_args.cuda_graph_config = default_cuda_graph_config()
    set_global_server_args_for_scheduler(server_args)
    # The layer communicator (every SDAR / MoE layer) and the MoE layers read these process-wide settings.
    initialize_dp_attention(server_args, SimpleNamespace(hf_config=SimpleNamespace(), hidden_size=hidden_size,
                                                         dtype=dtype))
    initialize_moe_config(server_args)


def model_class(arch: str):
    if arch == "Fast_dLLM_QwenForCausalLM":
        from sglang_mage.model_adapters.fast_dllm_v2_model import Fast_dLLM_QwenForCausalLM

        return Fast_dLLM_QwenForCausalLM
    from sglang.srt.models.registry import ModelRegistry

    return ModelRegistry.resolve_model_cls([arch])[0]


def hf_config(family: str, cfg: dict):
    """The config object SGLang would build from config.json for this family."""
    if family == "llada2-moe":
        from tiny_llada2_config import LLaDA2MoeConfig

        return LLaDA2MoeConfig(**cfg)
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    return {"sdar": Qwen3Config, "fast-dllm-v2": Qwen2Config, "sdar-moe": Qwen3MoeConfig}[family](**cfg)


def run_model_class(family: str, cfg: dict, weights: dict, block: int, mask: int, device: str = "cpu",
                    dtype=torch.float32) -> dict:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    hf = hf_config(family, cfg)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = model_class(ARCH[family])(hf)
    torch.set_default_dtype(torch.float32)
    # The loader keeps a checkpoint tensor's own dtype where the parameter asks for it (LLaDA2's fp32 bias).
    model.load_weights(iter([(k, v if v.dtype == torch.float32 and "expert_bias" in k else v.to(dtype))
                             for k, v in weights.items()]))
    # Every parameter must have been written by load_weights (a name the mapping missed would stay zero/empty).
    loaded = {k for k, v in model.named_parameters() if v.abs().sum() > 0}
    params = {k for k, _ in model.named_parameters()}

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(100, min(cfg["vocab_size"], 150000), (block,), generator=g)
    masked = prompt.new_full((block,), mask)
    masked[block // 2] = 4242  # one already-decoded token inside the [MASK] block
    seq = torch.cat([prompt, masked])
    slot = 1
    req_to_token = torch.zeros(4, 4 * block, dtype=torch.long, device=device)
    req_to_token[slot, : 2 * block] = torch.arange(10, 10 + 2 * block, device=device)
    attn = StubAttention(64 + 4 * block, block, req_to_token)
    rows = []
    for b in range(2):
        ids = seq[b * block:(b + 1) * block].to(device)
        pos = torch.arange(b * block, (b + 1) * block, device=device)
        fb = _Batch(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=1, input_ids=ids, positions=pos,
                    extend_start_loc=torch.tensor([0], device=device),
                    extend_seq_lens=torch.tensor([block], device=device), extend_seq_lens_cpu=[block],
                    req_pool_indices=torch.tensor([slot], device=device),
                    out_cache_loc=req_to_token[slot, pos],
                    seq_lens=torch.tensor([(b + 1) * block], device=device))
        if b == 1 and hasattr(model, "carried_first_tokens"):
            # Before the forward and outside its forward context, as the FastDllmV2 algorithm asks.
            carried = int(model.carried_first_tokens(fb)[0])
        with forward_context(ForwardContext(attn_backend=attn)), torch.no_grad():
            rows.append(model(ids, pos, fb).full_logits.float().cpu())
    got = torch.cat(rows)
    w = {k: v.to(dtype).float() for k, v in weights.items()}
    ref = reference_forward(w, cfg, seq, block, family)
    out = {"max_abs_err": float((got - ref).abs().max()), "scale": float(ref.abs().max()),
           "unloaded": sorted(params - loaded), "argmax_equal": bool(torch.equal(got.argmax(-1), ref.argmax(-1))),
           "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()), "dtype": str(dtype)}
    if LAYOUTS[family].shift:
        # The reference's token for position B: the prompt's last hidden state, greedy.
        out["carried_first_token"] = carried
        out["reference_first_token"] = int(ref[block].argmax())
        # Without the carry, row B would be its own hidden state's logits: the reference's shift says otherwise.
        unshifted = reference_forward(w, cfg, seq, block, Layout(qk_norm=None, qkv_bias=True))
        out["err_vs_unshifted"] = float((got[block:] - unshifted[block:]).abs().max())
        out["err_vs_unshifted_row_b"] = float((got[block] - unshifted[block - 1]).abs().max())
    return out


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("family", nargs="?", default="fast-dllm-v2", choices=list(ARCH))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--config", help="JSON config (default: reference_models.tiny_config for the family)")
    args = ap.parse_args(argv)
    if args.config:
        cfg = json.loads(args.config)
    else:
        # SGLang's CPU MoE fallback (fused_moe_native) leaves routed_scaling_factor out; its GPU kernels apply
        # it, and the GPU check (benchmarks/adapters_check.py) runs LLaDA2 with 2.5.
        cfg = tiny_config(args.family, **({"routed_scaling_factor": 1.0} if args.family == "llada2-moe" else {}))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    setup_sglang(args.device, cfg["hidden_size"], dtype)
    result = run_model_class(args.family, cfg, random_weights(cfg, args.family), *BLOCK_MASK[args.family],
                             device=args.device, dtype=dtype)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
