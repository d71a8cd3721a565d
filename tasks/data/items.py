"""The unit passed from a format reader to a preset: one parsed thing from one input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Item:
    """One parsed element of an input, with enough of an address to find it again.

    `value` is a JSON value (a JSONL line, or an element of a top-level JSON array), a dict (a CSV,
    Parquet or `save_to_disk` row; a whole JSON object file), or a str (a whole plain-text file).
    """

    source: str  # the file path or URI as resolved, e.g. "data/sources/a.jsonl", "s3://b/k.json"
    where: str  # "line 3", "[12]", "row 5"; "" for a whole file
    value: Any
    start_line: int = 1  # for text files: the line number the value starts at (documents report theirs)
