"""Train the tiny block-diffusion model on the synthetic long-context tasks; save an SGLang-loadable checkpoint.

    python -m training.train --out checkpoints/tiny-sdar-recall --minutes 10            # GPU
    python -m training.train --out /tmp/t --steps 20 --context 64 --device cpu   # smoke

Objective: the block-diffusion loss on the answer block. Prompts are padded to a multiple of the block size,
so the answer fills exactly one block, as at inference (SGLang appends B [MASK] tokens after the prompt).
Each step masks every answer token with probability t ~ U(0.1, 1) (at least one), and the loss is the
cross-entropy on the masked positions, with block-causal attention over prompt + noisy block.

At contexts up to --body-loss-max-context the loss covers every block of the sequence, as in SDAR's own
training (`loss_on_sequence`), not only the answers: that is what teaches the body's value tokens to read
their keys (see training/tasks.py), the half of the retrieval circuit that answer-only training never formed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from .model import TinyConfig, TinySDAR, block_causal_mask, training_mask
from .tasks import ALL_TASKS, ANSWER_LEN, BOS, FILLER, MASK, QUERY, TASKS, make_sample, query_group


def pick_task(rng: random.Random, tasks, weights=None) -> str:
    """A task for the next sample; uniform unless `weights` (aligned with `tasks`). The uniform draw stays
    rng.choice, so runs without weights reproduce the earlier checkpoints' data streams."""
    return rng.choices(tasks, weights)[0] if weights else rng.choice(tasks)


