"""Scores for `syntax` replies: valid JSON, SNIPS-style intent and slots, and text-to-SQL.

JSON is parsed strictly: the whole reply, surrounding whitespace aside, must be one JSON value. A
reply wrapped in a Markdown ```json fence does not count: the stage teaches bare JSON (its
targets are bare, and `validate` holds them to `json.loads`), so a fence is a format error this
score is there to see.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


def _load_json(text: str) -> Any:
    """The JSON value of the whole reply; ValueError if there is none."""
    try:
        return json.loads(text.strip())
    except RecursionError as exc:  # thousands of `[` from a looping model
        raise ValueError("JSON nested too deeply") from exc


def parses_as_json(text: str) -> bool:
    """The reply, stripped of surrounding whitespace, is exactly one JSON value (no fence, no
    trailing text; `json.loads` rules, as `validate`'s contract uses)."""
    try:
        _load_json(text)
    except ValueError:
        return False
    return True


# --- SNIPS: intent and slots ---------------------------------------------------------------------

Slot = tuple[str, str]  # (slot name, value), both normalised


def _norm(value: Any) -> str:
    """Case-folded, whitespace collapsed: `" New  York"` and `"new york"` are the same slot value."""
    return " ".join(str(value).split()).casefold()


def _slot_values(value: Any) -> list[str]:
    """A slot's values: the `snips` preset writes a string, or a list when an entity repeats (two
    cities in one request). Numbers and booleans count as their text; null and objects do not."""
    items = value if isinstance(value, list) else [value]
    return [_norm(v) for v in items if isinstance(v, (str, int, float)) and _norm(v)]


def intent_and_slots(text: str) -> tuple[str | None, set[Slot]] | None:
    """`(intent, {(slot, value), ...})` of a reply shaped like the `snips` preset's targets,
    `{"intent": "PlayMusic", "slots": {"artist": "Paul Landers", "city": ["Oslo", "Köln"]}}`;
    None when the reply is not JSON or has no `slots` object (so it is no SNIPS target).

    Names and values are normalised (case, whitespace); a list value gives one pair per element.
    The intent is None when missing or not a string. Being a set, a value repeated under one slot
    counts once."""
    try:
        value = _load_json(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("slots"), dict):
        return None
    intent = value.get("intent")
    slots = {(_norm(name), v) for name, raw in value["slots"].items() for v in _slot_values(raw)}
    return (_norm(intent) if isinstance(intent, str) else None), slots


@dataclass(frozen=True)
class SlotCounts:
    """Slot true positives, false positives and false negatives; counts add up over replies
    (`sum(counts, SlotCounts())`) so precision and recall are micro-averaged."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: SlotCounts) -> SlotCounts:
        return SlotCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def _reference(ref_text: str) -> tuple[str | None, set[Slot]]:
    parsed = intent_and_slots(ref_text)
    if parsed is None:
        raise ValueError(
            f'reference is not a SNIPS target ({{"intent": ..., "slots": {{...}}}}): {ref_text[:200]!r}; '
            "score only references for which intent_and_slots() is not None"
        )
    return parsed


def slot_counts(pred_text: str, ref_text: str) -> SlotCounts:
    """Slot matches of one reply against its reference, pair by pair (name and value must both
    match). A prediction that is not a SNIPS-shaped object misses every reference slot (all
    false negatives, no false positives). ValueError if the reference is not SNIPS-shaped."""
    _, ref = _reference(ref_text)
    parsed = intent_and_slots(pred_text)
    pred = parsed[1] if parsed is not None else set()
    return SlotCounts(tp=len(pred & ref), fp=len(pred - ref), fn=len(ref - pred))


def intent_matches(pred_text: str, ref_text: str) -> bool:
    """The prediction names the reference's intent (normalised); an unparseable one does not."""
    ref_intent, _ = _reference(ref_text)
    parsed = intent_and_slots(pred_text)
    return parsed is not None and ref_intent is not None and parsed[0] == ref_intent


def _ratio(part: int, whole: int, perfect: bool) -> float:
    if whole:
        return part / whole
    return 1.0 if perfect else 0.0


def prf(counts: SlotCounts) -> dict[str, float]:
    """Precision, recall and F1 of the counts. 0/0 is 1.0 only when all counts are 0 (nothing to
    find and nothing claimed: the replies were right); otherwise it is 0.0, so predicting no slots
    against real ones scores 0 everywhere rather than a perfect precision."""
    perfect = counts.tp == counts.fp == counts.fn == 0
    precision = _ratio(counts.tp, counts.tp + counts.fp, perfect)
    recall = _ratio(counts.tp, counts.tp + counts.fn, perfect)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# --- text-to-SQL ---------------------------------------------------------------------------------

# Quoted text first (kept verbatim, closed or cut off), then multi-character operators, words
# (identifiers, keywords, numbers, `table.column`), any other single character.
_SQL_TOKEN = re.compile(
    r"""'[^']*'?|"[^"]*"?|`[^`]*`?|<=|>=|<>|!=|==|\|\||::|[\w.$@#]+|\S"""
)
_SQL_START = re.compile(r"\s*\(*\s*(?:select|with|insert|update|delete)\b", re.IGNORECASE)


def normalize_sql(sql: str) -> str:
    """One canonical spelling of a query: tokens joined by single spaces (so `COUNT( * )` and
    `count(*)` agree), case folded except inside quotes, trailing semicolons dropped.

    Both `'...'` and `"..."` are kept verbatim: the advising data set writes string literals in
    double quotes (`DEPARTMENT = "EECS"`, `LIKE "%O'shea%"`), and in standard SQL a double-quoted
    identifier is case-sensitive anyway."""
    tokens = [t if t[0] in "'\"`" else t.casefold() for t in _SQL_TOKEN.findall(sql)]
    while tokens and tokens[-1] == ";":
        tokens.pop()
    return " ".join(tokens)


def sql_exact_match(pred: str, ref: str) -> bool:
    """The two queries are the same after `normalize_sql` (a string match, not execution: a
    different but equivalent query is a miss)."""
    return normalize_sql(pred) == normalize_sql(ref)


def looks_like_sql(text: str) -> bool:
    """The text starts with a SQL statement keyword: how `evaluate` tells text-to-SQL targets
    from JSON ones within one stage."""
    return _SQL_START.match(text) is not None
