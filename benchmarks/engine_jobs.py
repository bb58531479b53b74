"""Run GPU jobs (mostly one `sgl.Engine` each) in their own processes, several at once, and collect the one
JSON result each prints. An engine start costs ~35 s, mostly CPU, and a tiny model leaves the GPU idle, so
benchmarks/adapters_check.py and benchmarks/eval_accuracy.py start their engines side by side.

Protocol: the child is `python SCRIPT --engine-job SPEC_FILE` (the spec is a file: long prompts would overflow
argv); it calls `emit(result)`, which prints one `RESULT {json}` line. The children's output goes to files,
not pipes: SGLang logs enough to fill a pipe, and a child blocked on a full pipe would never finish.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

PREFIX = "RESULT "


def emit(result) -> None:
    print(PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str):
    """The last `RESULT` line's JSON, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(PREFIX)]
    return json.loads(lines[-1][len(PREFIX):]) if lines else None


def load_spec(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run_jobs(script: str, jobs: dict, parallel: int | None = None, timeout: float = 1800, log=None,
             on_result=None) -> dict:
    """{name: spec (JSON-able)} -> {name: result}: each job is `script --engine-job <spec file>` in its own
    process, at most `parallel` at once (None: all), each killed after `timeout` s; `on_result(name, result)`
    runs as each one finishes (so a caller cut off later still has reported the finished ones). Raises naming every
    failed job with the end of its stderr. The children's files stay in $ENGINE_JOBS_DIR when it is set (so a
    GPU run brings back the log of a job that hung), else in a fresh temporary folder."""
    keep = os.environ.get("ENGINE_JOBS_DIR")
    if keep:
        os.makedirs(keep, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="engine-jobs-", dir=keep or None)
    pending, running, out, errors = list(jobs.items()), {}, {}, {}
    limit = len(jobs) if parallel is None else max(1, parallel)
    while pending or running:
        while pending and len(running) < limit:
            name, spec = pending.pop(0)
            base = os.path.join(tmp, f"job{len(jobs) - len(pending)}")
            with open(base + ".json", "w") as f:
                json.dump(spec, f)
            stdout, stderr = open(base + ".out", "w"), open(base + ".err", "w")
            proc = subprocess.Popen([sys.executable, script, "--engine-job", base + ".json"], stdout=stdout,
                                    stderr=stderr, text=True)
            running[name] = (proc, time.time(), base, stdout, stderr)
        for name, (proc, started, base, stdout, stderr) in list(running.items()):
            if proc.poll() is None and time.time() - started < timeout:
                continue
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            stdout.close()
            stderr.close()
            del running[name]
            with open(base + ".out") as f:
                result = parse_result(f.read())
            if result is None:
                with open(base + ".err") as f:
                    errors[name] = f"rc {proc.returncode}: {f.read()[-1500:]}"
            else:
                out[name] = result
                if on_result is not None:
                    on_result(name, result)
            if log is not None:
                log(f"[jobs] {name} {'done' if result is not None else 'FAILED'} ({time.time() - started:.0f}s)")
        time.sleep(0.5)
    if errors:
        raise RuntimeError(f"engine job(s) failed: {errors}")
    return out
