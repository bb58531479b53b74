"""Fast-dLLM v2: registry entry and config parsing, token shift and carried state, the sub-block schedule
against a transcription of the reference's `generate` loop, and the SGLang model class built at a tiny config
and run on CPU against the pure-PyTorch reference forward (in a subprocess: it sets process-wide SGLang state)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sglang_mage.model_adapters import fast_dllm_v2 as fd
from sglang_mage.model_adapters.registry import ADAPTERS, find_adapter, resolve_block_params

HERE = os.path.dirname(os.path.abspath(__file__))
MASK, STOP = 99, 98


# Registry and config ---------------------------------------------------------------------------------------


def test_registry_entry_and_config_keys():
    spec = find_adapter("Fast_dLLM_QwenForCausalLM")
    assert spec is ADAPTERS["fast-dllm-v2"] and (spec.block_size, spec.mask_id) == (32, 151665)
    hf = SimpleNamespace(vocab_size=151936)
    assert resolve_block_params(spec, hf, {}) == (32, 151665)
    assert resolve_block_params(spec, SimpleNamespace(vocab_size=151936, bd_size=16), {}) == (16, 151665)
    assert resolve_block_params(spec, SimpleNamespace(vocab_size=151936, bd_size=16), {"block_size": 8}) == (8, 151665)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        resolve_block_params(spec, SimpleNamespace(vocab_size=151000), {})
    with pytest.raises(ValueError, match="fast-dllm-v2: invalid block_size"):
        resolve_block_params(spec, SimpleNamespace(vocab_size=151936, bd_size=0), {})


@pytest.mark.parametrize("cfg, block, expect", [
    ({}, 32, (8, 0.9, 151645)), ({}, 4, (4, 0.9, 151645)),
    ({"small_block_size": 16, "threshold": 1, "stop_token": None}, 32, (16, 1.0, None)),
    ({"small_block_size": 5}, 32, "small_block_size"), ({"small_block_size": True}, 32, "small_block_size"),
    ({"threshold": 1.5}, 32, "threshold"), ({"threshold": "0.9"}, 32, "threshold"), ({"stop_token": -1}, 32, "stop_token"),
])
def test_parse_schedule(cfg, block, expect):
    if isinstance(expect, str):
        with pytest.raises(ValueError, match=expect):
            fd.parse_schedule(cfg, block)
    else:
        assert fd.parse_schedule(cfg, block) == expect


def test_dllm_config_and_model_and_algorithm_registration(tmp_path):
    path = tmp_path / "fd"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "bd_size": 16,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6}))
    code = (
        "import sys\n"
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "assert 'sglang.srt.models.registry' not in sys.modules, 'imported at registration'\n"
        "assert 'sglang_mage.model_adapters.fast_dllm_v2_model' not in sys.modules\n"
        "from sglang.srt.server_args import ServerArgs\n"
        f"sa = ServerArgs(model_path={str(path)!r}, dllm_algorithm='FastDllmV2', device='cpu')\n"
        "from sglang.srt.dllm.config import DllmConfig\n"
        "c = DllmConfig.from_server_args(sa)\n"
        "from sglang.srt.dllm.algorithm import get_algorithm\n"
        "algo = get_algorithm(c)\n"
        "from sglang.srt.models.registry import ModelRegistry\n"
        "cls, arch = ModelRegistry.resolve_model_cls(['Fast_dLLM_QwenForCausalLM'])\n"
        "print('RESULT', c.block_size, c.mask_id, type(algo).__name__, algo.small_block_size, cls.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "RESULT 16 151665 FastDllmV2 8 sglang_mage.model_adapters.fast_dllm_v2_model" in out.stdout, out.stderr[-3000:]


# Token shift -------------------------------------------------------------------------------------------------


def test_shift_hidden_within_segments_and_carry():
    h = torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 2)  # two segments: rows 0-3, 4-6
    first = torch.tensor([0, 4])
    assert fd.shift_hidden(h, first)[:, 0].tolist() == [0, 0, 1, 2, 4, 4, 5]
    carried = torch.tensor([[10.0, 10.0], [20.0, 20.0]])
    out = fd.shift_hidden(h, first, carried, torch.tensor([False, True]))
    assert out[:, 0].tolist() == [0, 0, 1, 2, 20, 4, 5]


def test_carry_state_keys_position_and_kv_slot_and_drops_rewritten_slots():
    c = fd.CarryState(slots=4, hidden_size=2, dtype=torch.float32, device="cpu")
    slots = torch.tensor([1, 2])
    c.store(slots, torch.tensor([31, 63]), torch.tensor([131, 263]), torch.ones(2, 2), torch.tensor([100, 131, 263]))
    h, valid = c.lookup(slots, torch.tensor([32, 64]), torch.tensor([131, 263]))
    assert valid.tolist() == [True, True] and h.sum().item() == 4
    assert c.lookup(slots, torch.tensor([33, 64]), torch.tensor([131, 999]))[1].tolist() == [False, False]
    assert not c.lookup(torch.tensor([3]), torch.tensor([0]), torch.tensor([0]))[1].any()  # position 0: nothing before
    # Slot 3's forward writes KV slot 263: slot 2's state (a finished request's) no longer describes it.
    c.store(torch.tensor([3]), torch.tensor([7]), torch.tensor([300]), torch.zeros(1, 2), torch.tensor([263, 300]))
    assert c.lookup(slots, torch.tensor([32, 64]), torch.tensor([131, 263]))[1].tolist() == [True, False]


# Schedule ----------------------------------------------------------------------------------------------------


def reference_step(ids, logits, lo, hi, threshold):
    """The reference's inner step, row by row (greedy: temperature 0)."""
    out = ids.clone()
    for r in range(ids.shape[0]):
        probs = torch.softmax(logits[r, lo:hi].float(), -1)
        p, x = probs.max(-1)
        mask = ids[r, lo:hi] == MASK
        p = torch.where(mask, p, torch.tensor(float("-inf")))
        pick = [j for j in range(hi - lo) if mask[j] and p[j] > threshold]
        if mask.any():
            pick.append(int(p.argmax()))
        for j in pick:
            out[r, lo + j] = x[j]
    return out


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.9, 1.0])
def test_sub_block_step_matches_reference(threshold):
    g = torch.Generator().manual_seed(int(threshold * 100))
    ids = torch.randint(0, 50, (3, 16), generator=g)
    ids[0, :] = MASK
    ids[1, 3:] = MASK
    ids[2, ::3] = MASK
    logits = torch.randn(3, 16, 64, generator=g) * 3
    for lo, hi in ((0, 8), (8, 16)):
        got = fd.sub_block_step(ids, logits, MASK, lo, hi, threshold)
        assert torch.equal(got, reference_step(ids, logits, lo, hi, threshold))
        outside = torch.ones(16, dtype=torch.bool)
        outside[lo:hi] = False
        assert torch.equal(got[:, outside], ids[:, outside])


