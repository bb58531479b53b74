"""Per-rank shapes of mage under tensor parallelism, with an emulated attention-TP size (issue 9's CPU part):
each rank holds its share of query and KV heads (SGLang's ModelConfig splits them), its own index cache
and workspace of that size, and the per-rank backend computes exactly the per-rank slice of the full
attention (no selection crosses ranks)."""

import os
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch

from sglang_mage.backend import MageAttnBackend, rank_head_counts
from sglang_mage.config import MageConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples"))
from tiny_model import TINY_SDAR, write  # noqa: E402


@pytest.fixture(scope="module")
def model_config():
    from sglang.srt.configs.model_config import ModelConfig

    return ModelConfig(write(os.path.join(tempfile.mkdtemp(), "tiny")))


@pytest.mark.parametrize("tp, heads", [(1, (8, 4)), (2, (4, 2)), (4, (2, 1)), (8, (1, 1))])
def test_rank_head_counts_follow_sglang(model_config, tp, heads):
    # 8 query / 4 KV heads: at tp=8 SGLang replicates each KV head on two ranks.
    assert rank_head_counts(model_config, tp) == heads


def test_uneven_query_heads_are_rejected(model_config):
    with pytest.raises(RuntimeError, match="do not split"):
        rank_head_counts(model_config, 3)


def test_per_rank_state_is_sized_by_the_ranks_heads(model_config):
    cfg = MageConfig(k=8, sink_tokens=2, local_window=2)
    sizes = {}
    for tp in (1, 2):
        q_heads, kv_heads = rank_head_counts(model_config, tp)
        pool = SimpleNamespace(req_to_token=torch.zeros(5, 64, dtype=torch.int32), free=lambda r: None,
                               clear=lambda: None)
        backend = MageAttnBackend.__new__(MageAttnBackend)
        backend._setup_mage(cfg, SimpleNamespace(block_size=4, mask_id=7, max_running_requests=4),
                            TINY_SDAR["num_hidden_layers"], q_heads, kv_heads, 128, pool, "cpu")
        sizes[tp] = (backend.index_cache.slots.shape, backend.workspace_shape)
    (cache1, ws1), (cache2, ws2) = sizes[1], sizes[2]
    assert cache1[2] == 4 and cache2[2] == 2 and cache1[3] == cache2[3] == 12
    # (KV heads, block, G, ...): each rank's sparse workspace is for its own KV heads, G the same on every rank
    assert ws1[0] == 4 and ws2[0] == 2 and ws1[1:] == ws2[1:]


def test_rank_slices_of_the_sparse_step_reassemble_the_full_step():
    """Two ranks, each with half of the KV heads (and their query heads) and its own selection: their
    outputs, concatenated over heads, equal the single-rank sparse step."""
    from sglang_mage.ops.sparse_attention import sparse_block_attention_ref

    torch.manual_seed(0)
    B, hq, hkv, d, prefix = 4, 8, 4, 32, 40
    q = torch.randn(B, hq, d)
    k, v = torch.randn(prefix + B, hkv, d), torch.randn(prefix + B, hkv, d)
    r2t = torch.arange(prefix + B, dtype=torch.int32).view(1, -1)
    sel = torch.stack([torch.randperm(prefix)[:12].sort().values for _ in range(hkv)]).int().view(1, hkv, 12)
    lens = torch.full((1, hkv), 12, dtype=torch.int32)
    args = (torch.tensor([0, B], dtype=torch.int32), r2t, torch.tensor([0]), torch.tensor([prefix], dtype=torch.int32))
    full = sparse_block_attention_ref(q, k, v, *args, sel, lens, d**-0.5, B)
    parts = []
    for rank in range(2):
        kv = slice(rank * 2, rank * 2 + 2)
        qh = slice(rank * 4, rank * 4 + 4)
        parts.append(sparse_block_attention_ref(q[:, qh].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous(),
                                                *args, sel[:, kv].contiguous(), lens[:, kv].contiguous(), d**-0.5, B))
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-6)
