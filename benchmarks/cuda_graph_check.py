"""GPU: mage's sparse steps replayed from SGLang's dLLM CUDA graph give the same greedy tokens as eager.

Two `sgl.Engine`s on the dummy-weight tiny SDAR model, identical but for `disable_cuda_graph`, with
`--mage-force-sparse` and k = 64 (short prompts are kept whole by selection, the 4K one is truly sparse),
five prompts over at most four running requests (so some replays pad the batch). Checks: the same greedy
tokens; the graph engine replayed sparse forwards (`graph_sparse_forwards` in $SGLANG_MAGE_STATS_PATH) and
the eager one never did; both ran the same number of sparse forwards; the index cache ends empty.
The graph engine replays first steps too (--mage-graph-first-step, the default; `--no-graph-first-step` keeps
them eager), and the check then also requires that it replayed
first steps (`graph_first_forwards`) with the same tokens.

Usage: python benchmarks/cuda_graph_check.py [--algorithm LowConfidence] [--no-graph-first-step]
       [--selector S] [--fused-pass one|two] [--topk-method torch|radix] [--overlap-selection] [--pdl MODE] [--out PATH]
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
from e2e_correctness import prompts, read_stats, write_model_dir  # noqa: E402
from sglang_mage.config import PDL_MODES  # noqa: E402

# MageConfig fields this check can set for both engines, each its own flag (--selector, --fused-pass, ...)
OPTIONS = ("selector", "fused_pass", "topk_method", "overlap_selection", "pdl")


def run(model_dir, algorithm, ids, stats_path, graph: bool, graph_first_step: bool = False, mage=None):
    import sglang as sgl

    os.environ["SGLANG_MAGE_STATS_PATH"] = stats_path
    t0 = time.time()
    engine = sgl.Engine(
        model_path=model_dir, load_format="dummy", skip_tokenizer_init=True, dllm_algorithm=algorithm,
        attention_backend="mage", max_running_requests=4, disable_cuda_graph=not graph, mem_fraction_static=0.6,
        context_length=16384, random_seed=0, log_level="warning",
        mage_k=64, mage_min_context=0, mage_force_sparse=True, mage_graph_first_step=graph and graph_first_step,
        **{f"mage_{k}": v for k, v in (mage or {}).items()},
    )
    try:
        outs = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 16, "temperature": 0.0})
    finally:
        engine.shutdown()
    return [o["output_ids"] for o in outs], read_stats(stats_path), round(time.time() - t0, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algorithm", default="LowConfidence")
    ap.add_argument("--graph-first-step", action=argparse.BooleanOptionalAction, default=True,
                    help="the graph engine replays first steps too (default)")
    ap.add_argument("--selector", default=None, help="--mage-selector for both engines (default: the plugin's)")
    ap.add_argument("--fused-pass", default=None, help="--mage-fused-pass for both engines")
    ap.add_argument("--topk-method", default=None, help="--mage-topk-method for both engines")
    ap.add_argument("--overlap-selection", action="store_true", help="--mage-overlap-selection for both engines")
    ap.add_argument("--pdl", default=None, choices=PDL_MODES, help="--mage-pdl for both engines")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    mage = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) not in (None, False)}
    tmp = tempfile.mkdtemp(prefix="mage-graph-")
    model_dir = write_model_dir(tmp)
    ids = prompts([37, 130, 257, 1000, 4000], seed=5)
    runs = {}
    for graph in (True, False):
        name = "graph" if graph else "eager"
        runs[name] = run(model_dir, args.algorithm, ids, os.path.join(tmp, f"stats-{name}.json"), graph,
                         args.graph_first_step, mage)
        print(name, json.dumps(runs[name][1]), f"{runs[name][2]} s", flush=True)
    (g_out, g_stats, _), (e_out, e_stats, _) = runs["graph"], runs["eager"]
    failures = []
    for i, (a, b) in enumerate(zip(g_out, e_out)):
        if a != b:
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            failures.append(f"prompt {i} (len {len(ids[i])}): graph and eager tokens differ from output token {first}")
    if not g_stats["graph_sparse_forwards"] > 0:
        failures.append("the graph engine never replayed a sparse forward")
    if args.graph_first_step and not g_stats.get("graph_first_forwards"):
        failures.append("--graph-first-step: the graph engine never replayed a first step")
    if e_stats["graph_sparse_forwards"] != 0 or e_stats.get("graph_first_forwards"):
        failures.append("the eager engine replayed a graph")
    if g_stats["sparse_forwards"] != e_stats["sparse_forwards"] or e_stats["sparse_forwards"] == 0:
        failures.append(f"sparse forwards: graph {g_stats['sparse_forwards']}, eager {e_stats['sparse_forwards']}")
    if g_stats["occupancy"] or e_stats["occupancy"]:
        failures.append("the index cache is not empty after all requests")
    if args.out:
        with open(args.out, "w") as f:
            from sglang_mage.config import MageConfig

            # the options both engines ran with: the given ones over the plugin's defaults (k etc. from run())
            effective = {name: getattr(MageConfig(**mage), name) for name in OPTIONS}
            json.dump({"algorithm": args.algorithm, "graph_first_step": args.graph_first_step, "mage": mage,
                       "mage_effective": effective,
                       "prompt_lens": [len(p) for p in ids],
                       "runs": {k: {"stats": v[1], "seconds": v[2]} for k, v in runs.items()},
                       "greedy_match": g_out == e_out, "failures": failures}, f, indent=1)
    print("FAILURES:" if failures else "graph == eager: all checks passed", *failures, sep="\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
