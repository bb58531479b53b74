"""Where a block's first step spends its time, and which tiles make it cheapest: issue 6's P4 (the first
step costs <= 1.15x a plain dense step).

Per point (shape, context, batch; B=32, k=512) every part is timed replayed from a CUDA graph
(do_bench_cudagraph), as the engine's captured first step runs with --mage-graph-first-step:
  dense          FlashInfer's dense step (the baseline)
  exact_lse      the same pass returning the LSE (the `mean` selector's exact pass)
  scores         block_mean_scores, one row per tile config (block_n, block_m, num_warps)
  topk           select_topk on those scores: torch.topk over the row (`method: torch`) or the radix select of
                 ops/selection/radix_topk.py (`method: radix`); the keys and slot kernels included
  radix_select   radix_topk_positions alone on the same keys, per digit width and chunk
  mean_total     exact_lse + scores + topk at the default configs (what the engine runs), per top-k method
  qmean_scores   mean_query_scores: the block-mean-query logits as a pass over K
  fused_two_pass the fused selector with --mage-fused-pass two: dense + qmean_scores + topk, per top-k method
  fused_two_overlap  the same with qmean_scores + topk on a side stream beside the dense pass
                 (--mage-overlap-selection); rows carry whether its selection equals the serial one
  fused          fused_first_step + select_topk, one row per tile config (block_m, block_n, warps, stages,
                 splits); each config's output is checked against FlashInfer's and its scores against
                 torch's block-mean-query logits, and rows carry the max errors
`ratio` is us / dense. Writes benchmarks/results/first_step.json and prints a table. GPU only.

Usage: python benchmarks/bench_first_step.py [--out PATH] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_kernels import LOCAL, SINK, Dense, bench_graph, make_pool  # noqa: E402
from results_io import write_json  # noqa: E402
from roofline import SHAPES  # noqa: E402

POINTS = [("fast-dllm-v2-7b", 131072, 1), ("fast-dllm-v2-1.5b", 131072, 1), ("fast-dllm-v2-1.5b", 32768, 16),
          ("fast-dllm-v2-1.5b", 131072, 16)]
SCORE_TILES = [(128, 32, 4), (64, 32, 4), (256, 32, 8), (128, 64, 8), (256, 64, 8)]  # (block_n, block_m, warps)
# (block_m, block_n, num_warps, num_stages, split multiplier over the default split count)
FUSED_TILES = [(64, 64, 4, 2, 1), (64, 64, 4, 3, 1), (128, 64, 8, 2, 1), (128, 64, 8, 3, 1), (64, 128, 8, 2, 1),
               (128, 128, 8, 2, 1), (64, 64, 4, 2, 2), (128, 64, 8, 2, 2),
               # one row tile holds all B x G rows of a KV head, so K and V are read once (not once per tile)
               (256, 32, 8, 2, 1), (256, 64, 16, 2, 1)]


def measure(name, context, batch, k, B=32, quick=False):
    from sglang_mage.ops.first_step import fused_first_step
    from sglang_mage.ops.first_step.kernel import default_fused_splits
    from sglang_mage.ops.selection import block_mean_scores, mean_query_scores, select_topk
    from sglang_mage.ops.selection.radix_topk import default_chunk, radix_topk_positions
    from sglang_mage.side_stream import SideStream

    shape = SHAPES[name]
    p = make_pool(shape, batch, context, B)
    scale = shape.head_dim**-0.5
    hkv, g, d = shape.kv_heads, shape.q_heads // shape.kv_heads, shape.head_dim
    dense = Dense(p, shape, B, context)
    base = dict(shape=name, context=context, batch=batch, B=B, k=k, q_heads=shape.q_heads, kv_heads=hkv, head_dim=d)
    rows = []
    cap = k + SINK + LOCAL
    sel_slots = torch.zeros(batch, hkv, cap, dtype=torch.int32, device="cuda")
    sel_lens = torch.zeros(batch, hkv, dtype=torch.int32, device="cuda")
    args = (p["q"], p["k"], p["qo_indptr"], p["req_to_token"], p["rows"], p["prefix"])

    dense_us = bench_graph(lambda: dense.run(p["q"]))

    def row(part, us, config=None, **extra):
        rows.append({**base, "part": part, "config": config, "us_graph": None if us is None else round(us, 2),
                     "ratio": None if us is None or not dense_us else round(us / dense_us, 3), **extra})
        print(f"{name:>18} ctx={context:>6} bs={batch:>2} {part:>10} {str(config):>28}: "
              f"{'n/a' if us is None else f'{us:9.1f} us'}  x{rows[-1]['ratio']}", flush=True)

    row("dense", dense_us)
    ref_out, lse = dense.run(p["q"], lse=True)
    row("exact_lse", bench_graph(lambda: dense.run(p["q"], lse=True)))
    scores = torch.empty(batch, hkv, context, dtype=torch.float32, device="cuda")
    for bn, bm, w in SCORE_TILES[:1] if quick else SCORE_TILES:
        row("scores", bench_graph(lambda: block_mean_scores(*args, lse, scale, B, context, out=scores,
                                         lse_is_log2=True, block_n=bn, block_m=bm, num_warps=w)),
            {"block_n": bn, "block_m": bm, "num_warps": w})
    block_mean_scores(*args, lse, scale, B, context, out=scores, lse_is_log2=True)
    row("topk", bench_graph(lambda: select_topk(scores, p["prefix"], k, SINK, LOCAL, p["req_to_token"], p["rows"],
                                                sel_slots, sel_lens)), {"method": "torch"})
    row("topk", bench_graph(lambda: select_topk(scores, p["prefix"], k, SINK, LOCAL, p["req_to_token"], p["rows"],
                                                sel_slots, sel_lens, topk_method="radix")), {"method": "radix"})
    # The radix select alone (no key or slot kernels), at its digit widths and chunk sizes.
    keys = scores.reshape(batch * hkv, context).contiguous()
    want_top = torch.topk(keys, cap, dim=-1).values.sort(dim=-1).values
    for bits, chunk in [(8, None), (11, None)] + ([] if quick else [(8, 2048), (8, 8192), (11, 4096)]):
        got = keys.gather(1, radix_topk_positions(keys, cap, bits=bits, chunk=chunk)).sort(dim=-1).values
        row("radix_select", bench_graph(lambda: radix_topk_positions(keys, cap, bits=bits, chunk=chunk)),
            {"bits": bits, "chunk": chunk or default_chunk(batch * hkv, context)},
            same_values_as_torch=bool(torch.equal(got, want_top)))

    def mean_total(method="torch"):
        _, l2 = dense.run(p["q"], lse=True)
        s = block_mean_scores(*args, l2, scale, B, context, out=scores, lse_is_log2=True)
        select_topk(s, p["prefix"], k, SINK, LOCAL, p["req_to_token"], p["rows"], sel_slots, sel_lens,
                    topk_method=method)

    # The block-mean query's logits against every prefix key, in torch, for the fused selector's scores.
    qbar = p["q"].float().view(batch, B, hkv, g, d).mean(dim=(1, 3))
    prefix_slots = p["req_to_token"][:, :context].long()
    want_scores = torch.einsum("rnhd,rhd->rhn", p["k"][prefix_slots].float(), qbar) * scale
    # The fused selector's two-pass form (--mage-fused-pass two): FlashInfer's dense step, then the
    # block-mean-query logits as a pass over K, then the top-k, with each top-k method.
    qscores = torch.empty(batch, hkv, context, dtype=torch.float32, device="cuda")
    side = SideStream()
    mq = lambda: mean_query_scores(p["q"], p["k"], p["qo_indptr"], p["req_to_token"], p["rows"], p["prefix"], scale, B,
                                   context, out=qscores)
    mq()
    row("qmean_scores", bench_graph(mq), score_max_err=round(float((qscores - want_scores).abs().max()), 4))
    for method in ("torch", "radix"):
        def select():
            mq()
            select_topk(qscores, p["prefix"], k, SINK, LOCAL, p["req_to_token"], p["rows"], sel_slots, sel_lens,
                        topk_method=method)

        def two_pass():
            dense.run(p["q"])
            select()

        row("fused_two_pass", bench_graph(two_pass), {"method": method})
        # The same with the scores and top-k on a side stream beside the dense pass (--mage-overlap-selection).
        two_pass()
        torch.cuda.synchronize()
        serial = (sel_slots.clone(), sel_lens.clone())

        def overlapped():
            with side.fork(p["q"].device):
                select()
            dense.run(p["q"])
            side.join(p["q"].device)

        sel_slots.zero_()
        overlapped()
        torch.cuda.synchronize()
        kept = torch.arange(cap, device="cuda") < sel_lens[..., None]  # entries past a row's length are stale
        same = bool(torch.equal(sel_lens, serial[1]) and torch.equal(
            torch.where(kept, sel_slots, -1).sort(-1).values, torch.where(kept, serial[0], -1).sort(-1).values))
        row("fused_two_overlap", bench_graph(overlapped), {"method": method}, same_selection_as_serial=same)
    for method in ("torch", "radix"):
        row("mean_total", bench_graph(lambda: mean_total(method)), {"method": method})

    for bm, bn, w, st, mult in FUSED_TILES[:1] if quick else FUSED_TILES:
        splits = min(64, default_fused_splits(batch, hkv, B * g, bm, context, B) * mult)
        cfg = {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st, "splits": splits}
        out = torch.full_like(p["q"], float("nan"))
        fscores = torch.empty(batch, hkv, context, dtype=torch.float32, device="cuda")

        def fused():
            fused_first_step(p["q"], p["k"], p["v"], p["qo_indptr"], p["req_to_token"], p["rows"], p["prefix"], scale,
                             B, context, out=out, scores=fscores, num_splits=splits, block_m=bm, block_n=bn,
                             num_warps=w, num_stages=st)
            select_topk(fscores, p["prefix"], k, SINK, LOCAL, p["req_to_token"], p["rows"], sel_slots, sel_lens)

        try:
            fused()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a tile Triton cannot build (shared memory) is reported, not fatal
            row("fused", None, cfg, error=f"{type(e).__name__}: {str(e)[:120]}")
            continue
        out_err = float((out.float() - ref_out.float()).abs().max())
        score_err = float((fscores - want_scores).abs().max())
        row("fused", bench_graph(fused), cfg, out_max_err=round(out_err, 4), score_max_err=round(score_err, 4))
    del p, dense
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="default configs only")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "first_step.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_first_step needs a CUDA GPU; nothing to measure here.", file=sys.stderr)
        return 2
    import flashinfer
    import triton

    rows = []
    for name, context, batch in POINTS:
        rows += measure(name, context, batch, args.k, quick=args.quick)
        write_json(args.out, {"environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "flashinfer": flashinfer.__version__, "triton": triton.__version__},
                              "config": {"sink": SINK, "local": LOCAL, "B": 32, "k": args.k, "dtype": "bfloat16",
                                         "timer": "triton.testing.do_bench_cudagraph (rep 100 ms), per layer"},
                              "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
