"""Model adapters on the GPU (issue: model adapters). Per family, a tiny random config (benchmarks/
reference_models.tiny_config at head_dim 128; MoE families with 8 experts) and random weights written to disk
in the Hugging Face layout, then:
- max_abs_logit_err: SGLang's model class (the one the engine loads) over a prompt block and a [MASK] block,
  in bf16 with SGLang's CUDA kernels (its RMSNorm and fused q/k-norm kernels take bf16 only), against the
  pure-PyTorch reference forward (benchmarks/reference_models.py, fp32 on the same bf16-rounded weights).
  Tolerance: max |err| <= BF16_TOL x max |reference logit|. The same comparison in fp32, which isolates the
  architecture from bf16 rounding, runs on the CPU in CI (tests/adapters/test_model_classes.py, <= 1e-4).
- greedy_match: `sgl.Engine` with `--attention-backend mage` at k >= context (k=2048 = the context length) gives
  the same greedy tokens as `flashinfer`, LowConfidence (Fast-dLLM v2 also under its own FastDllmV2 schedule).
  mage's planner then keeps every step exact through FlashInfer, so the tokens must be identical: this proves
  the plugin (adapters, hooks, index-cache planning, schedules) changes nothing when nothing is dropped.
  Chunked prompt prefill is off here (--mage-prefill-chunk-size 0; its own check is
  chunked_prefill_correctness.py), because multi-block prefill sums in another order than block-by-block.
- sparse_vs_flashinfer: the same with --mage-force-sparse (k=64 + 16 sinks + 64 local >= every context here,
  min-context 0): every later step runs the Triton sparse kernel over the whole prefix, exact in real
  arithmetic, so only bf16 rounding separates it from FlashInfer. Noise control: the `triton` backend (dense,
  other kernels) against flashinfer. Random weights put many near-ties among 151K logits (bf16 argmax
  agreement with the fp32 reference is below 100% even for one forward), so a one-ulp difference can flip a
  greedy choice and everything after it; `token_agreement` / `first_divergence` per prompt show whether the
  sparse kernel's difference is of that kind (comparable to triton's) or a defect (wrong from the start).
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
import engine_jobs  # noqa: E402
from reference_models import BLOCK_MASK, LAYOUTS, random_weights, reference_forward, tiny_config  # noqa: E402

ARCH = {"sdar": ("SDARForCausalLM", "qwen3"), "fast-dllm-v2": ("Fast_dLLM_QwenForCausalLM", "qwen2"),
        "sdar-moe": ("SDARMoeForCausalLM", "qwen3_moe"), "llada2-moe": ("LLaDA2MoeModelLM", "llada2_moe")}
BF16_TOL = 0.02
GPU_SHAPE = dict(hidden_size=256, head_dim=128)  # FlashInfer kernels are compiled per head_dim: share 128
# k >= context, planner left alone: exact FlashInfer at every step (greedy_match).
MAGE_EXACT = dict(mage_k=2048, mage_min_context=0, mage_prefill_chunk_size=0)
# The sparse kernel at every later step, over a selected set that covers the whole prefix.
MAGE_SPARSE = dict(mage_k=64, mage_min_context=0, mage_force_sparse=True, mage_prefill_chunk_size=0)
CONTEXT_LEN = 2048


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

    # Several engines start on the GPU at once (run_engines). SGLang sizes the KV pool from the memory free
    # before and after its own weight load, so memory the other engines take meanwhile counts against this
    # one: a small fraction fails at random. A large fraction with a fixed small pool (max_total_tokens) is
    # robust to that and still leaves room for all of them.
    engine = sgl.Engine(model_path=path, dllm_algorithm=algorithm, attention_backend=backend,
                        skip_tokenizer_init=True, max_running_requests=4, disable_cuda_graph=True,
                        trust_remote_code=True, mem_fraction_static=0.5, max_total_tokens=4 * CONTEXT_LEN,
                        context_length=CONTEXT_LEN, log_level="warning", **extra)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": max_new, "temperature": 0})
        return [o["output_ids"] for o in outs]
    finally:
        engine.shutdown()


def run_engines(jobs: dict, path: str, prompts, max_new: int, timeout: float = 420) -> dict:
    """{name: (backend, algorithm, engine kwargs)} -> {name: tokens}, every engine in its own process at once."""
    specs = {name: {"path": path, "backend": backend, "algorithm": algorithm, "extra": extra, "prompts": prompts,
                    "max_new": max_new} for name, (backend, algorithm, extra) in jobs.items()}
    return engine_jobs.run_jobs(os.path.abspath(__file__), specs, timeout=timeout, log=progress)


def progress(message: str) -> None:
    """Stage timings on stderr: a run cut off at the device's limit still shows where its time went."""
    print(f"[adapters {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def model_class_errors(family: str, cfg: dict, dtype: str) -> dict:
    """SGLang's model class with the stub attention of the CPU tests, on the GPU, in a subprocess (it sets
    process-wide distributed state, which must not meet the engines')."""
    script = os.path.join(HERE, "..", "tests", "adapters", "model_class_forward.py")
    out = subprocess.run([sys.executable, script, family, "--device", "cuda", "--dtype", dtype,
                          "--config", json.dumps(cfg)], capture_output=True, text=True, timeout=300)
    result = engine_jobs.parse_result(out.stdout)
    if result is None:
        raise RuntimeError(f"model class run failed: {out.stderr[-2000:]}")
    return result


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
    progress(f"{family}: model class forward vs reference")
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
    jobs = {"flashinfer": ("flashinfer", "LowConfidence", {}), "mage_exact": ("mage", "LowConfidence", MAGE_EXACT),
            "mage_sparse": ("mage", "LowConfidence", MAGE_SPARSE)}
    if control:
        jobs["triton"] = ("triton", "LowConfidence", {})
    fast_schedule = LAYOUTS[family].shift and schedules  # the family's own sub-block schedule as well
    if fast_schedule:
        jobs.update({f"fd_{name}": (be, "FastDllmV2", kw) for name, (be, _, kw) in list(jobs.items())
                     if name != "triton"})
    progress(f"{family}: {len(jobs)} engines ({', '.join(jobs)})")
    toks = run_engines(jobs, path, prompts, max_new)
    progress(f"{family}: engines done; plain PyTorch reference decode")
    dense = toks["flashinfer"]
    row["prompt_lens"] = [len(p) for p in prompts]
    row["greedy_match"] = toks["mage_exact"] == dense
    row["sparse_vs_flashinfer"] = agreement(toks["mage_sparse"], dense)
    row["sparse_greedy_match"] = toks["mage_sparse"] == dense
    if control:
        row["triton_vs_flashinfer"] = agreement(toks["triton"], dense)
    if fast_schedule:
        row["fast_dllm_v2_schedule_greedy_match"] = toks["fd_mage_exact"] == toks["fd_flashinfer"]
        row["fast_dllm_v2_schedule_sparse_vs_flashinfer"] = agreement(toks["fd_mage_sparse"], toks["fd_flashinfer"])
        row["greedy_match"] = row["greedy_match"] and row["fast_dllm_v2_schedule_greedy_match"]
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
    ap.add_argument("--engine-job", help=argparse.SUPPRESS)  # internal: one engine run, from run_engines
    args = ap.parse_args()
    if args.engine_job:
        job = engine_jobs.load_spec(args.engine_job)
        engine_jobs.emit(engine_tokens(job["path"], job["backend"], job["prompts"], job["max_new"], job["algorithm"],
                                       **job["extra"]))
        return 0
    import sglang

    rows: list[dict] = []
    result = {"environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "sglang": sglang.__version__},
              "tolerances": {"bf16": f"max_abs_logit_err <= {BF16_TOL} x max |reference logit|"},
              "engine": {"algorithm": "LowConfidence (+ FastDllmV2 for fast-dllm-v2)", "mage_exact": MAGE_EXACT,
                         "mage_sparse": MAGE_SPARSE, "context_length": CONTEXT_LEN,
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
