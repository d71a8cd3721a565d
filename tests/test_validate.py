"""Tests for tasks/validate.py: real Great Expectations on tiny prepared datasets written as Parquet."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tasks import validate
from tasks.core import paths
from tasks.core.config import StageChecks, ValidateConfig, load_params
from tasks.prepare import prepared_schema

PROJECT = Path(__file__).resolve().parents[1]
SCHEMA = prepared_schema()


KINDS = {"embedding": "pretrain", "syntax": "sft", "thinking": "sft"}  # as in params.yaml


def reply_for(stage: str, i: int) -> str:
    """A final assistant reply that meets `stage`'s content checks."""
    if stage == "thinking":
        return f"<think>\n{i} plus 1 is {i + 1}\n</think>\nThe answer is {i + 1}."
    return json.dumps({"intent": "play", "slots": {"n": i}})


def make_row(stage: str, split: str, i: int) -> dict:
    """One valid prepared row of `stage` (a pretrain text or a chat), shaped as `prepare` writes it."""
    if KINDS[stage] == "pretrain":
        record, text, roles, last_reply = {"text": f"record {i}"}, f"record {i}", "", ""
    else:
        messages = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": reply_for(stage, i)}]
        record, roles, last_reply = {"messages": messages}, "user,assistant", messages[-1]["content"]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    ids = [(i * 7 + j) % 1000 for j in range(10 + i % 7)]
    record_json = json.dumps(record, sort_keys=True)
    return {
        "input_ids": ids,
        "labels": [-100] * 4 + ids[4:],
        "n_tokens": len(ids),
        "n_trainable": len(ids) - 4,
        "trainable_share": (len(ids) - 4) / len(ids),
        "content_hash": hashlib.sha256(f"{stage}:{record_json}".encode()).hexdigest(),
        "split": split,
        "record_json": record_json,
        "source_stage": stage,
        "text": text,
        "roles": roles,
        "last_reply": last_reply,
        "origin": f"data/sources/{stage}.jsonl line {i + 1}",
    }


def make_split(split: str, n: int, offset: int = 0, stage: str = "syntax", replayed: int = 0, replayed_from: str = "embedding") -> pd.DataFrame:
    """`n` valid rows, the last `replayed` of them drawn from `replayed_from` (train only, as
    `prepare` does); distinct offsets give disjoint content hashes."""
    rows = [make_row(stage, split, i) for i in range(offset, offset + n - replayed)]
    rows += [make_row(replayed_from, split, i) for i in range(offset + 5000, offset + 5000 + replayed)]
    return pd.DataFrame(rows)


def write_split(stage: str, split: str, df: pd.DataFrame) -> None:
    path = paths.prepared_file(stage, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([f for f in SCHEMA if f.name in df.columns])
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path)


def write_params(directory: Path, stages: list[str]) -> Path:
    """The project's params.yaml cut down to `stages`, consistently so `load_params` accepts it."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["stages"] = {s: raw["stages"][s] for s in stages}
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


STAGES = ["embedding", "syntax"]  # syntax starts from embedding, so the plan stays valid


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp project root with params for two stages and clean data for both."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, STAGES)
    write_split("embedding", "train", make_split("train", 20, stage="embedding"))
    write_split("embedding", "eval", make_split("eval", 4, offset=1000, stage="embedding"))
    write_split("syntax", "train", syntax_train())
    write_split("syntax", "eval", make_split("eval", 4, offset=1000))
    return tmp_path


def syntax_train() -> pd.DataFrame:
    """16 syntax chats and 4 replayed embedding texts, whose empty roles and replies must not be
    held to syntax's chat and JSON contracts."""
    return make_split("train", 20, replayed=4)


