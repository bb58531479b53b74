"""Serving robustness of `--attention-backend mage` through SGLang's HTTP server (GPU).

Starts `launch_server` (tiny dummy-weight SDAR unless --model-path) with $SGLANG_MAGE_STATS_PATH, or uses
a running one (--server-url, --stats-path: tools/gpu_run.sh serve-robust), then:
1. load: --requests requests of mixed prompt lengths at --concurrency, counting errors; afterwards the
   index cache's occupancy (slots still holding MAGE indices) must be back to 0;
2. abort: long requests aborted mid-generation through /abort_request free their cache entries;
3. determinism: the same prompts twice give identical greedy output, one at a time (required) and all at
   once (reported: batch composition may differ between the passes; see determinism_check);
4. soak: --soak-seconds of mixed load with random aborts, counting errors.
Writes benchmarks/results/robustness.json after every phase: {requests, concurrency, errors,
cache_slots_after, abort_freed, deterministic, soak_seconds, soak_errors, phases_done} plus config (with
the server's startup seconds) and details; a run cut short keeps the phases it finished.

Usage: python benchmarks/robustness.py [--requests 1000] [--concurrency 16] [--soak-seconds 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from results_io import write_json  # noqa: E402


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


# Token ids prompts draw from when no checkpoint says otherwise (a Qwen-sized vocabulary); main() passes
# a checkpoint's own range (examples/tiny_model.prompt_token_range) to every phase as `tokens`.
DEFAULT_PROMPT_TOKENS = (100, 150000)


def prompt(rng: random.Random, lo: int, hi: int, tokens: tuple[int, int] = DEFAULT_PROMPT_TOKENS) -> list[int]:
    return [rng.randrange(*tokens) for _ in range(rng.randint(lo, hi))]


class Client:
    def __init__(self, base: str):
        self.base = base

    def generate(self, ids: list[int], max_new: int, rid: str | None = None) -> dict:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0}}
        if rid:
            body["rid"] = rid
        return post(f"{self.base}/generate", body)

    def abort(self, rid: str) -> None:
        post(f"{self.base}/abort_request", {"rid": rid}, timeout=30)


def run_load(client: Client, n: int, concurrency: int, lens: tuple[int, int], seed: int, progress=None,
             tokens: tuple[int, int] = DEFAULT_PROMPT_TOKENS):
    """n requests at the given concurrency; returns (errors, messages)."""
    rng = random.Random(seed)
    jobs = [(prompt(rng, *lens, tokens), rng.choice([4, 16, 33])) for _ in range(n)]
    errors, messages = 0, []

    def one(job):
        try:
            out = client.generate(*job)
            return None if "output_ids" in out else f"no output_ids: {str(out)[:200]}"
        except Exception as e:  # noqa: BLE001 - every failure is counted
            return f"{type(e).__name__}: {e}"[:300]

    with ThreadPoolExecutor(concurrency) as pool:
        for result in pool.map(one, jobs):
            if result is not None:
                errors += 1
                messages.append(result)
            if progress is not None:
                progress.update(1)
    return errors, messages[:20]


def occupancy(stats_path: str) -> int | None:
    try:
        with open(stats_path) as f:
            return json.load(f)["occupancy"]
    except (OSError, ValueError, KeyError):
        return None


def abort_check(client: Client, stats_path: str, n: int = 4, delay: float = 1.5,
                tokens: tuple[int, int] = DEFAULT_PROMPT_TOKENS) -> dict:
    """Start n long generations, abort each mid-way; the cache must hold no entry afterwards."""
    rng = random.Random(7)
    rids = [f"abort-{uuid.uuid4().hex}" for _ in range(n)]
    results: dict[str, object] = {}

    def long_request(rid):
        try:
            results[rid] = client.generate(prompt(rng, 3000, 4000, tokens), 2048, rid=rid)
        except Exception as e:  # noqa: BLE001
            results[rid] = repr(e)

    threads = [threading.Thread(target=long_request, args=(rid,)) for rid in rids]
    for t in threads:
        t.start()
    time.sleep(delay)
    for rid in rids:
        client.abort(rid)
    for t in threads:
        t.join(timeout=120)
    time.sleep(1.0)
    reasons = [str((r.get("meta_info", {}) if isinstance(r, dict) else {}).get("finish_reason", r))[:120]
               for r in results.values()]
    occ = occupancy(stats_path)
    return {"aborted": n, "finish_reasons": reasons, "occupancy_after": occ, "abort_freed": occ == 0}


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = [x == y for x, y in zip(a, b)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    detail = None
    if first is not None:
        x, y = a[first], b[first]
        pos = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        detail = {"prompt": first, "first_diff_token": pos, "a": x[pos:pos + 8], "b": y[pos:pos + 8]}
    return {"identical": sum(same), "of": len(same), "first_mismatch": detail}


def determinism_check(client: Client, n: int, max_new: int = 33,
                      tokens: tuple[int, int] = DEFAULT_PROMPT_TOKENS) -> dict:
    """The same n prompts, greedy, twice one at a time, then twice n at once.

    One at a time, both passes run the same batch (one request, its prompt from the radix cache the second
    time): outputs must be identical, and `sequential_identical` is the figure `deterministic` reports.
    n at once, the scheduler may group and split the requests differently in the two passes; batch size
    changes the reduction order inside GEMM and attention kernels, so near-tied logits can flip (SGLang's
    own backends are batch-variant unless run with --enable-deterministic-inference). That pass is reported,
    not required: `concurrent` and `concurrent_vs_sequential` count the prompts whose outputs match.
    """
    rng = random.Random(3)
    prompts = [prompt(rng, 100, 2000, tokens) for _ in range(n)]

    def gen(p):
        return client.generate(p, max_new)["output_ids"]

    seq = [[gen(p) for p in prompts] for _ in range(2)]
    with ThreadPoolExecutor(n) as pool:
        con = [list(pool.map(gen, prompts)) for _ in range(2)]
    sequential = _agreement(*seq)
    return {"sequential": sequential, "sequential_identical": sequential["identical"] == n,
            "concurrent": _agreement(*con), "concurrent_vs_sequential": _agreement(seq[0], con[0])}


def soak(client: Client, seconds: float, concurrency: int, seed: int, on_progress=None,
         every: float = 15.0, tokens: tuple[int, int] = DEFAULT_PROMPT_TOKENS) -> tuple[int, int]:
    """Mixed load for `seconds`; about one request in ten is aborted shortly after it starts.
    `on_progress(seconds_done, requests, errors)` runs every `every` seconds, so a soak cut short still
    leaves how far it got with how many errors."""
    rng = random.Random(seed)
    start = time.time()
    deadline = start + seconds
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()

    def worker(wid: int):
        wrng = random.Random(seed * 100 + wid)
        while time.time() < deadline:
            ids, rid = prompt(wrng, 16, 6000, tokens), f"soak-{uuid.uuid4().hex}"
            abort = wrng.random() < 0.1
            if abort:
                threading.Timer(0.3, lambda: _quiet(client.abort, rid)).start()
            try:
                out = client.generate(ids, wrng.choice([4, 16, 64]), rid=rid)
                ok = "output_ids" in out
            except Exception:  # noqa: BLE001
                ok = abort  # an aborted request may end in an HTTP error; that is not a failure
            with lock:
                counts["requests"] += 1
                counts["errors"] += 0 if ok else 1

    del rng
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    next_report = start + every
    while any(t.is_alive() for t in threads):
        time.sleep(0.1)
        if on_progress is not None and time.time() >= next_report:
            next_report += every
            with lock:
                on_progress(round(time.time() - start, 1), counts["requests"], counts["errors"])
    return counts["requests"], counts["errors"]


def _quiet(fn, *args):
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - aborting a request that already finished is fine
        pass


def start_server(model_path: str | None, port: int, stats_path: str, log_path: str, extra: list[str]):
    if model_path is None:
        sys.path.insert(0, os.path.join(HERE, "..", "examples"))
        from tiny_model import write

        model_path = write(os.path.join(tempfile.mkdtemp(), "tiny-sdar"))
        extra = ["--load-format", "dummy", "--skip-tokenizer-init", *extra]
    elif not any(os.path.exists(os.path.join(model_path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        extra = ["--skip-tokenizer-init", *extra]  # the shipped checkpoint speaks token ids only
    env = dict(os.environ, SGLANG_MAGE_STATS_PATH=stats_path)
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--port", str(port),
           "--dllm-algorithm", "LowConfidence", "--attention-backend", "mage", "--mage-k", "64",
           "--mage-min-context", "256", *extra]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(900):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log_path}")
            time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not become healthy in 15 minutes")


def run_phases(client, args, stats_path: str, save) -> dict:
    """The four phases in order; `save(result)` after each, so a run cut off (by the device's time limit,
    say) keeps the figures of every phase it finished. `result["phases_done"]` lists them."""
    from tqdm import tqdm

    result: dict = {"requests": args.requests, "concurrency": args.concurrency, "errors": None,
                    "cache_slots_after": None, "abort_freed": None, "deterministic": None,
                    "soak_seconds": args.soak_seconds, "soak_errors": None, "phases_done": [], "details": {}}

    def done(phase: str) -> None:
        result["phases_done"].append(phase)
        save(result)

    tokens = tuple(args.prompt_tokens)
    t0 = time.time()
    with tqdm(total=args.requests, desc="load", unit="req") as bar:
        errors, messages = run_load(client, args.requests, args.concurrency, tuple(args.prompt_len), 1, bar, tokens)
    time.sleep(1.0)
    result.update(errors=errors, cache_slots_after=occupancy(stats_path))
    result["details"].update(error_messages=messages, load_seconds=round(time.time() - t0, 1))
    done("load")
    aborts = abort_check(client, stats_path, tokens=tokens)
    result["abort_freed"] = aborts["abort_freed"]
    result["details"]["abort"] = aborts
    done("abort")
    result["details"]["determinism"] = determinism_check(client, args.concurrency, tokens=tokens)
    result["deterministic"] = result["details"]["determinism"]["sequential_identical"]
    done("determinism")

    def soak_progress(seconds_done, requests, errors):
        result["details"]["soak_progress"] = {"seconds": seconds_done, "requests": requests, "errors": errors}
        save(result)

    soak_requests, soak_errors = soak(client, args.soak_seconds, args.concurrency, 5, soak_progress, tokens=tokens)
    time.sleep(1.0)
    result["soak_errors"] = soak_errors
    result["details"].update(soak_requests=soak_requests, cache_slots_after_soak=occupancy(stats_path))
    done("soak")
    return result


def passed(result: dict) -> bool:
    return (result["phases_done"] == ["load", "abort", "determinism", "soak"] and result["errors"] == 0
            and result["cache_slots_after"] == 0 and result["abort_freed"] is True
            and result["deterministic"] is True and result["soak_errors"] == 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[16, 3000])
    ap.add_argument("--soak-seconds", type=float, default=300)
    ap.add_argument("--port", type=int, default=30111)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "robustness.json"))
    ap.add_argument("--server-log", default=None, help="where the server's log goes (default: a temp dir)")
    ap.add_argument("--server-url", default=None,
                    help="use this running mage server instead of starting one (it must have been started "
                         "with SGLANG_MAGE_STATS_PATH=--stats-path; --model-path still picks the prompt tokens)")
    ap.add_argument("--stats-path", default=None, help="with --server-url: that server's stats file")
    ap.add_argument("server_args", nargs="*", help="extra launch_server flags (after --)")
    args = ap.parse_args(argv)
    if args.server_url and not args.stats_path:
        ap.error("--server-url needs --stats-path (the file the server's SGLANG_MAGE_STATS_PATH names)")

    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    from tiny_model import prompt_token_range

    args.prompt_tokens = prompt_token_range(args.model_path)
    tmp = tempfile.mkdtemp(prefix="mage-robust-")
    stats_path = os.path.join(tmp, "stats.json")
    log_path = args.server_log or os.path.join(tmp, "server.log")
    config = {"model": args.model_path or "tiny dummy SDAR", "prompt_len": args.prompt_len, "mage_k": 64,
              "mage_min_context": 256, "extra_server_args": args.server_args, "server_log": log_path}

    def save(result: dict) -> None:
        write_json(args.out, {**result, "config": config})

    if args.server_url:
        config.update(server="attached", server_url=args.server_url, server_log=None)
        result = run_phases(Client(args.server_url.rstrip("/")), args, args.stats_path, save)
    else:
        t0 = time.time()
        server = start_server(args.model_path, args.port, stats_path, log_path,
                              ["--max-running-requests", str(args.concurrency), *args.server_args])
        config["server_startup_seconds"] = round(time.time() - t0, 1)
        print(f"server healthy after {config['server_startup_seconds']} s", flush=True)
        try:
            result = run_phases(Client(f"http://127.0.0.1:{args.port}"), args, stats_path, save)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=1))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
