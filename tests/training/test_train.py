"""Training smoke test on the CPU: the loss falls, the checkpoint is written in the SGLang/HF layout and
reloads to the same model, and greedy block decoding fills the answer block."""

import json
import random

import pytest

import torch

from training import train
from training.model import TinyConfig, TinySDAR
from training.tasks import MASK, TASKS, VALUES


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


def test_multi_query_blocks_see_what_inference_sees():
    """Each noisy answer block of a multi-query sequence gets the logits that block-by-block inference
    gives after the same prefix (its question included, later questions and its own clean copy not)."""
    import random

    from training.model import block_causal_mask

    torch.manual_seed(0)
    model = TinySDAR(TinyConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2)).eval()
    seqs, starts, answers = train.multi_query_batch(random.Random(3), 4, 200, 4, 5)
    n, length = seqs.shape
    assert starts.numel() > 1 and length % 4 == 0
    for i, s in enumerate(starts.tolist()):
        assert torch.equal(seqs[:, s:s + 4], answers[:, i])  # the clean copy holds the answer
    noisy = torch.full((n, starts.numel() * 4), MASK)
    positions = torch.cat([torch.arange(length), (starts[:, None] + torch.arange(4)).view(-1)])
    with torch.no_grad():
        got = model(torch.cat([seqs, noisy], 1), positions, train.multi_query_mask(length, starts, 4))[:, length:]
        for i, s in enumerate(starts.tolist()):
            prefix = torch.cat([seqs[:, :s], torch.full((n, 4), MASK)], 1)
            ref = model(prefix, torch.arange(s + 4), block_causal_mask(s + 4, 4))[:, s:]
            assert (got[:, 4 * i:4 * i + 4] - ref).abs().max() < 1e-5


def test_multi_query_first_question_is_laid_out_as_an_evaluation_prompt():
    """The first asked question ends exactly where an evaluation prompt ends: QUERY key ANSWER right before a
    block boundary, its answer filling the next block; every later question follows the same 8-token layout."""
    import random

    from training.tasks import ANSWER, QUERY

    seqs, starts, answers = train.multi_query_batch(random.Random(7), 6, 300, 4, 3)
    assert starts[0] % 4 == 0 and (starts.diff() == 8).all()
    for row, ans in zip(seqs.tolist(), answers.tolist()):
        for i, s in enumerate(starts.tolist()):
            assert row[s - 1] == ANSWER and QUERY in row[s - 4:s - 1] and row[s:s + 4] == ans[i]


def test_multi_query_training_smoke(tmp_path):
    out = train.main(["--out", str(tmp_path), "--steps", "30", "--context", "64", "--batch", "8", "--device", "cpu",
                      "--hidden", "64", "--layers", "2", "--queries", "4"])
    assert len(out["history"]) == 30 and all(map(lambda x: x == x, out["history"]))


def test_curriculum_stages_follow_the_time_budget():
    import argparse

    from training.train import context_for, parse_stages

    assert parse_stages("0:64,128; 0.5:512") == [(0.0, [64, 128]), (0.5, [512])]
    for bad in ("0.1:64", "0:64;0.5:128;0.4:256", ""):
        with pytest.raises(ValueError, match="--stages"):
            parse_stages(bad)
    args = argparse.Namespace(stages="0:64,128;0.5:512;0.9:8192")
    rng = random.Random(0)
    assert {context_for(0.2, args, rng) for _ in range(50)} == {64, 128}
    assert {context_for(0.5, args, rng) for _ in range(10)} == {512}
    assert {context_for(0.95, args, rng) for _ in range(10)} == {8192}



