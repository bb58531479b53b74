"""Per-layer attention time of one denoising step: MAGE's sparse kernel, Quest's, FlashInfer dense, the
PyTorch reference, and the first step (exact + selection) against a plain dense step.

Setup per (shape, context, B, batch): a token-slot KV pool (page size 1, as SGLang's FlashInfer backend
views it) with shuffled slots, every request at `context` prefix tokens plus one B-token block. Methods:
  mage_sparse      sparse_block_attention over k + sink + local cached slots (+ the block)
  quest_sparse     Quest's per-step page scoring (bounds precomputed, block-mean query) + top-k + the kernel
  flashinfer_dense FlashInfer paged prefill of the block over prefix + block, non-causal (SGLang's dense step)
  reference        the PyTorch reference of the sparse step (batch 1, k <= 512 only: it is slow)
  mage_first_step  FlashInfer exact with LSE + block_mean_scores + select_topk (MAGE's first step, selector
                   "mean"), and the fused Triton pass + select_topk (selector "fused"); rows carry `selector`
  dense_step       = flashinfer_dense, listed again as the first step's baseline
`gbps` is the bytes the method must read (K/V it attends to, bf16; plus the bounds for quest) over its time.
`us` is eager (do_bench around the Python call: host launch gaps included, which dominate small steps);
`us_graph` the same call replayed from a CUDA graph, as the engine's captured steps run (dense, sparse, and
the first step as --mage-graph-first-step runs it).
Writes benchmarks/results/kernels.json (rows {context, k, B, batch, q_heads, kv_heads, head_dim, method, us,
gbps}) and prints a table. `--split-sweep N...` also times mage_sparse from a CUDA graph at each given
key-split count (the JSON's `split_sweep` list, rows carry `num_splits`; `num_splits` on the mage_sparse row
is the default the engine uses; a second mage_sparse row with `merge: last_program` times the one-launch
merge at that count), at each `--tile-sweep` row x key tile given (rows carry block_m / block_n;
None is the default tile), each `--merge-sweep` merge (two_launch, last_program; rows carry `merge`), and each
`--stage-sweep` / `--warp-sweep` launch setting (rows carry num_stages / num_warps, None = default) and
each `--pdl-sweep` programmatic-dependent-launch mode (rows carry `pdl`): the data for choosing
default_num_splits(), the tiles and the merge. `--timeline` profiles the default step per PDL mode (rows
carry `timeline`: kernel durations and the idle time between them, per captured call). GPU only.

Usage: python benchmarks/bench_kernels.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from results_io import write_json  # noqa: E402
from roofline import SHAPES  # noqa: E402

from sglang_mage.config import PDL_MODES, MageConfig  # noqa: E402

SINK, LOCAL, QUEST_PAGE = 16, 64, 16
# The sparse rows launch as the engine does: with --mage-pdl at its default (split_sweep rows name theirs).
ENGINE_PDL = MageConfig().pdl


def make_pool(shape, batch, context, B, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hkv, d = shape.kv_heads, shape.head_dim
    seq = context + B
    slots = batch * seq
    k_buf = torch.randn(slots, hkv, d, generator=g, device=device, dtype=torch.bfloat16)
    v_buf = torch.randn(slots, hkv, d, generator=g, device=device, dtype=torch.bfloat16)
    perm = torch.randperm(slots, generator=g, device=device).int()
    req_to_token = perm.view(batch, seq).contiguous()
    q = torch.randn(batch * B, shape.q_heads, d, generator=g, device=device, dtype=torch.bfloat16)
    qo_indptr = torch.arange(0, batch * B + 1, B, dtype=torch.int32, device=device)
    return dict(k=k_buf, v=v_buf, req_to_token=req_to_token, q=q, qo_indptr=qo_indptr,
                rows=torch.arange(batch, device=device), prefix=torch.full((batch,), context, dtype=torch.int32,
                                                                                device=device))


class Dense:
    """FlashInfer's dense dLLM step (and the exact first step with LSE), planned once."""

    def __init__(self, p, shape, B, context):
        import flashinfer

        batch = p["rows"].numel()
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        self.w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
        seq = context + B
        self.w.plan(p["qo_indptr"].cpu(), torch.arange(0, batch * seq + 1, seq, dtype=torch.int32),
                    p["req_to_token"].reshape(-1), torch.ones(batch, dtype=torch.int32), shape.q_heads,
                    shape.kv_heads, shape.head_dim, 1, causal=False, q_data_type=torch.bfloat16,
                    sm_scale=shape.head_dim**-0.5)
        self.kv = (p["k"].unsqueeze(1), p["v"].unsqueeze(1))

    def run(self, q, lse=False):
        return self.w.run(q, self.kv, return_lse=lse)


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100) * 1e3  # microseconds


