"""Training smoke test on the CPU: the loss falls, the checkpoint is written in the SGLang/HF layout and
reloads to the same model, and greedy block decoding fills the answer block."""

import json

import torch

from training import train
from training.model import TinyConfig, TinySDAR
from training.tasks import MASK, VALUES


def test_short_training_run_learns_and_saves(tmp_path):
    out = train.main(["--out", str(tmp_path), "--steps", "60", "--context", "64", "--batch", "16", "--device", "cpu",
                      "--hidden", "64", "--layers", "2", "--lr", "3e-3"])
    hist = out["history"]
    assert len(hist) == 60
    first, last = sum(hist[:10]) / 10, sum(hist[-10:]) / 10
    # From ~ln(1024) towards ln(|VALUES|): it learns at least which tokens can be answers.
    assert last < first - 0.3, (first, last)

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["SDARForCausalLM"] and cfg["mask_token_id"] == MASK
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    model = out["model"]
    assert set(state) == set(model.state_dict())
    reloaded = TinySDAR(TinyConfig(**{k: cfg[k] for k in TinyConfig.__dataclass_fields__}))
    reloaded.load_state_dict({k: v.float() for k, v in state.items()})

    import random

    prompts, answers, _ = train.padded_batch(random.Random(1), 4, 64, 4)
    decoded = train.decode_answer(reloaded.eval(), prompts)
    assert decoded.shape == answers.shape and not (decoded == MASK).any()
    assert ((decoded >= VALUES.start) & (decoded < VALUES.stop)).float().mean() > 0.5