def test_every_block_loss_weights_and_gradients():
    """loss_on_sequence: finite, gradients reach the model; filler and BOS are never masked; answer blocks
    carry answer_weight and the other masked tokens 1; every block gets masked tokens at some step."""
    from training.tasks import FILLER

    torch.manual_seed(0)
    model = TinySDAR(TinyConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    seqs, starts, answers = train.multi_query_batch(random.Random(2), 4, 128, 4, 3)
    loss, answer_loss = train.loss_on_sequence(model, seqs, starts, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and answer_loss > 3.0  # untrained: near ln(1024)
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0

    g = torch.Generator().manual_seed(1)
    ever = torch.zeros_like(seqs, dtype=torch.bool)
    filler = (seqs >= FILLER.start) & (seqs < FILLER.stop)
    for _ in range(20):
        masked, weight, is_answer = train.sequence_loss_weights(seqs, starts, 4, g, answer_weight=4.0)
        assert not (masked & filler).any() and not masked[:, 0].any()
        assert (weight[masked & is_answer] == 4.0).all() and (weight[masked & ~is_answer] == 1.0).all()
        ever |= masked
    assert ever[~filler & (torch.arange(seqs.shape[1]) > 0)].all()
    for i, s in enumerate(starts.tolist()):
        assert is_answer[:, s:s + 4].all() and torch.equal(seqs[:, s:s + 4], answers[:, i])


def test_every_block_loss_training_smoke(tmp_path):
    out = train.main(["--out", str(tmp_path), "--steps", "20", "--context", "64", "--batch", "8", "--device", "cpu",
                      "--hidden", "64", "--layers", "2", "--queries", "4", "--body-loss-max-context", "512"])
    assert len(out["history"]) == 20 and all(h == h for h in out["history"])


def test_zero_hop_queries_and_task_weights_shape_the_batches():
    from training.tasks import VAR

    rng = random.Random(3)
    seqs, starts, answers = train.multi_query_batch(rng, 4, 256, 4, 8, ("variables",), zero_hop=True)
    # a root's question and its chain's one-hop question share the answer: every answer appears twice
    for row in answers.tolist():
        assert all(row.count(a) == 2 for a in row)
    plain = train.multi_query_batch(random.Random(3), 4, 256, 4, 8, ("variables",))
    assert plain[2].shape[1] * 2 == answers.shape[1] and (seqs == VAR).any()
    picks = [train.pick_task(rng, ("needle", "variables"), [0.0, 1.0]) for _ in range(20)]
    assert set(picks) == {"variables"}
    # no weights: the same draws as rng.choice, so older recipes keep their data stream
    a, b = random.Random(5), random.Random(5)
    assert [train.pick_task(a, TASKS) for _ in range(10)] == [b.choice(TASKS) for _ in range(10)]


@pytest.mark.parametrize("weights", [["1", "2"], ["-1", "1", "1"], ["0", "0", "0"]])
def test_bad_task_weights_are_rejected(tmp_path, weights, capsys):
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--steps", "1", "--device", "cpu", "--task-weights", *weights])
    assert "--task-weights" in capsys.readouterr().err


def test_intermediate_width_and_zero_hop_training_smoke(tmp_path):
    out = train.main(["--out", str(tmp_path), "--steps", "8", "--context", "64", "--batch", "4", "--device", "cpu",
                      "--hidden", "64", "--layers", "2", "--intermediate", "96", "--queries", "4",
                      "--body-loss-max-context", "128", "--zero-hop-queries", "--task-weights", "1", "1", "2"])
    assert out["train_args"]["config"]["intermediate_size"] == 96 and len(out["history"]) == 8
    assert all(h == h for h in out["history"])


def test_init_from_continues_from_a_saved_checkpoint(tmp_path):
    """--init-from loads the weights and config (its widths win over --hidden/--layers)."""
    first = train.main(["--out", str(tmp_path / "a"), "--steps", "3", "--context", "64", "--batch", "2",
                        "--device", "cpu", "--hidden", "64", "--layers", "2"])
    model, cfg = train.load_checkpoint(str(tmp_path / "a"))
    ref = {k: v.to(torch.bfloat16).float() for k, v in first["model"].state_dict().items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
    out = train.main(["--out", str(tmp_path / "b"), "--steps", "2", "--context", "64", "--batch", "2", "--device", "cpu",
                      "--hidden", "256", "--layers", "4", "--init-from", str(tmp_path / "a"), "--lr", "0"])
    assert out["train_args"]["config"]["hidden_size"] == 64 and out["train_args"]["config"]["num_hidden_layers"] == 2
