"""Task accuracy and recall of MAGE against exact attention, Quest and the per-step oracle (issue 7).

The tiny block-diffusion checkpoint (training/) answers held-out synthetic long-context tasks (needle,
associative recall, variable tracking; training/tasks.py) with exact attention and with each selector at
each budget k. Two engines give the same rows:

    # CPU (or GPU: --device cuda), PyTorch reference emulation, small contexts:
    python benchmarks/eval_accuracy.py --engine reference --checkpoint checkpoints/tiny-sdar-recall \
        --contexts 512 2048 --samples 32
    # GPU, through SGLang's dLLM engine (attention_backend mage / flashinfer):
    python benchmarks/eval_accuracy.py --engine sglang --checkpoint checkpoints/tiny-sdar-recall \
        --contexts 2048 8192 32768 --samples 64
    # no checkpoint yet: a seeded random model exercises the pipeline (accuracy is meaningless then)
    python benchmarks/eval_accuracy.py --checkpoint random --contexts 256 --samples 4

Methods (same sinks / local window / k for all; step 0 of a block is exact for every sparse method):
  exact  : dense attention (reference: the model's own; sglang: attention_backend=flashinfer);
  mage   : the `mean` selector: top-k by step-0 block-mean attention probability, reused by later steps;
  mage_fused : the `fused` selector: top-k by the step-0 block-mean query's logit per key (what the fused
           first-step kernel writes, K read once), reused by later steps;
  quest  : page min/max key bounds scored with the block-mean query, re-selected every step;
  oracle : the `mean` top-k of every step's own exact attention.
Row fields: accuracy = share of samples whose ANSWER_LEN generated tokens all equal the answer (exact
match); recall = set recall against the per-step oracle top-k, mass_recall = share of the oracle top-k's
attention mass held by the set, mass_captured = share of all prefix mass held (definitions in
training/sparse_reference.py). Recall is measured by the reference engine only: null in sglang rows unless
--recall-from names a reference JSON (those rows then say recall_source: reference).
`statistics` holds the per-layer top-k mass, its coefficient of variation across KV heads and the vote
selector's layer score (the inputs of MAGE's layer-adaptive budget), from exact attention's step 0.

Writes --out (JSON, default benchmarks/results/accuracy.json) and a PNG next to it (accuracy and recall vs k
per context).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)  # training/ (not installed); appended so an installed sglang_mage stays first

sys.path.insert(0, HERE)  # benchmarks/engine_jobs.py
import engine_jobs  # noqa: E402
from training import train  # noqa: E402
from training.model import TinyConfig, TinySDAR  # noqa: E402
from training.sparse_reference import decode_with_method  # noqa: E402
from training.tasks import ALL_TASKS, ANSWER_LEN, TASKS  # noqa: E402

SHIPPED_CHECKPOINT = os.path.join(ROOT, "checkpoints", "tiny-sdar-recall")
# Each sparse method and the `--mage-selector` it runs through SGLang; exact runs the flashinfer backend.
SGLANG_SELECTORS = {"mage": "mean", "mage_fused": "fused", "quest": "quest", "oracle": "oracle"}
METHODS = ("exact", *SGLANG_SELECTORS)
DEFAULT_KS = (64, 128, 256, 512)
RANDOM_NOTE = "checkpoint 'random': a randomly initialised model; accuracy is meaningless (pipeline check only)"
ROW_FIELDS = ("context", "method", "k", "accuracy", "recall")


# ---- model and data ------------------------------------------------------------------------------------
def load_model(checkpoint: str, device: str = "cpu", seed: int = 0) -> TinySDAR:
    """A checkpoint dir as training/train.py saves it (config.json + model.safetensors, bf16) in fp32, or
    'random': TinySDAR with the default TinyConfig and seeded random weights."""
    if checkpoint == "random":
        torch.manual_seed(seed)
        return TinySDAR(TinyConfig()).to(device).eval()
    model, _ = train.load_checkpoint(checkpoint)
    return model.to(device).eval()


def make_data(contexts, samples: int, seed: int, block_size: int, tasks=TASKS) -> dict:
    """Held-out tasks per context (seeds disjoint from training's seed 0): {context: (prompts [N, L] padded
    with filler after BOS to a common multiple of the block, answers [N, ANSWER_LEN], task names)}."""
    return {c: train.padded_batch(random.Random(1_000_003 * (seed + 1) + c), samples, c, block_size, tasks)
            for c in contexts}


def exact_match(generated: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[N] bool: every answer token generated."""
    return (generated[:, :ANSWER_LEN].cpu() == answers.cpu()).all(-1)


