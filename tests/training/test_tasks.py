"""The synthetic long-context tasks are well-posed: the answer follows from the prompt alone."""

import random

import pytest

from training.tasks import ANSWER_LEN, TASKS, VALUE_SLOTS, VOCAB_SIZE, make_sample, solve


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("context_len", [64, 300, 2048, 8192])
def test_answer_is_determined_by_the_prompt(task, context_len):
    rng = random.Random(context_len)
    for _ in range(5):
        s = make_sample(task, context_len, rng)
        assert solve(s) == s.answer
        assert len(s.answer) == ANSWER_LEN and all(t in VALUE_SLOTS[j] for j, t in enumerate(s.answer))
        assert all(0 <= t < VOCAB_SIZE for t in s.prompt)
        assert context_len - 8 <= len(s.prompt) <= context_len + 64


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("sorting", 128, random.Random(0))
    with pytest.raises(ValueError, match="context_len"):
        make_sample("needle", 16, random.Random(0))
