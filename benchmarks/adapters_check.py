"""Model adapters on the GPU (issue: model adapters). Per family, a tiny random config (benchmarks/
reference_models.tiny_config at head_dim 128; MoE families with 8 experts) and random weights written to disk
in the Hugging Face layout, then:
- max_abs_logit_err: SGLang's model class (the one the engine loads) over a prompt block and a [MASK] block,
  in bf16 with SGLang's CUDA kernels (its RMSNorm and fused q/k-norm kernels take bf16 only), against the
  pure-PyTorch reference forward (benchmarks/reference_models.py, fp32 on the same bf16-rounded weights).
  Tolerance: max |err| <= BF16_TOL x max |reference logit|. The same comparison in fp32, which isolates the
  architecture from bf16 rounding, runs on the CPU in CI (tests/adapters/test_model_classes.py, <= 1e-4).
- greedy_match: `sgl.Engine` with `--attention-backend mage` (k=64 + 16 sinks + 64 local >= every context
  here, `--mage-min-context 0`, so every later step runs the sparse kernel over the whole prefix) gives the
  same greedy tokens as with `flashinfer`, LowConfidence; Fast-dLLM v2 also under its own FastDllmV2 schedule.
- noise control: the `triton` backend (dense, other kernels) against flashinfer. Random weights put many
  near-ties among 151K logits, so a one-ulp bf16 difference in any attention output can flip a greedy choice
  and everything after it; `token_agreement` / `first_divergence` per prompt show whether mage's difference
  from flashinfer is of that kind (as large as triton's) or a defect (wrong from the first tokens).
- reference_vs_flashinfer (information): the reference LowConfidence schedule on the reference forward (fp32)
  against the flashinfer engine (bf16), per prompt.
Writes benchmarks/results/adapters.json: environment, tolerances and rows {family, max_abs_logit_err,
greedy_match, ...}.

Usage (GPU): python benchmarks/adapters_check.py [--families sdar,fast-dllm-v2,...] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reference_models import BLOCK_MASK, LAYOUTS, random_weights, reference_forward, tiny_config  # noqa: E402

ARCH = {"sdar": ("SDARForCausalLM", "qwen3"), "fast-dllm-v2": ("Fast_dLLM_QwenForCausalLM", "qwen2"),
        "sdar-moe": ("SDARMoeForCausalLM", "qwen3_moe"), "llada2-moe": ("LLaDA2MoeModelLM", "llada2_moe")}
BF16_TOL = 0.02
GPU_SHAPE = dict(hidden_size=256, head_dim=128)  # FlashInfer kernels are compiled per head_dim: share 128
MAGE = dict(mage_k=64, mage_min_context=0)


def reference_low_confidence(w, cfg, family, prompt, max_new, threshold=0.95, device="cpu"):
    """Greedy tokens of SGLang's LowConfidence schedule run on `reference_forward` (no KV cache: every step
    recomputes the sequence, which block-causal attention makes equal to a cached run)."""
    block, mask = BLOCK_MASK[family]
    seq = list(prompt)
    while len(seq) - len(prompt) < max_new:
        start = len(seq) // block * block
        seq += [mask] * (start + block - len(seq))
        ids = torch.tensor(seq, device=device)
        while (ids[start:] == mask).any():
            logits = reference_forward(w, cfg, ids, block, family)[start:]
            conf, tok = logits.softmax(-1).max(-1)
            m = ids[start:] == mask
            conf = torch.where(m, conf, float("-inf"))
            transfer = conf > threshold
            if not transfer.any():
                transfer[conf.argmax()] = True
            ids[start:] = torch.where(transfer & m, tok, ids[start:])
        seq = ids.tolist()
    return seq[len(prompt):len(prompt) + max_new]


def write_model(root: str, family: str, cfg: dict, weights: dict) -> str:
    from safetensors.torch import save_file

    arch, model_type = ARCH[family]
    path = os.path.join(root, family)
    os.makedirs(path, exist_ok=True)
    out = {**cfg, "architectures": [arch], "model_type": model_type, "torch_dtype": "bfloat16"}
    if family == "llada2-moe":  # real LLaDA2 checkpoints carry their config class as remote code
        shutil.copy(os.path.join(HERE, "tiny_llada2_config.py"), os.path.join(path, "configuration_llada2_moe.py"))
        out["auto_map"] = {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(out, f, indent=1)
    save_file({k: (v if "expert_bias" in k else v.to(torch.bfloat16)).contiguous() for k, v in weights.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def engine_tokens(path: str, backend: str, prompts, max_new: int, algorithm: str = "LowConfidence", **extra):
    import sglang as sgl

    engine = sgl.Engine(model_path=path, dllm_algorithm=algorithm, attention_backend=backend,
                        skip_tokenizer_init=True, max_running_requests=4, disable_cuda_graph=True,
                        trust_remote_code=True, mem_fraction_static=0.25, context_length=2048,
                        log_level="warning", **extra)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": max_new, "temperature": 0})
        return [o["output_ids"] for o in outs]
    finally:
        engine.shutdown()


def model_class_errors(family: str, cfg: dict, dtype: str) -> dict:
    """SGLang's model class with the stub attention of the CPU tests, on the GPU, in a subprocess (it sets
    process-wide distributed state, which must not meet the engines')."""
    script = os.path.join(HERE, "..", "tests", "adapters", "model_class_forward.py")
    out = subprocess.run([sys.executable, script, family, "--device", "cuda", "--dtype", dtype,
                          "--config", json.dumps(cfg)], capture_output=True, text=True, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"model class run failed: {out.stderr[-2000:]}")
    return json.loads(line[0][len("RESULT "):])


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Per prompt: share of equal tokens and the index of the first differing one (None if identical)."""
    share, first = [], []
    for x, y in zip(a, b):
        same = [i == j for i, j in zip(x, y)]
        share.append(round(sum(same) / max(1, len(same)), 4))
        first.append(None if all(same) and len(x) == len(y) else (same.index(False) if False in same else len(same)))
    return {"token_agreement": share, "first_divergence": first}


def check_family(root: str, family: str, max_new: int = 64, control: bool = True, schedules: bool = True) -> dict:
    block, _ = BLOCK_MASK[family]
    cfg = tiny_config(family, **GPU_SHAPE)
    weights = random_weights(cfg, family)
    row: dict = {"family": family, "architecture": ARCH[family][0], "block_size": block, "config": cfg}
    t0 = time.time()
    try:
        bf16 = model_class_errors(family, cfg, "bf16")
        row.update(max_abs_logit_err=bf16["max_abs_err"], logit_scale=bf16["scale"],
                   logit_err_within_tol=bf16["max_abs_err"] <= BF16_TOL * bf16["scale"],
                   bf16_argmax_agreement=bf16["argmax_agreement"], unloaded_params=bf16["unloaded"])
    except Exception as e:  # noqa: BLE001 - the engine checks below still run
        row.update(max_abs_logit_err=None, logit_err_within_tol=False, logit_error=repr(e)[-1500:])
    path = write_model(root, family, cfg, weights)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 150000, (n,), generator=g).tolist() for n in (5, block * 2 + 3)]
    mage = engine_tokens(path, "mage", prompts, max_new, **MAGE)
    dense = engine_tokens(path, "flashinfer", prompts, max_new)
    row["greedy_match"] = mage == dense
    row["prompt_lens"] = [len(p) for p in prompts]
    row["mage_vs_flashinfer"] = agreement(mage, dense)
    if control:
        row["triton_vs_flashinfer"] = agreement(engine_tokens(path, "triton", prompts, max_new), dense)
    if LAYOUTS[family].shift and schedules:  # the family's own sub-block schedule, mage against the dense reference
        fd = [engine_tokens(path, be, prompts, max_new, algorithm="FastDllmV2", **kw)
              for be, kw in (("mage", MAGE), ("flashinfer", {}))]
        row["fast_dllm_v2_schedule_greedy_match"] = fd[0] == fd[1]
        row["fast_dllm_v2_schedule_mage_vs_flashinfer"] = agreement(fd[0], fd[1])
        row["greedy_match"] = row["greedy_match"] and fd[0] == fd[1]
    w = {k: v.to(torch.bfloat16).float().cuda() for k, v in weights.items()}
    refs = [reference_low_confidence(w, cfg, family, p, max_new, device="cuda") for p in prompts]
    row["reference_vs_flashinfer"] = [r == d[: len(r)] for r, d in zip(refs, dense)]
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default=",".join(ARCH))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "adapters.json"))
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--no-control", action="store_true", help="skip the triton-vs-flashinfer noise control")
    ap.add_argument("--no-schedules", action="store_true", help="skip Fast-dLLM v2's own FastDllmV2 schedule")
    args = ap.parse_args()
    import sglang

    rows: list[dict] = []
    result = {"environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "sglang": sglang.__version__},
              "tolerances": {"bf16": f"max_abs_logit_err <= {BF16_TOL} x max |reference logit|"},
              "engine": {"algorithm": "LowConfidence (+ FastDllmV2 for fast-dllm-v2)", "mage": MAGE,
                         "max_new_tokens": args.max_new, "disable_cuda_graph": True},
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with tempfile.TemporaryDirectory() as root:
        for family in args.families.split(","):
            try:
                rows.append(check_family(root, family, args.max_new, not args.no_control, not args.no_schedules))
            except Exception as e:  # noqa: BLE001 - one family's failure is a row, not the end of the run
                rows.append({"family": family, "max_abs_logit_err": None, "greedy_match": False, "error": repr(e)[:2000]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "config"}), flush=True)
            with open(args.out, "w") as f:  # after every family: a run cut short keeps what it measured
                json.dump(result, f, indent=1)
    print(f"{'family':>13} {'max_abs_logit_err':>18} {'scale':>7} {'greedy_match':>12}")
    for r in rows:
        print(f"{r['family']:>13} {str(r.get('max_abs_logit_err')):>18.10} {str(r.get('logit_scale')):>7.5} "
              f"{str(r['greedy_match']):>12}")
    return 0 if all(r["greedy_match"] and r.get("logit_err_within_tol") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
