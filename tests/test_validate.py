"""Tests for tasks/validate.py: real Great Expectations on tiny prepared datasets written as Parquet."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tasks import validate
from tasks.prepare import prepared_schema
from tasks.core import paths
from tasks.core.config import load_params

PROJECT = Path(__file__).resolve().parents[1]
SCHEMA = prepared_schema()


def make_split(split: str, n: int, offset: int = 0) -> pd.DataFrame:
    """`n` valid records; distinct offsets give disjoint content hashes."""
    rows = []
    for i in range(offset, offset + n):
        ids = [(i * 7 + j) % 1000 for j in range(10 + i % 7)]
        record_json = json.dumps({"text": f"record {i}"})
        rows.append({
            "input_ids": ids,
            "labels": [-100] * 4 + ids[4:],
            "n_tokens": len(ids),
            "n_trainable": len(ids) - 4,
            "trainable_share": (len(ids) - 4) / len(ids),
            "content_hash": hashlib.sha256(record_json.encode()).hexdigest(),
            "split": split,
            "record_json": record_json,
        })
    return pd.DataFrame(rows)


def write_split(stage: str, split: str, df: pd.DataFrame) -> None:
    path = paths.prepared_file(stage, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([f for f in SCHEMA if f.name in df.columns])
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path)


def write_params(directory: Path, stages: list[str]) -> Path:
    """The project's params.yaml cut down to `stages`, consistently so `load_params` accepts it."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["train"]["stages"] = {s: raw["train"]["stages"][s] for s in stages}
    raw["data"]["stages"] = {s: raw["data"]["stages"][s] for s in stages}
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


STAGES = ["embedding", "syntax"]  # syntax starts from embedding, so the plan stays valid


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp project root with params for two stages and clean data for both."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, STAGES)
    for stage in STAGES:
        write_split(stage, "train", make_split("train", 20))
        write_split(stage, "eval", make_split("eval", 4, offset=1000))
    return tmp_path


class TestCleanData:
    def test_passes_and_report_is_byte_identical_on_rerun(self, project: Path) -> None:
        params = load_params()
        reports = validate.validate_all(params)
        assert [r.dataset for r in reports] == STAGES
        assert all(r.success for r in reports)
        first = {s: paths.validation_report(s).read_bytes() for s in STAGES}
        validate.validate_all(params)
        assert {s: paths.validation_report(s).read_bytes() for s in STAGES} == first

    def test_report_shape(self, project: Path) -> None:
        validate.validate_all(load_params())
        report = json.loads(paths.validation_report("syntax").read_text())
        assert report["dataset"] == "syntax"
        assert report["success"] is True
        assert report["records"] == {"train": 20, "eval": 4}
        by_name = {(e["dataset"], e["name"]): e for e in report["expectations"]}
        n_tokens = by_name[("syntax/train", "expect_column_values_to_be_between(n_tokens, 4..256)")]
        assert n_tokens["element_count"] == 20 and n_tokens["unexpected_count"] == 0
        rows = by_name[("syntax/eval", "expect_table_row_count_to_be_between(>= 1)")]
        assert rows["observed"] == {"observed_value": 4}
        leak = by_name[("syntax/eval", "expect_column_values_to_not_be_in_set(content_hash, train hashes)")]
        assert leak["success"] is True
        for column in validate.REQUIRED_COLUMNS:
            assert ("syntax/train", f"expect_column_to_exist({column})") in by_name
            assert ("syntax/eval", f"expect_column_values_to_not_be_null({column})") in by_name


def _too_long(train: pd.DataFrame, eval_: pd.DataFrame) -> None:
    train.loc[[0, 1], "n_tokens"] = 300


def _low_share(train: pd.DataFrame, eval_: pd.DataFrame) -> None:
    eval_.loc[0, "trainable_share"] = 0.01


def _duplicate(train: pd.DataFrame, eval_: pd.DataFrame) -> None:
    train.loc[1] = train.loc[0]


def _leak(train: pd.DataFrame, eval_: pd.DataFrame) -> None:
    eval_.loc[0, "content_hash"] = train.loc[3, "content_hash"]


def _null(train: pd.DataFrame, eval_: pd.DataFrame) -> None:
    train.loc[2, "record_json"] = None


def _mislabelled(train: pd.DataFrame, eval_: pd.DataFrame) -> None:
    eval_.loc[0, "split"] = "train"


