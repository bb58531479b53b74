"""benchmarks/robustness.py's counting logic with a stand-in client (the HTTP runs need the GPU host)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import robustness  # noqa: E402


class FakeClient:
    def __init__(self, fail_every=0):
        self.n, self.fail_every, self.aborted, self.token_ids = 0, fail_every, [], set()

    def generate(self, ids, max_new, rid=None):
        self.n += 1
        self.token_ids.update(ids)
        if self.fail_every and self.n % self.fail_every == 0:
            raise ConnectionError("boom")
        return {"output_ids": [1] * max_new, "meta_info": {"finish_reason": {"type": "length"}}}

    def abort(self, rid):
        self.aborted.append(rid)


def test_load_counts_every_failure():
    errors, messages = robustness.run_load(FakeClient(fail_every=5), 50, 4, (3, 9), seed=0)
    assert errors == 10 and len(messages) == 10 and messages[0].startswith("ConnectionError")
    assert robustness.run_load(FakeClient(), 20, 4, (3, 9), seed=0) == (0, [])


def test_occupancy_reads_the_stats_file(tmp_path):
    path = tmp_path / "stats.json"
    assert robustness.occupancy(str(path)) is None
    path.write_text(json.dumps({"occupancy": 3}))
    assert robustness.occupancy(str(path)) == 3


def test_abort_check_aborts_every_request_and_reads_occupancy(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"occupancy": 0}))
    client = FakeClient()
    res = robustness.abort_check(client, str(path), n=3, delay=0.01)
    assert len(client.aborted) == 3 and res["abort_freed"] is True and len(res["finish_reasons"]) == 3


def test_soak_runs_until_the_deadline_and_counts_errors():
    requests, errors = robustness.soak(FakeClient(fail_every=7), 0.3, 2, seed=1)
    assert requests > 0 and 0 < errors <= requests


def test_phases_save_after_each_and_a_cut_run_keeps_what_finished(tmp_path, monkeypatch):
    import argparse

    import pytest

    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"occupancy": 0}))
    args = argparse.Namespace(requests=12, concurrency=3, prompt_len=[3, 9], soak_seconds=0.2, prompt_tokens=(10, 20))
    saved = []
    client = FakeClient()
    result = robustness.run_phases(client, args, str(stats), lambda r: saved.append(json.loads(json.dumps(r))))
    # every phase's prompts come from the model's own token range, not the Qwen-sized default
    assert client.token_ids and min(client.token_ids) >= 10 and max(client.token_ids) < 20
    assert [s["phases_done"] for s in saved] == [["load"], ["load", "abort"], ["load", "abort", "determinism"],
                                                ["load", "abort", "determinism", "soak"]]
    assert saved[0]["errors"] == 0 and saved[0]["soak_errors"] is None
    assert robustness.passed(result)

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands in for the run being killed mid-soak

    saved.clear()
    monkeypatch.setattr(robustness, "soak", killed)
    with pytest.raises(KeyboardInterrupt):
        robustness.run_phases(FakeClient(), args, str(stats), saved.append)
    assert saved[-1]["phases_done"] == ["load", "abort", "determinism"] and not robustness.passed(saved[-1])
    assert robustness.passed(result) and not robustness.passed(dict(result, errors=1))


class BatchVariantClient(FakeClient):
    """Greedy output that depends on how many requests are in flight at once, as batch-variant kernels can
    make it: one at a time it is a pure function of the prompt."""

    def __init__(self):
        super().__init__()
        import threading

        self.lock, self.in_flight = threading.Lock(), 0

    def generate(self, ids, max_new, rid=None):
        import time

        with self.lock:
            self.in_flight += 1
            crowd = self.in_flight
        time.sleep(0.02)
        with self.lock:
            self.in_flight -= 1
        first = sum(ids) % 97 + (crowd > 1) * 1000 * crowd
        return {"output_ids": [first] + [7] * (max_new - 1)}


def test_determinism_requires_identical_sequential_passes_and_reports_the_concurrent_ones():
    res = robustness.determinism_check(BatchVariantClient(), 4, max_new=5)
    assert res["sequential_identical"] is True and res["sequential"] == {"identical": 4, "of": 4, "first_mismatch": None}
    # all four at once: the crowd changes the first token away from the sequential output
    assert res["concurrent_vs_sequential"]["identical"] < 4
    mismatch = res["concurrent_vs_sequential"]["first_mismatch"]
    assert mismatch["first_diff_token"] == 0 and len(mismatch["a"]) == 5


def test_a_sequential_difference_fails_determinism():
    class Flaky(FakeClient):
        def generate(self, ids, max_new, rid=None):
            self.n += 1
            return {"output_ids": [1, 2, 3 if self.n % 2 else 4][:max_new]}  # alternates call to call

    res = robustness.determinism_check(Flaky(), 3, max_new=3)
    assert res["sequential_identical"] is False
    assert res["sequential"]["first_mismatch"]["first_diff_token"] == 2


def test_soak_reports_progress_while_it_runs():
    seen = []
    requests, errors = robustness.soak(FakeClient(fail_every=9), 0.5, 2, seed=1,
                                       on_progress=lambda *a: seen.append(a), every=0.1)
    assert len(seen) >= 3 and all(s[0] > 0 for s in seen)
    assert [s[1] for s in seen] == sorted(s[1] for s in seen) and seen[-1][1] <= requests


def test_attached_mode_needs_the_servers_stats_path(tmp_path):
    import pytest

    with pytest.raises(SystemExit):
        robustness.main(["--server-url", "http://127.0.0.1:1", "--out", str(tmp_path / "r.json")])
