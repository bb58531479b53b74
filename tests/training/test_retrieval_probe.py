"""training/retrieval_probe.py: its key-value batches are laid out as train.loss_on_queries expects, the
held-out metric is exact match of the all-[MASK] block, and a run records its curve and the curriculum."""

import random

import torch

from training import retrieval_probe as rp
from training.tasks import ANSWER, KEY, QUERY, VALUE, group_alphabet, key_group


def test_kv_batch_layout():
    seqs, starts, answers = rp.kv_batch(random.Random(0), 5, pairs=3, key_len=2, queries=4)
    assert seqs.shape[1] % 4 == 0 and starts[0] % 4 == 0 and (starts.diff() == 8).all()
    for row, ans in zip(seqs.tolist(), answers.tolist()):
        body = row[:starts[0] - 4]
        entries = {tuple(body[i + 1:i + 3]): body[i + 4:i + 8] for i in range(len(body)) if body[i] == KEY}
        assert len(entries) == 3 and all(body[i + 3] == VALUE for i in range(len(body)) if body[i] == KEY)
        for i, s in enumerate(starts.tolist()):
            group = row[s - 4:s]
            assert group[0] == QUERY and group[-1] == ANSWER
            key = tuple(group[1:3])
            assert entries[key] == ans[i] == row[s:s + 4]  # the answer is the asked key's value
            assert all(t in group_alphabet(j, key_group(key)) for j, t in enumerate(ans[i]))


def test_run_records_curve_and_advances_the_curriculum():
    # With one pair the answer is the only value in context: a tiny model copies it within ~200 steps on
    # the CPU. advance_at=0 moves to the next stage at the first evaluation, so both stages are exercised.
    out = rp.run_one({"pairs": [1, 2], "batch": 8, "hidden": 32, "head_dim": 16, "layers": 2, "advance_at": 0.0},
                     minutes=5, steps=101, device="cpu")
    assert out["steps_run"] == 101 and [c["step"] for c in out["curve"]] == [0, 100]
    assert [c["pairs"] for c in out["curve"]] == [1, 2] and out["steps_to_learn"] == {"1": 0, "2": 100}
    assert all(0.0 <= c["exact"] <= 1.0 and torch.isfinite(torch.tensor(c["loss"])) for c in out["curve"])
