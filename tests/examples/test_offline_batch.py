"""examples/offline_batch.py: its batch loop and summary with a stand-in engine, and its CPU fallback."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples"))
import offline_batch  # noqa: E402


class FakeEngine:
    def __init__(self, fail_wave=None):
        self.calls, self.fail_wave = [], fail_wave

    def generate(self, input_ids, sampling_params):
        self.calls.append((len(input_ids), dict(sampling_params)))
        if len(self.calls) - 1 == self.fail_wave:
            raise ValueError("sglang-mage: the prompt is empty")
        return [{"output_ids": list(range(sampling_params["max_new_tokens"]))} for _ in input_ids]


class Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def test_waves_progress_and_summary():
    prompts = offline_batch.make_prompts(10, 5, 9, seed=1)
    assert len(prompts) == 10 and all(5 <= len(p) <= 9 for p in prompts)
    bar, engine = Bar(), FakeEngine()
    s = offline_batch.run_batch(engine, prompts, 6, 4, bar)
    assert [c[0] for c in engine.calls] == [4, 4, 2] and engine.calls[0][1]["temperature"] == 0.0
    assert bar.n == 10 and s.requests == 10 and s.errors == 0
    assert s.generated_tokens == 60 and s.prompt_tokens == sum(map(len, prompts))
    assert "generated tokens / s" in s.table()


def test_a_failing_wave_is_counted_not_fatal():
    s = offline_batch.run_batch(FakeEngine(fail_wave=1), offline_batch.make_prompts(6, 1, 2), 3, 2)
    assert s.requests == 6 and s.errors == 2 and s.generated_tokens == 12
    assert s.error_messages == ["ValueError: sglang-mage: the prompt is empty"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU fallback only runs without a GPU")
def test_cpu_fallback_runs_the_reference_demo(capsys):
    assert offline_batch.main([]) == 0
    assert "CPU reference path" in capsys.readouterr().out
