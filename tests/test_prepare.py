"""`prepare`: hash splits, length policies, masks on real records, cleaning and dedupe with their
rejects, decontamination, mixture weights, replay, and a whole run with its data report."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tasks.core import paths
from tasks.core.chat import IGNORE_INDEX, Encoded
from tasks.core.config import PrepareConfig, load_params, parse_params
from tasks.core.records import content_hash, read_jsonl, split_of, write_jsonl
from tasks.prepare import (
    Record,
    StageData,
    _fit,
    clean_and_split,
    decontaminate,
    encode_split,
    prepare_all,
    replay_rows,
    weighted_rows,
)
from tests.shared_data import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA
PARAMS = load_params(ROOT / "params.yaml")
SPECS = PARAMS.data.stages


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def raw(record: dict, i: int) -> dict:
    return record | {"origin": {"source": 0, "uri": "data/sources/x.jsonl", "where": f"line {i + 1}"}}


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

    @pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
    def test_eval_share_matches_fraction(self, fraction):
        rng = random.Random(0)
        digests = [f"{rng.getrandbits(256):064x}" for _ in range(2000)]
        share = sum(split_of(d, fraction) == "eval" for d in digests) / len(digests)
        assert abs(share - fraction) <= 0.03


class TestLengthPolicy:
    enc = Encoded(list(range(25)), [IGNORE_INDEX] * 5 + list(range(5, 25)))

    def cfg(self, **kw) -> PrepareConfig:
        return PrepareConfig(max_length=10, **kw)

    def test_fits(self):
        assert _fit(Encoded([1, 2], [1, 2]), "sft", self.cfg()) == ([Encoded([1, 2], [1, 2])], None)

    def test_pretrain_split_is_even(self):
        pieces, note = _fit(self.enc, "pretrain", self.cfg())
        assert note == "split" and [len(p.input_ids) for p in pieces] == [8, 8, 9]
        assert [t for p in pieces for t in p.input_ids] == self.enc.input_ids

    @pytest.mark.parametrize("kind, key", [("pretrain", "pretrain_overflow"), ("sft", "chat_overflow")])
    def test_truncate_and_drop(self, kind, key):
        pieces, note = _fit(self.enc, kind, self.cfg(**{key: "truncate"}))
        assert note == "truncated" and pieces == [Encoded(list(range(10)), [IGNORE_INDEX] * 5 + list(range(5, 10)))]
        assert _fit(self.enc, kind, self.cfg(**{key: "drop"})) == ([], "too_long")

    def test_truncated_chat_with_nothing_to_train_is_dropped(self):
        masked = Encoded(list(range(25)), [IGNORE_INDEX] * 20 + list(range(20, 25)))
        assert _fit(masked, "sft", self.cfg(chat_overflow="truncate")) == ([], "too_long")


@pytest.fixture(scope="module")
def real_tokenizer():
    """A tokenizer trained on the real sets the masks are checked on (as `base` trains one on its corpus)."""
    from tasks.core.modeling import train_tokenizer

    lines = [json.loads(x) for x in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()[:300]]
    return train_tokenizer([r["question"] + "\n" + r["answer"] for r in lines], vocab_size=600)


def real_records(preset: str, path: Path, **options) -> list[dict]:
    from tasks.data.presets import build_preset
    from tasks.data.readers import read_items
    from tasks.data.sources import resolve_inputs

    built = build_preset(preset, "sft", {}, options)
    out = []
    for inp in resolve_inputs(str(path)):
        for item in read_items(inp):
            out += [rec for _, rec in built.records(item)][:40]
            if len(out) >= 40:
                return out
    return out


def trained_runs(enc: Encoded) -> list[list[int]]:
    """Maximal runs of trainable tokens, in order."""
    runs, current = [], []
    for label in enc.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
class TestMasksOnRealRecords:
    """Decode exactly the trainable tokens: they are the assistant replies plus <|im_end|>, nothing else."""

    @pytest.mark.parametrize("preset, path", [
        ("gsm8k", SHARED / "gsm8k" / "train.jsonl"),  # the <think> block is trained
        ("oasst", SHARED / "oasst_en100" / "en_100_tree.jsonl"),  # multi-turn
        ("alpaca", SHARED / "llms_from_scratch_instruct" / "instruction-data.json"),
    ])
    def test_trainable_tokens_are_the_replies(self, real_tokenizer, preset, path):
        records = real_records(preset, path)
        data = StageData("s", SPECS["thinking"], train=[Record(r, {"source": 0}, content_hash(r)) for r in records])
        rows, _ = encode_split(data, "train", real_tokenizer, PrepareConfig(max_length=100_000))
        assert len(rows) == len(records)
        for record, row in zip(records, rows):
            replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
            runs = trained_runs(Encoded(row["input_ids"], row["labels"]))
            assert [real_tokenizer.decode(run) for run in runs] == [r + "<|im_end|>" for r in replies]
        if preset == "gsm8k":
            assert all(row["last_reply"].startswith("<think>\n") for row in rows)


class TestCleanAndSplit:
    def test_changes_and_duplicates_are_logged_and_splits_follow_the_hash(self):
        records = [chat(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(30)]
        records.insert(5, chat("What is 3 plus 3?", "It is 6."))  # exact duplicate of record 3
        records.insert(9, chat("Caf\u0065\u0301 \x07please?", "Yes."))  # decomposed é and a BEL
        data = clean_and_split("syntax", SPECS["syntax"], [raw(r, i) for i, r in enumerate(records)], PARAMS.prepare, 0)
        kept = data.train + data.eval
        assert len(kept) == 31
        reasons = sorted((r.reason, r.action, r.where) for r in data.rejects)
        assert reasons == [
            ("control_chars_removed,unicode_normalized", "changed", "line 10"),
            ("exact_duplicate", "dropped", "line 6"),
        ]
        assert "duplicate of data/sources/x.jsonl line 4" in next(r.detail for r in data.rejects if r.action == "dropped")
        cleaned = next(r for r in kept if r.where == "line 10").content["messages"][0]["content"]
        assert cleaned == "Caf\u00e9 please?"
        for split, group in (("train", data.train), ("eval", data.eval)):
            assert all(split_of(r.digest, PARAMS.prepare.eval_fraction) == split for r in group)
            assert all(r.digest == content_hash(r.content) for r in group)
        assert dict(data.counts) == {"changed.control_chars_removed,unicode_normalized": 1, "dropped.exact_duplicate": 1}


class TestDecontaminate:
    def test_drops_train_records_sharing_an_ngram_with_any_eval_split(self, tmp_path):
        leak = "the quick brown fox jumps over the lazy dog near the old river bank today"
        a = StageData("a", SPECS["syntax"], train=[Record(chat("q", leak), {"where": "line 1"}), Record(chat("q", "fine"), {})],
                      eval=[Record(chat("q", "unrelated"), {})])
        b = StageData("b", SPECS["thinking"], eval=[Record(chat("Tell me: " + leak.upper(), "ok"), {})])
        bench = tmp_path / "bench.jsonl"
        bench.write_text(json.dumps({"problem": "one two three four five six seven eight nine ten eleven twelve thirteen"}) + "\n")
        b.train = [Record(chat("count", "one two three four five six seven eight nine ten eleven twelve thirteen"), {})]
        cfg = PARAMS.prepare.model_copy(update={"decontaminate": PARAMS.prepare.decontaminate.model_copy(
            update={"benchmark_files": [str(bench)]})})
        decontaminate([a, b], cfg)
        assert [r.content["messages"][1]["content"] for r in a.train] == ["fine"]
        assert b.train == []
        assert [(r.reason, r.where) for r in a.rejects] == [("contaminated", "line 1")]
        assert "13-gram 'the quick brown" in a.rejects[0].detail


class TestWeightedRows:
    rows = [{"content_hash": f"h{i}", "n": i} for i in range(10)]
    sources = ["0"] * 6 + ["1"] * 4

    def test_down_and_up_weighting(self):
        out, counts = weighted_rows(self.rows, self.sources, {"0": 0.5, "1": 2.5}, "s", seed=1)
        from_0 = [r for r in out if r["n"] < 6]
        from_1 = [r for r in out if r["n"] >= 6]
        assert len(from_0) == 3 and len(from_1) == 10  # 4 * 2.5
        hashes = [r["content_hash"] for r in out]
        assert len(set(hashes)) == len(hashes)  # copies are told apart
        assert sum(h.endswith("~1") for h in hashes) == 4 and sum(h.endswith("~2") for h in hashes) == 2
        assert dict(counts) == {"weight_dropped": 3, "weight_added": 6}

    def test_weight_one_keeps_rows_and_is_deterministic(self):
        out, counts = weighted_rows(self.rows, self.sources, {}, "s", seed=1)
        assert out == self.rows and not counts
        assert weighted_rows(self.rows, self.sources, {"0": 0.5}, "s", 1) == weighted_rows(self.rows, self.sources, {"0": 0.5}, "s", 1)


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


class TestPrepareAll:
    """A whole run on the synthetic curriculum plus a user source with duplicates and a long chat."""

    @pytest.fixture
    def project(self, tmp_path, monkeypatch, unit_tokenizer):
        from tasks.core.modeling import BaseInfo
        from tasks.ingest import ingest_all

        monkeypatch.chdir(tmp_path)
        tok_dir = tmp_path / "tok"
        unit_tokenizer.save_pretrained(tok_dir)
        BaseInfo(kind="tiny", name_or_path=str(tok_dir)).save(paths.BASE_DIR)
        raw_params = yaml.safe_load((ROOT / "params.yaml").read_text())
        for spec in raw_params["data"]["stages"].values():
            spec["n_records"] = 60
        source = Path("data/sources/instructions.jsonl")
        records = [chat(f"Repeat the word number {i}.", f"number {i}") for i in range(40)]
        records += [records[0], chat("Say fox many times.", " ".join(["fox"] * 400))]
        write_jsonl(source, records)
        raw_params["data"]["stages"]["instructions"]["sources"] = [{"path": str(source)}]
        params = parse_params(copy.deepcopy(raw_params))
        ingest_all(params)
        return params

    def test_outputs_report_and_accounting(self, project):
        results = prepare_all(project)
        report = json.loads(paths.DATA_REPORT.read_text())
        assert sorted(report) == ["embedding", "instructions", "syntax", "thinking"]
        for r in results:
            train = pq.read_table(paths.prepared_file(r.stage, "train")).to_pylist()
            eval_rows = pq.read_table(paths.prepared_file(r.stage, "eval")).to_pylist()
            stage = report[r.stage]
            assert (stage["train_rows"], stage["eval_rows"]) == (len(train), len(eval_rows)) == (r.n_train + r.n_replayed, r.n_eval)
            assert stage["train_rows_replayed"] == sum(row["source_stage"] != r.stage for row in train) == r.n_replayed
            packing = stage["packing"]
            assert packing["n_tokens"] == sum(row["n_tokens"] for row in train)
            assert packing["efficiency"] == pytest.approx(packing["n_tokens"] / (packing["n_rows"] * 256), abs=1e-6)
            packed = pq.read_table(paths.packed_file(r.stage)).to_pylist()
            assert sorted(h for row in packed for h in row["content_hashes"]) == sorted(row["content_hash"] for row in train)
            assert all(sum(row["seq_lengths"]) == len(row["input_ids"]) == len(row["position_ids"]) for row in packed)
        # instructions: 42 ingested, 1 duplicate and 1 too long dropped, the rest in train or eval
        rejects = read_jsonl(paths.prepared_rejects("instructions"))
        assert sorted((r["step"], r["reason"], r["where"]) for r in rejects) == [
            ("prepare", "exact_duplicate", "line 41"), ("prepare", "too_long", "line 42")]
        ins = report["instructions"]
        assert ins["ingested_records"] == 42 and ins["prepare"] == {"dropped.exact_duplicate": 1, "dropped.too_long": 1}
        assert ins["train_rows"] - ins["train_rows_replayed"] + ins["eval_rows"] == 40
        assert ins["sources"] == [{"path": "data/sources/instructions.jsonl", "preset": "messages", "records": 42}]

    def test_same_inputs_same_bytes(self, project):
        prepare_all(project)
        first = {p: p.read_bytes() for p in sorted(Path("data/prepared").rglob("*")) if p.is_file()}
        first[paths.DATA_REPORT] = paths.DATA_REPORT.read_bytes()
        prepare_all(project)
        again = {p: p.read_bytes() for p in sorted(Path("data/prepared").rglob("*")) if p.is_file()}
        again[paths.DATA_REPORT] = paths.DATA_REPORT.read_bytes()
        assert again == first


def test_base_pretrains_only_on_records_prepare_puts_in_train(tmp_path, monkeypatch):
    from tasks.base import pretraining_texts
    from tasks.ingest import ingest_all

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for spec in raw["data"]["stages"].values():
        spec["n_records"] = 200
    params = parse_params(raw)
    ingest_all(params)
    texts = pretraining_texts(params)
    everything = [r["text"] for r in read_jsonl(paths.raw_file("embedding"))]
    held_out = [t for t in everything if split_of(content_hash({"text": t}), params.prepare.eval_fraction) == "eval"]
    assert held_out and len(texts) == len(everything) - len(held_out)
    assert not set(held_out) & set(texts)
