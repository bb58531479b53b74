"""Print the directory of the sweep run whose last held-out evaluation is best (mean exact match over its
evaluated contexts, ties to the longest context); used by tools/gpu_run.sh wait-sweep."""

import json
import os
import sys


def score(path: str) -> tuple:
    with open(path) as f:
        evals = json.load(f).get("evals") or []
    if not evals:
        return (-1.0, -1.0)
    acc = evals[-1]["accuracy"]
    longest = max(acc, key=int)
    return (sum(v["all"] for v in acc.values()) / len(acc), acc[longest]["all"])


if __name__ == "__main__":
    runs = [p for p in sys.argv[1:] if os.path.exists(p)]
    for p in runs:
        print(p, score(p), file=sys.stderr)
    if runs:
        print(os.path.dirname(max(runs, key=score)))
