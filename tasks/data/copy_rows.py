"""Rows that teach the tiny base to copy: random token spans, each said twice.

In a row `a b c a b c <eos> d e d e <eos> ...` only the repeat can be predicted, and only by
looking back for the token that followed the current one last time: the induction head every SFT
stage relies on to read a count, a name or a slot value off the prompt. The loss is on the repeats
(and the end-of-text after them) alone, so nothing is learnt about the random spans themselves.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

from tasks.core.chat import IGNORE_INDEX

# A token must occur this often in the corpus to be drawn: rare merges have untrained embeddings,
# and the skill should be learnt on the tokens the stages will copy.
MIN_TOKEN_COUNT = 5


def copy_token_pool(token_lists: Iterable[list[int]], special_ids: Iterable[int]) -> list[int]:
    """The corpus's common token ids, special tokens excluded, in a fixed order."""
    counts = Counter(t for ids in token_lists for t in ids)
    special = set(special_ids)
    pool = sorted(t for t, n in counts.items() if n >= MIN_TOKEN_COUNT and t not in special)
    if len(pool) < 2:
        raise ValueError(f"copy warm-up: the corpus has {len(pool)} token(s) seen {MIN_TOKEN_COUNT}+ times; it needs 2")
    return pool


def copy_row(rng: random.Random, pool: list[int], length: int, min_span: int, max_span: int,
             eos_id: int) -> dict[str, list[int]]:
    """One row of `length` tokens: spans of min_span..max_span pool tokens, each repeated, then eos."""
    ids: list[int] = []
    labels: list[int] = []
    while len(ids) < length:
        span = [rng.choice(pool) for _ in range(rng.randint(min_span, max_span))]
        ids += span + span + [eos_id]
        labels += [IGNORE_INDEX] * len(span) + span + [eos_id]
    return {"input_ids": ids[:length], "labels": labels[:length]}


def copy_rows(pool: list[int], n_rows: int, length: int, min_span: int, max_span: int, eos_id: int,
              seed: int) -> list[dict[str, list[int]]]:
    """`n_rows` rows of `copy_row`, the same for the same seed."""
    rng = random.Random(f"{seed}:copy-warmup")
    return [copy_row(rng, pool, length, min_span, max_span, eos_id) for _ in range(n_rows)]
