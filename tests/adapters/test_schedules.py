"""FixedSteps: step logic against a brute-force reference, and the algorithm with a fake model runner."""

from types import SimpleNamespace

import pytest
import torch

from sglang_mage.model_adapters.schedules import fixed_steps_transfer, parse_steps, steps_needed

MASK = 99


@pytest.mark.parametrize("cfg, block, ok", [({}, 32, 8), ({}, 4, 4), ({"steps": 3}, 4, 3), ({"steps": 0}, 4, None),
                                            ({"steps": 5}, 4, None), ({"steps": 2.0}, 4, None), ({"steps": True}, 4, None)])
def test_parse_steps(cfg, block, ok):
    if ok is None:
        with pytest.raises(ValueError, match="FixedSteps"):
            parse_steps(cfg, block)
    else:
        assert parse_steps(cfg, block) == ok


def brute_force(ids, logits, steps_left):
    out = ids.clone()
    probs = torch.softmax(logits.float(), -1)
    for r in range(ids.shape[0]):
        masked = [j for j in range(ids.shape[1]) if ids[r, j] == MASK]
        quota = -(-len(masked) // steps_left)
        best = sorted(masked, key=lambda j: (-probs[r, j].max().item(), j))[:quota]
        for j in best:
            out[r, j] = probs[r, j].argmax()
    return out


@pytest.mark.parametrize("steps_left", [1, 2, 3, 8])
def test_transfer_matches_brute_force(steps_left):
    g = torch.Generator().manual_seed(steps_left)
    ids = torch.randint(0, 50, (3, 8), generator=g)
    ids[0, 2:] = MASK  # a prompt tail of 2 tokens, then masks
    ids[1, :] = MASK
    ids[2, ::2] = MASK
    logits = torch.randn(3, 8, 64, generator=g)
    got = fixed_steps_transfer(ids, logits, MASK, steps_left)
    assert torch.equal(got, brute_force(ids, logits, steps_left))
    keep = ids != MASK
    assert torch.equal(got[keep], ids[keep])


def test_fixed_steps_algorithm_runs_exactly_steps_plus_commit():
    from sglang_mage.model_adapters.fixed_steps_algorithm import FixedSteps

    block, steps = 8, 4
    algo = FixedSteps(SimpleNamespace(block_size=block, mask_id=MASK, algorithm_config={"steps": steps}))
    ids = torch.full((2 * block,), MASK)
    ids[:3] = torch.tensor([5, 6, 7])  # request 0 carries a 3-token prompt tail in its block
    batch = SimpleNamespace(batch_size=2, input_ids=ids)
    calls, masks_before = [], []

    def forward(fb, pp_proxy_tensors=None):
        masks_before.append(int((fb.input_ids == MASK).sum()))
        calls.append(1)
        logits = torch.randn(2 * block, 100, generator=torch.Generator().manual_seed(len(calls)))
        logits[:, MASK] = float("-inf")  # a model that never predicts [MASK] itself
        return SimpleNamespace(logits_output=SimpleNamespace(full_logits=logits), can_run_graph=False)

    _, tokens, _ = algo.run(SimpleNamespace(forward=forward), batch)
    assert len(calls) == steps + 1  # four denoising steps, one commit pass
    assert masks_before == [13, 9, 6, 3, 0]  # equal shares per step: ceil(5/4)+ceil(8/4), ...
    assert [t.numel() for t in tokens] == [5, 8] and not (ids == MASK).any()
    assert torch.equal(ids[:3], torch.tensor([5, 6, 7]))


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_steps_needed_equals_running_the_transfer_until_no_mask(steps):
    # The algorithm runs steps_needed(...) forwards without reading the device between them; it must be
    # exactly when the transfer itself would have emptied every row.
    g = torch.Generator().manual_seed(steps)
    block = 8
    for counts in ([0, 0], [1, 0], [3, 8], [8, 8], [2, 5, 7], [1]):
        ids = torch.randint(0, 50, (len(counts), block), generator=g)
        for r, n in enumerate(counts):
            ids[r, block - n:] = MASK
        ran = 0
        while (ids == MASK).any() and ran < steps:
            ids = fixed_steps_transfer(ids, torch.randn(len(counts), block, 64, generator=g), MASK, steps - ran)
            ran += 1
        assert not (ids == MASK).any()
        assert steps_needed(counts, steps) == ran, (counts, steps)


def test_fixed_steps_reads_the_device_once_per_block_and_rejects_masks_in_a_prompt_chunk():
    from sglang_mage.model_adapters.fixed_steps_algorithm import FixedSteps

    block = 4
    algo = FixedSteps(SimpleNamespace(block_size=block, mask_id=MASK, algorithm_config={"steps": 4}))
    calls = []

    def forward(fb, pp_proxy_tensors=None):
        calls.append(fb.input_ids.numel())
        logits = torch.randn(fb.input_ids.numel(), 100)
        logits[:, MASK] = float("-inf")
        return SimpleNamespace(logits_output=SimpleNamespace(full_logits=logits), can_run_graph=True)

    # two masks in the block: 2 denoising forwards (one mask each), then the commit pass
    ids = torch.tensor([5, 6, MASK, MASK])
    _, tokens, graph = algo.run(SimpleNamespace(forward=forward), SimpleNamespace(batch_size=1, input_ids=ids))
    assert calls == [4, 4, 4] and [t.numel() for t in tokens] == [2] and graph is True
    # a 3-block prompt chunk: one forward, nothing generated
    calls.clear()
    chunk = SimpleNamespace(batch_size=1, input_ids=torch.arange(12))
    _, tokens, _ = algo.run(SimpleNamespace(forward=forward), chunk)
    assert calls == [12] and tokens == []
    chunk.input_ids[5] = MASK
    with pytest.raises(RuntimeError, match="holds \\[MASK\\]"):
        algo.run(SimpleNamespace(forward=forward), chunk)
