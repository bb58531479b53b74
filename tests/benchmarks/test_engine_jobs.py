"""benchmarks/engine_jobs.py: parallel child jobs, their results, failures and timeouts (no GPU: the child
is a stand-in script speaking the same --engine-job protocol)."""

import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import engine_jobs  # noqa: E402

CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {benchmarks!r})
    import engine_jobs
    spec = engine_jobs.load_spec(sys.argv[2])
    sys.stderr.write("log line\\n" * spec.get("noise", 0))  # more than a pipe holds
    time.sleep(spec.get("sleep", 0))
    if spec.get("fail"):
        sys.exit("boom")
    engine_jobs.emit({{"doubled": [2 * x for x in spec["xs"]]}})
""")


@pytest.fixture
def child(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD.format(benchmarks=os.path.dirname(engine_jobs.__file__)))
    return str(path)


def test_results_come_back_by_name_with_a_parallel_limit(child):
    jobs = {f"j{i}": {"xs": [i, i + 1], "noise": 20000 if i == 0 else 0} for i in range(4)}
    logged = []
    out = engine_jobs.run_jobs(child, jobs, parallel=2, timeout=60, log=logged.append)
    assert out == {f"j{i}": {"doubled": [2 * i, 2 * i + 2]} for i in range(4)}
    assert len(logged) == 4 and all("done" in line for line in logged)


def test_failures_and_timeouts_are_reported_by_name(child):
    jobs = {"ok": {"xs": [1]}, "bad": {"xs": [], "fail": True}, "slow": {"xs": [], "sleep": 30}}
    finished = {}
    with pytest.raises(RuntimeError) as err:
        engine_jobs.run_jobs(child, jobs, timeout=3, on_result=finished.__setitem__)
    message = str(err.value)
    assert "'bad'" in message and "boom" in message and "'slow'" in message and "'ok'" not in message
    assert finished == {"ok": {"doubled": [2]}}  # reported as it ended, although the run as a whole failed


def test_children_files_are_kept_in_engine_jobs_dir(child, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_JOBS_DIR", str(tmp_path / "kept"))
    engine_jobs.run_jobs(child, {"a": {"xs": [3]}}, timeout=60)
    (run_dir,) = (tmp_path / "kept").iterdir()
    assert "RESULT" in (run_dir / "job1.out").read_text()


def test_parse_result_takes_the_last_result_line():
    assert engine_jobs.parse_result("noise\nRESULT [1]\nRESULT {\"a\": 2}\n") == {"a": 2}
    assert engine_jobs.parse_result("no result here") is None