FAILURES = {
    "too_long": (_too_long, "syntax/train: expect_column_values_to_be_between(n_tokens, 4..256): 2 of 20 records out of range (e.g. 300)"),
    "low_share": (_low_share, "syntax/eval: expect_column_values_to_be_between(trainable_share, >= 0.05): 1 of 4 records have too few trainable tokens (e.g. 0.01)"),
    "duplicate": (_duplicate, "syntax/train: expect_column_values_to_be_unique(content_hash): 2 of 20 records share their content_hash with another (duplicates)"),
    "leak": (_leak, "syntax/eval: expect_column_values_to_not_be_in_set(content_hash, train hashes): 1 of 4 eval records are in both train and eval"),
    "mislabelled": (_mislabelled, "syntax/eval: expect_column_values_to_be_in_set(split, {eval}): 1 of 4 records are labelled with another split"),
    "null": (_null, "syntax/train: expect_column_values_to_not_be_null(record_json): 1 of 20 records are null"),
}


class TestFailures:
    @pytest.mark.parametrize("case", list(FAILURES))
    def test_one_broken_record_fails_with_a_readable_line(self, project: Path, case: str) -> None:
        mutate, expected = FAILURES[case]
        train, eval_ = make_split("train", 20), make_split("eval", 4, offset=1000)
        mutate(train, eval_)
        write_split("syntax", "train", train)
        write_split("syntax", "eval", eval_)
        with pytest.raises(validate.DataValidationError) as info:
            validate.validate_all(load_params())
        message = str(info.value)
        assert expected in message
        assert "1 expectation(s) in syntax:" in message  # only the broken expectation fails
        assert message.rstrip().endswith("then rerun `dvc repro validate`.")
        assert "validate.* thresholds in params.yaml" in message

    def test_missing_column_is_named_and_its_other_checks_skipped(self, project: Path) -> None:
        write_split("syntax", "eval", make_split("eval", 4, offset=1000).drop(columns=["n_trainable"]))
        with pytest.raises(validate.DataValidationError) as info:
            validate.validate_all(load_params())
        assert "syntax/eval: expect_column_to_exist(n_trainable): column missing (columns found: input_ids" in str(info.value)
        assert "1 expectation(s)" in str(info.value)

    def test_too_few_rows(self, project: Path) -> None:
        write_split("syntax", "train", make_split("train", 5))
        with pytest.raises(validate.DataValidationError) as info:
            validate.validate_all(load_params())
        assert "syntax/train: expect_table_row_count_to_be_between(>= 8): 5 records, need at least 8" in str(info.value)

    def test_every_report_is_written_when_one_stage_fails(self, project: Path) -> None:
        broken = make_split("train", 20)
        broken.loc[0, "n_tokens"] = 1
        write_split("embedding", "train", broken)
        with pytest.raises(validate.DataValidationError, match="embedding/train"):
            validate.validate_all(load_params())
        embedding = json.loads(paths.validation_report("embedding").read_text())
        syntax = json.loads(paths.validation_report("syntax").read_text())
        assert embedding["success"] is False and syntax["success"] is True

    def test_missing_prepared_file_says_what_to_run(self, project: Path) -> None:
        paths.prepared_file("syntax", "eval").unlink()
        with pytest.raises(FileNotFoundError, match=r"syntax/eval.parquet not found: run the prepare step"):
            validate.validate_all(load_params())


class TestMain:
    def test_success_prints_one_line_per_dataset(self, project: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert validate.main([]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines == [
            f"{s}: train 20 records, eval 4 records, 43 expectations passed -> reports/validation/{s}.json"
            for s in STAGES
        ]

    def test_failure_exits_1_with_the_message_and_no_traceback(self, project: Path) -> None:
        eval_ = make_split("eval", 4, offset=1000)
        eval_.loc[0, "content_hash"] = make_split("train", 1)["content_hash"][0]
        write_split("syntax", "eval", eval_)
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        done = subprocess.run(
            [sys.executable, "-m", "tasks.validate", "--params", "params.yaml"],
            cwd=project, env=env, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 1, done.stderr
        assert "in both train and eval" in done.stderr
        assert "syntax/eval" in done.stderr
        assert "Traceback" not in done.stderr
        assert paths.validation_report("embedding").exists()
