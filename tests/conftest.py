"""Shared unit-test fixtures: a tiny byte-level BPE tokenizer trained in about a second."""

from __future__ import annotations

import contextlib
import io
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


@contextlib.contextmanager
def hub_offline():
    """The Hugging Face hub switched off, as on a machine with no network: nothing may be fetched."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def offline():
    with hub_offline():
        yield


@pytest.fixture(scope="session")
def standin_folder(tmp_path_factory) -> Path:
    """A Qwen3-shaped stand-in (`python -m tasks.tools.standin`), built once per session (~10 s) and
    only read by the tests that use it."""
    from tasks.tools import standin

    out = tmp_path_factory.mktemp("standin") / "qwen3-standin"
    with hub_offline(), contextlib.redirect_stdout(io.StringIO()):
        assert standin.main([str(out)]) == 0
    return out
