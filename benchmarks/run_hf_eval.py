"""Needle-in-a-haystack retrieval for real Hugging Face block-diffusion checkpoints, `mage` vs `flashinfer`,
served through SGLang's dLLM engine (GPU).

For every (length, depth) a prompt of `length` tokens (the checkpoint's own tokenizer) holds a filler
haystack, one needle sentence "The special magic number for <key> is <7 digits>." at relative depth `depth`
(0 = start, 1 = end, placed at a sentence boundary), and the question. The model generates
`--max-new-tokens` greedily; a sample scores 1 when the needle's number appears among the numbers of the
decoded output. Every backend sees the same token ids (the prompt is tokenized here and sent as input_ids,
the output is decoded here), so differences come from attention only.

    python benchmarks/run_hf_eval.py --model-path /models/SDAR-1.7B-Chat \
        --lengths 4096 16384 32768 --depths 0 0.25 0.5 0.75 1 --samples 4 \
        --backends flashinfer mage --ks 256 1024 --chat-template \
        --out benchmarks/results/niah_sdar.json

Options: --dllm-algorithm (LowConfidence), --haystack-file (plain text to use as haystack; a built-in
neutral text otherwise), --tokenizer (when the model dir lacks one), --mage-selector (mean), and the
engine's --context-length (default: longest length + 256). Writes JSON rows {backend, selector, k, length,
depth, n, accuracy} with config and environment. A LongBench runner would reuse run_backend(); it is not
included (its data must be downloaded by the user).

Tested on the CPU (tests/benchmarks/test_run_hf_eval.py) with a stand-in tokenizer and a stand-in engine:
prompt construction (exact length, needle depth, question last) and scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import time

KEYS = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Recife", "Tromso", "Windhoek", "Kraków",
        "Valparaiso", "Ushuaia", "Mandalay", "Zanzibar", "Bergen", "Tbilisi")
HAYSTACK = (
    "The river bends twice before it reaches the old mill, and the path beside it is lined with birch trees. "
    "In spring the meadow floods, and the farmers move their sheep to the higher pastures near the ridge. "
    "Travellers often stop at the inn, where the innkeeper serves bread, cheese and a thin vegetable soup. "
    "The village keeps a small library with a few hundred books, most of them donated by former teachers. "
    "On market days the square fills with stalls selling apples, wool, honey and hand-carved spoons. "
    "A narrow bridge crosses the stream below the church, and children throw sticks from it to watch them race. "
    "The winters are long, and the lamps in the windows stay lit from late afternoon until morning. "
    "Every autumn the villagers gather to repair the stone walls that divide the fields along the valley. "
)


def needle_sentence(key: str, value: str) -> str:
    return f" The special magic number for {key} is {value}. "


def question(key: str) -> str:
    return f"\nWhat is the special magic number for {key} mentioned in the text above? The special magic number for {key} is"


def build_prompt(tokenizer, length: int, depth: float, key: str, value: str, haystack: str = HAYSTACK,
                 chat_template: bool = False) -> tuple[list[int], int]:
    """Token ids of exactly `length` tokens (plain prompt) and the token offset of the needle.

    The haystack is repeated and cut so that haystack + needle + question fill `length`; the needle goes at
    the sentence boundary (". ") nearest to `depth` of the haystack's tokens. With chat_template the same
    text is the user turn of the tokenizer's chat template (the length then includes the template)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (got {depth})")
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    needle_ids, question_ids = enc(needle_sentence(key, value)), enc(question(key))
    overhead = 0
    if chat_template:
        wrapped = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=True,
                                                add_generation_prompt=True)
        overhead = len(wrapped) - len(enc("X"))
    budget = length - len(needle_ids) - len(question_ids) - overhead
    if budget < 1:
        raise ValueError(f"length {length} leaves no room for the haystack")
    unit = enc(haystack)
    hay = (unit * (budget // max(1, len(unit)) + 1))[:budget]
    # Sentence boundaries: token positions right after a token that decodes to a string ending the sentence.
    bounds = [0] + [i + 1 for i, t in enumerate(hay) if tokenizer.decode([t]).rstrip().endswith(".")] + [len(hay)]
    at = min(bounds, key=lambda b: abs(b - depth * len(hay)))
    ids = hay[:at] + needle_ids + hay[at:] + question_ids
    if chat_template:
        text = tokenizer.decode(ids)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True)
    return list(ids), at


def score(output_text: str, value: str) -> bool:
    """The needle's number appears among the output's numbers (digit runs)."""
    return value in re.findall(r"\d+", output_text)


def make_cases(tokenizer, lengths, depths, samples: int, seed: int, haystack: str = HAYSTACK,
               chat_template: bool = False) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for depth in depths:
            for i in range(samples):
                key, value = rng.choice(KEYS), str(rng.randrange(1_000_000, 10_000_000))
                ids, at = build_prompt(tokenizer, length, depth, key, value, haystack, chat_template)
                cases.append({"length": length, "depth": depth, "key": key, "value": value, "input_ids": ids,
                              "needle_at": at})
    return cases


def engine_kwargs(args, backend: str, k: int | None) -> dict:
    kw = dict(model_path=args.model_path, skip_tokenizer_init=True, dllm_algorithm=args.dllm_algorithm,
              attention_backend=backend, context_length=args.context_length or max(args.lengths) + 256,
              disable_cuda_graph=True, mem_fraction_static=0.8, random_seed=0, log_level="warning",
              trust_remote_code=True)
    if backend == "mage":
        kw.update(mage_k=int(k), mage_selector=args.mage_selector, max_running_requests=args.max_running_requests)
    return kw


def generate_sglang(kwargs: dict, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """GPU only: one sgl.Engine for one backend configuration."""
    import sglang as sgl

    engine = sgl.Engine(**kwargs)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": max_new_tokens,
                                                                   "temperature": 0.0})
        return [list(o["output_ids"]) for o in outs]
    finally:
        engine.shutdown()


