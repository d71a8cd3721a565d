"""Scores for free-text (`instructions`) replies: ROUGE-L against the reference, and reply lengths
(a model that learns to stop, or to ramble, shows in the lengths before it shows in ROUGE)."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

_WORD = re.compile(r"\w+")


def rouge_tokens(text: str) -> list[str]:
    """Lowercased word tokens; punctuation splits words and is dropped (`dog.` -> `dog`), as in
    Google's `rouge-score` without stemming, except that non-ASCII letters are kept."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence: dynamic programming, two rows, O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a  # the shorter one sets the row length
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(pred: str, ref: str) -> float:
    """Sentence-level ROUGE-L F-measure (Lin, 2004) with beta = 1, as `rouge-score` reports it:
    LCS over the tokens, precision LCS/len(pred), recall LCS/len(ref), F = 2PR/(P+R). 0.0 when
    either side has no tokens."""
    p_tokens, r_tokens = rouge_tokens(pred), rouge_tokens(ref)
    if not p_tokens or not r_tokens:
        return 0.0
    common = lcs_length(p_tokens, r_tokens)
    if common == 0:
        return 0.0
    precision, recall = common / len(p_tokens), common / len(r_tokens)
    return 2 * precision * recall / (precision + recall)


def _percentile(sorted_values: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted non-empty list."""
    position = (len(sorted_values) - 1) * q
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _stats(values: list[int], unit: str) -> dict[str, float]:
    if not values:
        return {f"{unit}_{k}": 0.0 for k in ("mean", "median", "p90", "max")}
    ordered = sorted(values)
    return {
        f"{unit}_mean": statistics.fmean(ordered),
        f"{unit}_median": float(statistics.median(ordered)),
        f"{unit}_p90": float(_percentile(ordered, 0.9)),
        f"{unit}_max": float(ordered[-1]),
    }


def length_stats(texts: Sequence[str]) -> dict[str, float]:
    """`count`, and mean, median, p90 and max of the lengths in words (whitespace-separated) and
    in characters: `words_mean`, ..., `chars_max`. An empty list gives count 0 and zeros (not NaN,
    which JSON metrics files and MLflow do not take)."""
    return {
        "count": float(len(texts)),
        **_stats([len(t.split()) for t in texts], "words"),
        **_stats([len(t) for t in texts], "chars"),
    }