def bench_graph(fn) -> float | None:
    """GPU time of `fn` replayed from a CUDA graph, as the engine runs a captured step: no host launch gaps.
    None where `fn` cannot be captured (a host sync inside it)."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=100) * 1e3
    except Exception:  # noqa: BLE001 - an uncapturable method is reported as such, eager time still stands
        return None


def kernel_timeline(fn, calls: int = 200) -> dict:
    """Where a captured call's time goes: `fn` replayed from a CUDA graph `calls` times under the profiler
    (CUPTI). Per call: each kernel's mean duration, `busy_us` (first kernel start to last kernel end),
    `period_us` (start to start of consecutive calls) and `idle_us` = period - the kernels' summed duration
    (launch gaps and dependency waits, the part that no faster kernel body removes)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.time_range.end > e.time_range.start), key=lambda e: e.time_range.start)
    per_call = len(kernels) // calls
    if per_call == 0:
        return {}
    kernels = kernels[: per_call * calls]
    starts = [kernels[i * per_call].time_range.start for i in range(calls)]
    durations: dict[str, float] = {}
    for e in kernels:
        durations[e.name] = durations.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / calls
    busy = sum(kernels[i * per_call + per_call - 1].time_range.end - starts[i] for i in range(calls)) / calls
    period = (starts[-1] - starts[0]) / (calls - 1)
    return {"kernels": {name: round(us, 2) for name, us in durations.items()}, "busy_us": round(busy, 2),
            "period_us": round(period, 2), "idle_us": round(period - sum(durations.values()), 2)}


