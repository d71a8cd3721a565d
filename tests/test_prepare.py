"""`prepare`: hash splits, record encoding, rejects, and replay sampling, with a real tiny tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tasks.core import paths
from tasks.core.chat import IGNORE_INDEX
from tasks.core.config import load_params
from tasks.core.records import content_hash
from tasks.prepare import encode_record, prepare_stage, replay_rows, split_of

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
MAX_LENGTH = PARAMS.prepare.max_length  # 256


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def long_chat(n_words: int = 300) -> dict:
    return chat("Say fox many times.", " ".join(["fox"] * n_words))


class TestSplitOf:
    @pytest.mark.parametrize(
        "digest, fraction, split",
        [
            ("0" * 64, 0.1, "eval"),
            ("f" * 64, 0.1, "train"),
            ("199999999999" + "0" * 52, 0.1, "eval"),  # just under 0.1
            ("19999999999a" + "0" * 52, 0.1, "train"),  # just over 0.1
            ("8" + "0" * 63, 0.5, "train"),  # exactly 0.5 is not < 0.5
        ],
    )
    def test_boundaries(self, digest, fraction, split):
        assert split_of(digest, fraction) == split

    def test_depends_only_on_content(self):
        record = chat("Hi", "Hello!")
        reordered = {"messages": [{"content": m["content"], "role": m["role"]} for m in record["messages"]]}
        assert content_hash(reordered) == content_hash(record)
        assert [split_of(content_hash(r), 0.3) for r in (record, reordered, record)] == [split_of(content_hash(record), 0.3)] * 3

    @pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
    def test_eval_share_matches_fraction(self, fraction):
        rng = random.Random(0)
        digests = [f"{rng.getrandbits(256):064x}" for _ in range(2000)]
        share = sum(split_of(d, fraction) == "eval" for d in digests) / len(digests)
        assert abs(share - fraction) <= 0.03


class TestEncodeRecord:
    def test_long_text_is_cut_into_rows(self, unit_tokenizer):
        record = {"text": "The quick brown fox jumps over the lazy dog. " * 20}
        rows = encode_record(unit_tokenizer, record, "pretrain", max_length=32)
        whole = [t for row in rows for t in row.input_ids]
        assert len(rows) == -(-len(whole) // 32) and len(rows) > 1
        assert all(len(row.input_ids) <= 32 for row in rows)
        sizes = [len(row.input_ids) for row in rows]
        assert max(sizes) - min(sizes) <= 1  # equal pieces: no stub of a few tokens at the end
        assert all(row.labels == row.input_ids for row in rows)
        assert unit_tokenizer.decode(whole) == record["text"] + "<|endoftext|>"

    def test_text_just_over_a_row_is_split_evenly(self, unit_tokenizer):
        record = {"text": "The quick brown fox jumps over the lazy dog."}
        n = len(encode_record(unit_tokenizer, record, "pretrain", max_length=10_000)[0].input_ids)
        rows = encode_record(unit_tokenizer, record, "pretrain", max_length=n - 1)
        assert [len(r.input_ids) for r in rows] == [n // 2, n - n // 2]

    def test_short_text_is_one_row(self, unit_tokenizer):
        rows = encode_record(unit_tokenizer, {"text": "What is 2+2?"}, "pretrain", max_length=MAX_LENGTH)
        assert len(rows) == 1 and rows[0].input_ids[-1] == unit_tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def test_chat_is_one_row(self, unit_tokenizer):
        rows = encode_record(unit_tokenizer, chat("What is 2+2?", "4"), "sft", max_length=MAX_LENGTH)
        assert len(rows) == 1
        trained = [t for t in rows[0].labels if t != IGNORE_INDEX]
        assert unit_tokenizer.decode(trained) == "4<|im_end|>"

    def test_long_chat_raises(self, unit_tokenizer):
        record = long_chat()
        n_tokens = len(encode_record(unit_tokenizer, record, "sft", max_length=10_000)[0].input_ids)
        assert n_tokens > MAX_LENGTH
        with pytest.raises(ValueError, match=rf"^conversation is {n_tokens} tokens, over prepare.max_length={MAX_LENGTH}$"):
            encode_record(unit_tokenizer, record, "sft", max_length=MAX_LENGTH)


class TestPrepareStage:
    def records(self) -> list[dict]:
        good = [chat(f"What is {i}+{i}?", f"The answer is {2 * i}.") for i in range(20)]
        good.insert(3, long_chat(300))
        good.insert(11, long_chat(400))
        return good

    def test_rejects_are_located_and_nothing_is_dropped(self, unit_tokenizer):
        records = self.records()
        splits, rejects = prepare_stage("syntax", "sft", records, unit_tokenizer, PARAMS)
        assert len(splits["train"]) + len(splits["eval"]) + len(rejects) == len(records)
        assert [(r["file"], r["line"]) for r in rejects] == [
            (str(paths.raw_file("syntax")), 4),
            (str(paths.raw_file("syntax")), 12),
        ]
        assert [r["record"] for r in rejects] == [records[3], records[11]]
        assert all(f"over prepare.max_length={MAX_LENGTH}" in r["reason"] for r in rejects)

    def test_rows(self, unit_tokenizer):
        records = self.records()
        splits, _ = prepare_stage("syntax", "sft", records, unit_tokenizer, PARAMS)
        rows = splits["train"] + splits["eval"]
        assert len(rows) == 20
        for row in rows:
            assert row["split"] == split_of(row["content_hash"], PARAMS.prepare.eval_fraction)
            assert row in splits[row["split"]]
            assert row["n_tokens"] == len(row["input_ids"]) == len(row["labels"]) <= MAX_LENGTH
            assert row["n_trainable"] == sum(lab != IGNORE_INDEX for lab in row["labels"])
            assert row["trainable_share"] == pytest.approx(row["n_trainable"] / row["n_tokens"])
            assert row["source_stage"] == "syntax"
        hashes = sorted(row["content_hash"] for row in rows)
        assert hashes == sorted(content_hash(r) for i, r in enumerate(records) if i not in (3, 11))

    def test_deterministic(self, unit_tokenizer):
        records = self.records()
        first = prepare_stage("syntax", "sft", records, unit_tokenizer, PARAMS)
        assert prepare_stage("syntax", "sft", list(records), unit_tokenizer, PARAMS) == first

    def test_pretrain_parts_share_split_and_get_part_hashes(self, unit_tokenizer):
        record = {"text": "Tom has 3 apples and buys 4 more, so he has 7 apples. " * 40}
        splits, rejects = prepare_stage("embedding", "pretrain", [record], unit_tokenizer, PARAMS)
        digest = content_hash(record)
        split = split_of(digest, PARAMS.prepare.eval_fraction)
        rows = splits[split]
        assert rejects == [] and splits["eval" if split == "train" else "train"] == []
        assert len(rows) > 1
        assert [row["content_hash"] for row in rows] == [f"{digest}:{i}" for i in range(len(rows))]
        assert all(row["n_tokens"] <= MAX_LENGTH and row["trainable_share"] == 1.0 for row in rows)


class TestReplayRows:
    own = [{"id": f"own{i}"} for i in range(70)]
    earlier = [[{"id": f"a{i}"} for i in range(40)], [{"id": f"b{i}"} for i in range(40)]]

    def test_share_of_mix(self):
        rows = replay_rows("syntax", self.own, self.earlier, share=0.3, seed=1234)
        assert len(rows) == 30  # 30 / (70 + 30) = 0.3
        pool = [row for rows in self.earlier for row in rows]
        assert all(row in pool for row in rows)
        assert len({row["id"] for row in rows}) == 30  # sampled without replacement

    def test_deterministic_per_seed_and_stage(self):
        first = replay_rows("syntax", self.own, self.earlier, 0.3, seed=1234)
        assert replay_rows("syntax", self.own, self.earlier, 0.3, seed=1234) == first
        assert replay_rows("syntax", self.own, self.earlier, 0.3, seed=99) != first
        assert replay_rows("thinking", self.own, self.earlier, 0.3, seed=1234) != first

    @pytest.mark.parametrize(
        "own_count, earlier, share",
        [(70, [[{"id": 1}]] * 3, 0.0), (70, [], 0.3), (70, [[], []], 0.3), (0, [[{"id": 1}]], 0.3)],
    )
    def test_empty(self, own_count, earlier, share):
        assert replay_rows("syntax", [{}] * own_count, earlier, share, seed=0) == []

    def test_never_more_than_pool(self):
        pool = [[{"id": i} for i in range(5)]]
        rows = replay_rows("syntax", self.own, pool, 0.5, seed=0)
        assert sorted(row["id"] for row in rows) == [0, 1, 2, 3, 4]
