"""The tiny SDAR model: block-diffusion training on [noisy | clean] computes exactly what block-by-block
inference computes, and its parameters carry the Hugging Face names SGLang's SDAR loader reads."""

import torch

from training.model import TinyConfig, TinySDAR, block_causal_mask, training_mask

CFG = TinyConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, block_size=4, mask_token_id=3)


def test_training_forward_matches_inference_block_by_block():
    torch.manual_seed(0)
    model = TinySDAR(CFG).eval()
    n, b = 16, CFG.block_size
    clean = torch.randint(8, 64, (n,))
    noisy = torch.where(torch.rand(n) < 0.5, torch.full((n,), CFG.mask_token_id), clean)
    pos = torch.arange(n)
    with torch.no_grad():
        train = model(torch.cat([noisy, clean]), torch.cat([pos, pos]), training_mask(n, b))[:n]
        for blk in range(n // b):
            s, e = blk * b, (blk + 1) * b
            seq = torch.cat([clean[:s], noisy[s:e]])
            infer = model(seq, torch.arange(e), block_causal_mask(e, b))[s:e]
            assert torch.allclose(train[s:e], infer, atol=1e-5), blk


def test_masks():
    m = training_mask(8, 4)
    assert m[:4, :4].all() and not m[:4, 4:8].any()  # noisy block 0: itself only
    assert m[4:8, 4:8].all() and m[4:8, 8:12].all() and not m[4:8, 12:].any()  # noisy block 1: + clean block 0
    assert not m[8:, :8].any() and torch.equal(m[8:, 8:], block_causal_mask(8, 4))


def test_parameter_names_follow_the_hf_qwen3_layout():
    names = set(TinySDAR(CFG).state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(CFG.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                     "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                     "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                                     "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
    assert names == expected
    hf = CFG.hf_config()
    assert hf["architectures"] == ["SDARForCausalLM"] and hf["block_size"] == 4 and hf["mask_token_id"] == 3
