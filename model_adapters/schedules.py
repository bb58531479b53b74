"""Denoising schedules beyond SGLang's own (LowConfidence, JointThreshold): the logic, free of SGLang.

`FixedSteps` makes benchmarks reproducible: every block takes exactly `steps` denoising forwards (fewer only
when a block holds fewer [MASK] tokens than that), each unmasking an equal share of the block's [MASK]
positions, the most confident first, then one commit pass that writes the block's final KV. The SGLang
algorithm class is in fixed_steps_algorithm.py. Registering it with SGLang (`--dllm-algorithm FixedSteps`,
step count from `--dllm-algorithm-config`, YAML `steps: 8`) is not wired yet: a hook on
`DllmConfig.from_server_args` would import ~900 SGLang modules at plugin registration, so it waits for a
post-import registration that keeps registration cheap.
"""

from __future__ import annotations

import torch

FIXED_STEPS = "FixedSteps"
DEFAULT_STEPS = 8


def parse_steps(algorithm_config: dict, block_size: int) -> int:
    steps = algorithm_config.get("steps", min(DEFAULT_STEPS, block_size))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= block_size:
        raise ValueError(f"FixedSteps: 'steps' must be an integer in [1, block size {block_size}] (got {steps!r})")
    return steps


def fixed_steps_transfer(input_ids: torch.Tensor, logits: torch.Tensor, mask_id: int, steps_left: int) -> torch.Tensor:
    """One denoising step. input_ids [R, B] (updated copy returned), logits [R, B, V].

    Each row unmasks ceil(remaining / steps_left) of its [MASK] positions: those whose argmax token has the
    highest probability (ties: the earlier position). Unmasked positions never change."""
    mask = input_ids == mask_id
    probs = torch.softmax(logits.float(), dim=-1)
    conf, token = probs.max(dim=-1)
    conf = torch.where(mask, conf, float("-inf"))
    remaining = mask.sum(dim=1, keepdim=True)
    quota = (remaining + steps_left - 1) // steps_left
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    transfer = mask & (rank < quota)
    return torch.where(transfer, token.to(input_ids.dtype), input_ids)
