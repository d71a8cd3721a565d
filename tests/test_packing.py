"""Packing: best-fit-decreasing rows, whole records, position ids restarting per record, no padding."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tasks.data import packing
from tasks.data.packing import (
    IGNORE_INDEX,
    PackingStats,
    build_packed_rows,
    pack_sequences,
)
from tests.shared_data import SHARED_DATA

GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"


def gsm8k_lengths() -> list[int]:
    """Token lengths as GSM8K's question + answer characters / 3.5, or a lookalike if the copy is absent."""
    if GSM8K.exists():
        records = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()]
        return [round((len(r["question"]) + len(r["answer"])) / 3.5) for r in records]
    rng = np.random.default_rng(0)  # GSM8K: mean ~149, 35..483 tokens, right-skewed
    return np.clip(rng.lognormal(np.log(140), 0.35, 7473), 35, 483).round().astype(int).tolist()


def make_rows(lengths: list[int], trained_from: int = 2) -> list[dict]:
    """Rows whose token ids encode (record, position), so any mix-up shows in the output."""
    rows = []
    for i, n in enumerate(lengths):
        ids = [i * 10_000 + t for t in range(n)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * min(trained_from, n) + ids[trained_from:],
                     "content_hash": f"h{i}"})
    return rows


class TestPackSequences:
    def test_best_fit_decreasing_small_case(self):
        # longest first: 7 (i1) and 5 (i0) open rows; 4 (i3) joins the 5 (room 5 is the best fit),
        # 3 (i2) the 7 (room 3), the next 3 (i5) opens a row, and 1 (i4) fills the 5 + 4 row
        assert pack_sequences([5, 7, 3, 4, 1, 3], 10) == [[1, 2], [0, 3, 4], [5]]

    def test_ties_are_stable_by_index(self):
        assert pack_sequences([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]

    def test_long_sequence_gets_its_own_rows(self):
        assert pack_sequences([3, 25, 4], 10) == [[1], [1], [1], [2, 0]]

    def test_empty_and_bad_input(self):
        assert pack_sequences([], 8) == []
        with pytest.raises(ValueError, match="positive"):
            pack_sequences([1], 0)
        with pytest.raises(ValueError, match="sequence 1 has a negative length"):
            pack_sequences([1, -2], 8)

    @pytest.mark.parametrize("row_length", [256, 1024])
    def test_random_lengths_invariants(self, row_length):
        rng = random.Random(row_length)
        lengths = [rng.randint(1, row_length) for _ in range(3000)]
        rows = pack_sequences(lengths, row_length)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert max(sum(lengths[i] for i in row) for row in rows) <= row_length
        # best fit never leaves two rows that could be merged into one
        loads = sorted(sum(lengths[i] for i in row) for row in rows)
        assert loads[0] + loads[1] > row_length
        assert pack_sequences(lengths, row_length) == rows


class TestGsm8kPacking:
    def test_efficiency_and_invariants_at_1024(self):
        lengths = gsm8k_lengths()
        assert len(lengths) == 7473
        packed, stats = build_packed_rows(make_rows(lengths), row_length=1024, pad_id=0)
        assert stats.efficiency >= 0.95
        assert (stats.n_sequences, stats.n_tokens, stats.n_split) == (7473, sum(lengths), 0)
        assert stats.n_rows == len(packed) and stats.capacity == len(packed) * 1024

        seen = []
        for row in packed:
            n = len(row["input_ids"])
            assert n <= 1024 and n == row["n_tokens"] == sum(row["seq_lengths"])
            assert len(row["labels"]) == len(row["position_ids"]) == n
            start = 0
            for length, digest in zip(row["seq_lengths"], row["content_hashes"], strict=True):
                record = int(digest[1:])
                seen.append(record)
                # the whole record, in order, with positions restarting at its first token
                assert row["input_ids"][start : start + length] == [record * 10_000 + t for t in range(length)]
                assert row["position_ids"][start : start + length] == list(range(length))
                assert length == lengths[record]
                start += length
        assert sorted(seen) == list(range(7473))  # every record exactly once, none straddling rows


class TestBuildPackedRows:
    def test_row_contents(self):
        rows = [
            {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "content_hash": "a"},
            {"input_ids": [4, 5, 6, 7, 8], "labels": [4, 5, 6, 7, 8], "content_hash": "b"},
            {"input_ids": [9, 10], "labels": [-100, 10], "content_hash": "c"},
        ]
        packed, stats = build_packed_rows(rows, row_length=8, pad_id=0)
        assert packed == [
            {"input_ids": [4, 5, 6, 7, 8, 1, 2, 3], "labels": [-100, 5, 6, 7, 8, -100, 2, 3],
             "position_ids": [0, 1, 2, 3, 4, 0, 1, 2], "seq_lengths": [5, 3], "content_hashes": ["b", "a"],
             "n_tokens": 8},
            {"input_ids": [9, 10], "labels": [-100, 10], "position_ids": [0, 1], "seq_lengths": [2],
             "content_hashes": ["c"], "n_tokens": 2},
        ]
        assert stats.to_json() == {"n_sequences": 3, "n_rows": 2, "n_tokens": 10, "row_length": 8, "n_split": 0,
                                   "capacity": 16, "efficiency": 0.625}
        assert rows[1]["labels"] == [4, 5, 6, 7, 8]  # input untouched

    def test_long_record_is_split_into_row_sized_chunks(self):
        rows = make_rows([3, 10], trained_from=0)
        packed, stats = build_packed_rows(rows, row_length=4, pad_id=0)
        assert [r["input_ids"] for r in packed] == [
            [10_000, 10_001, 10_002, 10_003], [10_004, 10_005, 10_006, 10_007], [10_008, 10_009], [0, 1, 2],
        ]
        assert [r["content_hashes"] for r in packed] == [["h1"], ["h1"], ["h1"], ["h0"]]
        assert [r["position_ids"] for r in packed][:3] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1]]
        assert stats.n_split == 1 and stats.n_rows == 4

    def test_numpy_arrays_become_plain_ints(self):
        rows = [{"input_ids": np.array([5, 6]), "labels": np.array([5, 6]), "content_hash": "x"}]
        packed, _ = build_packed_rows(rows, 4, 0)
        assert packed[0]["input_ids"] == [5, 6] and type(packed[0]["input_ids"][0]) is int

    def test_mismatched_labels_name_the_row(self):
        rows = [{"input_ids": [1, 2], "labels": [1], "content_hash": "abc"}]
        with pytest.raises(ValueError, match=r"row 0 \(content_hash 'abc'\) has 2 input_ids but 1 labels"):
            build_packed_rows(rows, 4, 0)

    def test_empty(self):
        packed, stats = build_packed_rows([], 16, 0)
        assert packed == [] and stats == PackingStats(0, 0, 0, 16) and stats.efficiency == 1.0


