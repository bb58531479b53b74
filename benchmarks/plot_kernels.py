"""Plot benchmarks/results/kernels.json: per-layer microseconds of each method against context, one panel per
(shape, batch), k=512 rows and the dense baseline. Usage: python benchmarks/plot_kernels.py [kernels.json]"""

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


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "kernels.json")))
