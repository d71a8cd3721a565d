"""`prepare`: hash splits, length policies, masks on real records, cleaning and dedupe with their
rejects, decontamination, mixture weights, replay, and a whole run with its data report."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.core import paths
from tasks.core.chat import IGNORE_INDEX, Encoded
from tasks.core.config import PrepareConfig, load_params, parse_params
from tasks.core.records import content_hash, read_jsonl, split_of, write_jsonl
from tasks.prepare import (
    Record,
    Rows,
    StageData,
    _fit,
    clean_and_split,
    clean_split_and_encode,
    decontaminate,
    encode_split,
    prepare_all,
    prepared_schema,
    replay_plan,
    replay_rows,
    split_rows,
    token_replay_plan,
    weight_rows,
    weighted_rows,
)
from tests.shared_data import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA
PARAMS = load_params(ROOT / "params.yaml")
SPECS = PARAMS.stages


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
            out += [o[1] for o in built.records(item) if isinstance(o, tuple)][:40]
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
    @pytest.mark.parametrize("scrub", [False, True])
    def test_a_record_over_the_size_limit_is_a_reject_holding_its_head_not_an_oom(self, scrub):
        """`prepare.max_record_chars` drops a record before any work on it; the entry names the
        limit, says what to do, holds only the record's first characters (scrubbed when scrubbing
        is on) and points at the whole record."""
        cfg = PARAMS.prepare.model_copy(update={"max_record_chars": 3000, "clean": PARAMS.prepare.clean.model_copy(
            update={"scrub_pii": scrub})})
        long_reply = "Write to ada@example.org. " + "word " * 2000  # with the question: 10,045 characters
        records = [chat(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)]
        records.insert(4, chat("Tell me everything.", long_reply))
        data = clean_and_split("syntax", SPECS["syntax"], [raw(r, i) for i, r in enumerate(records)], cfg, 0)
        assert len(data.train + data.eval) == 10
        (reject,) = data.rejects
        assert (reject.reason, reject.action, reject.where) == ("too_large", "dropped", "line 5")
        assert "10,045 characters, over prepare.max_record_chars=3,000" in reject.detail
        assert "max_chars" in reject.detail and "data/sources/x.jsonl line 5" in reject.detail
        stored = json.dumps(reject.to_json())
        assert len(stored) < 3000 and ("ada@example.org" in stored) is not scrub
        assert dict(data.counts) == {"dropped.too_large": 1}

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

    def test_stage_balance_takes_an_equal_part_from_each_earlier_stage(self):
        earlier = [[{"id": f"a{i}"} for i in range(400)], [{"id": f"b{i}"} for i in range(40)], [], [{"id": f"c{i}"} for i in range(40)]]
        rows = replay_rows("thinking", self.own, earlier, share=0.3, seed=5, balance="stage")
        firsts = [row["id"][0] for row in rows]
        assert (firsts.count("a"), firsts.count("b"), firsts.count("c")) == (10, 10, 10)
        assert len({row["id"] for row in rows}) == 30
        pooled = [row["id"][0] for row in replay_rows("thinking", self.own, earlier, share=0.3, seed=5)]
        assert pooled.count("a") > 20  # pooled: the big stage gives most
        small = [[{"id": f"a{i}"} for i in range(400)], [{"id": "b0"}, {"id": "b1"}]]
        assert [r["id"][0] for r in replay_rows("thinking", self.own, small, 0.3, 5, "stage")].count("b") == 2  # all it has

    def test_weights_split_the_rows_in_proportion(self):
        positions = replay_plan("instructions", 70, [400, 40, 40], 0.3, 5, "row", weights=[0.0, 1.0, 2.0])
        assert (sum(i < 400 for i in positions), sum(400 <= i < 440 for i in positions), sum(i >= 440 for i in positions)) == (0, 10, 20)
        equal = replay_plan("instructions", 70, [400, 40, 40], 0.3, 5, "stage")
        assert replay_plan("instructions", 70, [400, 40, 40], 0.3, 5, "row", weights=[1.0, 1.0, 1.0]) == equal

    @pytest.mark.parametrize(
        "own_count, earlier, share",
        [(70, [[{"id": 1}]] * 3, 0.0), (70, [], 0.3), (70, [[], []], 0.3), (0, [[{"id": 1}]], 0.3)],
    )
    def test_empty(self, own_count, earlier, share):
        assert replay_rows("syntax", [{}] * own_count, earlier, share, seed=0) == []


class TestTokenReplay:
    """`prepare.replay_unit: tokens`: replay_share counts trained tokens, not rows."""

    pretrain = np.full(400, 100)  # long raw-text rows, every token trained
    sft = np.full(60, 10)  # short replies

    def test_rows_are_taken_until_the_share_of_trained_tokens_is_reached(self):
        taken = token_replay_plan("thinking", 700, [self.pretrain, self.sft], share=0.3, seed=1)
        tokens = np.concatenate([self.pretrain, self.sft])[taken]
        assert tokens.sum() >= 300 > tokens.sum() - tokens[-1]  # 300 / (700 + 300) = 0.3, the last row reaching it
        assert len(set(taken)) == len(taken)

    def test_stage_balance_takes_an_equal_part_of_tokens_from_each_stage(self):
        taken = token_replay_plan("instructions", 1000, [self.pretrain, self.sft], share=0.5, seed=1, balance="stage")
        from_pretrain = [i for i in taken if i < 400]
        assert (len(from_pretrain), len(taken) - len(from_pretrain)) == (5, 50)  # 500 tokens each: 5 long rows, 50 short
        assert all(400 <= i < 460 for i in taken[5:])
        by_rows = replay_plan("instructions", 100, [400, 60], 0.5, 1, "stage")
        assert sum(i < 400 for i in by_rows) == 50  # counted in rows, the long rows hold 5000 of 5500 tokens

    def test_a_stage_with_too_few_tokens_gives_all_it_has(self):
        taken = token_replay_plan("instructions", 1000, [self.pretrain, self.sft[:3]], 0.5, 1, "stage")
        assert sorted(i for i in taken if i >= 400) == [400, 401, 402]

    def test_deterministic_per_seed_and_stage(self):
        first = token_replay_plan("thinking", 700, [self.pretrain, self.sft], 0.3, seed=1)
        assert token_replay_plan("thinking", 700, [self.pretrain, self.sft], 0.3, seed=1) == first
        assert token_replay_plan("thinking", 700, [self.pretrain, self.sft], 0.3, seed=2) != first
        assert token_replay_plan("syntax", 700, [self.pretrain, self.sft], 0.3, seed=1) != first

    def test_weights_give_each_named_stage_its_part_and_the_others_nothing(self):
        thinking = np.full(100, 20)
        taken = token_replay_plan("instructions", 1000, [self.pretrain, self.sft, thinking], 0.6, 1, "stage",
                                  weights=[0.0, 1.0, 2.0])
        assert not [i for i in taken if i < 400]  # the pretraining stage has no weight
        from_sft = [i for i in taken if 400 <= i < 460]
        assert (len(from_sft), len(taken) - len(from_sft)) == (50, 50)  # 500 tokens of 10, 1,000 of 20

    @pytest.mark.parametrize("own, earlier, share", [(700, [np.full(5, 10)], 0.0), (700, [], 0.3),
                                                     (700, [np.zeros(0, int)], 0.3), (0, [np.full(5, 10)], 0.3)])
    def test_empty(self, own, earlier, share):
        assert token_replay_plan("syntax", own, earlier, share, seed=0) == []


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
        for spec in raw_params["stages"].values():
            spec["data"]["n_records"] = 60
        source = Path("data/sources/instructions.jsonl")
        records = [chat(f"Repeat the word number {i}.", f"number {i}") for i in range(40)]
        records += [records[0], chat("Say fox many times.", " ".join(["fox"] * 400))]
        write_jsonl(source, records)
        raw_params["stages"]["instructions"]["data"]["sources"] = [{"path": str(source)}]
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

    @staticmethod
    def replayed(project, unit: str) -> dict[str, tuple[float, dict, list[dict]]]:
        """Per replaying stage, prepared with `replay_unit`: its share, report line and replayed rows."""
        params = project.model_copy(update={"prepare": project.prepare.model_copy(update={"replay_unit": unit})})
        prepare_all(params)
        report = json.loads(paths.DATA_REPORT.read_text())
        out = {}
        for stage in ("thinking", "instructions"):
            train = pq.read_table(paths.prepared_file(stage, "train")).to_pylist()
            replayed = [row for row in train if row["source_stage"] != stage]
            assert report[stage]["train_trainable_tokens_replayed"] == sum(row["n_trainable"] for row in replayed)
            out[stage] = (params.stages[stage].data.replay_share, report[stage], replayed)
        return out

    def test_replay_share_in_rows(self, project):
        for share, line, replayed in self.replayed(project, "rows").values():
            own_rows = line["train_rows"] - line["train_rows_replayed"]
            assert len(replayed) == round(own_rows * share / (1 - share)) > 0

    def test_replay_share_in_trained_tokens(self, project):
        for share, line, replayed in self.replayed(project, "tokens").values():
            wanted = line["train_trainable_tokens"] * share / (1 - share)
            longest = max(row["n_trainable"] for row in replayed)
            assert wanted <= line["train_trainable_tokens_replayed"] < wanted + 3 * longest  # a row past each stage's part

    def test_replay_from_draws_on_the_stages_it_names(self, project):
        stages = dict(project.stages)
        data = stages["instructions"].data.model_copy(update={"replay_from": {"thinking": 1.0}})
        stages["instructions"] = stages["instructions"].model_copy(update={"data": data})
        prepare_all(project.model_copy(update={"stages": stages}))
        train = pq.read_table(paths.prepared_file("instructions", "train")).to_pylist()
        assert {row["source_stage"] for row in train} == {"instructions", "thinking"}

    def test_packed_rows_are_written_in_row_groups_of_a_token_budget(self, project, monkeypatch):
        """One row group of a large stage's packed rows held all of its encoded pages at once."""
        from tasks.data import rows as rows_module

        prepare_all(project)
        whole = {s: pq.read_table(paths.packed_file(s)).to_pylist() for s in project.stages}
        monkeypatch.setattr(rows_module, "ROW_GROUP_TOKENS", 512)  # two 256-token rows a group
        prepare_all(project)
        for stage, rows in whole.items():
            written = pq.ParquetFile(paths.packed_file(stage))
            assert written.metadata.num_row_groups == -(-len(rows) // 2)
            assert written.read().to_pylist() == rows

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
    for spec in raw["stages"].values():
        spec["data"]["n_records"] = 200
    params = parse_params(raw)
    ingest_all(params)
    texts = pretraining_texts("embedding", params.prepare.clean, params.prepare.eval_fraction)
    everything = [r["text"] for r in read_jsonl(paths.raw_file("embedding"))]
    held_out = [t for t in everything if split_of(content_hash({"text": t}), params.prepare.eval_fraction) == "eval"]
    assert held_out and len(texts) == len(everything) - len(held_out)
    assert not set(held_out) & set(texts)


def old_encode_split(data: StageData, split: str, tokenizer, cfg: PrepareConfig) -> list[dict]:
    """The row-per-dict encode_split that split_rows replaced, kept as the reference it must match."""
    from tasks.core.chat import encode_chats, encode_texts

    records = data.train if split == "train" else data.eval
    kind = data.spec.kind
    encs = (encode_texts(tokenizer, [r.content["text"] for r in records]) if kind == "pretrain"
            else encode_chats(tokenizer, [r.content["messages"] for r in records]))
    rows = []
    for record, enc in zip(records, encs):
        pieces, note = _fit(enc, kind, cfg)
        pieces = [p for p in pieces if len(p.input_ids) >= cfg.min_tokens]
        if not pieces:
            continue
        whole = len(pieces) == 1 and note is None
        messages = record.content.get("messages") or []
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        for part, piece in enumerate(pieces):
            text = enc.text if whole else tokenizer.decode(piece.input_ids)
            own = len(pieces) > 1 and kind == "pretrain"  # a split document: each row's record is its piece
            rows.append({
                "input_ids": piece.input_ids, "labels": piece.labels, "n_tokens": len(piece.input_ids),
                "n_trainable": piece.n_trainable, "trainable_share": piece.n_trainable / max(len(piece.input_ids), 1),
                "content_hash": record.digest if whole else f"{record.digest}:{part}", "split": split,
                "record_json": json.dumps({"text": text} if own else record.content, ensure_ascii=False, sort_keys=True,
                                          separators=(",", ":")),
                "source_stage": data.stage, "text": text,
                "roles": ",".join(m["role"] for m in messages), "last_reply": replies[-1] if replies else "",
                "origin": f"{record.uri} {record.where}".strip(),
            })
    return rows


class TestColumnarRows:
    """split_rows, Rows and the column-wise mix give what the row-per-dict code gave."""

    @pytest.fixture
    def rows(self, unit_tokenizer) -> Rows:
        records = [chat(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(12)]
        sources = [0, 0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1]
        data = StageData("syntax", SPECS["syntax"], train=[
            Record(r, {"source": s, "where": f"line {i}"}, content_hash(r)) for i, (r, s) in enumerate(zip(records, sources))])
        return split_rows(data, "train", unit_tokenizer, PrepareConfig(max_length=100))

    def test_rows_written_a_row_group_at_a_time_read_back_as_the_whole_table(self, rows, tmp_path, monkeypatch):
        from tasks.data import rows as rows_module

        monkeypatch.setattr(rows_module, "ROW_GROUP_ROWS", 5)  # 12 rows: groups of 5, 5, 2
        rows_module.write_rows(rows, prepared_schema(), tmp_path / "train.parquet")
        written = pq.ParquetFile(tmp_path / "train.parquet")
        assert written.metadata.num_row_groups == 3
        assert written.read().to_pylist() == rows.table(prepared_schema()).to_pylist() == rows.to_dicts()
        rows_module.write_rows(Rows.empty(), prepared_schema(), tmp_path / "empty.parquet")
        assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0

    @pytest.mark.parametrize("kind, policy", [("pretrain", "split"), ("pretrain", "truncate"), ("sft", "truncate"), ("sft", "drop")])
    def test_split_rows_match_the_row_dicts(self, unit_tokenizer, kind, policy):
        key = "pretrain_overflow" if kind == "pretrain" else "chat_overflow"
        cfg = PrepareConfig(max_length=12, min_tokens=3, **{key: policy})
        if kind == "pretrain":
            contents = [{"text": " ".join(["The quick brown fox."] * n)} for n in (1, 2, 5, 9)] + [{"text": "a"}]
        else:
            contents = [chat("What is 2+2?", "It is 4."), chat("Q", " ".join(["fox"] * 30)), chat(" ".join(["the dog"] * 20), "ok")]
        records = [Record(c, {"source": 0, "uri": "u", "where": f"line {i}"}, content_hash(c)) for i, c in enumerate(contents)]
        spec = SPECS["embedding"] if kind == "pretrain" else SPECS["syntax"]
        data, reference = StageData("s", spec, train=records), StageData("s", spec, train=records)
        rows = split_rows(data, "train", unit_tokenizer, cfg)
        assert rows.to_dicts() == old_encode_split(reference, "train", unit_tokenizer, cfg)
        assert rows.table(prepared_schema()).to_pylist() == rows.to_dicts()
        assert encode_split(StageData("s", spec, train=records), "train", unit_tokenizer, cfg)[0] == rows.to_dicts()

    def test_a_long_document_costs_its_length_not_its_square(self, unit_tokenizer):
        """Every row of a split document once held the whole document as its record_json."""
        doc = " ".join(f"The fox number {i} jumps over the lazy dog." for i in range(3000))  # ~130 kB, ~150 rows
        record = Record({"text": doc}, {"source": 0, "uri": "u", "where": "line 1"}, content_hash({"text": doc}))
        rows = split_rows(StageData("s", SPECS["embedding"], train=[record]), "train", unit_tokenizer,
                          PrepareConfig(max_length=256, min_tokens=1))
        assert len(rows) > 100
        stored = sum(len(r) for r in rows.column("record_json")) + sum(len(t) for t in rows.text)
        assert stored < 3 * len(doc)
        assert "".join(json.loads(r)["text"] for r in rows.column("record_json")) == "".join(rows.text)

    def test_segment_sums_are_per_row_sums_empty_rows_included(self, monkeypatch):
        from tasks.data import rows as rows_module
        from tasks.data.rows import segment_sums

        monkeypatch.setattr(rows_module, "SUM_BLOCK", 4)  # rows across block edges
        rng = np.random.default_rng(0)
        for _ in range(500):
            lengths = rng.integers(0, 4, size=rng.integers(0, 20))
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
            values = rng.random(offsets[-1]) < 0.5
            expected = [int(values[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])]
            assert segment_sums(values, offsets).tolist() == expected

    def test_take_concat_and_take_across(self, rows):
        dicts = rows.to_dicts()
        assert rows.take([3, 0, 3, 11]).to_dicts() == [dicts[i] for i in (3, 0, 3, 11)]
        halves = [rows.take(range(5)), rows.take(range(5, 12))]
        assert Rows.concat(halves).to_dicts() == dicts
        assert Rows.take_across(halves, [7, 1, 11, 0, 7]).to_dicts() == [dicts[i] for i in (7, 1, 11, 0, 7)]
        assert len(Rows.empty()) == 0 and Rows.concat([Rows.empty(), rows]).to_dicts() == dicts

    @pytest.mark.parametrize("weights", [{}, {"0": 0.5, "1": 2.5}, {"2": 0.0, "1": 1.5}])
    def test_weight_rows_matches_weighted_rows(self, rows, weights):
        mixed, counts = weight_rows(rows, weights, "syntax", seed=3)
        expected, expected_counts = weighted_rows(rows.to_dicts(), rows.source, weights, "syntax", seed=3)
        assert mixed.to_dicts() == expected and counts == expected_counts

    @pytest.mark.parametrize("pool_size, share", [(5, 0.3), (40, 0.3), (400, 0.5), (3, 0.9)])
    def test_replay_takes_what_sample_of_the_pool_took(self, pool_size, share):
        own = [{"id": f"own{i}"} for i in range(30)]
        earlier = [[{"id": f"a{i}"} for i in range(pool_size // 2)], [{"id": f"b{i}"} for i in range(pool_size - pool_size // 2)]]
        pool = [row for rows in earlier for row in rows]
        wanted = round(len(own) * share / (1 - share))
        assert replay_rows("thinking", own, earlier, share, 7) == random.Random("7:replay:thinking").sample(pool, min(wanted, len(pool)))


class RecordingEncoder:
    """Stands in for prepare's Encoder: notes which records are handed over, and when."""

    def __init__(self):
        self.calls: list[tuple[str, list[Record]]] = []

    def start(self, stage: str, kind: str, records: list[Record]) -> None:
        self.calls.append((stage, list(records)))


def with_split(make, split: str, fraction: float) -> dict:
    """The first record make(i) gives whose content hash puts it in `split`."""
    return next(r for i in range(1000) if split_of(content_hash(r := make(i)), fraction) == split)


class TestScreenedPipeline:
    """clean_split_and_encode: what clean_and_split + decontaminate give, and only final records tokenized."""

    def test_same_stages_and_no_dropped_record_is_encoded(self):
        cfg = PARAMS.prepare.model_copy(update={"eval_fraction": 0.5})
        leak = "the quick brown fox jumps over the lazy dog near the old river bank today"
        twin = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
        held = with_split(lambda i: chat(f"Story {i}: {leak}", "ok"), "eval", 0.5)
        # A later duplicate that would be eval if it survived dedupe: only the screen sees its n-grams.
        first = with_split(lambda i: chat(f"Count {i}: {twin}", "done"), "train", 0.5)
        second = with_split(lambda i: chat(first["messages"][0]["content"].upper(), "DONE" + "!" * i), "eval", 0.5)
        b = [raw(held, 0), raw(first, 1), raw(second, 2)]
        leaky, counting, hello = (with_split(lambda i, q=q, a=a: chat(q + "?" * i, a), "train", 0.5)
                                  for q, a in (("Tell me", leak), ("Now count", twin), ("Hello", "there")))
        a = [raw(leaky, 0), raw(counting, 1), raw(hello, 2)]
        raw_stages = [("syntax", SPECS["syntax"], a), ("thinking", SPECS["thinking"], b)]

        encoder = RecordingEncoder()
        stages = clean_split_and_encode(copy.deepcopy(raw_stages), cfg, 0, encoder)
        reference = [clean_and_split(name, spec, copy.deepcopy(records), cfg, 0) for name, spec, records in raw_stages]
        decontaminate(reference, cfg)

        for got, want in zip(stages, reference, strict=True):
            assert [r.content for r in got.train] == [r.content for r in want.train]
            assert [r.content for r in got.eval] == [r.content for r in want.eval]
            assert [r.to_json() for r in got.rejects] == [r.to_json() for r in want.rejects]
            assert got.counts == want.counts
            handed = [r for stage, records in encoder.calls if stage == got.stage for r in records]
            assert sorted(map(id, handed)) == sorted(map(id, got.train + got.eval))  # each kept record once, no others
        syntax = stages[0]
        assert [(r.reason, r.where) for r in syntax.rejects] == [("contaminated", "line 1")]
        assert [(r.reason, r.where) for r in stages[1].rejects] == [("exact_duplicate", "line 3")]
        # the record that only looked contaminated (its twin was dropped as a duplicate) is handed over late
        late = [records for stage, records in encoder.calls if stage == "syntax"][-1]
        assert [r.content for r in late] == [counting]


def test_gc_is_paused_only_while_prepare_runs(monkeypatch, tmp_path, unit_tokenizer):
    import gc

    import tasks.prepare
    from tasks.core import modeling

    def fail(*args):
        assert not gc.isenabled()
        raise RuntimeError("stop here")

    monkeypatch.setattr(modeling.BaseInfo, "load", staticmethod(lambda *a: None))
    monkeypatch.setattr(modeling, "load_tokenizer", lambda info: unit_tokenizer)
    monkeypatch.setattr(tasks.prepare, "clean_split_and_encode", fail)
    monkeypatch.setattr(tasks.prepare, "read_jsonl", lambda path: [])
    monkeypatch.chdir(tmp_path)
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="stop here"):
        prepare_all(PARAMS)
    assert gc.isenabled()


def test_a_record_cleaning_changes_lands_on_the_same_side_for_base_and_prepare(tmp_path, monkeypatch):
    """The split is decided once, on cleaned content: a record whose raw and cleaned hashes fall on
    different sides (the case a raw-text hash got wrong) is pretrained on by the tiny base exactly
    when `prepare` puts it in train."""
    from tasks.base import pretraining_texts
    from tasks.data.split import split_of_content

    cfg = PARAMS.prepare.model_copy(update={"dedupe": PARAMS.prepare.dedupe.model_copy(update={"near_threshold": None})})
    candidates = [f"Line {i} of the corpus rings a bell\x07 here." for i in range(400)]
    flipped = [t for t in candidates if split_of(content_hash({"text": t}), cfg.eval_fraction)
               != split_of_content({"text": t}, cfg.clean, cfg.eval_fraction)]
    assert len(flipped) >= 10 and {split_of_content({"text": t}, cfg.clean, cfg.eval_fraction) for t in flipped} == {"train", "eval"}
    monkeypatch.chdir(tmp_path)
    write_jsonl(paths.raw_file("embedding"), [{"text": t, "origin": {"where": f"line {i}"}} for i, t in enumerate(flipped)])
    data = clean_and_split("embedding", SPECS["embedding"], read_jsonl(paths.raw_file("embedding")), cfg, 0)
    assert data.counts["changed.control_chars_removed"] == len(flipped)
    prepared_train = {r.content["text"] for r in data.train}
    prepared_eval = {r.content["text"] for r in data.eval}
    assert prepared_train and prepared_eval
    assert set(pretraining_texts("embedding", cfg.clean, cfg.eval_fraction)) == prepared_train
