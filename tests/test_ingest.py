"""`ingest`: the synthetic default, user sources through readers and presets, the bad-input corpus
(every case a located error or a rejects entry with its reason), and the loss guard."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.core import paths
from tasks.core.config import parse_params
from tasks.core.records import read_jsonl
from tasks.data.errors import SourceError
from tasks.data.synthetic import generate_stage_records
from tasks.ingest import ingest_all, ingest_stage

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "data" / "bad"
KINDS = {"embedding": "pretrain", "syntax": "sft", "thinking": "sft", "instructions": "sft"}
CHAT = {"messages": [{"role": "user", "content": "Extract JSON: hi"},
                     {"role": "assistant", "content": '{"intent": "greet", "slots": {}}'}]}


@pytest.fixture
def raw_params() -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for spec in raw["stages"].values():
        spec["data"]["n_records"] = 12
    return raw


def with_sources(raw: dict, stage: str, *sources: dict, **extra) -> dict:
    """The stage reading `sources` instead of the synthetic curriculum (its n_records gone, as the
    warning for keeping both says)."""
    raw = copy.deepcopy(raw)
    raw["stages"][stage]["data"]["sources"] = list(sources)
    raw["stages"][stage]["data"].pop("n_records", None)
    raw["data"].update(extra)
    return raw


def content(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "origin"} for r in records]


class TestSynthetic:
    def test_writes_every_stage_with_origin_and_report(self, raw_params, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        results = ingest_all(parse_params(raw_params))
        assert [(r.stage, r.records, r.synthetic) for r in results] == [(s, 12, True) for s in KINDS]
        for stage, kind in KINDS.items():
            written = read_jsonl(paths.raw_file(stage))
            assert content(written) == generate_stage_records(stage, kind, 12, raw_params["seed"])
            assert [r["origin"] for r in written] == [{"source": "synthetic", "where": f"#{i}"} for i in range(12)]
            assert read_jsonl(paths.raw_rejects(stage)) == []
            assert json.loads(paths.raw_report(stage).read_text())["synthetic"] is True


class TestUserSources:
    def test_jsonl_source_replaces_generation_and_bad_lines_become_rejects(self, raw_params, tmp_path, monkeypatch, caplog):
        monkeypatch.chdir(tmp_path)
        source = Path("data/sources/syntax.jsonl")
        source.parent.mkdir(parents=True)
        lines = [json.dumps(CHAT), "{oops", json.dumps({"text": "no messages"}),
                 json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps(CHAT | {"note": "x"})]
        source.write_text("\n".join(lines) + "\n")
        raw = with_sources(raw_params, "syntax", {"path": str(source)}, max_reject_share=0.8)
        with caplog.at_level(logging.WARNING, logger="tasks.ingest"):
            result = ingest_stage("syntax", parse_params(raw).stages["syntax"], parse_params(raw).seed, parse_params(raw).data.max_reject_share)
        assert result.records == 2 and not result.synthetic
        written = read_jsonl(paths.raw_file("syntax"))
        assert content(written) == [CHAT, CHAT]  # extra keys dropped
        assert [r["origin"] for r in written] == [{"source": 0, "uri": str(source), "where": f"line {n}"} for n in (1, 5)]
        rejects = read_jsonl(paths.raw_rejects("syntax"))
        assert [(r["where"], r["reason"]) for r in rejects] == [
            ("line 2", "malformed_json"), ("line 3", "missing_field"), ("line 4", "no_assistant_turn")]
        assert all(r["source"] == str(source) and r["action"] == "dropped" for r in rejects)
        assert "field 'messages' is missing" in rejects[1]["detail"]
        report = json.loads(paths.raw_report("syntax").read_text())
        assert report["sources"][0]["dropped"] == {"malformed_json": 1, "missing_field": 1, "no_assistant_turn": 1}
        assert not caplog.records  # under data/sources/: DVC tracks it

    def test_n_records_beside_sources_is_said_to_be_ignored(self, raw_params, tmp_path, monkeypatch, caplog):
        monkeypatch.chdir(tmp_path)
        source = paths.SOURCES_DIR / "few.jsonl"
        source.parent.mkdir(parents=True)
        source.write_text('{"text": "one"}\n{"text": "two"}\n')
        raw = with_sources(raw_params, "embedding", {"path": str(source)})
        raw["stages"]["embedding"]["data"]["n_records"] = 500
        params = parse_params(raw)
        with caplog.at_level(logging.WARNING, logger="tasks.ingest"):
            result = ingest_stage("embedding", params.stages["embedding"], params.seed, params.data.max_reject_share)
        assert result.records == 2
        assert [r.getMessage() for r in caplog.records] == [
            "stages.embedding.data.n_records (500) is ignored: it sizes the synthetic curriculum, and this stage reads "
            "sources; cap a source with its `limit`"]

    def test_source_outside_data_sources_warns(self, raw_params, tmp_path, monkeypatch, caplog):
        monkeypatch.chdir(tmp_path)
        Path("elsewhere.jsonl").write_text('{"text": "Mara lives in Oakridge."}\n')
        raw = with_sources(raw_params, "embedding", {"path": "elsewhere.jsonl"})
        params = parse_params(raw)
        with caplog.at_level(logging.WARNING, logger="tasks.ingest"):
            ingest_stage("embedding", params.stages["embedding"], params.seed, params.data.max_reject_share)
        assert "outside data/sources/" in caplog.text and "DVC does not track it" in caplog.text

    def test_too_many_rejects_fail_after_writing_them(self, raw_params, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        source = Path("data/sources/s.jsonl")
        source.parent.mkdir(parents=True)
        source.write_text(json.dumps(CHAT) + "\n" + '{"text": "a"}\n' * 3)
        params = parse_params(with_sources(raw_params, "syntax", {"path": str(source)}))
        with pytest.raises(SourceError, match=r"sources\[0\] \(data/sources/s.jsonl\): 1 records, 3 rejected "
                                              r"\(missing_field x3\); more than data.max_reject_share=0.5"):
            ingest_stage("syntax", params.stages["syntax"], params.seed, params.data.max_reject_share)
        assert len(read_jsonl(paths.raw_rejects("syntax"))) == 3  # written before failing

    def test_mixed_formats_and_presets_in_one_stage(self, raw_params, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        src = Path("data/sources")
        src.mkdir(parents=True)
        (src / "a.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
        (src / "b.csv").write_text('question,answer\n"What is 1+1?","So 1+1=<<1+1=2>>2.\n#### 2"\n')
        raw = with_sources(raw_params, "instructions",
                           {"path": "data/sources/a.json", "preset": "alpaca"},
                           {"path": "data/sources/*.csv", "preset": "gsm8k"})
        params = parse_params(raw)
        result = ingest_stage("instructions", params.stages["instructions"], params.seed, params.data.max_reject_share)
        assert result.records == 2
        first, second = read_jsonl(paths.raw_file("instructions"))
        assert first["messages"][1]["content"] == "Hi!" and first["origin"]["where"] == "[0]"
        assert second["origin"] == {"source": 1, "uri": "data/sources/b.csv", "where": "row 1"}
        assert second["messages"][1]["content"].endswith("The answer is 2.")


class TestBadInputCorpus:
    """tests/data/bad: each file gets a located error or a rejects entry with its reason."""

    def run_main(self, raw: dict, cwd: Path) -> subprocess.CompletedProcess:
        (cwd / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        env = os.environ | {"PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY",
                            "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-printed", "AWS_DEFAULT_REGION": "us-east-1"}
        return subprocess.run([sys.executable, "-m", "tasks.ingest", "--params", "p.yaml"],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=120)

    @pytest.mark.parametrize("path, message", [
        ("empty.jsonl", r"empty.jsonl is empty"),
        ("whitespace.jsonl", r"whitespace.jsonl holds only whitespace"),
        ("binary.jsonl", r"binary.jsonl looks binary"),
        ("no-such-*.jsonl", r"no-such-\*.jsonl"),
    ])
    def test_file_level_problems_stop_ingest_with_a_located_message(self, raw_params, tmp_path, path, message):
        raw = with_sources(raw_params, "syntax", {"path": str(BAD / path)})
        result = self.run_main(raw, tmp_path)
        assert result.returncode == 2, result.stdout
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("ingest: ") and "Traceback" not in result.stderr
        assert __import__("re").search(message, result.stderr), result.stderr

    def test_unreachable_s3_is_a_clear_error_without_secrets(self, raw_params, tmp_path):
        raw = with_sources(raw_params, "syntax", {"path": "s3://bucket/data/*.jsonl"})
        env_raw = copy.deepcopy(raw)
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(env_raw, sort_keys=False))
        env = os.environ | {"PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-printed",
                            "AWS_DEFAULT_REGION": "us-east-1"}
        result = subprocess.run([sys.executable, "-m", "tasks.ingest", "--params", "p.yaml"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert "s3://bucket/data/*.jsonl" in result.stderr and "Traceback" not in result.stderr
        assert "s3cr3t-never-printed" not in result.stderr + result.stdout

    def test_turn_order_and_cut_turns_are_on_record(self, raw_params, tmp_path, monkeypatch):
        """Caught at ingest, with the file and line, not by validate failing the whole stage later."""
        monkeypatch.chdir(tmp_path)
        raw = with_sources(raw_params, "instructions", *({"path": str(BAD / n)} for n in ("turn_order.jsonl", "trailing_user.jsonl")),
                           max_reject_share=1.0)
        params = parse_params(raw)
        ingest_stage("instructions", params.stages["instructions"], params.seed, params.data.max_reject_share)
        rejects = read_jsonl(paths.raw_rejects("instructions"))
        assert [(Path(r["source"]).name, r["where"], r["reason"], r["action"]) for r in rejects] == [
            ("turn_order.jsonl", "line 2", "bad_turn_order", "dropped"),
            ("trailing_user.jsonl", "line 1", "trailing_turns_cut", "changed")]
        assert "messages[1].role" in rejects[0]["detail"]
        report = json.loads(paths.raw_report("instructions").read_text())
        # a cut turn is a change, not a loss: it does not count towards data.max_reject_share
        assert [(s["dropped"], s["changed"]) for s in report["sources"]] == [
            ({"bad_turn_order": 1}, {}), ({}, {"trailing_turns_cut": 1})]
        kept = read_jsonl(paths.raw_file("instructions"))
        assert [[m["role"] for m in r["messages"]] for r in kept] == [["user", "assistant"], ["user", "assistant"]]

    def test_limit_takes_the_same_seeded_sample_in_file_order(self, raw_params, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        source = tmp_path / "many.jsonl"
        source.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(50)))
        raw = with_sources(raw_params, "embedding", {"path": str(source), "limit": 10})
        params = parse_params(raw)
        runs = []
        for _ in range(2):
            ingest_stage("embedding", params.stages["embedding"], params.seed, params.data.max_reject_share)
            runs.append([r["origin"]["where"] for r in read_jsonl(paths.raw_file("embedding"))])
        lines = [int(w.split()[1]) for w in runs[0]]
        assert runs[0] == runs[1] and len(lines) == 10 and lines == sorted(lines) and lines != list(range(1, 11))
        report = json.loads(paths.raw_report("embedding").read_text())
        assert (report["sources"][0]["records"], report["sources"][0]["limited_from"]) == (10, 50)

    def test_preset_refusals_in_the_corpus(self, raw_params, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        raw = with_sources(raw_params, "thinking", {"path": str(BAD / "gsm8k_words.jsonl"), "preset": "gsm8k"},
                           max_reject_share=1.0)
        raw = with_sources(raw, "instructions", {"path": str(BAD / "plain_turns.jsonl"), "fields": {"messages": "turns"}})
        params = parse_params(raw)
        ingest_stage("thinking", params.stages["thinking"], params.seed, params.data.max_reject_share)
        assert [(r["where"], r["reason"]) for r in read_jsonl(paths.raw_rejects("thinking"))] == [
            ("line 1", "non_numeric_answer"), ("line 2", "unbalanced_calculator_note")]
        assert [r["origin"]["where"] for r in read_jsonl(paths.raw_file("thinking"))] == ["line 3"]
        with pytest.raises(SourceError, match=r"0 records, 1 rejected \(no_assistant_turn x1\)"):
            ingest_stage("instructions", params.stages["instructions"], params.seed, params.data.max_reject_share)
        [reject] = read_jsonl(paths.raw_rejects("instructions"))
        assert "holds 2 plain string(s)" in reject["detail"]

    def test_record_level_problems_are_rejects_with_reasons(self, raw_params, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        texts = ["malformed_line.jsonl", "missing_field.jsonl", "wrong_type.jsonl", "latin1.jsonl", "cesu8.jsonl"]
        raw = with_sources(raw_params, "embedding", *({"path": str(BAD / n)} for n in texts))
        raw = with_sources(raw, "syntax", {"path": str(BAD / "no_assistant.jsonl")}, {"path": str(BAD / "ragged.csv"),
                           "preset": "alpaca", "fields": {"instruction": "prompt", "output": "completion"}}, max_reject_share=1.0)
        params = parse_params(raw)
        result = ingest_stage("embedding", params.stages["embedding"], params.seed, params.data.max_reject_share)
        rejects = read_jsonl(paths.raw_rejects("embedding"))
        found = [(Path(r["source"]).name, r["where"], r["reason"], r["action"]) for r in rejects]
        assert found == [
            ("malformed_line.jsonl", "line 2", "malformed_json", "dropped"),
            ("missing_field.jsonl", "line 2", "missing_field", "dropped"),
            ("wrong_type.jsonl", "line 2", "wrong_type", "dropped"),
            ("latin1.jsonl", "line 2 byte 37", "encoding", "dropped"),
            ("cesu8.jsonl", "line 2 byte 34", "cesu8_repaired", "repaired"),
        ]
        kept = read_jsonl(paths.raw_file("embedding"))
        assert len(kept) == result.records == 2 + 1 + 1 + 2 + 2  # every other line made it
        assert "\U0001F355" in next(r["text"] for r in kept if r["origin"]["uri"].endswith("cesu8.jsonl")
                                     and r["origin"]["where"] == "line 2")
        with pytest.raises(SourceError, match=r"no_assistant.jsonl\): 0 records, 1 rejected \(no_assistant_turn x1\)"):
            ingest_stage("syntax", params.stages["syntax"], params.seed, params.data.max_reject_share)
        rejects = read_jsonl(paths.raw_rejects("syntax"))
        assert [(Path(r["source"]).name, r["reason"]) for r in rejects] == [
            ("no_assistant.jsonl", "no_assistant_turn"), ("ragged.csv", "malformed_csv"), ("ragged.csv", "malformed_csv")]
