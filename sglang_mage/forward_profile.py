"""Opt-in timing of every model forward: where a denoising step's time goes.

A dLLM block costs one forward per denoising step, and at batch 1 the forwards are short enough that the
time around them matters as much as the kernels. Set SGLANG_MAGE_FORWARD_PROFILE=PATH (inherited by the
scheduler processes) and `ModelRunner.forward` is wrapped to record, per forward:
  gpu_ms     CUDA-event time from the forward's first enqueued kernel to its last (device busy + gaps)
  host_ms    wall time inside ModelRunner.forward (launches, planning; graph replay returns early)
  period_ms  wall time from this forward's start to the next one's (the step loop's host work included)
Forwards are grouped by (graph or eager, tokens in the batch, context bucket), and PATH receives per group
the count and the median of each (JSON, rewritten every 64 forwards and at exit). Off when the variable is
unset: nothing is wrapped. benchmarks/bench_e2e.py sets it for every engine it starts.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import statistics
import time
from collections import defaultdict, deque
from typing import Any

ENV = "SGLANG_MAGE_FORWARD_PROFILE"
TARGET_MODULE = "sglang.srt.model_executor.model_runner"
# Gaps longer than this between two forwards are the engine waiting for work, not a step loop.
IDLE_GAP_MS = 100.0
_KEEP = 4096  # samples per group, for the medians


def context_bucket(total_tokens: int, batch: int) -> int:
    """The power of two nearest each request's mean length, so that 1 x 8K and 1 x 128K stay apart."""
    return 1 << round(math.log2(max(1, total_tokens // max(batch, 1))))


class ForwardProfile:
    def __init__(self, path: str, clock=time.perf_counter):
        self.path, self.clock = path, clock
        self.pending: deque = deque()  # (key, start event, end event) of forwards whose events are not read yet
        self.samples: dict[str, dict[str, deque]] = defaultdict(
            lambda: {"gpu_ms": deque(maxlen=_KEEP), "host_ms": deque(maxlen=_KEEP), "period_ms": deque(maxlen=_KEEP)})
        self.counts: dict[str, int] = defaultdict(int)
        self.last = None  # (key, start time) of the previous forward
        self.seen = 0

    def around(self, original: Any, runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        t0 = self.clock()
        if self.last is not None:
            gap = (t0 - self.last[1]) * 1e3
            if gap < IDLE_GAP_MS:
                self.samples[self.last[0]]["period_ms"].append(gap)
        start = end = None
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        out = original(runner, forward_batch, *args, **kwargs)
        if end is not None:
            end.record()
        host_ms = (self.clock() - t0) * 1e3
        key = self.key(forward_batch, bool(getattr(out, "can_run_graph", False)))
        self.counts[key] += 1
        self.samples[key]["host_ms"].append(host_ms)
        self.last = (key, t0)
        if start is not None:
            self.pending.append((key, start, end))
        self.drain()
        self.seen += 1
        if self.seen % 64 == 0:
            self.write()
        return out

    @staticmethod
    def key(forward_batch: Any, graph: bool) -> str:
        tokens = getattr(forward_batch, "input_ids", None)
        tokens = int(tokens.shape[0]) if tokens is not None else 0
        batch = int(getattr(forward_batch, "batch_size", 0) or 1)
        total = int(getattr(forward_batch, "seq_lens_sum", 0) or 0)
        return f"{'graph' if graph else 'eager'} tokens={tokens} bs={batch} ctx~{context_bucket(total, batch)}"

    def drain(self, wait: bool = False) -> None:
        while self.pending and (wait or self.pending[0][2].query()):
            key, start, end = self.pending.popleft()
            end.synchronize()
            self.samples[key]["gpu_ms"].append(start.elapsed_time(end))

    def summary(self) -> dict:
        out = {}
        for key, count in sorted(self.counts.items()):
            s = self.samples[key]
            out[key] = {"forwards": count, **{f"median_{name}": round(statistics.median(v), 3) if v else None
                                              for name, v in s.items()}}
        return out

    def write(self) -> None:
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "groups": self.summary()}, f, indent=1)
        os.replace(tmp, self.path)

    def close(self) -> None:
        try:
            self.drain(wait=True)
            self.write()
        except Exception:  # noqa: BLE001 - at exit a dead CUDA context must not raise
            pass


_profile: ForwardProfile | None = None


def forward_around(original: Any, runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    return _profile.around(original, runner, forward_batch, *args, **kwargs)


def register_forward_profile_hook() -> None:
    global _profile
    path = os.environ.get(ENV)
    if not path or _profile is not None:
        return
    from sglang.srt.plugins.hook_registry import HookType

    from .compat import hook_when_imported

    # One file per process: a TP run has a scheduler per rank.
    _profile = ForwardProfile(path.replace("{pid}", str(os.getpid())))
    atexit.register(_profile.close)
    hook_when_imported(TARGET_MODULE, f"{TARGET_MODULE}.ModelRunner.forward", forward_around, HookType.AROUND)