class TestCleanData:
    def test_passes_and_report_is_byte_identical_on_rerun_while_the_docs_are_rebuilt(self, project: Path) -> None:
        params = load_params()
        reports = validate.validate_all(params)
        assert [r.dataset for r in reports] == STAGES
        assert all(r.success for r in reports)
        first = {s: paths.validation_report(s).read_bytes() for s in STAGES}
        validate.validate_all(params)
        assert {s: paths.validation_report(s).read_bytes() for s in STAGES} == first
        assert not list(paths.VALIDATION_DIR.glob("*.html"))  # the HTML lives in docs/, apart from the JSON
        index = paths.VALIDATION_DOCS_INDEX.read_text()
        for suite in ["embedding.train", "embedding.eval", "syntax.train", "syntax.eval", "syntax.train.own_records"]:
            assert suite in index
        # the rerun replaced the site: 6 pages, not 12 (embedding, pretrain without checks, has no content suite)
        assert len(list((paths.VALIDATION_DOCS_DIR / "validations").rglob("*.html"))) == 6
        assert not list(paths.VALIDATION_DOCS_DIR.rglob("*.gif"))  # GX's unused tutorial GIFs are pruned

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
        types = by_name[("syntax/train", "expect_column_values_to_be_in_type_list(n_tokens, int64|int32)")]
        assert types["success"] and types["observed"] == {"observed_value": "int64"}
        assert by_name[("syntax/eval", "expect_column_values_to_be_of_type(last_reply, str)")]["success"]
        assert by_name[("syntax/train", "expect_column_value_lengths_to_be_between(text, >= 1)")]["success"]
        source = by_name[("syntax/train", "expect_column_values_to_be_in_set(source_stage, {embedding, syntax})")]
        assert source["success"] and source["element_count"] == 20
        # the content suite sees syntax's own 16 rows, not the 4 replayed embedding texts
        json_target = by_name[("syntax/train (own records)", "expect_column_values_to_be_json_parseable(last_reply)")]
        assert json_target["success"] and json_target["element_count"] == 16
        roles = by_name[("syntax/eval (own records)", f"expect_column_values_to_match_regex(roles, {ROLES_NAME})")]
        assert roles["success"] and roles["element_count"] == 4
        embedding = json.loads(paths.validation_report("embedding").read_text())
        assert {e["dataset"] for e in embedding["expectations"]} == {"embedding/train", "embedding/eval"}


ROLES_NAME = "[system,](user,assistant,)*user,assistant"
THINK_NAME = "<think>...</think> answer"


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
    "low_share": (_low_share, "syntax/eval: expect_column_values_to_be_between(trainable_share, >= 0.05): 1 of 4 records have too few trainable tokens (e.g. 0.01); from data/sources/syntax.jsonl line 1001"),
    "duplicate": (_duplicate, "syntax/train: expect_column_values_to_be_unique(content_hash): 2 of 20 records share their content_hash with another (duplicates)"),
    "leak": (_leak, "syntax/eval: expect_column_values_to_not_be_in_set(content_hash, train hashes): 1 of 4 eval records are in both train and eval"),
    "mislabelled": (_mislabelled, "syntax/eval: expect_column_values_to_be_in_set(split, {eval}): 1 of 4 records are labelled with another split"),
    "null": (_null, "syntax/train: expect_column_values_to_not_be_null(record_json): 1 of 20 records are null"),
}


