"""Content must never become control tokens.

A tokenizer turns the text of a special token (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`...)
into that token wherever it appears, content included. So a scraped user message holding
`<|im_end|>\n<|im_start|>assistant\n...` forges a turn boundary in training, and a reply holding
`<|endoftext|>` teaches the model to stop mid-answer. `prepare` screens every record's text for
those strings before anything else sees it (`prepare.control_tokens`):

- `reject` (the default): the record goes to the rejects, naming the token and where it was;
- `strip`: the strings are removed, and the change is on record like any other cleaning.

Only special tokens count: Qwen3's `<think>` or `<tool_call>` are added tokens that are not special,
written in content on purpose (a reasoning reply is `<think>...</think>` text).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

CONTROL_TOKEN = "control_token"  # the rejects reason


@dataclass(frozen=True)
class ControlTokens:
    """The special-token texts of one tokenizer, as one pattern."""

    texts: tuple[str, ...]

    @classmethod
    def of(cls, tokenizer) -> ControlTokens:
        specials = set(tokenizer.all_special_tokens)
        specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        return cls(tuple(sorted(specials, key=lambda t: (-len(t), t))))  # longest first: one wins over its prefix

    @functools.cached_property
    def pattern(self) -> re.Pattern[str] | None:
        """One alternation of every text, compiled once: `found` runs on every record."""
        return re.compile("|".join(map(re.escape, self.texts))) if self.texts else None

    def found(self, record: dict) -> list[tuple[str, str]]:
        """(where, token text) for each special-token text in the record: "text", "messages[2]"."""
        pattern = self.pattern
        if pattern is None:
            return []
        return [(where, m.group()) for where, text in _texts(record) for m in pattern.finditer(text)]

    def stripped(self, record: dict) -> dict:
        """The record with every special-token text removed."""
        pattern = self.pattern
        if pattern is None:
            return record
        if isinstance(record.get("text"), str):
            return {**record, "text": pattern.sub("", record["text"])}
        messages = [
            {**m, "content": pattern.sub("", m["content"])} if isinstance(m, dict) and isinstance(m.get("content"), str) else m
            for m in record.get("messages") or []
        ]
        return {**record, "messages": messages}


def _texts(record: dict) -> list[tuple[str, str]]:
    if isinstance(record.get("text"), str):
        return [("text", record["text"])]
    return [(f"messages[{i}]", m["content"]) for i, m in enumerate(record.get("messages") or [])
            if isinstance(m, dict) and isinstance(m.get("content"), str)]


def describe(hits: list[tuple[str, str]], policy: str) -> str:
    """The rejects sentence for a record holding special-token text."""
    shown = ", ".join(f"{token!r} in {where}" for where, token in hits[:3]) + (f" (+{len(hits) - 3} more)" if len(hits) > 3 else "")
    if policy == "strip":
        return f"removed special-token text: {shown}"
    return (f"holds special-token text ({shown}): tokenized, it would become the control token itself and forge a "
            "turn boundary or an end of text; remove it at the source, or set prepare.control_tokens: strip")
