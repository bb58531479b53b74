"""Runs an SGLang dLLM model class (built and loaded exactly as SGLang's loader would, from HF-named weights)
over a prompt block and then a [MASK] block, with a stub attention backend that keeps K/V by KV slot and
attends block-causally, and compares its logits with `benchmarks/adapters_check.reference_forward` over the
whole sequence. Used by tests/adapters/test_fast_dllm_v2.py in a subprocess (it sets process-wide SGLang
state: the distributed group, global server args) and by benchmarks/adapters_check.py on the GPU.

`python fast_dllm_v2_cpu_forward.py` prints one JSON line."""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
from adapters_check import random_dense_weights, reference_forward  # noqa: E402


class _Batch:
    """The ForwardBatch fields the model, RadixAttention and LogitsProcessor read; anything else is off."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __getattr__(self, name):
        return False if name.startswith(("is_", "return_", "enable")) else None


class StubAttention:
    """Block-causal attention over a KV store indexed by KV slot, like a dLLM backend with ENCODER_ONLY layers."""

    def __init__(self, slots: int, block: int):
        self.k, self.v, self.block, self.slots = {}, {}, block, slots

    def forward(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        lid, d = layer.layer_id, layer.head_dim
        if lid not in self.k:
            self.k[lid] = torch.zeros(self.slots, layer.tp_k_head_num, d, dtype=k.dtype, device=k.device)
            self.v[lid] = torch.zeros(self.slots, layer.tp_v_head_num, d, dtype=v.dtype, device=v.device)
        self.k[lid][fb.out_cache_loc], self.v[lid][fb.out_cache_loc] = k, v
        q = q.view(q.shape[0], -1, d)
        out = torch.empty_like(q)
        group = q.shape[1] // layer.tp_k_head_num
        for i in range(fb.batch_size):
            s, n = int(fb.extend_start_loc[i]), int(fb.extend_seq_lens[i])
            pos = fb.positions[s:s + n]
            end = int(pos[-1]) + 1
            locs = fb.req_to_token_pool.req_to_token[fb.req_pool_indices[i], :end]
            kk = self.k[lid][locs].repeat_interleave(group, 1).float()
            vv = self.v[lid][locs].repeat_interleave(group, 1).float()
            scores = torch.einsum("qhd,khd->hqk", q[s:s + n].float(), kk) * layer.scaling
            allowed = (pos[:, None] // self.block) >= (torch.arange(end, device=q.device)[None] // self.block)
            scores = scores.masked_fill(~allowed[None], float("-inf"))
            out[s:s + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).to(q.dtype)
        return out.view(out.shape[0], -1)


def setup_sglang(device: str) -> None:
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    if device == "cpu":
        # SGLang's platform probe finds no CPU engine here; its rotary op would then want vllm's kernel.
        import sglang.srt.layers.rotary_embedding.base as rope_base

        rope_base._is_cpu = True
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo" if device == "cpu" else "nccl",
                                 distributed_init_method=f"tcp://127.0.0.1:{29500 + os.getpid() % 1000}")
    initialize_model_parallel(1, 1)
    set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", device=device))


def model_class(arch: str):
    if arch == "Fast_dLLM_QwenForCausalLM":
        from sglang_mage.model_adapters.fast_dllm_v2_model import Fast_dLLM_QwenForCausalLM

        return Fast_dLLM_QwenForCausalLM
    from sglang.srt.models.registry import ModelRegistry

    return ModelRegistry.resolve_model_cls([arch])[0]


def run_model_class(arch: str, cfg: dict, weights: dict, block: int, mask: int, device: str = "cpu",
                    dtype=torch.float32) -> dict:
    from transformers import Qwen2Config, Qwen3Config

    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    hf = (Qwen2Config if arch == "Fast_dLLM_QwenForCausalLM" else Qwen3Config)(**cfg)
    torch.set_default_dtype(dtype)
    model = model_class(arch)(hf).to(device)
    torch.set_default_dtype(torch.float32)
    model.load_weights(iter([(k, v.to(dtype)) for k, v in weights.items()]))
    # Every parameter must have been written by load_weights (a name the mapping missed would stay zero/empty).
    loaded = {k for k, v in model.named_parameters() if v.abs().sum() > 0}
    params = {k for k, _ in model.named_parameters()}

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(100, 150000, (block,), generator=g)
    masked = prompt.new_full((block,), mask)
    masked[block // 2] = 4242  # one already-decoded token inside the [MASK] block
    seq = torch.cat([prompt, masked])
    slot = 1
    req_to_token = torch.zeros(4, 4 * block, dtype=torch.long, device=device)
    req_to_token[slot, : 2 * block] = torch.arange(10, 10 + 2 * block, device=device)
    attn = StubAttention(64 + 4 * block, block)
    rows = []
    with forward_context(ForwardContext(attn_backend=attn)):
        for b in range(2):
            ids = seq[b * block:(b + 1) * block].to(device)
            pos = torch.arange(b * block, (b + 1) * block, device=device)
            fb = _Batch(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=1, input_ids=ids, positions=pos,
                        extend_start_loc=torch.tensor([0], device=device),
                        extend_seq_lens=torch.tensor([block], device=device), extend_seq_lens_cpu=[block],
                        req_pool_indices=torch.tensor([slot], device=device),
                        req_to_token_pool=_Batch(req_to_token=req_to_token), out_cache_loc=req_to_token[slot, pos],
                        seq_lens=torch.tensor([(b + 1) * block], device=device))
            if b == 1 and hasattr(model, "carried_first_tokens"):
                carried = int(model.carried_first_tokens(fb)[0])  # before the forward, as FastDllmV2 asks
            with torch.no_grad():
                rows.append(model(ids, pos, fb).full_logits.float().cpu())
    got = torch.cat(rows)
    w = {k: v.to(dtype).float() for k, v in weights.items()}
    shift = arch == "Fast_dLLM_QwenForCausalLM"
    ref = reference_forward(w, cfg, seq, block, qk_norm=not shift, qkv_bias=shift, shift=shift)
    out = {"max_abs_err": float((got - ref).abs().max()), "scale": float(ref.abs().max()),
           "unloaded": sorted(params - loaded), "argmax_equal": bool(torch.equal(got.argmax(-1), ref.argmax(-1)))}
    if shift:
        # The reference's token for position B: the prompt's last hidden state, greedy.
        out["carried_first_token"] = carried
        out["reference_first_token"] = int(ref[block].argmax())
        # Without the carry, row B would be its own hidden state's logits: the reference's shift says otherwise.
        unshifted = reference_forward(w, cfg, seq, block, qk_norm=False, qkv_bias=True, shift=False)
        out["err_vs_unshifted"] = float((got[block:] - unshifted[block:]).abs().max())
        out["err_vs_unshifted_row_b"] = float((got[block] - unshifted[block - 1]).abs().max())
    return out


def tiny_config(vocab: int = 151936) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=False)


if __name__ == "__main__":
    arch = sys.argv[1] if len(sys.argv) > 1 else "Fast_dLLM_QwenForCausalLM"
    setup_sglang("cpu")
    cfg = tiny_config()
    shift = arch == "Fast_dLLM_QwenForCausalLM"
    weights = random_dense_weights(cfg, qk_norm=not shift, qkv_bias=shift)
    block, mask = (32, 151665) if shift else (4, 151669)
    print("RESULT " + json.dumps(run_model_class(arch, cfg, weights, block, mask)), flush=True)