def row(context, method, k, correct, task_names, recall=None, engine="reference") -> dict:
    """One result row; `correct` [N] bool."""
    by_task = train.accuracy_by_task(correct, task_names)
    out = {"context": int(context), "method": method, "k": None if k is None else int(k),
           "accuracy": round(float(correct.float().mean()), 4), "recall": None, "mass_recall": None,
           "mass_captured": None, "n": int(correct.numel()), "accuracy_by_task": by_task, "engine": engine}
    if recall is not None:
        out.update({key: round(float(v), 4) for key, v in recall.items()})
    return out


def method_grid(methods, ks, baseline_ks=None):
    """(method, k) pairs: exact once; mage at every k; quest and oracle at `baseline_ks` (default: every k)."""
    def budgets(m):
        return [None] if m == "exact" else (ks if m.startswith("mage") or not baseline_ks else baseline_ks)
    return [(m, k) for m in methods for k in budgets(m)]


# ---- reference engine (PyTorch; CPU or GPU) ------------------------------------------------------------
def eval_reference(model, data, methods, ks, sink, local, page_size, batch=8, log=print, baseline_ks=None):
    """Rows for every (context, method, k), plus statistics per context (from the exact runs)."""
    rows, stats = [], {}
    device = next(model.parameters()).device
    for context, (prompts, answers, task_names) in data.items():
        for method, k in method_grid(methods, ks, baseline_ks):
            t0 = time.time()
            correct, recalls, layer_stats = [], [], []
            for s in range(0, prompts.shape[0], batch):
                chunk = prompts[s:s + batch].to(device)
                gen, sa = decode_with_method(model, chunk, None if method == "exact" else method, k or 0, sink,
                                             local, page_size, stats_ks=tuple(ks) if method == "exact" else ())
                correct.append(exact_match(gen, answers[s:s + batch]))
                recalls.append((chunk.shape[0], sa.mean_recall()))
                layer_stats.append((chunk.shape[0], sa.stats))
            n = sum(w for w, _ in recalls)
            rec = None if method == "exact" else {
                key: sum(w * r[key] for w, r in recalls) / n for key in recalls[0][1]}
            rows.append(row(context, method, k, torch.cat(correct), task_names, rec))
            if method == "exact":
                stats[str(context)] = merge_stats(layer_stats)
            log(f"[reference] ctx {context} {method:6s} k={k} acc {rows[-1]['accuracy']:.3f} "
                f"recall {rows[-1]['recall']} ({time.time() - t0:.1f}s)")
    return rows, stats


def merge_stats(weighted) -> list[dict]:
    """[(n, {layer: stats})] -> per layer, sample-weighted means (keys of k as strings, for JSON)."""
    n_total = sum(n for n, _ in weighted)
    out = []
    for layer in sorted(weighted[0][1]):
        entry = {"layer": layer}
        for key, val in weighted[0][1][layer].items():
            if isinstance(val, dict):
                entry[key] = {str(k): round(sum(n * s[layer][key][k] for n, s in weighted) / n_total, 5) for k in val}
            else:
                entry[key] = round(sum(n * s[layer][key] for n, s in weighted) / n_total, 5)
        out.append(entry)
    return out


# ---- SGLang engine (GPU only) ----------------------------------------------------------------------------
def sglang_engine_kwargs(method, k, args, context_length) -> dict:
    """sgl.Engine keyword arguments of one method (pure: CPU-tested)."""
    kw = dict(model_path=args.checkpoint, skip_tokenizer_init=True, dllm_algorithm=args.sglang_algorithm,
              disable_cuda_graph=True, context_length=context_length, mem_fraction_static=0.7, random_seed=0,
              log_level="warning", max_running_requests=args.batch)
    if args.sglang_algorithm == "FixedSteps":
        kw["dllm_algorithm_config"] = args.algorithm_config
    if method == "exact":
        return dict(kw, attention_backend="flashinfer")
    return dict(kw, attention_backend="mage", mage_selector=SGLANG_SELECTORS[method], mage_k=int(k), mage_min_context=0,
                mage_sink_tokens=args.sink, mage_local_window=args.local, mage_quest_page_size=args.page_size)


def generate_sglang(engine_kwargs: dict, prompts: list[list[int]]) -> list[list[int]]:
    """GPU only: one sgl.Engine, greedy, ANSWER_LEN new tokens (one block) per prompt."""
    return generate_sglang_groups(engine_kwargs, [prompts])[0]


def generate_sglang_groups(engine_kwargs: dict, groups: list[list[list[int]]]) -> list[list[list[int]]]:
    """GPU only: one sgl.Engine answers every group of prompts (one group per context), in turn."""
    import sglang as sgl

    engine = sgl.Engine(**engine_kwargs)
    try:
        params = {"max_new_tokens": ANSWER_LEN, "temperature": 0.0, "ignore_eos": True}
        return [[list(o["output_ids"])[:ANSWER_LEN] for o in engine.generate(input_ids=g, sampling_params=params)]
                for g in groups]
    finally:
        engine.shutdown()


