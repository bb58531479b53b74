"""End-to-end time per generated block inside SGLang's dLLM engine, at real model shapes (dummy weights).

For each (shape, backend) it starts one offline `sgl.Engine` with FixedSteps (8 denoising steps + the
commit pass per 32-token block). For each (context, batch) point it prefills `batch` prompts of `context`
tokens (chunked prompt prefill for every backend, see start_engine; `prefill_s` records it), then times two generations of the same
prompts from the warm radix cache: 1 block and 1 + N blocks. Their difference / N is the time per block
(per-request overhead cancels). Backends: mage (mean selector, first and sparse steps replayed
from the dLLM CUDA graph), mage_quest (eager: quest plans page bounds per forward), flashinfer (with its CUDA
graph), triton (eager). `roofline_bound` is benchmarks/roofline.py's bound on mage's gain for that row's
shape and size (memory only), `compute_aware_bound` the same with FLOPs counted (roofline.py's docstring);
`speedup_vs_flashinfer` and `fraction_of_bound` are the figures issue 6 states targets in.
Every shape runs as an SDARForCausalLM body by default (`--model-class`, see MODEL_CLASSES for why).
`mage_eager_first` and `mage_graph_first` (not in the default list) are mage with --no-mage-graph-first-step and
--mage-graph-first-step: in run E (results/e2e.json) `mage` still had eager first steps. Every engine runs with
sglang_mage/forward_profile.py on: the JSON's `forward_profiles` has, per engine and group of forwards
(graph/eager, tokens, context), the median GPU time, host time inside the forward and start-to-start time.

Writes benchmarks/results/e2e.json after every point (rows {shape, context, batch, backend, block_ms,
tokens_per_s, roofline_bound, ...}), prints a table, and plots benchmarks/results/e2e.png. GPU only.

Usage: python benchmarks/bench_e2e.py [--shapes fast-dllm-v2-1.5b] [--contexts 8192 32768] [--backends mage flashinfer]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from results_io import write_json  # noqa: E402
from roofline import SHAPES, compute_aware_bound, roofline_bound  # noqa: E402

from sglang_mage.config import MageConfig  # noqa: E402
from sglang_mage.forward_profile import ENV as PROFILE_ENV  # noqa: E402

# Hugging Face configs at each shape (Qwen2.5 bodies for Fast-dLLM v2, Qwen3 for SDAR); weights are dummy.
# Layer and head counts come from roofline.SHAPES, so the bound and the engine describe the same model.
_HF_BODIES = {
    "fast-dllm-v2-1.5b": dict(architectures=["Fast_dLLM_QwenForCausalLM"], model_type="qwen2", bd_size=32,
                              hidden_size=1536, intermediate_size=8960, vocab_size=151936),
    "fast-dllm-v2-7b": dict(architectures=["Fast_dLLM_QwenForCausalLM"], model_type="qwen2", bd_size=32,
                            hidden_size=3584, intermediate_size=18944, vocab_size=152064),
    "sdar-1.7b": dict(architectures=["SDARForCausalLM"], model_type="qwen3", block_size=4, hidden_size=2048,
                      intermediate_size=6144, head_dim=128, vocab_size=151936),
}
CONFIGS = {
    name: dict(body, num_hidden_layers=SHAPES[name].layers, num_attention_heads=SHAPES[name].q_heads,
               num_key_value_heads=SHAPES[name].kv_heads)
    for name, body in _HF_BODIES.items()
}
BLOCK = {"fast-dllm-v2-1.5b": 32, "fast-dllm-v2-7b": 32, "sdar-1.7b": 4}
# The Fast_dLLM_Qwen class reads per-forward extend offsets, so the plugin runs it eagerly with every backend
# (sglang_mage/hooks.py), and flashinfer "with its CUDA graph" cannot exist at that class: on the H200 its
# 1 x 128K point had not finished in 4 minutes (results/raw/e2e_cut_h200.log). `--model-class sdar` (the
# default) times the same shape (layers, heads, hidden, MLP, vocab, B=32) as an SDARForCausalLM body, which
# both backends capture; per-step bytes differ only by the q/k norms. `native` keeps each shape's own class.
MODEL_CLASSES = ("sdar", "native")


def model_config(shape: str, model_class: str = "sdar") -> dict:
    cfg = dict(CONFIGS[shape])
    if model_class == "sdar" and cfg["architectures"] != ["SDARForCausalLM"]:
        cfg.pop("bd_size", None)
        cfg.update(architectures=["SDARForCausalLM"], model_type="qwen3", block_size=BLOCK[shape],
                   head_dim=cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg
BACKENDS = {
    "mage": dict(attention_backend="mage"),  # first and sparse steps replay from the dLLM CUDA graph
    "mage_quest": dict(attention_backend="mage", mage_selector="quest", disable_cuda_graph=True),
    "flashinfer": dict(attention_backend="flashinfer"),
    "triton": dict(attention_backend="triton", disable_cuda_graph=True),
    # Not in issue 6's list. mage_eager_first: mage with its first steps eager (--no-mage-graph-first-step,
    # the default before run E). mage_graph_first: the flag given explicitly (run E's name for the default).
    "mage_eager_first": dict(attention_backend="mage", mage_graph_first_step=False),
    "mage_graph_first": dict(attention_backend="mage", mage_graph_first_step=True),
    "mage_radix_topk": dict(attention_backend="mage", mage_topk_method="radix"),  # --mage-topk-method radix
    "mage_torch_topk": dict(attention_backend="mage", mage_topk_method="torch"),  # the default before run H
    # the fused selector's two-pass form (FlashInfer exact + block-mean-query logits) with the radix top-k
    "mage_fused_two_radix": dict(attention_backend="mage", mage_selector="fused", mage_fused_pass="two",
                                 mage_topk_method="radix"),
    "mage_fused_two": dict(attention_backend="mage", mage_selector="fused", mage_fused_pass="two"),
    # the same with the scores and top-k on a side stream beside the exact pass (--mage-overlap-selection)
    "mage_fused_overlap": dict(attention_backend="mage", mage_selector="fused", mage_fused_pass="two",
                               mage_overlap_selection=True),
    # programmatic dependent launch of the sparse step (--mage-pdl), with the fused two-pass selector
    "mage_fused_pdl_merge": dict(attention_backend="mage", mage_selector="fused", mage_fused_pass="two",
                                 mage_pdl="merge"),
    "mage_fused_pdl_full": dict(attention_backend="mage", mage_selector="fused", mage_fused_pass="two",
                                mage_pdl="full"),
}
DEFAULT_BACKENDS = ["mage", "mage_quest", "flashinfer", "triton"]


def write_model(root: str, shape: str, context: int, model_class: str = "sdar") -> str:
    path = os.path.join(root, f"{shape}-{model_class}")
    os.makedirs(path, exist_ok=True)
    cfg = dict(model_config(shape, model_class), max_position_embeddings=context + 4096, rms_norm_eps=1e-6, rope_theta=1e6,
               tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151643)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def plan_runs(shapes, contexts, batch16_contexts, backends) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """One engine per (shape, backend), timing all of that shape's (context, batch) points in increasing size.

    An engine start (dummy weights, graph capture) costs more than most points, so the grid is grouped by
    engine. Batch 16 points exist for the 1.5B shape only, as in issue 6's table.
    """
    runs = []
    for shape in shapes:
        points = [(c, 1) for c in sorted(contexts)]
        if shape == "fast-dllm-v2-1.5b":
            points += [(c, 16) for c in sorted(batch16_contexts)]
        points.sort(key=lambda p: p[0] * p[1])
        runs += [(shape, backend, points) for backend in backends]
    return runs


def start_engine(shape: str, backend: str, points, root: str, model_class: str = "sdar", **engine_kwargs):
    import sglang as sgl
    from sglang_mage.chunked_prefill import BENCH_ANY_BACKEND_ENV

    # Every backend runs the plugin's scheduler changes: prompts prefilled in chunks (sglang_mage/chunked_prefill.py
    # says why and what that costs the baselines' prompt KV) and incremental radix caching of rounds
    # (sglang_mage/radix_rounds.py); the scheduler processes inherit the variable.
    os.environ[BENCH_ANY_BACKEND_ENV] = "1"

    steps = min(8, BLOCK[shape])
    algo_cfg = os.path.join(root, f"fixed_steps_{steps}.yaml")
    with open(algo_cfg, "w") as f:
        f.write(f"steps: {steps}\n")
    max_context = max(c for c, _ in points)
    return sgl.Engine(
        model_path=write_model(root, shape, max_context, model_class), load_format="dummy", skip_tokenizer_init=True,
        dllm_algorithm="FixedSteps", dllm_algorithm_config=algo_cfg, max_running_requests=max(b for _, b in points),
        context_length=max_context + 4096, mem_fraction_static=0.85, random_seed=0, log_level="warning",
        **{**BACKENDS[backend], **({"mage_k": 512} if backend.startswith("mage") else {}), **engine_kwargs},
    )


def time_per_block(engine, shape: str, context: int, batch: int, blocks: int) -> tuple[float, float]:
    """(seconds per generated block, seconds of the cold first call beyond a warm one: ~the prefill)."""
    import random

    rng = random.Random(context + batch)
    prompts = [[rng.randrange(100, 150000) for _ in range(context)] for _ in range(batch)]
    block = BLOCK[shape]

    def run(n_blocks: int) -> float:
        t0 = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": n_blocks * block, "ignore_eos": True})
        return time.perf_counter() - t0

    # The first call prefills the prompts (thousands of forwards at 128K: one block per forward without
    # chunked prefill) and leaves them in the radix cache; the two timed calls then both start from that
    # warm cache, so their difference holds N blocks and nothing else. Timing the cold call as the 1-block
    # one would subtract the whole prefill from N blocks.
    cold = run(1)
    one = run(1)
    many = run(1 + blocks)
    return (many - one) / blocks, cold - one


def warm_up(engine, shape: str) -> None:
    """Compile and capture on a short prompt, so the first timed point pays no JIT or capture cost."""
    engine.generate(input_ids=[list(range(1000, 1000 + 4 * BLOCK[shape]))],
                    sampling_params={"max_new_tokens": 2 * BLOCK[shape], "ignore_eos": True})


def read_profiles(root: str, shape: str, backend: str) -> dict:
    """The forward profiles (sglang_mage/forward_profile.py) that an engine's processes wrote: per group of
    forwards the count and median GPU, host-inside-forward and start-to-start times."""
    groups = {}
    for path in sorted(glob.glob(os.path.join(root, f"profile-{shape}-{backend}-*.json"))):
        try:
            with open(path) as f:
                groups.update(json.load(f)["groups"])
        except (OSError, ValueError, KeyError):
            continue
    return groups


def add_ratios(rows: list[dict]) -> None:
    """speedup over flashinfer (with its graph) at the same point, and that speedup as a fraction of the
    roofline bound: the quantities issue 6's P2, P3 and P5 are stated in."""
    base = {(r["shape"], r["context"], r["batch"]): r["block_ms"] for r in rows
            if r["backend"] == "flashinfer" and r["block_ms"]}
    for r in rows:
        ref = base.get((r["shape"], r["context"], r["batch"]))
        r["speedup_vs_flashinfer"] = round(ref / r["block_ms"], 3) if ref and r["block_ms"] else None
        r["fraction_of_bound"] = (round(r["speedup_vs_flashinfer"] / r["roofline_bound"], 3)
                                  if r["speedup_vs_flashinfer"] and r["backend"].startswith("mage") else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["fast-dllm-v2-1.5b", "fast-dllm-v2-7b"], choices=list(CONFIGS))
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 65536, 131072])
    ap.add_argument("--batch16-contexts", nargs="*", type=int, default=[32768, 131072],
                    help="batch-16 contexts (1.5B shape only); none: batch 1 only")
    ap.add_argument("--backends", nargs="+", default=DEFAULT_BACKENDS, choices=list(BACKENDS))
    ap.add_argument("--blocks", type=int, default=4, help="extra blocks timed per measurement")
    ap.add_argument("--model-class", choices=MODEL_CLASSES, default="sdar",
                    help="sdar: every shape as an SDARForCausalLM body (CUDA-graph capturable); native: its own class")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e.json"))
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a results file (no GPU needed)")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.replot.replace(".json", ".png"))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench_e2e needs a CUDA GPU; nothing to measure here.", file=sys.stderr)
        return 2
    import sglang
    from tqdm import tqdm

    device_key = "h200" if "H200" in torch.cuda.get_device_name() else "h100"
    runs = plan_runs(args.shapes, args.contexts, args.batch16_contexts, args.backends)
    result = {"environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "sglang": sglang.__version__},
              "config": {"algorithm": "FixedSteps (8 steps per 32-token block; 4 for B=4)", "mage_k": 512,
                         "mage_graph_first_step_default": MageConfig().graph_first_step,
                         "blocks_timed": args.blocks, "weights": "dummy", "model_class": args.model_class,
                         "architectures": {sh: model_config(sh, args.model_class)["architectures"][0]
                                           for sh in args.shapes},
                         "cuda_graph": {b: not BACKENDS[b].get("disable_cuda_graph", False) for b in BACKENDS},
                         "prompt_prefill": "chunked for every backend (SGLANG_MAGE_BENCH_ANY_BACKEND=1): "
                                           "untimed; the baselines' chunks attend bidirectionally",
                         "radix_rounds": "incremental radix caching of dLLM rounds for every backend "
                                         "(sglang_mage/radix_rounds.py, SGLANG_MAGE_BENCH_ANY_BACKEND=1)"},
              "rows": [], "forward_profiles": {}}
    rows, root = result["rows"], tempfile.mkdtemp(prefix="mage-e2e-")
    bar = tqdm(total=sum(len(p) for *_, p in runs), desc="e2e", unit="point")
    for shape, backend, points in runs:
        engine, error = None, None
        try:
            os.environ[PROFILE_ENV] = os.path.join(root, f"profile-{shape}-{backend}-{{pid}}.json")
            engine = start_engine(shape, backend, points, root, args.model_class)
            warm_up(engine, shape)
        except Exception as e:  # noqa: BLE001 - an engine that cannot start is rows with an error, not a crash
            error = f"engine start: {type(e).__name__}: {e}"[:400]
        for context, batch in points:
            block_ms = tps = prefill_s = None
            if engine is not None:
                try:
                    secs, prefill = time_per_block(engine, shape, context, batch, args.blocks)
                    block_ms, tps = round(secs * 1e3, 2), round(batch * BLOCK[shape] / secs, 1)
                    prefill_s = round(prefill, 2)
                    error = None
                except Exception as e:  # noqa: BLE001
                    error = f"{type(e).__name__}: {e}"[:400]
            rows.append({"shape": shape, "context": context, "batch": batch, "backend": backend,
                         "block_ms": block_ms, "tokens_per_s": tps, "prefill_s": prefill_s,
                         "roofline_bound": round(roofline_bound(SHAPES[shape], batch, context), 2),
                         "compute_aware_bound": round(compute_aware_bound(SHAPES[shape], device_key, batch, context), 2),
                         **({"error": error} if error else {})})
            add_ratios(rows)
            bar.update()
            tqdm.write(json.dumps(rows[-1]))
            write_json(args.out, result)  # after every point: a run cut at the device's limit keeps what it measured
        if engine is not None:
            engine.shutdown()
        result["forward_profiles"][f"{shape}/{backend}"] = read_profiles(root, shape, backend)
        write_json(args.out, result)
    bar.close()
    print(f"{'shape':>18} {'ctx':>7} {'bs':>3} {'backend':>11} {'block ms':>9} {'tok/s':>9} {'x fi':>6} {'bound':>6}")
    for r in rows:
        print(f"{r['shape']:>18} {r['context']:>7} {r['batch']:>3} {r['backend']:>11} {str(r['block_ms']):>9} "
              f"{str(r['tokens_per_s']):>9} {str(r['speedup_vs_flashinfer']):>6} {r['roofline_bound']:>6}")
    try:
        plot(result, args.out.replace(".json", ".png"))
    except Exception as e:  # noqa: BLE001 - every point is already in the JSON; `--replot` draws it elsewhere
        print(f"plot skipped ({type(e).__name__}: {e}); redraw with --replot {args.out}", file=sys.stderr)
    return 0


