"""Denoising schedules beyond SGLang's own (LowConfidence, JointThreshold): the logic, free of SGLang.

`FixedSteps` makes benchmarks reproducible: every block takes exactly `steps` denoising forwards (fewer only
when a block holds fewer [MASK] tokens than that), each unmasking an equal share of the block's [MASK]
positions, the most confident first, then one commit pass that writes the block's final KV. The SGLang
algorithm class is in fixed_steps_algorithm.py; `register_schedules()` adds it to SGLang's algorithm table
when that package is first imported, so `--dllm-algorithm FixedSteps` works, with the step count from
`--dllm-algorithm-config` (YAML `steps: 8`).
"""

from __future__ import annotations

import torch

FIXED_STEPS = "FixedSteps"
DEFAULT_STEPS = 8


ALGORITHM_PACKAGE = "sglang.srt.dllm.algorithm"


def _add_schedules(package) -> None:
    from .fixed_steps_algorithm import FixedSteps

    package.algo_name_to_cls.setdefault(FIXED_STEPS, FixedSteps)


def register_schedules() -> None:
    """Why: SGLang 0.5.14 finds dLLM algorithms only among its own modules (`algo_name_to_cls`, filled when
    `sglang.srt.dllm.algorithm` is imported). Adds ours to that table right after the package's first
    import in each process, without importing it at plugin registration. Remove when SGLang has a plugin
    registry for algorithms."""
    from sglang_mage.compat import when_imported

    when_imported(ALGORITHM_PACKAGE, _add_schedules)


def parse_steps(algorithm_config: dict, block_size: int) -> int:
    steps = algorithm_config.get("steps", min(DEFAULT_STEPS, block_size))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= block_size:
        raise ValueError(f"FixedSteps: 'steps' must be an integer in [1, block size {block_size}] (got {steps!r})")
    return steps


def step_quota(remaining, steps_left: int):
    """[MASK] positions a row fills at a step: an equal share of what remains, ceil(remaining / steps_left).
    Works on host ints (steps_needed) and on device tensors (fixed_steps_transfer) alike."""
    return (remaining + steps_left - 1) // steps_left


def steps_needed(masked_counts, steps: int) -> int:
    """Denoising forwards until every row's [MASK] is gone, from the rows' [MASK] counts alone.

    fixed_steps_transfer fills exactly step_quota of a row's masks per step (never more
    than remain), so the count is known on the host before the first forward. The loop that runs the steps
    then needs no device-to-host read between them, and the host can queue the next forward while the GPU
    still runs the current one."""
    remaining = [int(n) for n in masked_counts]
    done = 0
    for step in range(steps):
        if not any(remaining):
            break
        remaining = [n - step_quota(n, steps - step) for n in remaining]
        done += 1
    return done


def fixed_steps_transfer(input_ids: torch.Tensor, logits: torch.Tensor, mask_id: int, steps_left: int) -> torch.Tensor:
    """One denoising step. input_ids [R, B] (updated copy returned), logits [R, B, V].

    Each row unmasks ceil(remaining / steps_left) of its [MASK] positions: those whose argmax token has the
    highest probability (ties: the earlier position). Unmasked positions never change."""
    mask = input_ids == mask_id
    probs = torch.softmax(logits.float(), dim=-1)
    conf, token = probs.max(dim=-1)
    conf = torch.where(mask, conf, float("-inf"))
    remaining = mask.sum(dim=1, keepdim=True)
    quota = step_quota(remaining, steps_left)
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    transfer = mask & (rank < quota)
    return torch.where(transfer, token.to(input_ids.dtype), input_ids)
