"""The opt-in forward profiler (sglang_mage/forward_profile.py): grouping, host time, periods between
forwards, idle gaps left out, the JSON it writes, and that it wraps nothing unless asked."""

import json
import types

import torch

from sglang_mage import forward_profile
from sglang_mage.forward_profile import IDLE_GAP_MS, ForwardProfile, context_bucket


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def batch(tokens, bs, seq_lens_sum):
    return types.SimpleNamespace(input_ids=torch.zeros(tokens, dtype=torch.long), batch_size=bs,
                                 seq_lens_sum=seq_lens_sum)


def test_context_bucket_is_the_nearest_power_of_two_per_request():
    assert context_bucket(131072 + 32, 1) == 131072
    assert context_bucket(16 * (32768 + 64), 16) == 32768
    assert context_bucket(8192 + 40, 1) == 8192
    assert context_bucket(0, 0) == 1


def test_groups_host_time_and_periods(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    clock = FakeClock()
    prof = ForwardProfile(str(tmp_path / "p.json"), clock=clock)

    def forward(runner, fb, graph, host_ms):
        clock.t += host_ms / 1e3
        return types.SimpleNamespace(can_run_graph=graph)

    steps = [(True, 1.0, 3.0), (True, 1.0, 3.0), (False, 12.0, 2.0), (True, 1.0, IDLE_GAP_MS * 3)]
    for graph, host_ms, gap_ms in steps:
        out = prof.around(forward, None, batch(32, 1, 131072 + 32), graph, host_ms)
        assert out.can_run_graph is graph
        clock.t += gap_ms / 1e3
    prof.around(forward, None, batch(512, 16, 16 * 32800), False, 5.0)
    prof.write()
    got = json.loads((tmp_path / "p.json").read_text())["groups"]
    g = got["graph tokens=32 bs=1 ctx~131072"]
    assert g["forwards"] == 3 and abs(g["median_host_ms"] - 1.0) < 1e-9
    # Periods: 4 ms and 4 ms; the third graph forward's next gap is idle and is not a period.
    assert abs(g["median_period_ms"] - 4.0) < 1e-9
    e = got["eager tokens=32 bs=1 ctx~131072"]
    assert e["forwards"] == 1 and abs(e["median_host_ms"] - 12.0) < 1e-9 and abs(e["median_period_ms"] - 14.0) < 1e-9
    b16 = got["eager tokens=512 bs=16 ctx~32768"]
    assert b16["forwards"] == 1 and b16["median_period_ms"] is None and b16["median_gpu_ms"] is None


def test_off_unless_the_variable_is_set(monkeypatch):
    calls = []
    monkeypatch.delenv(forward_profile.ENV, raising=False)
    monkeypatch.setattr(forward_profile, "_profile", None)
    import sglang_mage.compat as compat

    monkeypatch.setattr(compat, "hook_when_imported", lambda *a: calls.append(a))
    monkeypatch.setattr(forward_profile.atexit, "register", lambda fn: None)
    forward_profile.register_forward_profile_hook()
    assert calls == [] and forward_profile._profile is None
    monkeypatch.setenv(forward_profile.ENV, "/tmp/prof-{pid}.json")
    forward_profile.register_forward_profile_hook()
    assert len(calls) == 1 and calls[0][1].endswith("ModelRunner.forward")
    assert forward_profile._profile.path.startswith("/tmp/prof-") and "{pid}" not in forward_profile._profile.path