def plot(result: dict, path: str) -> None:
    """Per shape: ms per block at batch 1 by backend; last panel: mage's speedup over flashinfer against the
    roofline bound at every measured (shape, context, batch)."""
    try:
        # A bare Figure, not pyplot: inside an SGLang process pyplot may already be bound to another backend
        # (on the GPU host it failed in an IPython display hook after every point had been measured).
        from matplotlib.figure import Figure
    except ImportError:
        return
    rows = result["rows"]
    shapes = sorted({r["shape"] for r in rows})
    fig = Figure(figsize=(5.5 * (len(shapes) + 1), 4.5))
    axes = fig.subplots(1, len(shapes) + 1, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for backend in [b for b in BACKENDS if any(r["backend"] == b for r in rows)]:
            pts = sorted((r["context"], r["block_ms"]) for r in rows if r["shape"] == shape
                         and r["backend"] == backend and r["batch"] == 1 and r["block_ms"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms per block (batch 1)", title=shape)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax = axes[0][-1]
    # One group of bars per measured point: each mage variant's speedup over flashinfer, then the bound.
    variants = [b for b in BACKENDS if b.startswith("mage") and b != "mage_quest"
                and any(r["backend"] == b and r.get("speedup_vs_flashinfer") for r in rows)]
    points = sorted({(r["shape"], r["context"], r["batch"]) for r in rows
                     if r["backend"] in variants and r.get("speedup_vs_flashinfer")})
    labels = [f"{sh.replace('fast-dllm-v2-', '')}\n{c // 1024}K x{b}" for sh, c, b in points]
    xs = range(len(points))
    width = 0.8 / (len(variants) + 1)
    for i, b in enumerate(variants + ["roofline bound"]):
        vals = []
        for pt in points:
            hit = [r for r in rows if (r["shape"], r["context"], r["batch"]) == pt
                   and (r["backend"] == b or (b == "roofline bound" and r["backend"] in variants))]
            key = "roofline_bound" if b == "roofline bound" else "speedup_vs_flashinfer"
            vals.append(hit[0][key] if hit and hit[0].get(key) else 0)
        ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], vals, width,
               label=b if b == "roofline bound" else f"{b} / flashinfer")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set(ylabel="speedup per block", title="mage vs the memory roofline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