def padded_batch(rng: random.Random, batch: int, context_len: int, block: int, tasks=TASKS):
    """[N, L] prompts (left-padded with filler after BOS to a common multiple of the block) and [N, 4] answers."""
    samples = [make_sample(pick_task(rng, tasks), context_len, rng) for _ in range(batch)]
    length = max(len(s.prompt) for s in samples)
    length = -(-length // block) * block
    prompts = [[s.prompt[0], *(rng.choice(FILLER) for _ in range(length - len(s.prompt))), *s.prompt[1:]]
               for s in samples]
    return torch.tensor(prompts), torch.tensor([s.answer for s in samples]), [s.task for s in samples]


def multi_query_batch(rng: random.Random, batch: int, context_len: int, block: int, queries: int, tasks=TASKS,
                      task_weights=None, zero_hop: bool = False):
    """Sequences that ask up to `queries` questions of one body: [BOS, filler..., body, (Q_1, A_1), ...,
    (Q_m, A_m)], each Q a 4-token QUERY key ANSWER group and each A its 4-token answer, so every A fills one
    block; the first group is exactly the single question an evaluation prompt ends with. Returns clean
    sequences [N, L], the answer blocks' start positions [m] (shared by the batch) and the answers [N, m, 4].
    `zero_hop` adds each sample's zero_hop_queries to the questions it may be asked."""
    samples = [make_sample(pick_task(rng, tasks, task_weights), context_len, rng) for _ in range(batch)]
    if zero_hop:
        samples = [dataclasses.replace(s, queries=s.queries + s.zero_hop_queries) for s in samples]
    m = max(1, min(queries, *(len(s.queries) for s in samples)))
    bodies = [s.prompt[:s.prompt.index(QUERY) - (1 if len(s.queries[0][0]) == 1 else 0)] for s in samples]
    prefix = -(-max(map(len, bodies)) // block) * block
    seqs, answers = [], []
    for s, body in zip(samples, bodies):
        asked = rng.sample(s.queries, m)
        seq = [body[0], *(rng.choice(FILLER) for _ in range(prefix - len(body))), *body[1:]]
        for key, value in asked:
            seq += query_group(key) + list(value)
        seqs.append(seq)
        answers.append([list(v) for _, v in asked])
    starts = torch.arange(m) * 2 * ANSWER_LEN + prefix + ANSWER_LEN
    return torch.tensor(seqs), starts, torch.tensor(answers)


def multi_query_mask(length: int, starts: torch.Tensor, block: int, device=None) -> torch.Tensor:
    """[L + 4m, L + 4m] over [clean sequence | noisy answer blocks]: clean tokens attend block-causally among
    clean tokens; noisy block i sees the clean tokens before its answer's block and itself, which is what the
    model sees at inference when it denoises that block after that prefix."""
    m = starts.numel()
    total = length + m * ANSWER_LEN
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:length, :length] = block_causal_mask(length, block, device)
    for i, start in enumerate(starts.tolist()):
        rows = slice(length + i * ANSWER_LEN, length + (i + 1) * ANSWER_LEN)
        mask[rows, :start] = True
        mask[rows, rows] = True
    return mask


def loss_on_queries(model, seqs, starts, answers, rng_t: torch.Generator):
    """Block-diffusion loss on every asked answer block at once (noisy copies appended after the clean
    sequence, with the answers' own positions), cross-entropy on the masked tokens."""
    n, length = seqs.shape
    m = starts.numel()
    t = torch.rand(n, m, 1, generator=rng_t) * 0.9 + 0.1
    masked = torch.rand(n, m, ANSWER_LEN, generator=rng_t) < t
    masked.view(n * m, ANSWER_LEN)[torch.arange(n * m), torch.randint(0, ANSWER_LEN, (n * m,), generator=rng_t)] = True
    masked = masked.to(seqs.device)
    logits = answer_block_logits(model, seqs, starts, torch.where(masked, torch.full_like(answers, MASK), answers))
    return F.cross_entropy(logits.float()[masked], answers[masked])


def answer_block_logits(model, seqs, starts, noisy_answers):
    """Logits [N, m, 4, V] of the noisy answer blocks [N, m, 4], appended after the clean sequences [N, L] at
    their answers' own positions and attending as multi_query_mask says."""
    n, length = seqs.shape
    m = starts.numel()
    ids = torch.cat([seqs, noisy_answers.reshape(n, m * ANSWER_LEN)], 1)
    positions = torch.cat([torch.arange(length), (starts[:, None] + torch.arange(ANSWER_LEN)).view(-1)])
    mask = multi_query_mask(length, starts, model.config.block_size, seqs.device)
    return model(ids, positions.to(seqs.device), mask)[:, length:].view(n, m, ANSWER_LEN, -1)


def sequence_loss_weights(seqs, starts, block: int, rng_t: torch.Generator, answer_weight: float = 4.0):
    """For loss_on_sequence: which tokens of [N, L] are masked (each block with its own t ~ U(0.1, 1)), their
    loss weights (answer blocks at `starts` weigh `answer_weight`; filler and BOS 0: random filler is
    unpredictable, its gradient only noise, so it is never masked), and which positions are answers."""
    n, length = seqs.shape
    t = torch.rand(n, length // block, 1, generator=rng_t) * 0.9 + 0.1
    masked = (torch.rand(n, length // block, block, generator=rng_t) < t).view(n, length).to(seqs.device)
    is_answer = torch.zeros(length, dtype=torch.bool, device=seqs.device)
    for start in starts.tolist():
        is_answer[start:start + ANSWER_LEN] = True
    weight = torch.where(is_answer, answer_weight, 1.0).expand(n, length)
    weight = weight * (((seqs < FILLER.start) | (seqs >= FILLER.stop)) & (seqs != BOS))
    return masked & (weight > 0), weight, is_answer.expand(n, length)


def loss_on_sequence(model, seqs, starts, rng_t: torch.Generator, answer_weight: float = 4.0):
    """The block-diffusion loss on every block of [N, L] clean sequences, the noisy copy beside the clean one
    (model.training_mask: noisy block b sees itself and the clean blocks before b). Returns (loss, the answer
    blocks' own loss, comparable with loss_on_queries)."""
    length = seqs.shape[1]
    block = model.config.block_size
    masked, weight, is_answer = sequence_loss_weights(seqs, starts, block, rng_t, answer_weight)
    noisy = torch.where(masked, torch.full_like(seqs, MASK), seqs)
    positions = torch.arange(length, device=seqs.device).repeat(2)
    logits = model(torch.cat([noisy, seqs], 1), positions, training_mask(length, block, seqs.device))[:, :length]
    ce = F.cross_entropy(logits[masked].float(), seqs[masked], reduction="none")
    w = weight[masked]
    on_answers = is_answer[masked]
    return (ce * w).sum() / w.sum(), ce[on_answers].mean() if on_answers.any() else ce.new_zeros(())


def loss_on_answer_block(model, prompts, answers, rng_t: torch.Generator):
    n, length = prompts.shape
    t = torch.rand(n, 1, generator=rng_t) * 0.9 + 0.1
    masked = torch.rand(n, ANSWER_LEN, generator=rng_t) < t
    masked[torch.arange(n), torch.randint(0, ANSWER_LEN, (n,), generator=rng_t)] = True
    noisy = torch.where(masked.to(answers.device), torch.full_like(answers, MASK), answers)
    ids = torch.cat([prompts, noisy], dim=1)
    total = length + ANSWER_LEN
    block = model.config.block_size
    logits = model(ids, torch.arange(total, device=ids.device), block_causal_mask(total, block, ids.device))
    logits = logits[:, length:].float()
    m = masked.to(ids.device)
    return F.cross_entropy(logits[m], answers[m])


@torch.no_grad()
def decode_answer(model, prompts, on_step=None):
    """Greedy block decoding of the answer block: ANSWER_LEN steps, each unmasking the most confident
    [MASK] (the FixedSteps schedule that the SGLang side runs). `on_step(step)` runs before each forward."""
    from sglang_mage.model_adapters.schedules import fixed_steps_transfer

    n, length = prompts.shape
    block = torch.full((n, ANSWER_LEN), MASK, device=prompts.device)
    total = length + ANSWER_LEN
    mask = block_causal_mask(total, model.config.block_size, prompts.device)
    for step in range(ANSWER_LEN):
        if on_step is not None:
            on_step(step)
        logits = model(torch.cat([prompts, block], 1), torch.arange(total, device=prompts.device), mask)[:, length:]
        logits[..., MASK] = float("-inf")
        block = fixed_steps_transfer(block, logits, MASK, ANSWER_LEN - step)
    return block


def save_checkpoint(model: TinySDAR, out: str, train_args: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(model.config.hf_config(), f, indent=1)
    with open(os.path.join(out, "training_args.json"), "w") as f:
        json.dump(train_args, f, indent=1)


def load_checkpoint(path: str) -> tuple[TinySDAR, TinyConfig]:
    """A checkpoint written by save_checkpoint, as an fp32 TinySDAR in train mode, and its config."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    cfg = TinyConfig(**{k: hf[k] for k in TinyConfig.__dataclass_fields__ if k in hf})
    model = TinySDAR(cfg)
    model.load_state_dict({k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()})
    return model, cfg


def accuracy_by_task(correct: torch.Tensor, task_names) -> dict:
    """{task: share of its samples answered exactly}, `correct` [N] bool in the order of `task_names`."""
    return {t: round(float(correct[[i for i, n in enumerate(task_names) if n == t]].float().mean()), 4)
            for t in sorted(set(task_names))}


def held_out_accuracy(model, contexts, samples: int, block: int, device, seed: int = 12345, tasks=TASKS) -> dict:
    """Exact-match accuracy of greedy block decoding per (context, task) on held-out samples (seeds disjoint
    from training's), exact attention."""
    out = {}
    model.eval()
    for ctx in contexts:
        prompts, answers, names = padded_batch(random.Random(seed + ctx), samples, ctx, block, tuple(tasks))
        got = torch.cat([decode_answer(model, prompts[i:i + 16].to(device)).cpu()
                         for i in range(0, samples, 16)])
        correct = (got == answers).all(-1)
        out[str(ctx)] = {"all": round(float(correct.float().mean()), 4), **accuracy_by_task(correct, names)}
    model.train()
    return out


def parse_stages(text: str) -> list[tuple[float, list[int]]]:
    """'0:64,128;0.5:512,2048' -> [(0.0, [64, 128]), (0.5, [512, 2048])]: from each share of the time budget
    on, contexts are drawn from that stage's list."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        at, _, ctxs = part.partition(":")
        stages.append((float(at), [int(c) for c in ctxs.split(",")]))
    if not stages or stages[0][0] != 0.0 or any(b[0] <= a[0] for a, b in zip(stages, stages[1:])):
        raise ValueError(f"--stages must start at 0 and increase: {text!r}")
    return stages


_PARSED_STAGES: dict[str, list] = {}  # context_for runs per batch, in every data worker


def context_for(step_fraction: float, args, rng: random.Random) -> int:
    """A curriculum over the time budget: a retrieval mechanism forms on short contexts in far fewer tokens,
    then longer ones teach it to reach far. --stages if given, else --warmup-context then --context."""
    if getattr(args, "stages", None):
        stages = _PARSED_STAGES.get(args.stages) or _PARSED_STAGES.setdefault(args.stages, parse_stages(args.stages))
        return rng.choice([c for at, c in stages if at <= step_fraction][-1])
    if step_fraction < args.warmup_fraction:
        return rng.choice(args.warmup_context)
    return rng.choice(args.context)


class BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches, generated in DataLoader worker processes (sample generation is Python and
    would otherwise bound the step rate). Each worker has its own seed; the context follows `context_for` on
    the shared wall clock."""

    def __init__(self, args, block: int, start: float):
        self.args, self.block, self.start = args, block, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.args.seed * 1009 + (info.id + 1 if info else 0))
        budget = self.args.minutes * 60
        while True:
            ctx = context_for((time.time() - self.start) / budget, self.args, rng)
            n = samples_per_step(self.args, ctx)
            if self.args.queries > 1:
                yield (ctx,) + multi_query_batch(rng, n, ctx, self.block, self.args.queries, tuple(self.args.tasks),
                                                 self.args.task_weights, self.args.zero_hop_queries)
            else:
                yield (ctx,) + padded_batch(rng, n, ctx, self.block, tuple(self.args.tasks))[:2]


def samples_per_step(args, ctx: int) -> int:
    if args.tokens_per_step:
        return max(1, args.tokens_per_step // ctx)
    return max(1, args.batch * min(args.context) // ctx)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--warmup-context", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--warmup-fraction", type=float, default=0.0, help="share of the time budget on --warmup-context")
    ap.add_argument("--stages", default="", help="curriculum 'share:ctx,ctx;share:ctx,...' (overrides the warm-up flags)")
    ap.add_argument("--tasks", nargs="+", choices=ALL_TASKS, default=list(TASKS),
                    help="training tasks (also the held-out evaluation's)")
    ap.add_argument("--batch", type=int, default=8, help="samples per step at the shortest context")
    ap.add_argument("--tokens-per-step", type=int, default=0,
                    help="if set, samples per step = tokens-per-step // context (overrides --batch scaling)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--eval-every", type=float, default=0.0, help="seconds between held-out evaluations (0: off)")
    ap.add_argument("--eval-contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--eval-samples", type=int, default=48)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader processes generating batches (0: inline)")
    ap.add_argument("--queries", type=int, default=1,
                    help="questions asked of each training sequence (>1: every answer block is a loss term)")
    ap.add_argument("--body-loss-max-context", type=int, default=0,
                    help="with --queries > 1: at contexts up to this, the loss covers every block (0: answers only)")
    ap.add_argument("--answer-weight", type=float, default=4.0, help="answer blocks' weight in the every-block loss")
    ap.add_argument("--task-weights", type=float, nargs="+", default=None,
                    help="with --queries > 1: sampling weight per --tasks entry (default: uniform)")
    ap.add_argument("--zero-hop-queries", action="store_true",
                    help="with --queries > 1: also ask variable chains' roots by name (training/tasks.variables)")
    ap.add_argument("--intermediate", type=int, default=0, help="MLP width (0: 3 x --hidden)")
    ap.add_argument("--init-from", default=None,
                    help="start from this checkpoint's weights and config (its --hidden/--layers/--intermediate win)")
    args = ap.parse_args(argv)
    if args.task_weights is not None and (len(args.task_weights) != len(args.tasks)
                                          or min(args.task_weights) < 0 or sum(args.task_weights) <= 0):
        ap.error(f"--task-weights needs {len(args.tasks)} non-negative weights, one per --tasks entry, not all 0")
    if args.stages:
        parse_stages(args.stages)  # fail before any work
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    cfg = TinyConfig(hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
                     num_hidden_layers=args.layers)
    if args.init_from:
        model, cfg = load_checkpoint(args.init_from)
        model = model.to(args.device)
    else:
        model = TinySDAR(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    budget = args.minutes * 60
    start, history, evals, last_eval = time.time(), [], [], time.time()
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "train_log.jsonl"), "w")
    stream = iter(torch.utils.data.DataLoader(BatchStream(args, cfg.block_size, start), batch_size=None,
                                              num_workers=args.workers, prefetch_factor=4 if args.workers else None))
    def evaluate(step: int) -> None:
        with torch.autocast(device_type=args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            acc = held_out_accuracy(model, args.eval_contexts, args.eval_samples, cfg.block_size, args.device,
                                    tasks=args.tasks)
        evals.append({"step": step, "s": round(time.time() - start, 1), "accuracy": acc})
        print("EVAL " + json.dumps(evals[-1]), flush=True)
        log.write(json.dumps(evals[-1]) + "\n")
        log.flush()

    for step in range(args.steps):
        elapsed = time.time() - start
        if elapsed > budget:
            break
        # Linear warm-up, then cosine decay over the time budget (the step count is not known in advance).
        lr = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))
        for group in opt.param_groups:
            group["lr"] = lr
        ctx, *data = next(stream)
        n = data[0].shape[0]
        with torch.autocast(device_type=args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            if args.queries > 1 and ctx <= args.body_loss_max_context:
                loss, answer_loss = loss_on_sequence(model, data[0].to(args.device), data[1], gen, args.answer_weight)
            elif args.queries > 1:
                seqs, starts, answers = data
                loss = answer_loss = loss_on_queries(model, seqs.to(args.device), starts, answers.to(args.device), gen)
            else:
                loss = answer_loss = loss_on_answer_block(model, data[0].to(args.device), data[1].to(args.device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(answer_loss.item())
        if step % 50 == 0:
            print(f"step {step} ctx {ctx} n {n} answer loss {answer_loss.item():.3f} (objective {loss.item():.3f}) "
                  f"lr {lr:.2e} ({elapsed:.0f}s)", flush=True)
            log.write(json.dumps({"step": step, "ctx": ctx, "loss": round(answer_loss.item(), 4),
                                  "objective": round(loss.item(), 4), "s": round(elapsed, 1)}) + "\n")
        if args.eval_every and time.time() - last_eval > args.eval_every:
            evaluate(step)
            last_eval = time.time()
    if args.eval_every and history:  # the shipped weights' own figures, not the last periodic ones
        evaluate(len(history) - 1)
    log.close()
    train_args = {**vars(args), "config": dataclasses.asdict(cfg), "steps_run": len(history),
                  "seconds": round(time.time() - start, 1), "final_loss": history[-1] if history else None,
                  "evals": evals}
    save_checkpoint(model, args.out, train_args)
    return {"model": model, "history": history, "train_args": train_args}


if __name__ == "__main__":
    main()
