"""bench_radix_rounds at a small size: it builds the node count it claims, times both methods on the same
request history, and writes the rows it prints."""

import json
import os
import sys

import pytest

pytest.importorskip("sglang.srt.mem_cache.radix_cache")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))

import bench_radix_rounds  # noqa: E402


def test_rows_for_both_methods_with_the_node_count_of_the_share(tmp_path):
    out = tmp_path / "radix_rounds.json"
    assert bench_radix_rounds.main(["--contexts", "1024", "--shares", "256", "64", "--rounds", "3",
                                    "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["share"], r["method"]) for r in rows} == {(s, m) for s in (256, 64) for m in ("upstream", "incremental")}
    for r in rows:
        # the prompt cached in context / share rounds leaves that many nodes before the timed rounds
        assert r["nodes"] == 1024 // r["share"] and r["ms_per_round"] > 0