class TestFailures:
    @pytest.mark.parametrize("case", list(FAILURES))
    def test_one_broken_record_fails_with_a_readable_line(self, project: Path, case: str) -> None:
        mutate, expected = FAILURES[case]
        train, eval_ = syntax_train(), make_split("eval", 4, offset=1000)
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

    def test_message_names_the_content_check_and_its_data_docs_page(self, project: Path) -> None:
        train = syntax_train()
        train.loc[3, "last_reply"] = '{"intent": "play", "slots": {"n": 3}'  # the closing brace lost
        write_split("syntax", "train", train)
        with pytest.raises(validate.DataValidationError) as info:
            validate.validate_all(load_params())
        message = str(info.value)
        assert "1 expectation(s) in syntax:" in message
        assert (
            "  syntax/train (own records): expect_column_values_to_be_json_parseable(last_reply): "
            "1 of 16 own records' final reply is not valid JSON "
            r'(e.g. "{\"intent\": \"play\", \"slots\": {\"n\"...")'  # quoted, escaped, cut to 32 characters
        ) in message
        assert f"Data Docs (HTML): {paths.VALIDATION_DOCS_INDEX}" in message
        page = re.search(r"^  syntax/train \(own records\): (\S+\.html)$", message, re.MULTILINE)
        assert page, message
        assert page.group(1).startswith("reports/validation/docs/validations/syntax/train/own_records/")
        html = Path(page.group(1)).read_text()
        assert "values must be parseable as JSON" in html and "Failed" in html
        assert "syntax" in paths.VALIDATION_DOCS_INDEX.read_text()
        assert message.rstrip().endswith("then rerun `dvc repro validate`.")

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

    def test_a_stage_s_own_thresholds_replace_the_global_ones_for_it_alone(self, project: Path) -> None:
        """One-word answers train on a small share of each row: the stage says so, the others keep
        the global threshold."""
        train, eval_ = syntax_train(), make_split("eval", 4, offset=1000)
        eval_.loc[0, "trainable_share"] = 0.01
        write_split("syntax", "train", train)
        write_split("syntax", "eval", eval_)
        embedding_eval = make_split("eval", 4, offset=1000, stage="embedding")
        embedding_eval.loc[0, "trainable_share"] = 0.01
        write_split("embedding", "eval", embedding_eval)
        raw = yaml.safe_load(Path("params.yaml").read_text())
        raw["stages"]["syntax"]["validate"]["min_trainable_share"] = 0.005
        Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        with pytest.raises(validate.DataValidationError) as info:
            validate.validate_all(load_params())
        message = str(info.value)
        assert "embedding/eval: expect_column_values_to_be_between(trainable_share, >= 0.05)" in message
        assert "syntax/eval" not in message
        reports = {stage: json.loads(paths.validation_report(stage).read_text()) for stage in STAGES}
        assert (reports["syntax"]["success"], reports["embedding"]["success"]) == (True, False)

    def test_every_report_is_written_when_one_stage_fails(self, project: Path) -> None:
        broken = make_split("train", 20, stage="embedding")
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
            "embedding: train 20 records, eval 4 records, 83 expectations passed -> reports/validation/embedding.json",
            "syntax: train 20 records, eval 4 records, 87 expectations passed -> reports/validation/syntax.json",
            "Data Docs -> reports/validation/docs/index.html",
        ]

    def test_failure_exits_1_with_the_message_and_no_traceback(self, project: Path) -> None:
        eval_ = make_split("eval", 4, offset=1000)
        eval_.loc[0, "content_hash"] = make_split("train", 1)["content_hash"][0]
        write_split("syntax", "eval", eval_)
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        done = subprocess.run(
            [sys.executable, "-m", "tasks.validate", "--params", "params.yaml"],
            cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 1, done.stderr
        assert "in both train and eval" in done.stderr
        assert "syntax/eval" in done.stderr
        assert "Traceback" not in done.stderr
        assert paths.validation_report("embedding").exists()


# --- content contracts, on one stage's frames directly (no Parquet, no params) -------------------

CFG = ValidateConfig()
SYNTAX = validate.StageContract("syntax", "sft", StageChecks(json_target=True), earlier=("embedding",))
THINKING = validate.StageContract("thinking", "sft", StageChecks(think_block=True), earlier=("embedding", "syntax"))


def train_of(contract: validate.StageContract) -> pd.DataFrame:
    """20 rows: 16 of the stage's own, 4 replayed from the stage before it."""
    return make_split("train", 20, stage=contract.stage, replayed=4, replayed_from=contract.earlier[-1])


def run_contract(contract: validate.StageContract, train: pd.DataFrame, eval_: pd.DataFrame | None = None) -> validate.DatasetReport:
    """One stage's four suites on in-memory frames, without a Data Docs site (faster)."""
    eval_ = make_split("eval", 4, offset=1000, stage=contract.stage) if eval_ is None else eval_
    return validate.validate_dataset(contract, train, eval_, CFG)


def lines_of(report: validate.DatasetReport) -> list[str]:
    """Failures as the error message prints them, examples cut off (they are checked elsewhere)."""
    return [f"{f.dataset}: {f.name}: {f.problem.split(' (e.g. ')[0]}" for f in report.failures]


def _set(column: str, value, split: str = "train", row: int = 0):
    """A mutation that breaks one cell: row 0 is the stage's own, row 19 a replayed one."""
    def mutate(train: pd.DataFrame, eval_: pd.DataFrame) -> None:
        (train if split == "train" else eval_).loc[row, column] = value
    return mutate


OWN_THINK = f"thinking/train (own records): expect_column_values_to_match_regex(last_reply, {THINK_NAME}): "
NOT_THINK = "1 of 16 own records' final reply is not one <think>...</think> block followed by an answer"
OWN_ROLES = f"syntax/train (own records): expect_column_values_to_match_regex(roles, {ROLES_NAME}): "
NOT_TURNS = "1 of 16 own records do not alternate user/assistant turns ending with the assistant"

CONTENT_FAILURES = {
    "think_unclosed": (THINKING, _set("last_reply", "<think>\n2 plus 1 is 3\nThe answer is 3."), OWN_THINK + NOT_THINK),
    "think_nested": (THINKING, _set("last_reply", "<think>a<think>b</think></think>The answer is 3."), OWN_THINK + NOT_THINK),
    "think_twice": (THINKING, _set("last_reply", "<think>a</think>3<think>b</think>The answer is 3."), OWN_THINK + NOT_THINK),
    "answer_missing": (THINKING, _set("last_reply", "<think>\n2 plus 1 is 3\n</think>\n  "), OWN_THINK + NOT_THINK),
    "answer_only": (THINKING, _set("last_reply", "The answer is 3."), OWN_THINK + NOT_THINK),
    "eval_reply": (THINKING, _set("last_reply", "<think>x", split="eval"),
                   (f"thinking/eval (own records): expect_column_values_to_match_regex(last_reply, {THINK_NAME}): "
                    "1 of 4 own records' final reply is not one <think>...</think> block followed by an answer")),
    "invalid_json": (SYNTAX, _set("last_reply", "{'intent': 'play'}"),
                     ("syntax/train (own records): expect_column_values_to_be_json_parseable(last_reply): "
                      "1 of 16 own records' final reply is not valid JSON")),
    "user_twice": (SYNTAX, _set("roles", "user,user,assistant"), OWN_ROLES + NOT_TURNS),
    "assistant_only": (SYNTAX, _set("roles", "assistant"), OWN_ROLES + NOT_TURNS),
    "ends_with_user": (SYNTAX, _set("roles", "user,assistant,user"), OWN_ROLES + NOT_TURNS),
    "empty_text": (SYNTAX, _set("text", ""),
                   "syntax/train: expect_column_value_lengths_to_be_between(text, >= 1): 1 of 20 records have empty text"),
    "float_tokens": (SYNTAX, lambda t, e: t.__setitem__("n_tokens", t["n_tokens"].astype(float)),
                     ("syntax/train: expect_column_values_to_be_in_type_list(n_tokens, int64|int32): "
                      "values are float64, expected int64 or int32")),
    "later_stage": (SYNTAX, _set("source_stage", "thinking"),
                    ("syntax/train: expect_column_values_to_be_in_set(source_stage, {embedding, syntax}): "
                     "1 of 20 records come from a stage not allowed in syntax/train")),
    "replay_in_eval": (SYNTAX, _set("source_stage", "embedding", split="eval"),
                       ("syntax/eval: expect_column_values_to_be_in_set(source_stage, {syntax}): "
                        "1 of 4 records come from a stage not allowed in syntax/eval")),
    # a syntax reply labelled as thinking's own is held to thinking's contract
    "replay_mislabelled": (THINKING, _set("source_stage", "thinking", row=19),
                           OWN_THINK + "1 of 17 own records' final reply is not one <think>...</think> block followed by an answer"),
}


class TestContentContracts:
    @pytest.mark.parametrize("contract", [SYNTAX, THINKING], ids=["syntax", "thinking"])
    def test_clean_stage_passes_and_replayed_rows_answer_to_their_own_stage(self, contract: validate.StageContract) -> None:
        report = run_contract(contract, train_of(contract))
        assert lines_of(report) == []
        own = [e for e in report.expectations if e.dataset == f"{contract.stage}/train (own records)"]
        assert {e.name for e in own} == {
            f"expect_column_values_to_match_regex(roles, {ROLES_NAME})",
            "expect_column_values_to_be_json_parseable(last_reply)" if contract is SYNTAX
            else f"expect_column_values_to_match_regex(last_reply, {THINK_NAME})",
        }
        assert all(e.element_count == 16 for e in own)

    @pytest.mark.parametrize("case", list(CONTENT_FAILURES))
    def test_one_broken_row_fails_one_expectation(self, case: str) -> None:
        contract, mutate, expected = CONTENT_FAILURES[case]
        train, eval_ = train_of(contract), make_split("eval", 4, offset=1000, stage=contract.stage)
        mutate(train, eval_)
        assert lines_of(run_contract(contract, train, eval_)) == [expected]

    def test_examples_stay_on_one_line(self) -> None:
        train = train_of(THINKING)
        train.loc[0, "last_reply"] = "<think>\nno end"
        [failure] = run_contract(THINKING, train).failures
        assert failure.problem.endswith('(e.g. "<think>\\nno end"); from data/sources/thinking.jsonl line 1')
        assert failure.observed == {"unexpected_examples": ["<think>\nno end"],
                                    "unexpected_origins": ["data/sources/thinking.jsonl line 1"]}

    def test_pretrain_stage_without_checks_has_no_content_suite(self) -> None:
        contract = validate.StageContract("embedding", "pretrain")
        report = run_contract(contract, make_split("train", 20, stage="embedding"))
        assert report.success
        assert {e.dataset for e in report.expectations} == {"embedding/train", "embedding/eval"}


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("<think>\n2 plus 1 is 3\n</think>\nThe answer is 3.", True),
        ("<think></think>3", True),  # an empty thought is still one balanced block
        ("<think>a</think>3\n", True),
        (" <think>a</think>3", False),  # the block must come first
        ("<think>a", False),
        ("<think>a</think>", False),
        ("<think>a</think> \n ", False),
        ("<think>a<think>b</think></think>3", False),
        ("<think>a</think>3</think>", False),
        ("<think>a</think><think>b</think>3", False),
        ("3", False),
    ],
)
def test_think_pattern(reply: str, ok: bool) -> None:
    assert bool(re.search(validate.THINK_PATTERN, reply)) is ok


@pytest.mark.parametrize(
    ("roles", "ok"),
    [
        ("user,assistant", True),
        ("system,user,assistant,user,assistant", True),
        ("user,user,assistant", False),
        ("assistant", False),
        ("user,assistant,user", False),
        ("system,assistant", False),
        ("", False),
    ],
)
def test_roles_pattern(roles: str, ok: bool) -> None:
    assert bool(re.search(validate.ROLES_PATTERN, roles)) is ok
