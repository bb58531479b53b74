"""End-to-end correctness of `--attention-backend mage` inside SGLang's dLLM engine (GPU).

Runs a dummy-weight tiny SDAR model through `sgl.Engine` and checks:
- k >= context: mage gives the same greedy tokens as flashinfer (4 prompts of mixed lengths);
- k >= context with --mage-force-sparse: the same, with every step after the first in the sparse kernel;
- k = 64 on 4K-token prompts: runs, steps >= 2 used the sparse kernel (counter), and one dumped sparse step
  equals the PyTorch reference recomputed from the q, k, v captured on the GPU;
- the same for JointThreshold, and the k = 64 check with the `vote` selector (LowConfidence);
- after 200 sequential requests (on the force-sparse engine, where every request selects) the index cache
  is empty.

Writes benchmarks/results/e2e_correctness.json. Usage: python benchmarks/e2e_correctness.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from tiny_model import TINY_SDAR, write  # noqa: E402


def write_model_dir(root: str) -> str:
    return write(os.path.join(root, "tiny-sdar"))


def prompts(lengths, seed):
    rng = random.Random(seed)
    # Ids below 151643 keep clear of the special tokens (mask 151669, eos 151643).
    return [[rng.randrange(100, 150000) for _ in range(n)] for n in lengths]


def run_engine(model_dir, backend, algorithm, prompt_ids, max_new_tokens, stats_path=None, dump_dir=None, **mage):
    import sglang as sgl

    env_keys = {"SGLANG_MAGE_STATS_PATH": stats_path, "SGLANG_MAGE_DUMP_DIR": dump_dir}
    for key, value in env_keys.items():
        if value:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    engine = sgl.Engine(
        model_path=model_dir, load_format="dummy", skip_tokenizer_init=True, dllm_algorithm=algorithm,
        attention_backend=backend, max_running_requests=4, disable_cuda_graph=True, mem_fraction_static=0.6,
        context_length=16384, random_seed=0, log_level="warning", **mage,
    )
    try:
        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        outs = engine.generate(input_ids=prompt_ids, sampling_params=params)
        return [o["output_ids"] for o in outs], engine
    except BaseException:
        engine.shutdown()
        raise


def read_stats(path):
    with open(path) as f:
        return json.load(f)


def check_dump(dump_dir):
    """Recompute the dumped sparse step with the PyTorch reference; return the max abs error."""
    from sglang_mage.ops.sparse_attention import sparse_block_attention_ref

    files = [f for f in os.listdir(dump_dir) if f.endswith(".pt")]
    assert files, f"no sparse step was dumped into {dump_dir}"
    d = torch.load(os.path.join(dump_dir, files[0]))
    R = d["qo_indptr"].numel() - 1
    ref = sparse_block_attention_ref(
        d["q"].cuda(), d["k"].cuda(), d["v"].cuda(), d["qo_indptr"].cuda(), d["req_to_token"].cuda(),
        torch.arange(R, device="cuda"), d["prefix_lens"].cuda(), d["sel_slots"].cuda(), d["sel_lens"].cuda(),
        d["sm_scale"], d["block_size"],
    )
    lens = d["sel_lens"]
    return (ref.float().cpu() - d["out"].float()).abs().max().item(), int(lens.min()), int(lens.max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e_correctness.json"))
    ap.add_argument("--sequential", type=int, default=200)
    ap.add_argument("--algorithms", default="LowConfidence,JointThreshold")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    ap.add_argument("--merge", action="store_true", help="append to the cases already in --out")
    args = ap.parse_args()
    import sglang
    import flashinfer
    import triton

    tmp = tempfile.mkdtemp(prefix="mage-e2e-")
    model_dir = write_model_dir(tmp)
    mixed = prompts([37, 130, 257, 1000], seed=1)  # 37, 130 and 257 are not multiples of B=4
    # Two 4K prompts: SGLang's dLLM scheduler prefills one block per round, so each costs ~1000 rounds.
    long4k = prompts([4000, 4096 + 3], seed=2)
    new_tokens = 16
    cases, failures = [], []
    t0 = time.time()
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        cases, failures = previous["cases"], previous["failures"]
    for algorithm in args.algorithms.split(","):
        ref_mixed = None
        if args.only in "k_ge_context_force_sparse":
            ref_mixed, eng = run_engine(model_dir, "flashinfer", algorithm, mixed, new_tokens)
            eng.shutdown()
        runs = [
            ("k_ge_context", mixed, ref_mixed, dict(mage_k=4096, mage_min_context=0)),
            ("k_ge_context_force_sparse", mixed, ref_mixed, dict(mage_k=4096, mage_min_context=0, mage_force_sparse=True)),
            ("k64_4k_prompts", long4k, None, dict(mage_k=64, mage_min_context=1024)),
        ]
        if algorithm == "LowConfidence":
            runs.append(("k64_4k_prompts_vote", long4k, None,
                         dict(mage_k=64, mage_min_context=1024, mage_selector="vote", mage_vote_min_k=16,
                              mage_vote_max_k=128)))
        for name, ids, ref, mage in runs:
            if args.only not in name:
                continue
            stats_path = os.path.join(tmp, f"stats-{algorithm}-{name}.json")
            dump_dir = os.path.join(tmp, f"dump-{algorithm}-{name}") if name.startswith("k64") else None
            t_case = time.time()
            out, eng = run_engine(model_dir, "mage", algorithm, ids, new_tokens, stats_path, dump_dir, **mage)
            case = {"name": f"{algorithm}/{name}", "algorithm": algorithm, "k": mage["mage_k"],
                    "reference_backend": "flashinfer" if ref else None,
                    "greedy_match": (out == ref) if ref else None,
                    "prompt_lens": [len(p) for p in ids], "new_tokens": new_tokens}
            if name.endswith("force_sparse") and algorithm == "LowConfidence" and args.sequential:
                # Every request selects under --mage-force-sparse, so each one creates cache entries.
                rng = random.Random(3)
                for i in range(args.sequential):
                    eng.generate(input_ids=prompts([rng.randrange(1, 64)], seed=100 + i)[0],
                                 sampling_params={"max_new_tokens": rng.choice([1, 4, 7, 12])})
                case["sequential_requests"] = args.sequential
            eng.shutdown()
            case["seconds"] = round(time.time() - t_case, 1)
            stats = read_stats(stats_path)
            case["sparse_steps"] = stats["sparse_forwards"]
            case["stats"] = stats
            if dump_dir:
                err, kmin, kmax = check_dump(dump_dir)
                case["dump_max_abs_err_vs_reference"] = err
                case["dump_selected_len_range"] = [kmin, kmax]
                if err > 2e-2:
                    failures.append(f"{case['name']}: dumped sparse step differs from reference by {err}")
            if ref is not None and not case["greedy_match"]:
                failures.append(f"{case['name']}: greedy tokens differ from flashinfer")
            if name != "k_ge_context" and case["sparse_steps"] == 0:
                failures.append(f"{case['name']}: the sparse kernel never ran")
            if stats["occupancy"] != 0:
                failures.append(f"{case['name']}: index cache holds {stats['occupancy']} entries after all requests")
            cases.append(case)
            print(json.dumps(case), flush=True)
    result = {
        "device": torch.cuda.get_device_name(0),
        "versions": {"sglang": sglang.__version__, "flashinfer": flashinfer.__version__, "torch": torch.__version__,
                     "triton": triton.__version__, "python": platform.python_version()},
        "model": TINY_SDAR, "wall_s": round(time.time() - t0, 1), "cases": cases, "failures": failures,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("FAILURES:" if failures else "all e2e checks passed", *failures, sep="\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
