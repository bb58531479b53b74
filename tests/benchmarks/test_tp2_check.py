"""benchmarks/tp2_check.py's acceptance logic (the run itself needs a 2-GPU host)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import tp2_check  # noqa: E402


def test_every_acceptance_check_has_a_failure_message():
    ok = [{"name": "flashinfer_tp2", "tp_size": 2},
          {"name": "mage_tp2_k_ge_context", "tp_size": 2, "greedy_match": True, "needs_sparse": False,
           "sparse_steps": 0, "occupancy_after": 0},
          {"name": "mage_tp2_k64_4k", "tp_size": 2, "greedy_match": None, "needs_sparse": True,
           "sparse_steps": 40, "occupancy_after": 0}]
    assert tp2_check.failures_of(ok) == []
    bad = [dict(ok[1], greedy_match=False), dict(ok[2], sparse_steps=0, occupancy_after=3),
           {"name": "block_time_tp2", "error": "RuntimeError: NCCL"}]
    msgs = tp2_check.failures_of(bad)
    assert any("greedy tokens differ" in m for m in msgs) and any("never ran" in m for m in msgs)
    assert any("holds 3 entries" in m for m in msgs) and any("NCCL" in m for m in msgs)


def test_one_gpu_host_is_refused_with_a_clear_message(capsys):
    import pytest
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this host has 2 GPUs: tp2_check would run instead of refusing")
    assert tp2_check.main(["--out", os.devnull]) == 2
    assert "needs 2 GPUs" in capsys.readouterr().err
