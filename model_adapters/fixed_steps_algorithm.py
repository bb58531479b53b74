"""`FixedSteps` as an SGLang dLLM algorithm (imported lazily: SGLang's algorithm package is heavy)."""

from __future__ import annotations

from sglang.srt.dllm.algorithm.base import DllmAlgorithm

from .schedules import fixed_steps_transfer, parse_steps


class FixedSteps(DllmAlgorithm):
    def __init__(self, config):
        super().__init__(config)
        self.steps = parse_steps(config.algorithm_config or {}, self.block_size)

    def run(self, model_runner, forward_batch):
        bs, block = forward_batch.batch_size, self.block_size
        # Checked before the view: a mask-free batch may hold multi-block prompt chunks (mage chunked prefill).
        if not bool((forward_batch.input_ids == self.mask_id).any()):
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            return out.logits_output, [], out.can_run_graph
        ids = forward_batch.input_ids.view(bs, block)  # a view: in-place updates reach the next forward
        masked = ids == self.mask_id
        starts = (block - masked.sum(dim=1)).tolist()
        for step in range(self.steps):
            if not bool((ids == self.mask_id).any()):
                break
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            logits = out.logits_output.full_logits.view(bs, block, -1)
            ids.copy_(fixed_steps_transfer(ids, logits, self.mask_id, self.steps - step))
        # The commit pass: the block's final tokens write their KV.
        out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
        return out.logits_output, [ids[i, starts[i]:] for i in range(bs)], out.can_run_graph


Algorithm = FixedSteps
