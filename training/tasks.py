"""Synthetic long-context tasks for the shipped tiny block-diffusion model (issue: accuracy), generated on
the fly: multi-key needle retrieval, associative recall and variable tracking.

Every sample is a prompt whose answer is determined by it alone, and `solve(prompt)` recovers that answer
by parsing, which the tests use to prove each task well-posed (unique keys, no answer leaked elsewhere).
The answer is ANSWER_LEN tokens, so it fills one block of the block-diffusion model (B = 4).

Vocabulary (< 1024): special tokens, then three disjoint ranges for filler, keys and values, so that a
model must retrieve rather than guess from token statistics. A value is a 4-part code whose part j comes
from its own alphabet VALUE_SLOTS[j] (96 tokens each, 96^4 codes): the answer block's position j then
knows by content which token of the retrieved value is its own. With one shared alphabet a 4-layer model
must also learn where in the value each answer position reads, and in 10 minutes of training it did not
(benchmarks/results/raw/train_pilot*: 0% held-out exact match, loss stuck near the value unigram).

Each slot's alphabet is further split into KEY_GROUPS parts, and a value's tokens come from the part of its
key's group (`key_group`). A key thus tells a little about its value (its group), never which value, so the
task still needs retrieval. This gives the value positions in the body a reason to read their key (the
block-diffusion loss on body tokens rewards it), which is the first half of the retrieval circuit. Without
it, nothing rewards either half until the other exists. Models stayed on the ln(#values) plateau for
thousands of steps, even with 2 pairs (benchmarks/results/raw/retrieval_probe*). With it and the
every-block loss (training/train.py), the shipped run solved needle and recall within 7.3 minutes
(benchmarks/results/raw/train_sweepC1*).
"""

from __future__ import annotations

import dataclasses
import random

PAD, BOS, EOS, MASK, QUERY, ANSWER, KEY, VALUE, ASSIGN, VAR = range(10)
FILLER = range(16, 256)
KEYS = range(256, 640)
VALUES = range(640, 1024)
VALUE_SLOTS = tuple(range(VALUES.start + 96 * j, VALUES.start + 96 * (j + 1)) for j in range(4))
KEY_GROUPS = 4
VOCAB_SIZE = 1024
ANSWER_LEN = 4
TASKS = ("needle", "recall", "variables")


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    prompt: list[int]
    answer: list[int]
    # Every question the body answers, as (query key tokens, answer): training asks several per sequence.
    queries: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    # Easier questions of the same body that training may add (variables: each chain's root, zero hops).
    zero_hop_queries: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()


def _distinct(rng: random.Random, pool: range, n: int, width: int) -> list[tuple[int, ...]]:
    return _distinct_codes(rng, (pool,) * width, n)


def key_group(key) -> int:
    return sum(key) % KEY_GROUPS


def group_alphabet(slot: int, group: int) -> range:
    """The part of VALUE_SLOTS[slot] that values of keys in `group` draw from."""
    r = VALUE_SLOTS[slot]
    per = len(r) // KEY_GROUPS
    return range(r.start + group * per, r.start + (group + 1) * per)