def run_backend(kwargs, cases, tokenizer, max_new_tokens, generate=generate_sglang) -> list[dict]:
    """Rows {length, depth, n, accuracy} of one engine configuration over `cases`."""
    outs = generate(kwargs, [c["input_ids"] for c in cases], max_new_tokens)
    hits: dict[tuple, list[bool]] = {}
    for case, out in zip(cases, outs):
        hits.setdefault((case["length"], case["depth"]), []).append(score(tokenizer.decode(out), case["value"]))
    return [{"length": length, "depth": depth, "n": len(h), "accuracy": round(sum(h) / len(h), 4)}
            for (length, depth), h in hits.items()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--tokenizer", default=None, help="default: --model-path")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--samples", type=int, default=4, help="samples per (length, depth)")
    ap.add_argument("--backends", nargs="+", choices=("flashinfer", "mage"), default=["flashinfer", "mage"])
    ap.add_argument("--ks", type=int, nargs="+", default=[512], help="mage budgets")
    ap.add_argument("--mage-selector", default="mean")
    ap.add_argument("--dllm-algorithm", default="LowConfidence")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-running-requests", type=int, default=8)
    ap.add_argument("--context-length", type=int, default=None)
    ap.add_argument("--haystack-file", default=None)
    ap.add_argument("--chat-template", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "niah.json"))
    return ap.parse_args(argv)


def main(argv=None, tokenizer=None, generate=generate_sglang, log=print) -> dict:
    args = parse_args(argv)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model_path, trust_remote_code=True)
    haystack = HAYSTACK
    if args.haystack_file:
        with open(args.haystack_file) as f:
            haystack = f.read()
    cases = make_cases(tokenizer, args.lengths, args.depths, args.samples, args.seed, haystack, args.chat_template)
    rows = []
    for backend in args.backends:
        for k in (args.ks if backend == "mage" else [None]):
            t0 = time.time()
            for r in run_backend(engine_kwargs(args, backend, k), cases, tokenizer, args.max_new_tokens, generate):
                rows.append({"backend": backend, "selector": args.mage_selector if backend == "mage" else None,
                             "k": k, **r})
                log(f"{backend} k={k} len {r['length']} depth {r['depth']}: {r['accuracy']:.2f}")
            log(f"{backend} k={k}: {time.time() - t0:.1f}s")
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"},
              "environment": {"python": platform.python_version(), "platform": platform.platform()},
              "prompt_lengths": sorted({len(c["input_ids"]) for c in cases}), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
