"""How many steps does the tiny block-diffusion model need before it learns key -> value retrieval?

Ten-minute training runs at 512-8K contexts never left the loss plateau near ln(#values in context)
(benchmarks/results/raw/train_sweep*): the model learned which values are present but not which one a key
names. This probe trains many small variants at once on short contexts, each for a fixed wall-clock budget,
and records the loss curve and held-out exact match, so the recipe for the shipped checkpoint is chosen from
measurements rather than guessed.

    python -m training.retrieval_probe --grid default --minutes 4 --out probe.json   # GPU, variants in parallel
    python -m training.retrieval_probe --config '{"pairs": [1, 2]}' --steps 50 --device cpu --out one.json

Data: either `kv` (BOS, then `pairs` entries KEY k.. VALUE v1..v4, then `queries` question/answer groups)
or `tasks` (training.tasks at `context` tokens, the shipped task mix). `pairs` is a curriculum: it moves to
the next count once held-out exact match reaches `advance_at`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch

from . import tasks
from .model import TinyConfig, TinySDAR
from .train import answer_block_logits, loss_on_queries, multi_query_batch

DEFAULTS = dict(data="kv", pairs=[2], key_len=1, queries=4, batch=128, layers=4, hidden=128, heads=4, kv_heads=2,
                head_dim=32, rope_theta=1e6, lr=3e-3, weight_decay=0.01, advance_at=0.9, context=64,
                task_names=["needle", "recall"], seed=0)

# Each variant changes one or two things against `base`, so a difference in steps-to-learn has one cause.
GRIDS = {
    "default": {
        "base": {},
        "layers2": {"layers": 2},
        "hidden256": {"hidden": 256, "head_dim": 64, "lr": 1e-3},
        "theta1e4": {"rope_theta": 1e4},
        "heads8": {"heads": 8, "kv_heads": 4, "head_dim": 32},
        "pairs8": {"pairs": [8]},
        "curriculum": {"pairs": [1, 2, 4, 8, 16]},
        "curriculum_key2": {"pairs": [1, 2, 4, 8, 16], "key_len": 2},
        "lr1e3": {"lr": 1e-3},
        "tasks64": {"data": "tasks", "context": 64, "hidden": 256, "head_dim": 64, "lr": 1e-3},
        "tasks64_theta1e4": {"data": "tasks", "context": 64, "hidden": 256, "head_dim": 64, "lr": 1e-3,
                             "rope_theta": 1e4},
        "curriculum_key2_h256": {"pairs": [1, 2, 4, 8, 16], "key_len": 2, "hidden": 256, "head_dim": 64,
                                 "lr": 1e-3},
    },
}


def kv_batch(rng: random.Random, n: int, pairs: int, key_len: int, queries: int):
    """[N, L] sequences, answer-block starts [m] and answers [N, m, 4], in train.loss_on_queries' layout."""
    seqs, answers = [], []
    for _ in range(n):
        keys = tasks._distinct(rng, tasks.KEYS, pairs, key_len)
        values = tasks._values(rng, keys)
        body = [tasks.BOS]
        for k, v in zip(keys, values):
            body += [tasks.KEY, *k, tasks.VALUE, *v]
        body += [tasks.FILLER[0]] * (-len(body) % tasks.ANSWER_LEN)
        asked = [rng.randrange(pairs) for _ in range(queries)]
        seq = list(body)
        for i in asked:
            seq += tasks.query_group(keys[i]) + list(values[i])
        seqs.append(seq)
        answers.append([list(values[i]) for i in asked])
    starts = torch.arange(queries) * 2 * tasks.ANSWER_LEN + len(body) + tasks.ANSWER_LEN
    return torch.tensor(seqs), starts, torch.tensor(answers)


def make_batch(cfg: dict, rng: random.Random, n: int, pairs: int):
    if cfg["data"] == "kv":
        return kv_batch(rng, n, pairs, cfg["key_len"], cfg["queries"])
    return multi_query_batch(rng, n, cfg["context"], 4, cfg["queries"], tuple(cfg["task_names"]))