class TestWork:
    def test_one_bisect_and_at_most_one_insort_per_sequence(self, monkeypatch):
        counts = {"bisect": 0, "insort": 0}

        def counted(name, fn):
            def wrapper(*args, **kwargs):
                counts[name] += 1
                return fn(*args, **kwargs)
            return wrapper

        monkeypatch.setattr(packing, "bisect_left", counted("bisect", packing.bisect_left))
        monkeypatch.setattr(packing, "insort", counted("insort", packing.insort))
        lengths = gsm8k_lengths()
        pack_sequences(lengths, 1024)
        assert counts["bisect"] == len(lengths) and counts["insort"] <= len(lengths)


def reference_best_fit(lengths: list[int], row_length: int) -> list[list[int]]:
    """Best-fit decreasing spelt out: the fullest row that fits (lowest on ties), by scanning them all."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > row_length:
            rows += [[index] for _ in range(-(-length // row_length))]
            free += [0] * -(-length // row_length)
            continue
        fits = [r for r in range(len(rows)) if free[r] >= max(length, 1)]
        if fits:
            best = min(fits, key=lambda r: (free[r], r))
            rows[best].append(index)
            free[best] -= length
        else:
            rows.append([index])
            free.append(row_length - length)
    return rows


class TestAgainstReference:
    @pytest.mark.parametrize("seed", range(6))
    def test_pack_sequences_is_best_fit_decreasing(self, seed):
        rng = random.Random(seed)
        row_length = rng.choice([1, 4, 16, 100])
        lengths = [rng.choice([0, rng.randint(1, row_length), row_length, rng.randint(1, 3 * row_length)]) for _ in range(300)]
        assert pack_sequences(lengths, row_length) == reference_best_fit(lengths, row_length)


class TestPackFlat:
    """The columnar packer gives build_packed_rows' rows exactly."""

    @staticmethod
    def as_rows(columns) -> list[dict]:
        t, s = columns.token_offsets.tolist(), columns.seq_offsets.tolist()
        return [{
            "input_ids": columns.input_ids[t[i]:t[i + 1]].tolist(),
            "labels": columns.labels[t[i]:t[i + 1]].tolist(),
            "position_ids": columns.position_ids[t[i]:t[i + 1]].tolist(),
            "seq_lengths": columns.seq_lengths[s[i]:s[i + 1]].tolist(),
            "content_hashes": columns.content_hashes[s[i]:s[i + 1]],
            "n_tokens": int(columns.n_tokens[i]),
        } for i in range(len(t) - 1)]

    @staticmethod
    def flat(rows: list[dict]):
        offsets = np.cumsum([0] + [len(r["input_ids"]) for r in rows])
        ids = np.array([t for r in rows for t in r["input_ids"]], dtype=np.int32)
        labels = np.array([t for r in rows for t in r["labels"]], dtype=np.int32)
        return offsets, ids, labels, [r["content_hash"] for r in rows]

    @pytest.mark.parametrize("row_length", [1, 4, 64, 1024])
    def test_same_rows_and_stats(self, row_length):
        rng = random.Random(row_length)
        rows = make_rows([rng.choice([0, 1, rng.randint(1, 3 * row_length)]) for _ in range(200)], trained_from=1)
        expected, expected_stats = build_packed_rows(rows, row_length, pad_id=0)
        columns, stats = packing.pack_flat(*self.flat(rows), row_length)
        assert self.as_rows(columns) == expected
        assert stats == expected_stats

    def test_empty(self):
        columns, stats = packing.pack_flat(np.zeros(1, dtype=np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), [], 8)
        assert self.as_rows(columns) == [] and stats == PackingStats(0, 0, 0, 8)
