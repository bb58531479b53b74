"""End-to-end time per generated block inside SGLang's dLLM engine, at real model shapes (dummy weights).

For each (shape, context, batch, backend) it starts an offline `sgl.Engine` with FixedSteps (8 denoising
steps + the commit pass per 32-token block), prefills `batch` prompts of `context` tokens (chunked prompt
prefill with mage), then times two generations of the same prompts from the warm radix cache: 1 block and
1 + N blocks. Their difference / N is the time per block (prefill, which the cache skips, and per-request
overhead cancel). Backends: mage (mean selector), mage_quest, flashinfer (with its decode CUDA graph),
triton. `roofline_bound` is benchmarks/roofline.py's bound on mage's gain for that row's shape and size.

Writes benchmarks/results/e2e.json (rows {shape, context, batch, backend, block_ms, tokens_per_s,
roofline_bound}), prints a table, and plots benchmarks/results/e2e.png (if matplotlib is installed). GPU only.

Usage: python benchmarks/bench_e2e.py [--shapes fast-dllm-v2-1.5b] [--contexts 8192 32768] [--quick]
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
from roofline import SHAPES, roofline_bound  # noqa: E402

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
BACKENDS = {
    "mage": dict(attention_backend="mage", disable_cuda_graph=True),
    "mage_quest": dict(attention_backend="mage", mage_selector="quest", disable_cuda_graph=True),
    "flashinfer": dict(attention_backend="flashinfer"),
    "triton": dict(attention_backend="triton", disable_cuda_graph=True),
}


def write_model(root: str, shape: str, context: int) -> str:
    path = os.path.join(root, shape)
    os.makedirs(path, exist_ok=True)
    cfg = dict(CONFIGS[shape], max_position_embeddings=context + 4096, rms_norm_eps=1e-6, rope_theta=1e6,
               tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151643)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def time_per_block(shape: str, context: int, batch: int, backend: str, blocks: int, root: str) -> float:
    import random

    import sglang as sgl

    steps = min(8, BLOCK[shape])
    algo_cfg = os.path.join(root, f"fixed_steps_{steps}.yaml")
    with open(algo_cfg, "w") as f:
        f.write(f"steps: {steps}\n")
    engine = sgl.Engine(
        model_path=write_model(root, shape, context), load_format="dummy", skip_tokenizer_init=True,
        dllm_algorithm="FixedSteps", dllm_algorithm_config=algo_cfg, max_running_requests=batch,
        context_length=context + 4096, mem_fraction_static=0.85, random_seed=0, log_level="warning",
        **BACKENDS[backend], **({"mage_k": 512} if backend.startswith("mage") else {}),
    )
    try:
        rng = random.Random(context + batch)
        prompts = [[rng.randrange(100, 150000) for _ in range(context)] for _ in range(batch)]
        block = BLOCK[shape]

        def run(n_blocks: int) -> float:
            t0 = time.perf_counter()
            engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": n_blocks * block,
                                                                "ignore_eos": True})
            return time.perf_counter() - t0

        run(1)  # prefill into the radix cache, and warm-up
        one = run(1)
        many = run(1 + blocks)
        return (many - one) / blocks
    finally:
        engine.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["fast-dllm-v2-1.5b", "fast-dllm-v2-7b"], choices=list(CONFIGS))
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 65536, 131072])
    ap.add_argument("--batch16-contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--blocks", type=int, default=4, help="extra blocks timed per measurement")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e.json"))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_e2e needs a CUDA GPU; nothing to measure here.", file=sys.stderr)
        return 2
    from tqdm import tqdm

    grid = [(s, c, 1) for s in args.shapes for c in args.contexts]
    grid += [(s, c, 16) for s in args.shapes if s == "fast-dllm-v2-1.5b" for c in args.batch16_contexts]
    runs = [(s, c, b, be) for s, c, b in grid for be in args.backends]
    rows, root = [], tempfile.mkdtemp(prefix="mage-e2e-")
    for shape, context, batch, backend in tqdm(runs, desc="e2e", unit="run"):
        try:
            secs = time_per_block(shape, context, batch, backend, args.blocks, root)
            block_ms, tps = secs * 1e3, batch * BLOCK[shape] / secs
        except Exception as e:  # noqa: BLE001 - an engine that cannot run a size is a row, not a crash
            block_ms, tps = None, None
            tqdm.write(f"{shape} ctx={context} bs={batch} {backend}: {type(e).__name__}: {e}"[:400])
        rows.append({"shape": shape, "context": context, "batch": batch, "backend": backend,
                     "block_ms": None if block_ms is None else round(block_ms, 2),
                     "tokens_per_s": None if tps is None else round(tps, 1),
                     "roofline_bound": round(roofline_bound(SHAPES[shape], batch, context), 2)})
        tqdm.write(json.dumps(rows[-1]))
    print(f"{'shape':>18} {'ctx':>7} {'bs':>3} {'backend':>11} {'block ms':>9} {'tok/s':>9} {'bound':>6}")
    for r in rows:
        print(f"{r['shape']:>18} {r['context']:>7} {r['batch']:>3} {r['backend']:>11} {str(r['block_ms']):>9} "
              f"{str(r['tokens_per_s']):>9} {r['roofline_bound']:>6}")
    import sglang

    result = {"environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "sglang": sglang.__version__},
              "config": {"algorithm": "FixedSteps (8 steps per 32-token block; 4 for B=4)", "mage_k": 512,
                         "blocks_timed": args.blocks, "weights": "dummy"},
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out.replace(".json", ".png"))
    return 0


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = sorted({r["shape"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for backend in BACKENDS:
            pts = sorted((r["context"], r["block_ms"]) for r in result["rows"] if r["shape"] == shape
                         and r["backend"] == backend and r["batch"] == 1 and r["block_ms"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms per block (batch 1)", title=shape)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