def test_stopped_rows():
    ids = torch.tensor([[1, STOP, MASK, MASK], [MASK, STOP, 2, 3], [1, 2, 3, 4], [1, 2, STOP, MASK]])
    assert fd.stopped_rows(ids, MASK, STOP).tolist() == [True, False, False, True]
    assert not fd.stopped_rows(ids, MASK, None).any()


VOCAB, BLOCK, SMALL = 100, 8, 4
EMB = torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(7))
HEAD = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(8)) * 2


def raw_logits(seq):
    """A block-causal toy model: row p depends on the tokens of blocks up to p's own (unshifted logits)."""
    e = EMB[torch.as_tensor(seq)]
    out = []
    for p in range(len(seq)):
        end = (p // BLOCK + 1) * BLOCK
        ctx = e[:end].mean(0)
        out.append((e[p] + ctx + 0.1 * p) @ HEAD)
    out = torch.stack(out)
    out[:, MASK] = -1e9  # never predicts [MASK] itself
    return out


def reference_generate(prompt, blocks, threshold, stop):
    """The reference `generate` (no block cache, greedy), transcribed for one sequence of a block-aligned prompt."""
    x = list(prompt)
    x.append(int(raw_logits(x)[-1].argmax()))  # after the aligned prompt: its last logit's greedy token
    for _ in range(blocks):
        start = len(x) // BLOCK * BLOCK
        x += [MASK] * (start + BLOCK - len(x))
        prompt_len = start + 1
        for lo in range(0, BLOCK, SMALL):
            while True:
                ids = torch.tensor(x)
                if not (ids[start + lo:start + lo + SMALL] == MASK).any():
                    break
                gen = ids[prompt_len:]
                if stop is not None and (gen == stop).any() and not (gen[:int((gen == stop).int().argmax())] == MASK).any():
                    break
                logits = raw_logits(x)[start:]
                logits = torch.cat([logits[:1], logits[:-1]])
                step = reference_step(ids[start:][None], logits[None], lo, lo + SMALL, threshold)[0]
                x[start:] = step.tolist()
        if stop is not None and stop in x[len(prompt):]:
            return x[len(prompt):len(prompt) + x[len(prompt):].index(stop) + 1]
        x.append(int(raw_logits(x)[-1].argmax()))  # the commit forward's last logit
    return x[len(prompt):len(prompt) + blocks * BLOCK]


class FakeRunner:
    """SGLang's side: the model shifts logits itself and carries the previous block's last hidden state (here:
    its unshifted logit row), as Fast_dLLM_QwenForCausalLM does."""

    def __init__(self, prefix):
        self.prefix, self.calls = list(prefix), 0
        self.model = SimpleNamespace(carried_first_tokens=self.carried)

    def carried(self, fb):
        return raw_logits(self.prefix)[-1].argmax().reshape(1)

    def forward(self, fb, pp_proxy_tensors=None):
        self.calls += 1
        seq = self.prefix + fb.input_ids.tolist()
        raw = raw_logits(seq)
        shifted = raw[len(self.prefix) - 1:-1]
        return SimpleNamespace(logits_output=SimpleNamespace(full_logits=shifted), can_run_graph=False)


@pytest.mark.parametrize("threshold, stop", [(0.9, STOP), (0.3, None), (1.0, None), (0.0, "mid"), (0.3, "mid")])
def test_algorithm_matches_reference_generate(threshold, stop):
    from sglang_mage.model_adapters.fast_dllm_v2_algorithm import FastDllmV2

    prompt = torch.randint(0, 90, (2 * BLOCK,), generator=torch.Generator().manual_seed(11)).tolist()
    if stop == "mid":  # a token the run does produce in its second block: generation must stop there
        stop = reference_generate(prompt, 4, threshold, None)[BLOCK + 3]
    algo = FastDllmV2(SimpleNamespace(block_size=BLOCK, mask_id=MASK, algorithm_config={
        "small_block_size": SMALL, "threshold": threshold, "stop_token": stop}))
    expect = reference_generate(prompt, 4, threshold, stop)
    assert stop is None or stop == STOP or len(expect) < 2 * BLOCK
    seq, out = list(prompt), []
    for _ in range(4):  # SGLang: each block starts as B [MASK]; the algorithm fills its first from the carry
        runner = FakeRunner(seq)
        ids = torch.full((BLOCK,), MASK)
        _, tokens, _ = algo.run(runner, SimpleNamespace(batch_size=1, input_ids=ids))
        assert len(tokens[0]) == BLOCK and not (ids == MASK).any()
        assert runner.calls <= BLOCK + 1
        seq += tokens[0].tolist()
        out += tokens[0].tolist()
        if stop is not None and stop in out:
            out = out[:out.index(stop) + 1]
            break
    assert out == expect


# The SGLang model class ---------------------------------------------------------------------------------------


def test_model_class_on_cpu_matches_reference_forward():
    out = subprocess.run([sys.executable, os.path.join(HERE, "model_class_forward.py"), "fast-dllm-v2"],
                         capture_output=True, text=True, timeout=600)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, out.stderr[-3000:]
    r = json.loads(line[0][len("RESULT "):])
    assert r["unloaded"] == []  # HF names (q/k/v/gate/up, biases) all mapped by load_weights
    assert r["max_abs_err"] < 1e-4 * max(1.0, r["scale"]) and r["argmax_equal"]
    # Row B (the [MASK] block's first) comes from the carried prompt state, not from its own hidden state.
    assert r["err_vs_unshifted_row_b"] < 1e-4 and r["err_vs_unshifted"] > 1e-2
    assert r["carried_first_token"] == r["reference_first_token"]
