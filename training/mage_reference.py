"""MAGE on the tiny PyTorch model, for accuracy and recall at small context on the CPU.

The answer block is decoded in ANSWER_LEN steps (training.train.decode_answer). With MAGE, step 1 attends
exactly and, per layer and KV head, keeps the sink tokens, the local window and the top-k prefix positions by
block-average attention probability (over the block's rows and the KV head's query heads); later steps
attend the block's rows only to those positions plus the block. Prompt rows are unaffected (their output
does not depend on the block, as with SGLang's cached prefix KV).

Recall: at every later step, the share of that step's own top-k prefix positions (the per-step oracle) that
the cached set holds, averaged over layers, KV heads and requests.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .model import attention_override


class MageAttention:
    def __init__(self, model, prompt_len: int, k: int, sink: int = 4, local: int = 16):
        self.model, self.prompt_len, self.k, self.sink, self.local = model, prompt_len, k, sink, local
        self.selected: dict[int, torch.Tensor] = {}  # layer -> [N, Hkv, P] bool
        self.recalls: list[float] = []
        self.step = 0

    def _block_mean(self, probs, group):
        """probs [N, Hq, B, P] -> [N, Hkv, P]: mean over the group's query heads and the block's rows."""
        n, hq, b, p = probs.shape
        return probs.view(n, hq // group, group, b, p).mean(dim=(2, 3))

    def _forced(self, scores):
        p = scores.shape[-1]
        forced = torch.zeros_like(scores, dtype=torch.bool)
        forced[..., : min(self.sink, p)] = True
        forced[..., max(0, p - self.local):] = True
        return forced

    def _top(self, scores, exclude):
        """The top-k positions by score outside `exclude`."""
        top = torch.zeros_like(exclude)
        n_top = min(self.k, scores.shape[-1] - int(exclude[0, 0].sum()))
        if n_top > 0:
            top.scatter_(-1, scores.masked_fill(exclude, float("-inf")).topk(n_top, dim=-1).indices, True)
        return top

    def _select(self, scores):
        forced = self._forced(scores)
        return forced | self._top(scores, forced)

    def make_attend(self, layer_idx, attn):
        group = attn.c.num_attention_heads // attn.c.num_key_value_heads
        scale = 1.0 / math.sqrt(attn.c.head_dim)

        def attend(q, k, v, mask):
            p = self.prompt_len
            logits = (q.float() @ k.float().transpose(-1, -2)) * scale
            logits = logits.masked_fill(~mask, float("-inf"))
            block = logits[:, :, p:, :]  # [N, Hq, B, T]: the block's rows see everything
            exact_probs = torch.softmax(block, dim=-1)
            scores = self._block_mean(exact_probs[..., :p], group)
            if self.step == 0:
                self.selected[layer_idx] = self._select(scores)
            else:
                oracle = self._top(scores, self._forced(scores))  # this step's own top-k beyond the forced
                held = (oracle & self.selected[layer_idx]).sum(-1).float()
                self.recalls.append((held / oracle.sum(-1).clamp_min(1)).mean().item())
                allowed = self.selected[layer_idx].repeat_interleave(group, dim=1).unsqueeze(2)  # [N, Hq, 1, P]
                prefix = block[..., :p].masked_fill(~allowed, float("-inf"))
                block = torch.cat([prefix, block[..., p:]], dim=-1)
            probs = torch.softmax(logits, dim=-1)
            probs = torch.cat([probs[:, :, :p], torch.softmax(block, dim=-1)], dim=2)
            return (probs @ v.float()).to(q.dtype)

        return attend

    @contextlib.contextmanager
    def installed(self):
        with attention_override(self.model, self.make_attend):
            yield self


def decode_with_mage(model, prompts, k: int, sink: int = 4, local: int = 16):
    """decode_answer with MAGE attention; returns (answer block [N, ANSWER_LEN], mean recall of steps >= 2)."""
    from .train import decode_answer

    mage = MageAttention(model, prompts.shape[1], k, sink, local)
    with mage.installed():
        block = decode_answer(model, prompts, on_step=lambda step: setattr(mage, "step", step))
    recall = sum(mage.recalls) / len(mage.recalls) if mage.recalls else 1.0
    return block, recall
