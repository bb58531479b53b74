"""Plot benchmarks/results/prefill.json: prefill seconds against prompt length, one panel per model shape.
Usage: python benchmarks/plot_prefill.py benchmarks/results/prefill.json [out.png]"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"per_block": ("tab:red", "o"), "chunked": ("tab:blue", "s"), "flashinfer_causal": ("tab:gray", "^")}


def main(path: str, out: str | None = None) -> None:
    res = json.load(open(path))
    shapes = list(res["config"]["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for method, (color, marker) in STYLE.items():
            pts = [(r["prompt_len"], r["seconds"]) for r in res["rows"]
                   if r["shape"] == shape and r["method"] == method and r["seconds"] is not None]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker=marker, color=color, label=method)
        for u in res.get("per_block_unfinished", []):
            if u["shape"] == shape:
                text = f"per_block > {u['cap_s']:.0f} s cap" if u["cap_s"] else "per_block not run"
                ax.annotate(text, (u["prompt_len"], 1),
                            xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill seconds",
               title=f"{shape} (B={res['config']['block']}, chunk={res['config']['chunk']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"dLLM prompt prefill on {res['environment']['device']}")
    fig.tight_layout()
    fig.savefig(out or path.replace(".json", ".png"), dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
