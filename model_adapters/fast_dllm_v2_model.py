"""`Fast_dLLM_QwenForCausalLM` for SGLang: Qwen2 (SGLang's implementation) with block-diffusion attention and the
Fast-dLLM v2 token shift (see fast_dllm_v2.py for the reference's behaviour). Imported lazily, when SGLang's
model registry is first imported."""

from __future__ import annotations

from typing import Optional

import torch

from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.models.qwen2 import Qwen2ForCausalLM

from .fast_dllm_v2 import CarryState, segment_rows, shift_hidden


class Fast_dLLM_QwenForCausalLM(Qwen2ForCausalLM):  # noqa: N801 - the HF architecture name
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        # ENCODER_ONLY: SGLang's dLLM backends (flashinfer, mage) then attend bidirectionally inside the block
        # and to the whole prefix, the reference's block-causal pattern; DECODER would make the block causal.
        for layer in self.model.layers:
            attn = getattr(getattr(layer, "self_attn", None), "attn", None)
            if attn is not None:
                attn.attn_type = AttentionType.ENCODER_ONLY
        # dLLM algorithms read a logit row for every token of the block.
        self.logits_processor = LogitsProcessor(config, return_full_logits=True)
        self.carry: Optional[CarryState] = None
        self._req_to_token: Optional[torch.Tensor] = None

    # ---- token shift ----------------------------------------------------------------------------------------

    def _slot_table(self) -> torch.Tensor:
        """The request-to-KV-slot table. SGLang 0.5.14's ForwardBatch does not carry the pool: models reach it
        through the forward context (the attention backend's `req_to_token_pool`). The dLLM algorithm asks for
        the carried tokens before the forward, outside that context, so the table seen by the last forward is
        kept (the pool is allocated once, so it is the same tensor)."""
        from sglang.srt.model_executor.forward_context import get_req_to_token_pool, has_forward_context

        if has_forward_context():
            self._req_to_token = get_req_to_token_pool().req_to_token
        if self._req_to_token is None:
            raise RuntimeError("Fast-dLLM v2: no request-to-token table seen yet (no forward has run)")
        return self._req_to_token

    def _carry_for(self, forward_batch, hidden_size: int, dtype, device) -> CarryState:
        if self.carry is None:
            # One row per request-pool slot, sized from the pool itself (known only once a batch arrives).
            slots = self._slot_table().shape[0]
            self.carry = CarryState(slots, hidden_size, dtype, device)
        return self.carry

    def _lookup(self, forward_batch, positions: torch.Tensor, carry: CarryState):
        first, last = segment_rows(forward_batch.extend_start_loc, forward_batch.extend_seq_lens)
        slots = forward_batch.req_pool_indices.long()
        first_pos = positions[first].long()
        prev_loc = self._slot_table()[slots, (first_pos - 1).clamp(min=0)].long()
        carried, valid = carry.lookup(slots, first_pos, prev_loc)
        return first, last, slots, carried, valid

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, get_embedding: bool = False,
                pp_proxy_tensors=None):
        if not forward_batch.forward_mode.is_dllm_extend() or get_embedding:
            return super().forward(input_ids, positions, forward_batch, input_embeds, get_embedding,
                                   pp_proxy_tensors)
        hidden = self.model(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors=pp_proxy_tensors)
        if not self.pp_group.is_last_rank:
            return hidden
        carry = self._carry_for(forward_batch, hidden.shape[-1], hidden.dtype, hidden.device)
        first, last, slots, carried, valid = self._lookup(forward_batch, positions, carry)
        shifted = shift_hidden(hidden, first, carried, valid)
        # After the lookup: the carry read above belongs to the previous forward of these requests.
        carry.store(slots, positions[last], forward_batch.out_cache_loc[last], hidden[last],
                    forward_batch.out_cache_loc)
        return self.logits_processor(input_ids, shifted, self.lm_head, forward_batch)

    @torch.no_grad()
    def carried_first_tokens(self, forward_batch) -> torch.Tensor:
        """[bs] the greedy token each request's segment should start with, predicted by the carried hidden
        state of the previous position (the reference's token appended after a block), or -1 without one."""
        bs = forward_batch.batch_size
        device = forward_batch.input_ids.device
        if self.carry is None:
            return torch.full((bs,), -1, dtype=torch.long, device=device)
        _, _, _, carried, valid = self._lookup(forward_batch, forward_batch.positions, self.carry)
        logits = self.logits_processor._compute_lm_head(carried, self.lm_head)
        if self.logits_processor.do_tensor_parallel_all_gather:
            from sglang.srt.distributed import tensor_model_parallel_all_gather

            logits = tensor_model_parallel_all_gather(logits)
        token = logits[:, : self.config.vocab_size].argmax(dim=-1)
        return torch.where(valid, token, torch.full_like(token, -1))


EntryClass = Fast_dLLM_QwenForCausalLM
