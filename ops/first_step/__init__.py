"""Fused MAGE first step: exact block attention plus the block-mean query's logits in one pass over K."""

from .kernel import fused_first_step
from .reference import fused_first_step_ref

__all__ = ["fused_first_step", "fused_first_step_ref"]