def measure(shape, context, B, batch, ks, with_reference, split_sweep=(), tile_sweep=((None, None),),
            merge_sweep=("two_launch",), stage_sweep=(None,), warp_sweep=(None,), pdl_sweep=("off",),
            timeline=False, merge_m_sweep=(None,)):
    from sglang_mage.ops.first_step import fused_first_step
    from sglang_mage.ops.selection import block_mean_scores, select_topk
    from sglang_mage.ops.selection.quest import block_mean_query, page_bounds, quest_position_scores
    from sglang_mage.ops.sparse_attention import alloc_merge_counters, alloc_workspace, default_num_splits
    from sglang_mage.ops.sparse_attention import sparse_block_attention
    from sglang_mage.ops.sparse_attention import sparse_block_attention_ref

    p = make_pool(shape, batch, context, B)
    scale = shape.head_dim**-0.5
    hkv, d, g = shape.kv_heads, shape.head_dim, shape.q_heads // shape.kv_heads
    dense = Dense(p, shape, B, context)
    kv_bytes_tok = hkv * d * 2 * 2
    rows, sweep = [], []

    def row(method, k, us, bytes_read, us_graph=None, **extra):
        rows.append({"context": context, "k": k, "B": B, "batch": batch, "q_heads": shape.q_heads,
                     "kv_heads": hkv, "head_dim": d, "method": method, "us": round(us, 2),
                     "gbps": round(bytes_read / (us * 1e-6) / 1e9, 1),
                     "us_graph": None if us_graph is None else round(us_graph, 2),
                     "gbps_graph": None if not us_graph else round(bytes_read / (us_graph * 1e-6) / 1e9, 1), **extra})

    dense_us, dense_graph = bench(lambda: dense.run(p["q"])), bench_graph(lambda: dense.run(p["q"]))
    dense_bytes = batch * (context + B) * kv_bytes_tok
    row("flashinfer_dense", None, dense_us, dense_bytes, dense_graph)
    row("dense_step", None, dense_us, dense_bytes, dense_graph)
    _, lse = dense.run(p["q"], lse=True)
    for k in ks:
        cap = k + SINK + LOCAL
        sel_slots = torch.zeros(batch, hkv, cap, dtype=torch.int32, device="cuda")
        sel_lens = torch.zeros(batch, hkv, dtype=torch.int32, device="cuda")

        def first_step():
            _, l2 = dense.run(p["q"], lse=True)
            s = block_mean_scores(p["q"], p["k"], p["qo_indptr"], p["req_to_token"], p["rows"], p["prefix"], l2,
                                  scale, B, context, lse_is_log2=True)
            select_topk(s, p["prefix"], k, SINK, LOCAL, p["req_to_token"], p["rows"], sel_slots, sel_lens)

        row("mage_first_step", k, bench(first_step), dense_bytes + batch * context * hkv * d * 2,
            bench_graph(first_step), selector="mean")

        def fused_step():
            _, s = fused_first_step(p["q"], p["k"], p["v"], p["qo_indptr"], p["req_to_token"], p["rows"],
                                    p["prefix"], scale, B, context)
            select_topk(s, p["prefix"], k, SINK, LOCAL, p["req_to_token"], p["rows"], sel_slots, sel_lens)

        row("mage_first_step", k, bench(fused_step), dense_bytes, bench_graph(fused_step), selector="fused")
        splits = default_num_splits(batch, hkv, g, B, cap, d)
        ws = alloc_workspace(batch, hkv, B, g, d, splits, "cuda")
        out = torch.empty_like(p["q"])
        sparse_args = (p["q"], p["k"], p["v"], p["qo_indptr"], p["req_to_token"], p["rows"], p["prefix"],
                       sel_slots, sel_lens, scale, B)
        sparse_bytes = batch * (cap + B) * kv_bytes_tok
        def sparse_step():
            sparse_block_attention(*sparse_args, out=out, workspace=ws, pdl=ENGINE_PDL)

        row("mage_sparse", k, bench(sparse_step), sparse_bytes, bench_graph(sparse_step), num_splits=splits,
            pdl=ENGINE_PDL)
        if splits > 1:  # the same step with the last split of each row tile merging (one launch, not two)
            counters = alloc_merge_counters(batch, hkv, B, g, d, "cuda")

            def last_merge_step():
                sparse_block_attention(*sparse_args, out=out, workspace=ws, merge_counters=counters)

            row("mage_sparse", k, bench(last_merge_step), sparse_bytes, bench_graph(last_merge_step),
                num_splits=splits, merge="last_program")
        for pdl in pdl_sweep if timeline else ():
            def pdl_step():
                sparse_block_attention(*sparse_args, out=out, workspace=ws, pdl=pdl)

            us = bench_graph(pdl_step)
            sweep.append({"context": context, "k": k, "B": B, "batch": batch, "q_heads": shape.q_heads,
                          "kv_heads": hkv, "head_dim": d, "num_splits": splits, "default_splits": splits,
                          "block_m": None, "block_n": None, "merge": "two_launch", "num_stages": None,
                          "num_warps": None, "pdl": pdl, "timeline": kernel_timeline(pdl_step),
                          "us_graph": None if us is None else round(us, 2)})
        for (bm, bn), n, merge, stages, warps, pdl, mm in itertools.product(
                tile_sweep if split_sweep else (), split_sweep, merge_sweep, stage_sweep, warp_sweep, pdl_sweep,
                merge_m_sweep):
            if merge == "last_program" and (n == 1 or pdl != "off"):
                continue  # one split has nothing to merge; the one-launch merge has no second launch to overlap
            if (pdl == "merge" or mm is not None) and n == 1:
                continue  # no merge launch: the same launch as "off" / the default merge tile
            ws_n = alloc_workspace(batch, hkv, B, g, d, n, "cuda") if n > 1 else None
            cnt = alloc_merge_counters(batch, hkv, B, g, d, "cuda", block_m=bm) if merge == "last_program" else None
            us = bench_graph(lambda: sparse_block_attention(*sparse_args, out=out, num_splits=n, workspace=ws_n,
                                                            block_m=bm, block_n=bn, merge_counters=cnt,
                                                            num_stages=stages, num_warps=warps, pdl=pdl,
                                                            merge_block_m=mm))
            sweep.append({"context": context, "k": k, "B": B, "batch": batch, "q_heads": shape.q_heads,
                          "kv_heads": hkv, "head_dim": d, "num_splits": n, "default_splits": splits,
                          "block_m": bm, "block_n": bn, "merge": merge, "num_stages": stages, "num_warps": warps,
                          "pdl": pdl, "merge_block_m": mm, "us_graph": None if us is None else round(us, 2),
                          "gbps_graph": None if not us else round(sparse_bytes / (us * 1e-6) / 1e9, 1)})
        kmin, kmax = page_bounds(p["k"], p["req_to_token"], p["rows"], p["prefix"], QUEST_PAGE, context)

        def quest_step():
            qm = block_mean_query(p["q"], p["qo_indptr"], hkv, B)
            s = quest_position_scores(qm, kmin, kmax, p["prefix"], QUEST_PAGE, context)
            select_topk(s, p["prefix"], k, SINK, LOCAL, p["req_to_token"], p["rows"], sel_slots, sel_lens)
            sparse_block_attention(*sparse_args, out=out, workspace=ws, pdl=ENGINE_PDL)

        bounds_bytes = 2 * kmin.numel() * kmin.element_size()
        row("quest_sparse", k, bench(quest_step), sparse_bytes + bounds_bytes)
        if with_reference and batch == 1 and k <= 512:
            row("reference", k, bench(lambda: sparse_block_attention_ref(*sparse_args)), sparse_bytes)
    del p, dense
    torch.cuda.empty_cache()
    return rows, sweep


