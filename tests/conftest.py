"""Shared unit-test fixtures: a tiny byte-level BPE tokenizer trained in about a second."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]

# Enough text for BPE merges on the words the tests use; the chat markup tokens are specials.
UNIT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 2+2? The answer is 4.",
    "You are a helpful assistant. Answer in JSON.",
    '{"name": "Ada", "age": 36, "tags": ["math", "code"]}',
    "Think step by step, then give the final answer.",
    "Tom has 3 apples and buys 4 more, so he has 7 apples.",
] * 4


@pytest.fixture(scope="session")
def unit_tokenizer():
    from tasks.core.modeling import train_tokenizer

    return train_tokenizer(UNIT_CORPUS, vocab_size=300)
