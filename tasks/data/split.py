"""The train/eval split, decided once: by the hash of a record's content after cleaning.

`prepare` splits every stage with it and `base` pretrains the tiny model on the train side only,
so a record that cleaning changes (a control character, a normal form, scrubbed PII) still lands
on the same side for both: the base never pretrains on text `prepare` holds out for evaluation.
"""

from __future__ import annotations

from typing import Literal

from tasks.core.config import CleanConfig
from tasks.core.records import content_hash, split_of
from tasks.data.clean import final_content


def split_of_cleaned(cleaned: dict, eval_fraction: float) -> Literal["train", "eval"]:
    """The split of a record already cleaned by `final_content` (as `prepare` splits it)."""
    return split_of(content_hash(cleaned), eval_fraction)  # type: ignore[return-value]


def split_of_content(content: dict, clean: CleanConfig, eval_fraction: float) -> Literal["train", "eval"]:
    """The split `prepare` puts this raw record's cleaned content in."""
    return split_of_cleaned(final_content(content, clean)[0], eval_fraction)
