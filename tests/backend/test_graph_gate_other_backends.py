"""hooks.can_run_graph_around for backends other than mage: a DLLM_EXTEND batch holding a prompt chunk
(more than one block per request, which the benchmark switch gives every backend) never reaches SGLang's
graph replay, whose buffers hold B tokens per request; single-block batches keep SGLang's own decision."""

from types import SimpleNamespace

import pytest

from sglang_mage import hooks


class Mode:
    def __init__(self, dllm: bool):
        self.dllm = dllm

    def is_dllm_extend(self) -> bool:
        return self.dllm


def runner(block: int = 32):
    return SimpleNamespace(attn_backend=SimpleNamespace(), num_tokens_per_bs=block)


def original(self, forward_batch):
    return "sglang"


@pytest.mark.parametrize("lens,expected", [
    ([32], "sglang"), ([32, 32, 32], "sglang"), ([8, 32], "sglang"),  # one block each (a short last block too)
    ([128], False), ([32, 8192], False), ([64, 64], False),  # any prompt chunk: eager
])
def test_chunked_dllm_batches_run_eagerly(lens, expected):
    fb = SimpleNamespace(forward_mode=Mode(True), extend_seq_lens_cpu=lens)
    assert hooks.can_run_graph_around(original, runner(), fb) == expected


def test_other_forward_modes_and_unknown_lengths_keep_sglangs_decision():
    assert hooks.can_run_graph_around(original, runner(), SimpleNamespace(forward_mode=Mode(False),
                                                                         extend_seq_lens_cpu=[128])) == "sglang"
    assert hooks.can_run_graph_around(original, runner(), SimpleNamespace(forward_mode=Mode(True),
                                                                         extend_seq_lens_cpu=None)) == "sglang"