def eval_sglang(data, methods, ks, args, generate=None, log=print):
    """Rows from SGLang's engine: one engine per (method, k) answers every context. `generate(engine_kwargs,
    prompts)` is injectable for CPU tests (then engines run in turn, in this process)."""
    if args.sglang_algorithm == "FixedSteps" and not args.algorithm_config:
        import tempfile

        args.algorithm_config = os.path.join(tempfile.mkdtemp(prefix="mage-acc-"), "fixed_steps.yaml")
        with open(args.algorithm_config, "w") as f:
            f.write(f"steps: {ANSWER_LEN}\n")
    context_length = max(p.shape[1] for p, _, _ in data.values()) + 4 * ANSWER_LEN
    grid = method_grid(methods, ks, args.baseline_ks)
    kwargs = {(m, k): sglang_engine_kwargs(m, k, args, context_length) for m, k in grid}
    groups = [prompts.tolist() for prompts, _, _ in data.values()]
    t0 = time.time()
    if generate is None:
        # Engines start at once: a fixed KV pool (max_total_tokens) under a large memory fraction, because
        # SGLang charges memory that other engines take during its start-up against its own fraction.
        pool = args.batch * (context_length + 4 * ANSWER_LEN)
        jobs = {f"{m}-k{k}": {"kwargs": dict(kw, mem_fraction_static=0.5, max_total_tokens=pool), "groups": groups}
                for (m, k), kw in kwargs.items()}
        names = {f"{m}-k{k}": (m, k) for m, k in grid}
        rows_of = {}

        def on_result(name, outputs):  # logged as each engine ends: a run cut off later keeps these lines
            rows_of[names[name]] = engine_rows(*names[name], outputs, data, log)

        engine_jobs.run_jobs(os.path.abspath(__file__), jobs, args.parallel, log=log, on_result=on_result)
    else:
        rows_of = {key: engine_rows(*key, [generate(kw, g) for g in groups], data, log) for key, kw in kwargs.items()}
    log(f"[sglang] {len(grid)} engines, {time.time() - t0:.0f}s")
    return [r for key in grid for r in rows_of[key]]


def engine_rows(method: str, k, outputs, data: dict, log) -> list[dict]:
    """One sglang engine's generations (a list per context) -> its accuracy rows."""
    rows = []
    for (context, (prompts, answers, task_names)), gen in zip(data.items(), outputs):
        gen = torch.tensor([g + [-1] * (ANSWER_LEN - len(g)) for g in gen])
        rows.append(row(context, method, k, exact_match(gen, answers), task_names, engine="sglang"))
        log(f"[sglang] ctx {context} {method:6s} k={k} acc {rows[-1]['accuracy']:.3f} {rows[-1]['accuracy_by_task']}")
    return rows


def merge_recall(rows: list[dict], reference_rows: list[dict]) -> int:
    """Fill the recall fields of sglang rows from reference rows of the same (context, method, k), marking
    them `recall_source: reference`; returns how many rows were filled."""
    ref = {(r["context"], r["method"], r["k"]): r for r in reference_rows if r.get("engine") == "reference"}
    filled = 0
    for r in rows:
        match = ref.get((r["context"], r["method"], r["k"]))
        if match is not None and r["recall"] is None and match["recall"] is not None:
            r.update({key: match[key] for key in ("recall", "mass_recall", "mass_captured")}, recall_source="reference")
            filled += 1
    return filled


