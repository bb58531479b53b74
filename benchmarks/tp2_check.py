"""mage under tensor parallelism (issue 9): tp_size=2 on one host, NCCL with NVLink multicast off.

Checks, each in its own engine:
- k >= context: mage's greedy tokens equal flashinfer's at tp_size=2 (tiny dummy SDAR, 8 q / 4 kv heads, so
  each rank holds 2 KV heads and its own index cache);
- k = 64 on two 4K prompts at tp_size=2: runs, the sparse kernel ran, and the index cache is empty after;
- time per generated block at 32K, batch 1, for mage at tp_size=1 and tp_size=2 (the Fast-dLLM-v2-1.5B shape
  as an SDAR body, 2 KV heads: one per rank; bench_e2e's engine and timing).
Writes benchmarks/results/tp2.json. Needs 2 GPUs (the device's nvidia-h200-x2 kind).

Usage: NCCL_NVLS_ENABLE=0 python benchmarks/tp2_check.py [--out PATH] [--skip-timing]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from e2e_correctness import prompts, read_stats, run_engine, write_model_dir  # noqa: E402
from results_io import write_json  # noqa: E402

TIMING_SHAPE, TIMING_CONTEXT = "fast-dllm-v2-1.5b", 32768


def failures_of(cases: list[dict]) -> list[str]:
    """What the acceptance checks require of the cases, as messages (empty: passed)."""
    out = []
    for c in cases:
        if c.get("error"):
            out.append(f"{c['name']}: {c['error']}")
            continue
        if c.get("greedy_match") is False:
            out.append(f"{c['name']}: greedy tokens differ from flashinfer at tp_size={c['tp_size']}")
        if c.get("needs_sparse") and not c.get("sparse_steps"):
            out.append(f"{c['name']}: the sparse kernel never ran")
        if c.get("occupancy_after") not in (None, 0):
            out.append(f"{c['name']}: index cache holds {c['occupancy_after']} entries after all requests")
    return out


def timing_case(tp: int, root: str, blocks: int = 4) -> dict:
    from bench_e2e import BLOCK, start_engine, time_per_block, warm_up

    engine = start_engine(TIMING_SHAPE, "mage", [(TIMING_CONTEXT, 1)], root, tp_size=tp)
    try:
        warm_up(engine, TIMING_SHAPE)
        secs, prefill = time_per_block(engine, TIMING_SHAPE, TIMING_CONTEXT, 1, blocks)
    finally:
        engine.shutdown()
    return {"name": f"block_time_{TIMING_CONTEXT // 1024}k_tp{tp}", "tp_size": tp, "shape": TIMING_SHAPE,
            "context": TIMING_CONTEXT, "block_ms": round(secs * 1e3, 2), "prefill_s": round(prefill, 2),
            "tokens_per_s": round(BLOCK[TIMING_SHAPE] / secs, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tp2.json"))
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if torch.cuda.device_count() < 2:
        print(f"tp2_check needs 2 GPUs; this host has {torch.cuda.device_count()}.", file=sys.stderr)
        return 2
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import sglang

    tmp = tempfile.mkdtemp(prefix="mage-tp2-")
    model_dir = write_model_dir(tmp)
    mixed, long4k = prompts([37, 130, 257, 1000], seed=1), prompts([4000, 4096 + 3], seed=2)
    result = {"environment": {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                              "torch": torch.__version__, "sglang": sglang.__version__,
                              "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"]},
              "cases": [], "failures": []}
    cases = result["cases"]

    def attempt(name: str, fn) -> None:
        t0 = time.time()
        try:
            case = fn()
        except Exception as e:  # noqa: BLE001 - a failed case is a row with its error, the others still run
            case = {"name": name, "error": f"{type(e).__name__}: {e}"[:400]}
        case["seconds"] = round(time.time() - t0, 1)
        cases.append(case)
        result["failures"] = failures_of(cases)
        print(json.dumps(case), flush=True)
        write_json(args.out, result)

    ref: dict = {}

    def flashinfer_ref():
        ref["tokens"], eng = run_engine(model_dir, "flashinfer", "LowConfidence", mixed, 16, tp_size=2)
        eng.shutdown()
        return {"name": "flashinfer_tp2", "tp_size": 2, "prompt_lens": [len(p) for p in mixed]}

    def mage_case(name, ids, needs_sparse, **mage):
        stats_path = os.path.join(tmp, f"stats-{name}.json")
        out, eng = run_engine(model_dir, "mage", "LowConfidence", ids, 16, stats_path, tp_size=2, **mage)
        eng.shutdown()
        stats = read_stats(stats_path)
        return {"name": name, "tp_size": 2, "k": mage["mage_k"], "prompt_lens": [len(p) for p in ids],
                "greedy_match": (out == ref["tokens"]) if "tokens" in ref and ids is mixed else None,
                "needs_sparse": needs_sparse, "sparse_steps": stats["sparse_forwards"],
                "occupancy_after": stats["occupancy"]}

    attempt("flashinfer_tp2", flashinfer_ref)
    attempt("mage_tp2_k_ge_context", lambda: mage_case("mage_tp2_k_ge_context", mixed, False, mage_k=4096,
                                                        mage_min_context=0))
    attempt("mage_tp2_k64_4k", lambda: mage_case("mage_tp2_k64_4k", long4k, True, mage_k=64, mage_min_context=1024))
    if not args.skip_timing:
        for tp in (1, 2):
            attempt(f"block_time_tp{tp}", lambda tp=tp: timing_case(tp, tmp))
        by_tp = {c["tp_size"]: c.get("block_ms") for c in cases if c["name"].startswith("block_time")}
        if by_tp.get(1) and by_tp.get(2):
            result["tp2_speedup_per_block"] = round(by_tp[1] / by_tp[2], 3)
            write_json(args.out, result)
    print("FAILURES:" if result["failures"] else "all tp2 checks passed", *result["failures"], sep="\n")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