def write_results(path: str, rows: list, flashinfer_version: str, triton_version: str, sweep=()) -> None:
    result = {"environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "flashinfer": flashinfer_version, "triton": triton_version},
              "config": {"sink": SINK, "local": LOCAL, "quest_page": QUEST_PAGE, "dtype": "bfloat16",
                         "timer": "triton.testing.do_bench (warmup 25 ms, rep 100 ms), per layer; us_graph: "
                                  "do_bench_cudagraph"},
              "rows": rows}
    if sweep:
        result["split_sweep"] = list(sweep)
    write_json(path, result)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["sdar-1.7b", "fast-dllm-v2-1.5b", "fast-dllm-v2-7b"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 65536, 131072])
    ap.add_argument("--ks", nargs="+", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--blocks", nargs="+", type=int, default=[4, 32])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--split-sweep", nargs="+", type=int, default=[], metavar="N",
                    help="also time mage_sparse (graph) at these key-split counts")
    ap.add_argument("--tile-sweep", nargs="+", default=[], metavar="MxN",
                    help="with --split-sweep: row x key tiles to sweep (e.g. 64x32 128x64); default tile if none")
    ap.add_argument("--merge-sweep", nargs="+", default=["two_launch"], choices=["two_launch", "last_program"],
                    help="with --split-sweep: merge the splits in a second launch, or in the last split's program")
    ap.add_argument("--stage-sweep", nargs="+", type=int, default=[0], metavar="S",
                    help="with --split-sweep: pipeline depths (num_stages) to sweep (0 = the kernel's default)")
    ap.add_argument("--warp-sweep", nargs="+", type=int, default=[0], metavar="W",
                    help="with --split-sweep: warps per program to sweep (0 = the kernel's default)")
    ap.add_argument("--pdl-sweep", nargs="+", default=["off"], choices=PDL_MODES,
                    help="with --split-sweep or --timeline: programmatic dependent launch modes to sweep")
    ap.add_argument("--merge-m-sweep", nargs="+", type=int, default=[0], metavar="M",
                    help="with --split-sweep: the merge launch's row tiles to sweep (0 = the kernel's default)")
    ap.add_argument("--timeline", action="store_true",
                    help="profile the default sparse step per --pdl-sweep mode (CUPTI): kernel durations and idle "
                         "time per captured call (split_sweep rows with a `timeline`)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kernels.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU; nothing to measure here.", file=sys.stderr)
        return 2
    import flashinfer
    import triton

    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tile_sweep] or [(None, None)]
    rows, sweep = [], []
    grid = list(itertools.product(args.shapes, args.contexts, args.blocks, args.batches))
    for i, (name, context, B, batch) in enumerate(grid):
        got, got_sweep = measure(SHAPES[name], context, B, batch, args.ks, not args.no_reference, args.split_sweep,
                                 tiles, args.merge_sweep, [s or None for s in args.stage_sweep],
                                 [w or None for w in args.warp_sweep], args.pdl_sweep, args.timeline,
                                 [m or None for m in args.merge_m_sweep])
        rows += got
        sweep += got_sweep
        for r in got_sweep:
            if "timeline" in r:
                print(f"[{i + 1}/{len(grid)}] {name:>18} ctx={context:>6} B={B:>2} bs={batch:>2} k={r['k']:>5} "
                      f"pdl={r['pdl']}: graph {r['us_graph']} us, timeline {r['timeline']}", flush=True)
                continue
            print(f"[{i + 1}/{len(grid)}] {name:>18} ctx={context:>6} B={B:>2} bs={batch:>2} k={r['k']:>5} "
                  f"tile={r['block_m']}x{r['block_n']} splits={r['num_splits']:>2} (default {r['default_splits']}) "
                  f"merge={r['merge']}/{r['merge_block_m']} stages={r['num_stages']} warps={r['num_warps']} "
                  f"pdl={r['pdl']}: graph {r['us_graph']} us",
                  flush=True)
        for r in got:
            print(f"[{i + 1}/{len(grid)}] {name:>18} ctx={context:>6} B={B:>2} bs={batch:>2} k={str(r['k']):>5} "
                  f"{r['method']:>16}: {r['us']:9.1f} us {r['gbps']:8.1f} GB/s graph {r.get('us_graph')} us",
                  flush=True)
        write_results(args.out, rows, flashinfer.__version__, triton.__version__, sweep)  # a cut-off run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
