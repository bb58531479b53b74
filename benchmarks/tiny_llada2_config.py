"""A minimal Hugging Face config class for LLaDA2-MoE checkpoints (model_type `llada2_moe`).

Real LLaDA2 checkpoints ship their config class as remote code (`trust_remote_code=True`); transformers has
none. The tiny test models that benchmarks/adapters_check.py writes carry this file as
`configuration_llada2_moe.py` with an `auto_map`, so SGLang loads them the way it loads a real checkpoint.
The fields are the ones SGLang 0.5.14's `sglang.srt.models.llada2` reads.
"""

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    model_type = "llada2_moe"

    def __init__(self, vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_hidden_layers=20,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=None, hidden_act="silu",
                 use_qkv_bias=False, use_bias=False, use_qk_norm=True, rms_norm_eps=1e-6, embedding_dropout=0.0,
                 max_position_embeddings=32768, rope_theta=600000.0, rope_scaling=None, partial_rotary_factor=0.5,
                 num_experts=256, num_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                 moe_intermediate_size=512, first_k_dense_replace=1, norm_topk_prob=True,
                 routed_scaling_factor=2.5, score_function="sigmoid", moe_router_enable_expert_bias=True,
                 router_dtype="fp32", tie_word_embeddings=False, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act, self.use_qkv_bias, self.use_bias, self.use_qk_norm = hidden_act, use_qkv_bias, use_bias, use_qk_norm
        self.rms_norm_eps, self.embedding_dropout = rms_norm_eps, embedding_dropout
        self.max_position_embeddings, self.rope_theta, self.rope_scaling = max_position_embeddings, rope_theta, rope_scaling
        self.partial_rotary_factor = partial_rotary_factor
        self.num_experts, self.num_shared_experts, self.num_experts_per_tok = num_experts, num_shared_experts, num_experts_per_tok
        self.n_group, self.topk_group, self.moe_intermediate_size = n_group, topk_group, moe_intermediate_size
        self.first_k_dense_replace, self.norm_topk_prob = first_k_dense_replace, norm_topk_prob
        self.routed_scaling_factor, self.score_function = routed_scaling_factor, score_function
        self.moe_router_enable_expert_bias, self.router_dtype = moe_router_enable_expert_bias, router_dtype
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
