"""MAGE on the tiny PyTorch model: with a budget covering the prompt it decodes exactly like dense
attention; with a small budget it runs and reports a recall in [0, 1]."""

import random

import torch

from training import train
from training.mage_reference import decode_with_mage
from training.model import TinyConfig, TinySDAR
from training.tasks import MASK

CFG = TinyConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)


def batch():
    return train.padded_batch(random.Random(0), 3, 128, CFG.block_size)


def test_budget_covering_the_prompt_equals_dense_decoding():
    torch.manual_seed(0)
    model = TinySDAR(CFG).eval()
    prompts, _, _ = batch()
    dense = train.decode_answer(model, prompts)
    mage, recall = decode_with_mage(model, prompts, k=prompts.shape[1], sink=0, local=0)
    assert torch.equal(mage, dense) and recall == 1.0


def test_small_budget_runs_and_reports_recall():
    torch.manual_seed(0)
    model = TinySDAR(CFG).eval()
    prompts, _, _ = batch()
    out, recall = decode_with_mage(model, prompts, k=8, sink=2, local=4)
    assert out.shape == (3, 4) and not (out == MASK).any()
    assert 0.0 <= recall <= 1.0
    # The hooks are gone afterwards: plain decoding is unaffected.
    assert "attend" not in vars(model.model.layers[0].self_attn)
