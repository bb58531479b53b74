"""Prompt-prefill time of a block-diffusion model: per-block (SGLang 0.5.14 today), chunked block-causal
(sglang-mage), and FlashInfer's ordinary causal prefill (the floor a causal LLM of the same shape pays).

The model is a stack of Qwen3/SDAR-shaped decoder layers with random bf16 weights: RMSNorm, fused QKV,
attention, output projection, SwiGLU MLP; no RoPE and no LM head, the same for all three methods (SGLang
computes logits for every forward; with chunking the plugin skips them for mask-free chunks). KV lives in a
paged bf16 cache with page size B, as SGLang's radix cache forces for dLLM models. Attention per forward
mirrors SGLang's FlashInfer backend: a ragged pass over the extend plus a paged pass over the cached prefix,
merged by log-sum-exp, planned once per forward and run once per layer.
  per_block          one forward per B-token block, bidirectional inside the block (ceil(L/B) forwards)
  chunked            forwards of up to --chunk tokens, causal FlashInfer + later_in_block_merge (block-causal)
  flashinfer_causal  the same forwards with plain causal attention (not a valid dLLM prefill: the reference)

`seconds` is null where per-block prefill did not finish within --per-block-cap-s (the issue asks for 10
minutes; the cap actually used is recorded in the JSON). A check at the shortest length compares the three
methods' final hidden states and KV caches (chunked must match per-block to bf16 accuracy).

Usage (GPU): python benchmarks/bench_prefill.py --out benchmarks/results/prefill.json
Plot:        python benchmarks/plot_prefill.py benchmarks/results/prefill.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

SHAPES = {
    # The tiny SDAR shipped with the examples (examples/tiny_model.py).
    "tiny": dict(layers=3, hidden=512, heads=8, kv_heads=4, head_dim=128, ffn=1024),
    # SDAR-1.7B-Chat (Qwen3-1.7B body): the 1.5B class.
    "sdar-1.7b": dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, ffn=6144),
}
METHODS = ("per_block", "chunked", "flashinfer_causal")


class DecoderStack:
    def __init__(self, shape: dict, max_tokens: int, block: int, device: str, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.s, self.block, self.device = shape, block, device
        h, nh, nkv, d, f = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["ffn"]

        def w(*size):
            return (torch.randn(*size, generator=g, device=device) * size[0] ** -0.5).to(torch.bfloat16)

        self.layers = [
            dict(qkv=w(h, (nh + 2 * nkv) * d), o=w(nh * d, h), gate_up=w(h, 2 * f), down=w(f, h))
            for _ in range(shape["layers"])
        ]
        pages = (max_tokens + block - 1) // block
        self.k_cache = [torch.zeros(pages, block, nkv, d, dtype=torch.bfloat16, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros_like(c) for c in self.k_cache]
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor, start: int, attend) -> torch.Tensor:
        """x: [n, hidden] hidden states of tokens start..start+n-1; returns the last layer's output."""
        nh, nkv, d = self.s["heads"], self.s["kv_heads"], self.s["head_dim"]
        n = x.shape[0]
        for i, p in enumerate(self.layers):
            qkv = torch.nn.functional.rms_norm(x, (x.shape[-1],)) @ p["qkv"]
            q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
            q, k, v = q.reshape(n, nh, d), k.reshape(n, nkv, d), v.reshape(n, nkv, d)
            self.k_cache[i].view(-1, nkv, d)[start:start + n] = k
            self.v_cache[i].view(-1, nkv, d)[start:start + n] = v
            x = x + attend(i, q, k, v).reshape(n, nh * d) @ p["o"]
            gate, up = (torch.nn.functional.rms_norm(x, (x.shape[-1],)) @ p["gate_up"]).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ p["down"]
        return x


