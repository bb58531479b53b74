"""Chunked prompt prefill inside SGLang's dLLM engine (GPU): same greedy tokens and same KV as per-block.

One tiny dummy-weight SDAR model, `--attention-backend mage` with k >= context, a batch of 4 prompts of
mixed lengths up to 8K (none a multiple of B, so every tail joins its first [MASK] block):
- engine A: --mage-prefill-chunk-size 0 (SGLang's per-block prompt prefill);
- engine B: the default chunk size (SGLang's --chunked-prefill-size);
checks that the greedy outputs are token-identical, that both engines' KV caches (first and last layer,
every full prompt block) agree within bf16 tolerance, and that a second pass of the same prompts on engine
B hits the radix cache and reproduces its outputs. Wall times of both engines are recorded.

Writes benchmarks/results/chunked_prefill_correctness.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from e2e_correctness import prompts, write_model_dir  # noqa: E402

B = 4
KV_TOL = 2e-2  # bf16: 8 mantissa bits; relative to the largest |K| / |V| of the compared range


def run(model_dir, ids, new_tokens, dump_dir, stats_path, chunk, repeat=False):
    import sglang as sgl

    os.environ["SGLANG_MAGE_KV_DUMP_DIR"] = dump_dir
    os.environ["SGLANG_MAGE_STATS_PATH"] = stats_path
    engine = sgl.Engine(
        model_path=model_dir, load_format="dummy", skip_tokenizer_init=True, dllm_algorithm="LowConfidence",
        attention_backend="mage", max_running_requests=4, disable_cuda_graph=True, mem_fraction_static=0.6,
        context_length=16384, random_seed=0, log_level="warning", mage_k=9000, mage_min_context=0,
        mage_prefill_chunk_size=chunk,
    )
    try:
        params = {"max_new_tokens": new_tokens, "temperature": 0.0}
        t0 = time.perf_counter()
        outs = engine.generate(input_ids=ids, sampling_params=params)
        seconds = time.perf_counter() - t0
        again = engine.generate(input_ids=ids, sampling_params=params) if repeat else None
    finally:
        engine.shutdown()
    with open(stats_path) as f:
        stats = json.load(f)
    return outs, again, seconds, stats


def kv_errors(dump_a, dump_b, ids):
    from sglang_mage.kv_dump import load_dumps

    def find(records, prompt):
        # A request's first forward may hold only its first block, so a record keeps as few as B head tokens.
        hits = [r for h, r in records.items() if h and list(h) == prompt[: len(h)]]
        assert len(hits) == 1, f"{len(hits)} KV records match the prompt of {len(prompt)} tokens"
        return hits[0]

    a, b = load_dumps(dump_a), load_dumps(dump_b)
    rows = []
    for p in ids:
        full = len(p) // B * B
        ra, rb = find(a, p), find(b, p)
        row = {"prompt_len": len(p), "compared_positions": full}
        for name in ("k_first", "v_first", "k_last", "v_last"):
            x, y = ra[name][:full].float(), rb[name][:full].float()
            row[name + "_max_abs_err"] = (x - y).abs().max().item()
            row[name + "_max_abs"] = x.abs().max().item()
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "chunked_prefill_correctness.json"))
    ap.add_argument("--lengths", nargs="+", type=int, default=[8190, 6001, 3003, 1234])
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    import flashinfer
    import sglang
    import triton

    tmp = tempfile.mkdtemp(prefix="mage-chunk-")
    model_dir = write_model_dir(tmp)
    ids = prompts(args.lengths, seed=3)
    dirs = {m: os.path.join(tmp, m) for m in ("per_block", "chunked")}
    per_block = run(model_dir, ids, args.new_tokens, dirs["per_block"], os.path.join(tmp, "a.json"), 0)
    chunked = run(model_dir, ids, args.new_tokens, dirs["chunked"], os.path.join(tmp, "b.json"), None, repeat=True)
    tokens_a = [o["output_ids"] for o in per_block[0]]
    tokens_b = [o["output_ids"] for o in chunked[0]]
    tokens_b2 = [o["output_ids"] for o in chunked[1]]
    cached = [o["meta_info"].get("cached_tokens") for o in chunked[1]]
    kv = kv_errors(dirs["per_block"], dirs["chunked"], ids)
    worst = max(r[n + "_max_abs_err"] / max(r[n + "_max_abs"], 1e-6)
                for r in kv for n in ("k_first", "v_first", "k_last", "v_last"))
    checks = {
        "greedy_tokens_identical": tokens_a == tokens_b,
        "kv_within_bf16_tolerance": worst <= KV_TOL,
        "second_pass_identical": tokens_b2 == tokens_b,
        "second_pass_hits_radix_cache": all(c is not None and c >= len(p) // B * B - B for c, p in zip(cached, ids)),
        "chunked_engine_used_block_causal_forwards": chunked[3].get("block_causal_forwards", 0) > 0,
        "per_block_engine_used_none": per_block[3].get("block_causal_forwards", 0) == 0,
    }
    result = {
        "environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                        "sglang": sglang.__version__, "flashinfer": flashinfer.__version__,
                        "triton": triton.__version__},
        "config": {"model": "tiny SDAR (examples/tiny_model.py), dummy weights", "block": B,
                   "prompt_lengths": args.lengths, "new_tokens": args.new_tokens, "mage_k": 9000,
                   "algorithm": "LowConfidence", "chunk": "SGLang --chunked-prefill-size (default)"},
        "seconds": {"per_block": per_block[2], "chunked": chunked[2]},
        "speedup": per_block[2] / chunked[2],
        "stats": {"per_block": per_block[3], "chunked": chunked[3]},
        "kv": kv,
        "kv_worst_relative_err": worst,
        "second_pass_cached_tokens": cached,
        "tokens": {"per_block": tokens_a, "chunked": tokens_b},
        "checks": checks,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("seconds", "speedup", "kv_worst_relative_err", "checks")}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
