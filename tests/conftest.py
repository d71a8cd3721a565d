"""Shared fixtures: a tiny byte-level BPE tokenizer trained in about a second, the Qwen3-shaped
stand-in, and one pipeline run for the end-to-end tests that read it. Under `pytest -n` (the
Makefile's default, with `--dist loadfile`) each test module runs whole on one worker, so its
module-scoped workspace is built once."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

# One OpenMP thread per process, for the test process and every stage process it starts (they
# inherit the environment). `pytest -n` already runs a worker per core, and each starts stages:
# torch's default of a thread per core then oversubscribes the CPU, and its spinning threads made
# two concurrent 30-step tiny trainings take 8.8 s each instead of 1.6 s (23 vs 14 CPU-s per
# stage process). Set before torch is imported anywhere in the session; a value given outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests.pipeline_run import PipelineRun, session_temp, shared_pipeline_run  # noqa: E402

# The longest test modules, longest first (measured with --durations; minutes each on 2 cores):
# started first, so `pytest -n` does not end with one worker on a long module while the others idle.
LONGEST_FIRST = ("test_stack_e2e", "test_pipeline_e2e", "test_standin_e2e", "test_validation_gate_e2e", "test_serve",
                 "test_resume")

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


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> PipelineRun:
    """The flow run once for the session, across `pytest -n` workers too (~3 min on 2 cores); copy
    its workspace, never change it."""
    return shared_pipeline_run(session_temp(tmp_path_factory))


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, the longest known ones at the head (`--no-loadscope-reorder`
    keeps this order under `--dist loadfile`), so the short tests fill in at the end instead of a
    long module starting last. A module's tests stay together and in their order."""
    slow = {item.path.stem for item in items if any(item.iter_markers("slow"))}

    def rank(item) -> tuple[int, int]:
        name = item.path.stem
        return (0, LONGEST_FIRST.index(name)) if name in LONGEST_FIRST else (1 if name in slow else 2, 0)

    items.sort(key=rank)