class Attention:
    """SGLang's FlashInfer extend path for one request: ragged over the extend, paged over the prefix."""

    def __init__(self, model: DecoderStack, device: str):
        import flashinfer

        self.fi, self.m = flashinfer, model
        ws = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        self.ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="auto")
        self.paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
        self.device = device
        self.page_ids = torch.arange(model.k_cache[0].shape[0], dtype=torch.int32, device=device)

    def plan(self, start: int, n: int, method: str) -> None:
        s, b = self.m.s, self.m.block
        i32 = dict(dtype=torch.int32)  # indptrs stay on the host: plan() reads them there
        common = dict(num_qo_heads=s["heads"], num_kv_heads=s["kv_heads"], head_dim_qk=s["head_dim"],
                      q_data_type=torch.bfloat16, sm_scale=self.m.scale)
        indptr = torch.tensor([0, n], **i32)
        self.ragged.plan(indptr, indptr, causal=method != "per_block", **common)
        self.start, self.n, self.method = start, n, method
        if start:
            pages = start // b
            self.paged.plan(indptr, torch.tensor([0, pages], **i32), self.page_ids[:pages],
                            torch.tensor([b], **i32), page_size=b, causal=False, **common)

    def __call__(self, layer: int, q, k, v):
        from sglang_mage.ops.block_causal_prefill import later_in_block_merge

        o, lse = self.ragged.run(q, k, v, return_lse=True)
        if self.start:
            o2, lse2 = self.paged.run(q, (self.m.k_cache[layer], self.m.v_cache[layer]), return_lse=True)
            o, lse = self.fi.merge_state(o, lse, o2, lse2)
        if self.method == "chunked":
            later_in_block_merge(q, k, v, o, lse, self.m.block, self.m.scale)
        return o


def timed(model, attn, x, method: str, chunk: int, cap_s: float | None, repeats: int):
    """Per-block: one run (minutes long, capped). Chunked and causal: the best of `repeats` runs."""
    if method == "per_block":
        secs, done, _ = prefill(model, attn, x, method, chunk, cap_s)
        return secs, done
    return min(prefill(model, attn, x, method, chunk)[0] for _ in range(repeats)), x.shape[0]


