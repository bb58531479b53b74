"""`FixedSteps` as an SGLang dLLM algorithm (imported lazily: SGLang's algorithm package is heavy)."""

from __future__ import annotations

from sglang.srt.dllm.algorithm.base import DllmAlgorithm

from .schedules import fixed_steps_transfer, parse_steps, steps_needed


class FixedSteps(DllmAlgorithm):
    def __init__(self, config):
        super().__init__(config)
        self.steps = parse_steps(config.algorithm_config or {}, self.block_size)

    def run(self, model_runner, forward_batch):
        bs, block = forward_batch.batch_size, self.block_size
        ids = forward_batch.input_ids
        if ids.numel() == bs * block:
            ids = ids.view(bs, block)  # a view: in-place updates reach the next forward
            # The block's one device-to-host read: the step count follows from the [MASK] counts (steps_needed).
            masked_counts = ids.eq(self.mask_id).sum(dim=1).tolist()
        elif bool((ids == self.mask_id).any()):
            # Any other size is a multi-block prompt chunk (mage chunked prefill), which holds no [MASK];
            # checking costs a host read, but only on those few prompt forwards.
            raise RuntimeError(f"FixedSteps: a batch of {ids.numel()} tokens for {bs} requests of block size "
                               f"{block} holds [MASK] tokens")
        else:
            masked_counts = []
        if not any(masked_counts):
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            return out.logits_output, [], out.can_run_graph
        starts = [block - n for n in masked_counts]
        for step in range(steps_needed(masked_counts, self.steps)):
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            logits = out.logits_output.full_logits.view(bs, block, -1)
            ids.copy_(fixed_steps_transfer(ids, logits, self.mask_id, self.steps - step))
        # The commit pass: the block's final tokens write their KV.
        out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
        return out.logits_output, [ids[i, starts[i]:] for i in range(bs)], out.can_run_graph


Algorithm = FixedSteps
