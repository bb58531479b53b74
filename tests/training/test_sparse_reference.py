"""The selectors' PyTorch emulation (training/sparse_reference.py): recall on hand-made sets, exact decoding
through the hook, agreement with mage_reference.py, Quest scores equal to the backend's loop reference, and
the step-0 sparsity statistics."""

import random

import pytest
import torch

from training import train
from training.mage_reference import decode_with_mage
from training.model import TinyConfig, TinySDAR
from training.sparse_reference import decode_with_method, fused_scores, quest_scores, set_recall, top_outside
from training.tasks import MASK

CFG = TinyConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TinySDAR(CFG).eval()
    prompts, _, _ = train.padded_batch(random.Random(0), 3, 160, CFG.block_size)
    return model, prompts, train.decode_answer(model, prompts)


def test_set_recall_hand_made_cases():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    oracle = torch.tensor([[True, True, False, False]])
    assert set_recall(oracle.clone(), oracle, probs)[:2] == (1.0, 1.0)
    rec, mrec, cap = set_recall(~oracle, oracle, probs)
    assert rec == 0.0 and mrec == 0.0 and cap == pytest.approx(0.3)
    rec, mrec, cap = set_recall(torch.tensor([[False, True, True, False]]), oracle, probs)
    assert rec == 0.5 and mrec == pytest.approx(0.3 / 0.7) and cap == pytest.approx(0.5)
    # An empty oracle (prefix within sinks + local window) is fully recalled.
    assert set_recall(oracle, torch.zeros_like(oracle), probs)[:2] == (1.0, 1.0)


def test_top_outside_skips_excluded_positions():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    top = top_outside(scores, torch.tensor([True, False, False, False, False]), 2)
    assert top.tolist() == [[False, True, True, False, False]]


def test_exact_through_the_hook_equals_the_model(setup):
    model, prompts, dense = setup
    out, sa = decode_with_method(model, prompts, None, k=0)
    assert torch.equal(out, dense) and sa.recalls == []
    assert "attend" not in vars(model.model.layers[0].self_attn)


@pytest.mark.parametrize("method", ["mage", "mage_fused", "quest", "oracle"])
def test_budget_covering_the_prompt_equals_dense(setup, method):
    model, prompts, dense = setup
    out, sa = decode_with_method(model, prompts, method, k=prompts.shape[1], sink=0, local=0)
    assert torch.equal(out, dense)
    assert sa.mean_recall() == {"recall": 1.0, "mass_recall": 1.0, "mass_captured": pytest.approx(1.0)}


def test_mage_equals_mage_reference(setup):
    model, prompts, _ = setup
    ref, ref_recall = decode_with_mage(model, prompts, k=16, sink=4, local=16)
    out, sa = decode_with_method(model, prompts, "mage", k=16, sink=4, local=16)
    assert torch.equal(out, ref) and sa.mean_recall()["recall"] == pytest.approx(ref_recall)


def test_small_budget_recall_ranges(setup):
    model, prompts, _ = setup
    res = {}
    for method in ("mage", "mage_fused", "quest", "oracle"):
        out, sa = decode_with_method(model, prompts, method, k=8, sink=2, local=4)
        assert not (out == MASK).any()
        # 3 later steps x 2 layers, one entry each
        assert len(sa.recalls) == 3 * CFG.num_hidden_layers
        res[method] = sa.mean_recall()
        assert all(0.0 <= v <= 1.0 for v in res[method].values())
    assert res["oracle"]["recall"] == 1.0 and res["oracle"]["mass_recall"] == 1.0
    assert res["mage"]["recall"] < 1.0  # a random model's attention moves between steps


def test_fused_scores_equal_the_fused_first_step_reference():
    """The harness's `mage_fused` ranks keys by exactly the scores ops/first_step's fused pass writes."""
    from sglang_mage.ops.first_step.reference import fused_first_step_ref

    g = torch.Generator().manual_seed(0)
    n, hkv, grp, b, p, d = 2, 2, 3, 4, 37, 8
    scale = d ** -0.5
    q_block = torch.randn(n, hkv * grp, b, d, generator=g)
    k_all = torch.randn(n, hkv, p + b, d, generator=g)  # prefix, then the block's own keys
    ours = fused_scores(q_block, k_all[:, :, :p], grp, scale)
    q = q_block.permute(0, 2, 1, 3).reshape(n * b, hkv * grp, d)
    k_buffer = k_all.permute(0, 2, 1, 3).reshape(n * (p + b), hkv, d)
    _, ref = fused_first_step_ref(q, k_buffer, k_buffer, torch.arange(n + 1) * b,
                                  torch.arange(n * (p + b)).view(n, p + b), torch.arange(n), torch.full((n,), p),
                                  scale, b, p)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_quest_scores_equal_the_backend_loop_reference():
    from sglang_mage.ops.selection.quest import quest_scores_ref

    g = torch.Generator().manual_seed(0)
    n, hkv, grp, b, p, d, page = 2, 2, 3, 4, 37, 8, 8
    q_block = torch.randn(n, hkv * grp, b, d, generator=g)
    k_prefix = torch.randn(n, hkv, p, d, generator=g)
    ours = quest_scores(q_block, k_prefix, page)
    q = q_block.permute(0, 2, 1, 3).reshape(n * b, hkv * grp, d)
    k_buffer = k_prefix.permute(0, 2, 1, 3).reshape(n * p, hkv, d)
    ref = quest_scores_ref(q, k_buffer, torch.arange(n + 1) * b, torch.arange(n * p).view(n, p), torch.arange(n),
                           torch.full((n,), p), b, page, p)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # By hand for request 1, KV head 0, last (partial) page: the bound of the block-mean query.
    qm = q_block[1, :grp].mean(dim=(0, 1))
    keys = k_prefix[1, 0, 32:]
    bound = torch.maximum(qm * keys.min(0).values, qm * keys.max(0).values).sum()
    assert ours[1, 0, 32:].allclose(bound.expand(5), atol=1e-5)


def test_step0_statistics(setup):
    model, prompts, _ = setup
    _, sa = decode_with_method(model, prompts, None, k=0, stats_ks=(8, 32))
    assert sorted(sa.stats) == list(range(CFG.num_hidden_layers))
    for s in sa.stats.values():
        assert 0 < s["topk_mass"][8] < s["topk_mass"][32] <= s["prefix_mass"] <= 1 + 1e-6
        assert s["head_cv"][8] >= 0 and s["vote_layer_score"][32] > s["vote_layer_score"][8] > 0


def test_quest_bounds_used_here_equal_the_backend_kernel():
    """The reference uses the torch page bounds; the backend's Triton kernel (interpreted on the CPU) gives
    the same bounds on the same paged layout."""
    from sglang_mage.ops.selection import quest

    if not hasattr(quest, "page_bounds_ref"):
        pytest.skip("this sglang_mage's page_bounds is the torch version itself")
    g = torch.Generator().manual_seed(1)
    n, hkv, p, d, page = 2, 2, 45, 16, 16
    k_buffer = torch.randn(n * p, hkv, d, generator=g)
    args = (k_buffer, torch.arange(n * p, dtype=torch.int32).view(n, p), torch.arange(n),
            torch.full((n,), p, dtype=torch.int32), page, p)
    for ours, kernel in zip(quest.page_bounds_ref(*args), quest.page_bounds(*args)):
        assert torch.equal(ours, kernel)