@torch.no_grad()
def exact_match(model, cfg: dict, pairs: int, device: str, n: int = 256) -> float:
    """Share of held-out questions whose 4 answer tokens are all the argmax of the all-[MASK] block (the
    first denoising step alone: the hardest case, no answer token revealed)."""
    seqs, starts, answers = make_batch(cfg, random.Random(10_000 + pairs), n, pairs)
    seqs, answers = seqs.to(device), answers.to(device)
    model.eval()
    logits = answer_block_logits(model, seqs, starts, torch.full_like(answers, tasks.MASK))
    model.train()
    return float((logits.argmax(-1) == answers).all(-1).float().mean())


def run_one(cfg: dict, minutes: float, steps: int, device: str) -> dict:
    cfg = {**DEFAULTS, **cfg}
    torch.manual_seed(cfg["seed"])
    mc = TinyConfig(hidden_size=cfg["hidden"], intermediate_size=3 * cfg["hidden"], num_hidden_layers=cfg["layers"],
                    num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                    rope_theta=cfg["rope_theta"])
    model = TinySDAR(mc).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    rng, gen = random.Random(cfg["seed"]), torch.Generator().manual_seed(cfg["seed"])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    stage, curve, reached, start = 0, [], {}, time.time()
    for step in range(steps):
        if time.time() - start > minutes * 60:
            break
        pairs = cfg["pairs"][stage]
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * min(1.0, (step + 1) / 100)
        seqs, starts, answers = make_batch(cfg, rng, cfg["batch"], pairs)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_on_queries(model, seqs.to(device), starts, answers.to(device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                acc = exact_match(model, cfg, pairs, device)
            curve.append({"step": step, "s": round(time.time() - start, 1), "pairs": pairs,
                          "loss": round(loss.item(), 4), "exact": round(acc, 4)})
            print(json.dumps(curve[-1]), flush=True)
            if acc >= cfg["advance_at"] and str(pairs) not in reached:
                reached[str(pairs)] = step
                stage = min(stage + 1, len(cfg["pairs"]) - 1)
    return {"config": cfg, "steps_run": step + 1, "steps_to_learn": reached, "curve": curve}


def run_grid(name: str, minutes: float, steps: int, device: str, out: str) -> dict:
    """Every variant of GRIDS[name] in its own process at once (each is far too small to fill the GPU)."""
    os.makedirs(out + ".d", exist_ok=True)
    procs = {}
    for tag, cfg in GRIDS[name].items():
        path = os.path.join(out + ".d", tag + ".json")
        log = open(path + ".log", "w")
        procs[tag] = (subprocess.Popen([sys.executable, "-m", "training.retrieval_probe", "--config", json.dumps(cfg),
                                        "--minutes", str(minutes), "--steps", str(steps), "--device", device,
                                        "--out", path], stdout=log, stderr=subprocess.STDOUT), path)
    results = {}
    for tag, (proc, path) in procs.items():
        proc.wait()
        results[tag] = json.load(open(path)) if proc.returncode == 0 else {"error": f"rc={proc.returncode}"}
    print(f"{'variant':<24}{'steps':>7}  steps to reach exact >= advance_at, per pair count; last exact")
    for tag, r in results.items():
        last = r.get("curve", [{}])[-1] if r.get("curve") else {}
        print(f"{tag:<24}{r.get('steps_run', 0):>7}  {r.get('steps_to_learn', r.get('error'))}  "
              f"pairs={last.get('pairs')} exact={last.get('exact')} loss={last.get('loss')}")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=sorted(GRIDS))
    ap.add_argument("--config", default="{}", help="JSON overrides of the probe defaults (one run)")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.grid:
        result = {"grid": args.grid, "minutes": args.minutes, "device": torch.cuda.get_device_name()
                  if args.device.startswith("cuda") else "cpu",
                  "runs": run_grid(args.grid, args.minutes, args.steps, args.device, args.out)}
    else:
        result = run_one(json.loads(args.config), args.minutes, args.steps, args.device)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
