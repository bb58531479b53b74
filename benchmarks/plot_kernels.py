"""Plot benchmarks/results/kernels.json: per-layer microseconds of each method against context, one panel per
(shape, batch), k=512 rows and the dense baseline. With `--sweep`, a file's `split_sweep` rows instead: one
panel per (batch, k), a bar per split count and launch setting (merge tile, PDL mode), written as
<file>_sweep.png. Usage: python benchmarks/plot_kernels.py [--sweep] [kernels.json]"""

import json
import os
import sys


def main(path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.load(open(path))["rows"]
    panels = sorted({(r["q_heads"], r["kv_heads"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (hq, hkv, bs) in zip(axes[0], panels):
        sel = [r for r in rows if (r["q_heads"], r["kv_heads"], r["batch"]) == (hq, hkv, bs)]
        series = {}
        for r in sel:
            if r["method"] == "dense_step" or (r["k"] not in (None, 512)):
                continue
            tags = [r[key] for key in ("selector", "merge") if r.get(key)]
            name = r["method"] + "".join(f" ({t})" for t in tags)
            series.setdefault(name, []).append((r["context"], r["us"]))
        for name, pts in sorted(series.items()):
            ax.plot(*zip(*sorted(pts)), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="us per layer",
               title=f"{hq} q / {hkv} kv heads, batch {bs}, k=512")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    return out


def sweep(path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.load(open(path))["split_sweep"] if r.get("us_graph") and "timeline" not in r]

    def setting(r):  # what a bar varies besides the split count
        return (r.get("merge_block_m") or 0, r.get("pdl") or "off", r.get("num_stages") or 0,
                f"{r['block_m']}x{r['block_n']}")

    panels = sorted({(r["batch"], r["k"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (bs, k) in zip(axes[0], panels):
        sel = [r for r in rows if (r["batch"], r["k"]) == (bs, k)]
        settings = sorted({setting(r) for r in sel}, key=str)
        splits = sorted({r["num_splits"] for r in sel})
        width = 0.8 / max(1, len(settings))
        for i, (mm, pdl, st, tile) in enumerate(settings):
            us = {r["num_splits"]: r["us_graph"] for r in sel if setting(r) == (mm, pdl, st, tile)}
            label = f"tile {tile}, merge {mm or 'default'}, pdl {pdl}" + (f", {st} stages" if st else "")
            ax.bar([j + i * width for j, n in enumerate(splits) if n in us], [us[n] for n in splits if n in us],
                   width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], [str(n) for n in splits])
        ax.set(xlabel="key splits", ylabel="us per layer (graph replay)", title=f"batch {bs}, k={k}")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="lower left", framealpha=0.9)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + "_sweep.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sweep"]
    target = args[0] if args else os.path.join(os.path.dirname(__file__), "results", "kernels.json")
    print(sweep(target) if "--sweep" in sys.argv[1:] else main(target))
