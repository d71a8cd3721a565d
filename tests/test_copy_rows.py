"""The tiny base's copy warm-up: its rows, its token pool, its settings, and that `base` runs it."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from tasks.core.chat import IGNORE_INDEX
from tasks.core.config import CopyWarmupConfig, PretrainConfig, TinyModelConfig
from tasks.data.copy_rows import MIN_TOKEN_COUNT, copy_row, copy_rows, copy_token_pool

EOS = 2
POOL = list(range(10, 60))


def spans(row: dict[str, list[int]]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each `span span eos` episode of a row, the last one possibly cut."""
    episodes, ids, labels = [], row["input_ids"], row["labels"]
    start = 0
    for i, token in enumerate(ids):
        if token == EOS:
            episodes.append((ids[start:i], labels[start:i]))
            start = i + 1
    return episodes


class TestCopyRow:
    def test_each_span_is_said_twice_and_trained_on_its_repeat_alone(self):
        row = copy_row(random.Random(0), POOL, 64, 3, 8, EOS)
        episodes = spans(row)
        assert len(episodes) >= 3
        for ids, labels in episodes:
            n = len(ids) // 2
            assert 3 <= n <= 8 and len(ids) == 2 * n
            assert ids[:n] == ids[n:]
            assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:]

    def test_the_end_of_text_after_a_repeat_is_trained(self):
        row = copy_row(random.Random(1), POOL, 64, 3, 8, EOS)
        ends = [i for i, t in enumerate(row["input_ids"]) if t == EOS]
        assert ends and all(row["labels"][i] == EOS for i in ends)

    def test_rows_have_the_asked_length_and_draw_from_the_pool(self):
        rows = copy_rows(POOL, 20, 32, 3, 8, EOS, seed=5)
        assert len(rows) == 20
        assert all(len(r["input_ids"]) == len(r["labels"]) == 32 for r in rows)
        assert {t for r in rows for t in r["input_ids"]} <= set(POOL) | {EOS}

    def test_seeded(self):
        assert copy_rows(POOL, 4, 32, 3, 8, EOS, seed=5) == copy_rows(POOL, 4, 32, 3, 8, EOS, seed=5)
        assert copy_rows(POOL, 4, 32, 3, 8, EOS, seed=5) != copy_rows(POOL, 4, 32, 3, 8, EOS, seed=6)


class TestTokenPool:
    def test_common_tokens_only_and_no_special_tokens(self):
        common, rare, special = 11, 12, 1
        lists = [[common, special]] * MIN_TOKEN_COUNT + [[rare]] * (MIN_TOKEN_COUNT - 1) + [[13, 14]] * MIN_TOKEN_COUNT
        assert copy_token_pool(lists, special_ids=[special]) == [common, 13, 14]

    def test_a_corpus_too_small_is_an_error(self):
        with pytest.raises(ValueError, match="copy warm-up: the corpus has 0 token"):
            copy_token_pool([[5, 6]], special_ids=[])


class TestConfig:
    def test_off_unless_asked(self):
        assert PretrainConfig(max_steps=1, batch_size=1, learning_rate=1e-3).copy_warmup.steps == 0

    @pytest.mark.parametrize(("settings", "message"), [
        ({"min_span": 6, "max_span": 4}, r"min_span \(6\) is above max_span \(4\)"),
        ({"row_length": 16, "max_span": 8}, r"max_span \(8\) said twice does not fit row_length \(16\)"),
    ])
    def test_impossible_spans_are_refused(self, settings, message):
        with pytest.raises(ValidationError, match=message):
            CopyWarmupConfig(steps=10, **settings)


def test_base_runs_the_warm_up_before_the_corpus(tmp_path):
    """`build_tiny_base` trains the warm-up's steps on its rows, then the corpus, and records both."""
    from tasks.base import build_tiny_base

    warmup = CopyWarmupConfig(steps=3, batch_size=2, row_length=16, min_span=2, max_span=4)
    tiny = TinyModelConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, head_dim=8, num_experts=4,
                           moe_intermediate_size=32, max_position_embeddings=128,
                           pretrain=PretrainConfig(max_steps=2, batch_size=2, learning_rate=1e-3, max_length=32,
                                                   copy_warmup=warmup))
    corpus = [f"Mara has {n} red apples. {n} + 2 = {n + 2}. Tom reads out: owl cat {n}." for n in range(8)] * 4
    build_tiny_base(tiny, corpus, seed=0, out_dir=tmp_path)
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["copy_warmup"]["steps"] == 3
    assert record["copy_warmup"]["tokens_seen"] == 3 * 2 * 16  # full rows: no padding
    assert record["steps"] == 2
