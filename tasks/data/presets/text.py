"""The `text` preset (pretrain): a whole text file cut into documents, or the `text` field of a row."""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import pairwise
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.data.items import Item
from tasks.data.presets.base import Output, Preset, PresetOptions, _field, _Miss


class TextOptions(PresetOptions):
    # How a whole text file is cut into documents: blank-line paragraphs grouped up to max_chars,
    # one document per line, the whole file, or a new document at each line matching `pattern`.
    split: Literal["paragraphs", "lines", "none", "pattern"] = "paragraphs"
    max_chars: int = Field(default=4000, gt=0)
    pattern: str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _pattern_iff_split_pattern(self) -> TextOptions:
        if (self.split == "pattern") != (self.pattern is not None):
            raise ValueError("set pattern (a regex) exactly when split is 'pattern'")
        if "max_chars" in self.model_fields_set and self.split != "paragraphs":
            raise ValueError("max_chars applies only to split 'paragraphs'")
        return self


class TextPreset(Preset):
    """Raw text: a whole text file cut into documents, or the `text` field of a row."""

    name, kind, default_fields, Options = "text", "pretrain", {"text": "text"}, TextOptions
    options: TextOptions

    def _map(self, item: Item) -> Iterator[Output]:
        if isinstance(item.value, str):
            yield from self._split(item)
            return
        text = _field(item.value, self.fields["text"], str, config_key="text")
        if isinstance(text, _Miss):
            yield text.reject(item, item.where, item.value)
        elif not text.strip():
            yield self._reject(item, item.where, "empty_text", f"field {self.fields['text']!r} is empty", item.value)
        else:
            yield item.where, {"text": text}

    def _split(self, item: Item) -> Iterator[Output]:
        text = item.value
        if not text.strip():
            yield self._reject(item, f"line {item.start_line}", "empty_text", "the text is empty or whitespace", text)
            return
        if self.options.split == "none":
            yield f"line {item.start_line}", {"text": text}
            return
        lines = text.splitlines()
        for first, last in self._documents(lines):
            yield f"line {item.start_line + first}", {"text": "\n".join(lines[first : last + 1])}

    def _documents(self, lines: list[str]) -> Iterator[tuple[int, int]]:
        """(first, last) line index of each document; documents never start or end on a blank line."""
        blank = [not line.strip() for line in lines]
        if self.options.split == "lines":
            yield from ((i, i) for i, b in enumerate(blank) if not b)
        elif self.options.split == "pattern":
            starts = re.compile(self.options.pattern or "")
            cuts = [0] + [i for i, line in enumerate(lines) if i and starts.search(line)] + [len(lines)]
            for lo, hi in pairwise(cuts):
                kept = [i for i in range(lo, hi) if not blank[i]]
                if kept:
                    yield kept[0], kept[-1]
        else:
            yield from _group_paragraphs(lines, blank, self.options.max_chars)


def _group_paragraphs(lines: list[str], blank: list[bool], max_chars: int) -> Iterator[tuple[int, int]]:
    """Greedy: add blank-line separated blocks to a document while it stays within max_chars.

    Speaker turns or short paragraphs alone make poor documents; a block longer than max_chars
    stays whole (a paragraph is never cut).
    """
    offset = [0]  # offset[i]: characters before line i when lines are joined with "\n"
    for line in lines:
        offset.append(offset[-1] + len(line) + 1)
    blocks, start = [], None
    for i, b in enumerate([*blank, True]):
        if not b and start is None:
            start = i
        elif b and start is not None:
            blocks.append((start, i - 1))
            start = None
    doc: tuple[int, int] | None = None
    for first, last in blocks:
        if doc is not None and offset[last + 1] - 1 - offset[doc[0]] <= max_chars:
            doc = (doc[0], last)
            continue
        if doc is not None:
            yield doc
        doc = (first, last)
    if doc is not None:
        yield doc
