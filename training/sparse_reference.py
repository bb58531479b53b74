"""Sparse-attention selectors on the tiny PyTorch model, for accuracy, recall and sparsity statistics on the
CPU (benchmarks/eval_accuracy.py --engine reference). A generalisation of mage_reference.py to the
selectors of the `mage` backend, with the same conventions:

- The answer block is decoded in ANSWER_LEN steps (training.train.decode_answer). Step 0 attends exactly
  for every method, as the backend's FIRST phase does; later steps attend the block's rows to a selected set
  of prefix positions per (layer, KV head) plus the whole block. Prompt rows stay exact (their output does
  not depend on the block, as with SGLang's cached prefix KV).
- A set is the sinks, the local window and the top-k other prefix positions by the method's score:
  * `mage`:   block-mean attention probability of step 0 (the `mean` selector), reused at every later step;
  * `mage_fused`: the `fused` selector: the logit of step 0's block-mean query (mean over the block's rows
              and the KV head's query heads) against every prefix key, as ops/first_step's fused pass
              writes it; reused at every later step;
  * `quest`:  per-page (page_size positions) channel-wise min/max key bounds scored with the block-mean
              query, re-selected every step, through sglang_mage.ops.selection.quest's torch functions;
  * `oracle`: the `mean` top-k of each step's own exact attention (the per-step oracle).
- Recall, at every later step, per (request, layer, KV head), against O = the top-k positions outside the
  sinks/local window by that step's exact block-mean probability p:
  * `recall` (set):  |S & O| / |O|;
  * `mass_recall`:   sum_{S & O} p / sum_O p (the share of the oracle top-k's attention mass the set holds);
  * `mass_captured`: sum_S p / sum_prefix p (the share of all prefix mass the set holds).
  Each is averaged over requests, layers, KV heads and later steps. The oracle scores 1 by construction.
- Statistics (exact attention, step 0 of the block, per layer): the share of the block-mean prefix mass in
  the top-k positions (mean over requests and KV heads) and its coefficient of variation across KV heads;
  and the `vote` selector's layer score s_l = max_h |U_h| (1 - log p_h) with the per-layer budget K_l it
  implies (ops/selection/vote.py's own functions), i.e. the inputs of MAGE's layer-adaptive budget.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .model import attention_override

METHODS = ("mage", "mage_fused", "quest", "oracle")


def fused_scores(q_block, k_prefix_kv, group: int, scale: float) -> torch.Tensor:
    """[N, Hkv, P]: the block-mean query's logits against the prefix keys, per KV head. q_block [N, Hq, B, D],
    k_prefix_kv [N, Hkv, P, D] (one row per KV head), Hq = Hkv * group. Softmax is monotone in the logit and
    shares one normaliser per head, so this ranks keys as the block-mean query's own attention would."""
    n, hq, b, d = q_block.shape
    q_mean = q_block.float().view(n, hq // group, group, b, d).mean(dim=(2, 3))  # [N, Hkv, D]
    return torch.einsum("nhd,nhpd->nhp", q_mean, k_prefix_kv.float()) * scale


def quest_scores(q_block, k_prefix_kv, page_size: int) -> torch.Tensor:
    """Quest position scores in the backend's layout through ops/selection/quest.py.

    q_block [N, Hq, B, D] (the block's query rows); k_prefix_kv [N, Hkv, P, D] (the prefix keys per KV head).
    The model's batch becomes requests 0..N-1 of a paged KV buffer holding each prefix contiguously.
    Returns [N, Hkv, P] fp32 (each page's bound repeated over its positions)."""
    from sglang_mage.ops.selection import quest

    # The torch bounds (equal bit for bit to the backend's Triton kernel), so that this runs on the CPU too.
    page_bounds = getattr(quest, "page_bounds_ref", quest.page_bounds)

    n, hq, b, d = q_block.shape
    hkv, p = k_prefix_kv.shape[1], k_prefix_kv.shape[2]
    k_buffer = k_prefix_kv.permute(0, 2, 1, 3).reshape(n * p, hkv, d)
    dev = k_prefix_kv.device
    req_to_token = torch.arange(n * p, dtype=torch.int32, device=dev).view(n, p)
    pool = torch.arange(n, device=dev)
    prefix_lens = torch.full((n,), p, dtype=torch.int32, device=dev)
    kmin, kmax = page_bounds(k_buffer, req_to_token, pool, prefix_lens, page_size, p)
    qo_indptr = torch.arange(n + 1, dtype=torch.int32, device=dev) * b
    q_mean = quest.block_mean_query(q_block.permute(0, 2, 1, 3).reshape(n * b, hq, d), qo_indptr, hkv, b)
    return quest.quest_position_scores(q_mean, kmin, kmax, prefix_lens, page_size, p)


def forced_positions(n_pos: int, sink: int, local: int, device=None) -> torch.Tensor:
    """[n_pos] bool: the sinks [0, sink) and the local window [n_pos - local, n_pos)."""
    pos = torch.arange(n_pos, device=device)
    return (pos < sink) | (pos >= n_pos - local)


def top_outside(scores: torch.Tensor, exclude: torch.Tensor, k: int) -> torch.Tensor:
    """[..., P] bool: the top-k positions by score outside `exclude` ([P] bool)."""
    top = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    n_top = min(k, int((~exclude).sum()))
    if n_top > 0:
        top.scatter_(-1, scores.float().masked_fill(exclude, float("-inf")).topk(n_top, dim=-1).indices, True)
    return top


def set_recall(selected: torch.Tensor, oracle: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, float]:
    """(set recall, mass recall, mass captured) of `selected` against `oracle`, both [..., P] bool, with the
    exact block-mean probabilities `probs` [..., P]; means over the leading dims. An empty oracle (a prefix
    within sinks + local window) counts as fully recalled."""
    probs = probs.float()
    both = selected & oracle
    n_or = oracle.sum(-1)
    rec = torch.where(n_or > 0, both.sum(-1) / n_or.clamp_min(1), 1.0)
    m_or = (probs * oracle).sum(-1)
    mrec = torch.where(n_or > 0, (probs * both).sum(-1) / m_or.clamp_min(1e-30), 1.0)
    cap = (probs * selected).sum(-1) / probs.sum(-1).clamp_min(1e-30)
    return rec.mean().item(), mrec.clamp(0, 1).mean().item(), cap.clamp(0, 1).mean().item()


class SparseAttention:
    """Installs a per-layer `attend` on the model that emulates one selector; collects recall and, when
    `stats_ks` is given, step-0 sparsity statistics."""

    def __init__(self, model, prompt_len: int, method: str | None, k: int, sink: int = 16, local: int = 64,
                 page_size: int = 16, stats_ks: tuple[int, ...] = ()):
        if method not in (*METHODS, None):
            raise ValueError(f"unknown method {method!r}; known: {METHODS} (None = exact)")
        self.model, self.p, self.method, self.k = model, prompt_len, method, k
        self.sink, self.local, self.page_size, self.stats_ks = sink, local, page_size, tuple(stats_ks)
        self.step = 0
        self.cached: dict[int, torch.Tensor] = {}  # layer -> [N, Hkv, P] bool (mage)
        self.recalls: list[tuple[float, float, float]] = []
        self.stats: dict[int, dict] = {}  # layer -> statistics of step 0

    def _block_mean(self, probs, group):
        n, hq, b, p = probs.shape
        return probs.view(n, hq // group, group, b, p).mean(dim=(2, 3))

    def _layer_stats(self, layer_idx, prefix_probs, group):
        """prefix_probs [N, Hq, B, P]: exact step-0 probabilities (normalised over prefix + block)."""
        from sglang_mage.ops.selection import layer_score, vote_candidates

        n, hq, b, p = prefix_probs.shape
        scores = self._block_mean(prefix_probs, group)  # [N, Hkv, P]
        total = scores.sum(-1).clamp_min(1e-30)
        rows = prefix_probs.view(n, hq // group, group, b, p).permute(0, 1, 3, 2, 4).reshape(n, hq // group, b * group, p)
        out = {"prefix_mass": scores.sum(-1).mean().item(), "topk_mass": {}, "head_cv": {}, "vote_layer_score": {}}
        for k in self.stats_ks:
            share = scores.topk(min(k, p), dim=-1).values.sum(-1) / total  # [N, Hkv]
            out["topk_mass"][k] = share.mean().item()
            cv = share.std(dim=1, unbiased=False) / share.mean(dim=1).clamp_min(1e-30) if share.shape[1] > 1 else share * 0
            out["head_cv"][k] = cv.mean().item()
            _, union, coverage = vote_candidates(rows, torch.ones(n, b * group, dtype=torch.bool, device=rows.device),
                                                 torch.full((n,), p, device=rows.device), k)
            out["vote_layer_score"][k] = layer_score(union, coverage).mean().item()
        self.stats[layer_idx] = out

    def make_attend(self, layer_idx, attn):
        group = attn.c.num_attention_heads // attn.c.num_key_value_heads
        scale = 1.0 / math.sqrt(attn.c.head_dim)

        def attend(q, k, v, mask):
            p = self.p
            prompt_out = F.scaled_dot_product_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p],
                                                        attn_mask=mask[:p, :p], scale=scale)
            logits = (q[:, :, p:].float() @ k.float().transpose(-1, -2)) * scale  # [N, Hq, B, T]: sees all
            exact = torch.softmax(logits, dim=-1)
            probs = self._block_mean(exact[..., :p], group)  # [N, Hkv, P]
            if self.step == 0 and self.stats_ks:
                self._layer_stats(layer_idx, exact[..., :p], group)
            forced = forced_positions(p, self.sink, self.local, q.device)
            if self.method is None:
                block_probs = exact
            else:
                if self.method == "quest":
                    selected = forced | top_outside(quest_scores(q[:, :, p:], k[:, ::group, :p], self.page_size),
                                                    forced, self.k)
                elif self.method == "mage_fused" and self.step == 0:
                    selected = forced | top_outside(fused_scores(q[:, :, p:], k[:, ::group, :p], group, scale),
                                                    forced, self.k)
                elif self.method == "oracle" or self.step == 0:
                    selected = forced | top_outside(probs, forced, self.k)
                else:
                    selected = self.cached[layer_idx]
                if self.step == 0:
                    self.cached[layer_idx] = selected
                    block_probs = exact
                else:
                    self.recalls.append(set_recall(selected, top_outside(probs, forced, self.k), probs))
                    allowed = torch.cat([selected, torch.ones_like(selected[..., :1]).expand(
                        *selected.shape[:2], logits.shape[-1] - p)], -1)
                    allowed = allowed.repeat_interleave(group, dim=1).unsqueeze(2)  # [N, Hq, 1, T]
                    block_probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            block_out = block_probs @ v.float()
            return torch.cat([prompt_out.float(), block_out], dim=2).to(q.dtype)

        return attend

    @contextlib.contextmanager
    def installed(self):
        with attention_override(self.model, self.make_attend):
            yield self

    def mean_recall(self) -> dict:
        if not self.recalls:
            return {"recall": 1.0, "mass_recall": 1.0, "mass_captured": 1.0}
        cols = list(zip(*self.recalls))
        return {name: sum(c) / len(c) for name, c in zip(("recall", "mass_recall", "mass_captured"), cols)}


def decode_with_method(model, prompts, method: str | None, k: int, sink: int = 16, local: int = 64,
                       page_size: int = 16, stats_ks: tuple[int, ...] = ()):
    """decode_answer under `method` (None = exact attention). Returns (answer block [N, ANSWER_LEN], the
    SparseAttention with its recall and statistics)."""
    from .train import decode_answer

    sa = SparseAttention(model, prompts.shape[1], method, k, sink, local, page_size, stats_ks)
    with sa.installed():
        block = decode_answer(model, prompts, on_step=lambda step: setattr(sa, "step", step))
    return block, sa