def prefill(model, attn, x, method: str, chunk: int, cap_s: float | None = None):
    """Run the whole prompt; returns (seconds or None past the cap, tokens done, last-layer outputs)."""
    n_total, b = x.shape[0], model.block
    step = b if method == "per_block" else chunk
    out = torch.empty_like(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, s in enumerate(range(0, n_total, step)):
        e = min(s + step, n_total)
        attn.plan(s, e - s, method)
        out[s:e] = model.forward(x[s:e], s, attn)
        if cap_s is not None and i % 256 == 255:
            torch.cuda.synchronize()
            if time.perf_counter() - t0 > cap_s:
                return None, e, out
    torch.cuda.synchronize()
    return time.perf_counter() - t0, n_total, out


def check(model, attn, x, chunk) -> dict:
    """Final hidden states and last-layer KV of chunked / causal against per-block, at one length."""
    res, kv = {}, {}
    for method in METHODS:
        _, _, out = prefill(model, attn, x, method, chunk)
        res[method] = out.float()
        kv[method] = model.k_cache[-1].view(-1, *model.k_cache[-1].shape[2:])[: x.shape[0]].float().clone()
    ref, kref = res["per_block"], kv["per_block"]
    scale = ref.abs().max().item()
    return {
        "prompt_len": x.shape[0],
        "hidden_max_abs": scale,
        "chunked_vs_per_block_hidden_max_abs_err": (res["chunked"] - ref).abs().max().item(),
        "causal_vs_per_block_hidden_max_abs_err": (res["flashinfer_causal"] - ref).abs().max().item(),
        "chunked_vs_per_block_kv_max_abs_err": (kv["chunked"] - kref).abs().max().item(),
        "causal_vs_per_block_kv_max_abs_err": (kv["flashinfer_causal"] - kref).abs().max().item(),
    }


def environment() -> dict:
    import flashinfer
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "flashinfer": flashinfer.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--block", type=int, default=4, help="block size B (SDAR: 4)")
    ap.add_argument("--chunk", type=int, default=8192, help="tokens per chunked forward (SGLang's H100 default)")
    ap.add_argument("--per-block-cap-s", type=float, default=600.0)
    ap.add_argument("--per-block-max-len", type=int, default=None,
                    help="do not run per-block above this length (seconds null; recorded in the JSON)")
    ap.add_argument("--repeats", type=int, default=3, help="chunked / causal: best of this many runs")
    ap.add_argument("--check-len", type=int, default=2048, help="length of the accuracy check (0: skip)")
    ap.add_argument("--out", default="benchmarks/results/prefill.json")
    ap.add_argument("--merge", action="store_true", help="add to (replace matching rows of) an existing --out")
    ap.add_argument("--run-label", default="", help="recorded per row in the JSON's `sources`")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_prefill needs a CUDA GPU (FlashInfer); nothing to measure here.", file=sys.stderr)
        return 2
    device = "cuda"
    rows, progress, checks = [], [], {}
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        model = DecoderStack(shape, max(args.lengths), args.block, device)
        attn = Attention(model, device)
        g = torch.Generator(device=device).manual_seed(1)
        x_all = torch.randn(max(args.lengths), shape["hidden"], generator=g, device=device).to(torch.bfloat16)
        for method in args.methods:  # warm-up: JIT and autotune outside the timings
            warm = 64 * args.block if method == "per_block" else 2 * args.chunk
            prefill(model, attn, x_all[:warm], method, args.chunk)
        if args.check_len:
            checks[shape_name] = check(model, attn, x_all[: args.check_len], args.chunk)
            print(f"[{shape_name}] check: {json.dumps(checks[shape_name])}", flush=True)
        for length in args.lengths:
            for method in args.methods:
                if method == "per_block" and args.per_block_max_len and length > args.per_block_max_len:
                    secs, done = None, 0
                else:
                    secs, done = timed(model, attn, x_all[:length], method, args.chunk, args.per_block_cap_s,
                                       args.repeats)
                rows.append({"shape": shape_name, "prompt_len": length, "method": method, "seconds": secs})
                if secs is None:
                    progress.append({"shape": shape_name, "prompt_len": length, "tokens_done": done,
                                     "cap_s": args.per_block_cap_s if done else None,
                                     "run": args.run_label or None})
                shown = f"{secs:9.3f}" if secs is not None else f"   > cap ({done} tokens done)"
                print(f"[{shape_name}] L={length:>6} {method:>17}: {shown}", flush=True)
        del model, attn, x_all
        torch.cuda.empty_cache()
    config = {"shapes": {k: SHAPES[k] for k in args.shapes}, "block": args.block, "chunk": args.chunk,
              "per_block_cap_s": args.per_block_cap_s, "per_block_max_len": args.per_block_max_len,
              "repeats": args.repeats, "dtype": "bfloat16", "page_size": args.block}
    result = {"environment": environment(), "config": config, "runs": {args.run_label: config}, "rows": rows,
              "sources": [[r["shape"], r["prompt_len"], r["method"], args.run_label] for r in rows],
              "per_block_unfinished": progress, "checks": checks}
    if args.merge and os.path.exists(args.out):
        result = merge(json.load(open(args.out)), result)
    result["summary"] = summarize(result["rows"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["summary"], indent=1))
    return 0


def merge(old: dict, new: dict) -> dict:
    """Rows of `new` replace rows of `old` with the same (shape, prompt_len, method)."""
    key = lambda r: (r[0], r[1], r[2]) if isinstance(r, list) else (r["shape"], r["prompt_len"], r.get("method"))  # noqa: E731
    fresh = {key(r) for r in new["rows"]}
    out = dict(new)
    out["rows"] = [r for r in old["rows"] if key(r) not in fresh] + new["rows"]
    out["sources"] = [s for s in old.get("sources", []) if key(s) not in fresh] + new["sources"]
    out["per_block_unfinished"] = [p for p in old.get("per_block_unfinished", []) if (p["shape"], p["prompt_len"], "per_block") not in fresh] + new["per_block_unfinished"]
    out["checks"] = {**old.get("checks", {}), **new["checks"]}
    out["runs"] = {**old.get("runs", {}), **new["runs"]}
    shapes = {**old["config"]["shapes"], **new["config"]["shapes"]}
    out["config"] = {**new["config"], "shapes": shapes}
    out["rows"].sort(key=lambda r: (list(shapes).index(r["shape"]), r["prompt_len"], METHODS.index(r["method"])))
    return out


def summarize(rows) -> dict:
    """The issue's two targets per shape: chunked / causal at the longest length, per-block / chunked at 32K."""
    t = {(r["shape"], r["prompt_len"], r["method"]): r["seconds"] for r in rows}
    out = {}
    for shape in sorted({r["shape"] for r in rows}):
        lens = sorted({r["prompt_len"] for r in rows if r["shape"] == shape})
        longest = lens[-1]
        c, f = t.get((shape, longest, "chunked")), t.get((shape, longest, "flashinfer_causal"))
        p32, c32 = t.get((shape, 32768, "per_block")), t.get((shape, 32768, "chunked"))
        out[shape] = {
            f"chunked_over_causal_at_{longest}": (c / f) if c and f else None,
            "per_block_over_chunked_at_32768": (p32 / c32) if p32 and c32 else None,
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
