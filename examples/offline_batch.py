"""Offline batch generation with `sgl.Engine` and `--attention-backend mage`: a progress bar, then a summary.

    python examples/offline_batch.py                       # tiny dummy-weight SDAR, 64 prompts of 1K-4K tokens
    python examples/offline_batch.py --model-path M --num-prompts 256 --prompt-len 8192 32768 --mage-k 512

Prompts are random token ids (no tokenizer is needed); pass --model-path for a real checkpoint. Requests
are submitted in waves of --wave (SGLang batches up to --max-running-requests of them), so the bar moves
as waves finish. Without a CUDA GPU it runs MAGE's CPU reference demo instead (sglang_mage.demo).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Summary:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    error_messages: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def table(self) -> str:
        rows = [("requests", self.requests), ("errors", self.errors), ("prompt tokens", self.prompt_tokens),
                ("generated tokens", self.generated_tokens), ("wall seconds", f"{self.seconds:.2f}"),
                ("generated tokens / s", f"{self.tokens_per_s:.1f}")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def make_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: tuple[int, int] = (100, 150000)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_batch(engine, prompts: list[list[int]], max_new_tokens: int, wave: int, progress=None) -> Summary:
    """Generate for every prompt in waves; an exception fails its wave's requests, not the run."""
    summary = Summary()
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    start = time.perf_counter()
    for i in range(0, len(prompts), wave):
        chunk = prompts[i:i + wave]
        try:
            outs = engine.generate(input_ids=chunk, sampling_params=params)
            summary.generated_tokens += sum(len(o["output_ids"]) for o in outs)
        except Exception as e:  # noqa: BLE001 - counted and reported in the summary
            summary.errors += len(chunk)
            summary.error_messages.append(f"{type(e).__name__}: {e}"[:300])
        summary.requests += len(chunk)
        summary.prompt_tokens += sum(len(p) for p in chunk)
        if progress is not None:
            progress.update(len(chunk))
    summary.seconds = time.perf_counter() - start
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="default: a tiny dummy-weight SDAR written to a temp dir")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[1024, 4096], metavar=("MIN", "MAX"))
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--wave", type=int, default=16, help="requests submitted per generate() call")
    ap.add_argument("--max-running-requests", type=int, default=8)
    ap.add_argument("--mage-k", type=int, default=512)
    ap.add_argument("--dllm-algorithm", default="LowConfidence")
    ap.add_argument("--mem-fraction-static", type=float, default=None, help="SGLang's; default: SGLang's own")
    ap.add_argument("--max-total-tokens", type=int, default=None, help="fixed KV pool size (tokens)")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU here: running the CPU reference path (python -m sglang_mage.demo).")
        from sglang_mage import demo

        demo.main([])
        return 0
    import sglang as sgl
    from tqdm import tqdm

    model_path = args.model_path
    dummy = model_path is None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_model import prompt_token_range, write

    token_range = prompt_token_range(model_path)
    if dummy:
        model_path = write(os.path.join(tempfile.mkdtemp(), "tiny-sdar"))
    engine = sgl.Engine(
        model_path=model_path, load_format="dummy" if dummy else "auto", skip_tokenizer_init=True,
        dllm_algorithm=args.dllm_algorithm, attention_backend="mage", mage_k=args.mage_k,
        max_running_requests=args.max_running_requests, log_level="warning",
        **{k: v for k, v in (("mem_fraction_static", args.mem_fraction_static),
                             ("max_total_tokens", args.max_total_tokens)) if v is not None},
    )
    try:
        prompts = make_prompts(args.num_prompts, *args.prompt_len, vocab=token_range)
        with tqdm(total=len(prompts), unit="req", desc="generating") as bar:
            summary = run_batch(engine, prompts, args.max_new_tokens, args.wave, bar)
    finally:
        engine.shutdown()
    print(summary.table())
    for msg in summary.error_messages:
        print("error:", msg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(summary), "tokens_per_s": summary.tokens_per_s, "config": vars(args)}, f, indent=1)
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