def _values(rng: random.Random, keys, slots=range(ANSWER_LEN)) -> list[tuple[int, ...]]:
    """One distinct code per key, its tokens from group_alphabet(slot, key_group(key)) for each slot."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for key in keys:
        pools = [group_alphabet(j, key_group(key)) for j in slots]
        code = None
        while code is None or code in seen:
            code = tuple(rng.choice(p) for p in pools)
        seen.add(code)
        out.append(code)
    return out


def _distinct_codes(rng: random.Random, pools, n: int) -> list[tuple[int, ...]]:
    """n distinct codes, token j drawn from pools[j], in random order."""
    seen: set[tuple[int, ...]] = set()
    while len(seen) < n:
        seen.add(tuple(rng.choice(pool) for pool in pools))
    out = list(seen)
    rng.shuffle(out)
    return out


def _filler(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(FILLER) for _ in range(n)]


def needle(rng: random.Random, context_len: int, num_needles: int | None = None) -> Sample:
    """Needles KEY k k VALUE v v v v scattered through filler; the query names one key. 2 to 8 needles
    unless given: samples with few needles are where training first finds the retrieval circuit."""
    num_needles = num_needles or rng.randint(2, 8)
    keys = _distinct(rng, KEYS, num_needles, 2)
    values = _values(rng, keys)
    needles = [[KEY, *k, VALUE, *v] for k, v in zip(keys, values)]
    body_len = max(0, context_len - 1 - sum(map(len, needles)) - 4)
    body = _filler(rng, body_len)
    for n, at in zip(needles, sorted((rng.randrange(body_len + 1) for _ in needles), reverse=True)):
        body[at:at] = n
    target = rng.randrange(num_needles)
    return Sample("needle", [BOS, *body, QUERY, *keys[target], ANSWER], list(values[target]),
                  tuple(zip(keys, values)))


def recall(rng: random.Random, context_len: int) -> Sample:
    """Dense key-value pairs (k k v v v v); the query names one key."""
    per_pair = 2 + ANSWER_LEN
    n = max(2, (context_len - 5) // per_pair)
    keys = _distinct(rng, KEYS, n, 2)
    values = _values(rng, keys)
    body = [tok for k, v in zip(keys, values) for tok in (*k, *v)]
    target = rng.randrange(len(keys))
    return Sample("recall", [BOS, *body, QUERY, *keys[target], ANSWER], list(values[target]),
                  tuple(zip(keys, values)))


def variables(rng: random.Random, context_len: int, chain: int = 2, max_chains: int = 4,
              named: bool = False) -> Sample:
    """Chains VAR x ASSIGN v v v v, then VAR y ASSIGN VAR x, ... spread through filler; the query names a
    chain's last variable, whose value is its chain's root value. Statements take at most half the context.
    Chains are `chain` variables long (chain - 1 hops): the shipped model has 4 layers, and every hop of a
    chain resolved in one forward pass costs about a layer, so the default is one hop.

    `zero_hop_queries` ask for a root by its own name: the lookup the hop's second half performs, in this
    task's syntax (one-token names, ASSIGN). Training on them as well (train.py --zero-hop-queries) means
    the answer's gradient on a one-hop question reaches a model whose second half already works, instead
    of needing both halves before either is rewarded, as with needle retrieval before key-grouped values.

    `named` (task "variables_named"): roots hold 3-token values, and the answer is the root's name followed
    by its value, [x, v1, v2, v3]. Each answer token is then one lookup away from the prompt plus the block:
    x from the chain's statement, v1..v3 from x's statement once x is in the block. Block diffusion's
    denoising steps carry the chain (unmask x, then the value), the way MAGE's later steps refine a block
    whose first step chose the KV; the 4-layer model learned no two-hop lookup in one forward."""
    value_len = ANSWER_LEN - 1 if named else ANSWER_LEN
    chain_tokens = 3 + value_len + (chain - 1) * 5
    chains = max(1, min(max_chains, (context_len // 2) // chain_tokens))
    names = _distinct(rng, KEYS, chain * chains, 1)
    roots = _values(rng, [names[c * chain] for c in range(chains)], range(ANSWER_LEN - value_len, ANSWER_LEN))
    statements = []
    for c in range(chains):
        chain_names = names[c * chain:(c + 1) * chain]
        per_chain = [[VAR, *chain_names[0], ASSIGN, *roots[c]]]
        per_chain += [[VAR, *chain_names[i], ASSIGN, VAR, *chain_names[i - 1]] for i in range(1, chain)]
        statements.append(per_chain)
    # Interleave the chains but keep each chain in order, so every assignment precedes its use.
    order = [c for c in range(chains) for _ in range(chain)]
    rng.shuffle(order)
    cursor = [0] * chains
    flat = []
    for c in order:
        flat.append(statements[c][cursor[c]])
        cursor[c] += 1
    body_len = max(0, context_len - 1 - sum(map(len, flat)) - 4)
    gaps = sorted(rng.randrange(body_len + 1) for _ in flat)
    body, last = [], 0
    filler = _filler(rng, body_len)
    for stmt, gap in zip(flat, gaps):
        body += filler[last:gap] + stmt
        last = gap
    body += filler[last:]
    target = rng.randrange(chains)
    last = [names[c * chain + chain - 1] for c in range(chains)]
    answers = [(*names[c * chain], *roots[c]) if named else roots[c] for c in range(chains)]
    return Sample("variables_named" if named else "variables", [BOS, *body, QUERY, *last[target], ANSWER],
                  list(answers[target]), tuple(zip(last, answers)), tuple(zip(names[::chain], answers)))


def variables_named(rng: random.Random, context_len: int) -> Sample:
    return variables(rng, context_len, named=True)


GENERATORS = {"needle": needle, "recall": recall, "variables": variables, "variables_named": variables_named}
# TASKS: the default mix, the previous checkpoint's pretraining stage. The shipped checkpoint trains on needle, recall
# and variables_named; eval_accuracy.py reads a checkpoint's own mix from its training_args.json. ALL_TASKS: every generator.
ALL_TASKS = tuple(GENERATORS)


def make_sample(task: str, context_len: int, rng: random.Random) -> Sample:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {ALL_TASKS}")
    if context_len < 64:
        raise ValueError(f"context_len must be >= 64 (got {context_len})")
    return GENERATORS[task](rng, context_len)


def query_group(key) -> list[int]:
    """QUERY key ANSWER, left-padded with one filler token to 4 tokens (one block) for 1-token keys."""
    group = [QUERY, *key, ANSWER]
    return [FILLER[0]] * (ANSWER_LEN - len(group)) + group


def solve(sample: Sample) -> list[int]:
    """Recover the answer from the prompt alone (the reference the tests check generators against)."""
    p = sample.prompt
    assert p[-1] == ANSWER
    q = p.index(QUERY)
    key = tuple(p[q + 1:-1])
    body = p[1:q]
    if sample.task == "needle":
        hits = [i for i in range(len(body)) if body[i] == KEY and tuple(body[i + 1:i + 3]) == key]
        assert len(hits) == 1
        return body[hits[0] + 4:hits[0] + 4 + ANSWER_LEN]
    if sample.task == "recall":
        per_pair = 2 + ANSWER_LEN
        hits = [i for i in range(0, len(body), per_pair) if tuple(body[i:i + 2]) == key]
        assert len(hits) == 1
        return body[hits[0] + 2:hits[0] + per_pair]
    named = sample.task == "variables_named"
    value_len = ANSWER_LEN - 1 if named else ANSWER_LEN
    env: dict[int, list[int]] = {}  # name -> its root's answer
    i = 0
    while i < len(body):
        if body[i] == VAR and i + 2 < len(body) and body[i + 2] == ASSIGN:
            name = body[i + 1]
            if body[i + 3] == VAR:
                env[name] = env[body[i + 4]]
                i += 5
            else:
                env[name] = ([name] if named else []) + body[i + 3:i + 3 + value_len]
                i += 3 + value_len
        else:
            i += 1
    return env[key[0]]
