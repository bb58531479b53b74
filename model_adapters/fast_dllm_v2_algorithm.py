"""`FastDllmV2` as an SGLang dLLM algorithm: the reference's sub-block threshold schedule (fast_dllm_v2.py).
Imported lazily: SGLang's algorithm package is heavy. YAML (`--dllm-algorithm-config`): `small_block_size`
(8), `threshold` (0.9), `stop_token` (151645, null to disable)."""

from __future__ import annotations

import torch

from sglang.srt.dllm.algorithm.base import DllmAlgorithm

from .fast_dllm_v2 import parse_schedule, stopped_rows, sub_block_step


class FastDllmV2(DllmAlgorithm):
    def __init__(self, config):
        super().__init__(config)
        self.small_block_size, self.threshold, self.stop_token = parse_schedule(
            config.algorithm_config or {}, self.block_size)

    def run(self, model_runner, forward_batch):
        bs, block, mask_id = forward_batch.batch_size, self.block_size, self.mask_id
        # Checked before the view: a mask-free batch may hold multi-block prompt chunks (mage chunked prefill).
        if not bool((forward_batch.input_ids == mask_id).any()):
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            return out.logits_output, [], out.can_run_graph
        ids = forward_batch.input_ids.view(bs, block)  # a view: in-place updates reach the next forward
        starts = (block - (ids == mask_id).sum(dim=1)).tolist()
        # The reference appends the previous block's greedy next token before this block's first forward.
        carried = getattr(model_runner.model, "carried_first_tokens", None)
        if carried is not None:
            first = carried(forward_batch)
            ids[:, 0] = torch.where((ids[:, 0] == mask_id) & (first >= 0), first.to(ids.dtype), ids[:, 0])
        for lo in range(0, block, self.small_block_size):
            hi = lo + self.small_block_size
            while True:
                done = stopped_rows(ids, mask_id, self.stop_token)
                live = (ids[:, lo:hi] == mask_id).any(dim=1) & ~done
                if not bool(live.any()):
                    break
                out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
                logits = out.logits_output.full_logits.view(bs, block, -1)
                step = sub_block_step(ids, logits, mask_id, lo, hi, self.threshold)
                ids.copy_(torch.where(live[:, None], step, ids))
        # A stopped row's [MASK] after its stop token is cut from the output; fill it so the commit is mask-free.
        if self.stop_token is not None:
            ids.masked_fill_(ids == mask_id, self.stop_token)
        out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
        return out.logits_output, [ids[i, starts[i]:] for i in range(bs)], out.can_run_graph


Algorithm = FastDllmV2