# ---- output ----------------------------------------------------------------------------------------------
def environment(args) -> dict:
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "git_commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if args.engine == "sglang":
        import sglang

        env["sglang"] = sglang.__version__
    return env


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 3.8), squeeze=False)
    colors = {"mage": "C0", "mage_fused": "C3", "quest": "C1", "oracle": "C2"}
    for ax, ctx in zip(axes[0], contexts):
        for r in rows:
            if r["context"] == ctx and r["method"] == "exact":
                ax.axhline(r["accuracy"], color="k", ls=":", label="exact acc")
        for method, color in colors.items():
            pts = sorted((r["k"], r["accuracy"], r["recall"]) for r in rows if r["context"] == ctx and r["method"] == method)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{method} acc")
            if all(p[2] is not None for p in pts):
                ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", color=color, alpha=0.6, label=f"{method} recall")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("k")
        ax.set_title(f"context {ctx}")
    axes[0][0].set_ylabel("accuracy / recall")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    title = f"{result['config']['engine']}: {os.path.basename(str(result['config']['checkpoint']))}"
    if result.get("note"):
        title += " (random weights: accuracy meaningless)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("reference", "sglang"), default="reference")
    ap.add_argument("--checkpoint", default=SHIPPED_CHECKPOINT, help="checkpoint dir, or 'random'")
    ap.add_argument("--contexts", type=int, nargs="+", default=None,
                    help="default: 512 2048 (reference), 2048 8192 32768 (sglang)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    ap.add_argument("--baseline-ks", type=int, nargs="+", default=None,
                    help="budgets for quest and oracle (default: --ks)")
    ap.add_argument("--samples", type=int, default=32, help="samples per context (tasks mixed at random)")
    ap.add_argument("--tasks", nargs="+", choices=ALL_TASKS, default=None,
                    help="default: the tasks in the checkpoint's training_args.json (else needle recall variables)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--local", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16, help="quest page size")
    ap.add_argument("--batch", type=int, default=8, help="reference: samples per forward; sglang: max running requests")
    ap.add_argument("--device", default="cpu", help="reference engine's device")
    ap.add_argument("--sglang-algorithm", default="LowConfidence",
                    help="LowConfidence (default), or FixedSteps (ANSWER_LEN steps: the reference's schedule)")
    ap.add_argument("--algorithm-config", default=None, help="YAML for --dllm-algorithm-config")
    ap.add_argument("--recall-from", default=None,
                    help="sglang: a reference-engine JSON whose recall fills the rows of the same (context, method, k)")
    ap.add_argument("--parallel", type=int, default=6, help="sglang: engines running at once (own processes)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accuracy.json"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--engine-job", help=argparse.SUPPRESS)  # internal: one engine, from engine_jobs.run_jobs
    args = ap.parse_args(argv)
    if args.contexts is None:
        args.contexts = [512, 2048] if args.engine == "reference" else [2048, 8192, 32768]
    if args.tasks is None:
        args.tasks = checkpoint_tasks(args.checkpoint)
    return args


def checkpoint_tasks(checkpoint: str) -> list[str]:
    """The tasks a checkpoint was trained on (its training_args.json), so it is evaluated on the same mix;
    TASKS where it records none (a random model, an older checkpoint)."""
    try:
        with open(os.path.join(checkpoint, "training_args.json")) as f:
            tasks = json.load(f).get("tasks")
    except (OSError, ValueError):
        tasks = None
    return [t for t in tasks if t in ALL_TASKS] if tasks else list(TASKS)


def main(argv=None, generate=None, log=print) -> dict:
    args = parse_args(argv)
    if args.engine_job:
        job = engine_jobs.load_spec(args.engine_job)
        engine_jobs.emit(generate_sglang_groups(job["kwargs"], job["groups"]))
        return {}
    if args.engine == "sglang" and args.checkpoint == "random":
        raise SystemExit("--engine sglang needs a checkpoint directory (SGLang loads the weights itself)")
    block = 4
    if args.checkpoint != "random":
        with open(os.path.join(args.checkpoint, "config.json")) as f:
            block = json.load(f).get("block_size", 4)
    data = make_data(args.contexts, args.samples, args.seed, block, tuple(args.tasks))
    t0 = time.time()
    stats = {}
    if args.engine == "reference":
        model = load_model(args.checkpoint, args.device, args.seed)
        rows, stats = eval_reference(model, data, args.methods, args.ks, args.sink, args.local, args.page_size,
                                     args.batch, log, args.baseline_ks)
    else:
        rows = eval_sglang(data, args.methods, args.ks, args, generate, log)
        if args.recall_from:
            with open(args.recall_from) as f:
                log(f"recall of {merge_recall(rows, json.load(f)['rows'])} rows from {args.recall_from}")
    result = {
        "note": RANDOM_NOTE if args.checkpoint == "random" else None,
        "config": {"engine": args.engine, "checkpoint": args.checkpoint, "contexts": args.contexts,
                   "methods": args.methods, "ks": args.ks, "baseline_ks": args.baseline_ks or args.ks, "samples": args.samples, "tasks": args.tasks,
                   "seed": args.seed, "sink": args.sink, "local": args.local, "quest_page_size": args.page_size,
                   "prompt_lengths": {str(c): int(p.shape[1]) for c, (p, _, _) in data.items()},
                   "schedule": "FixedSteps, ANSWER_LEN steps" if args.engine == "reference" else args.sglang_algorithm,
                   "recall": "set recall vs the per-step oracle top-k (outside sinks/local), later steps; "
                             "mass_recall: its attention-mass share; mass_captured: share of all prefix mass"},
        "environment": environment(args),
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
        "statistics": {"source": "exact attention, step 0 of the answer block; keys of the dicts are k",
                       "per_context": stats},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if not args.no_plot:
        plot(result, os.path.splitext(args.out)[0] + ".png")
    if result["note"]:
        log(result["note"])
    return result


if __name__ == "__main__":
    main()
