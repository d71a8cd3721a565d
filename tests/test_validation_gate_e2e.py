"""End to end: data that breaks a contract stops the DAG at `validate`, before any training,
with a summary naming the dataset, the expectation and the counts; fixing the data resumes from
the outputs already made."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.pipeline_workspace import PROJECT, copy_workspace, make_workspace, small_params

pytestmark = pytest.mark.slow


def chat(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


def user_syntax_file(broken: int) -> str:
    """40 requests with JSON replies; the first `broken` replies are prose, which the syntax
    stage's contract (`checks.json_target`) refuses."""
    lines = [chat(f"Extract JSON: play song number {i}.",
                  f"play song {i}" if i < broken else json.dumps({"intent": "play", "slots": {"n": i}}))
             for i in range(40)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    raw = small_params(yaml.safe_load((PROJECT / "params.yaml").read_text()))
    raw["model"]["tiny"]["pretrain"]["max_steps"] = 5
    raw["stages"]["syntax"]["data"]["sources"] = [{"path": "data/sources/syntax.jsonl"}]
    ws = make_workspace(tmp_path_factory.mktemp("gate"), raw)
    (ws.root / "data/sources/syntax.jsonl").write_text(user_syntax_file(broken=6))
    return ws, ws.flow(check=False)


def test_flow_stops_at_validate_with_a_readable_summary(failed_run):
    ws, out = failed_run
    assert out.returncode == 1
    assert "stage validate failed" in out.stderr
    assert "Data validation failed" in out.stderr
    assert "expect_column_values_to_be_json_parseable(last_reply)" in out.stderr
    assert "own records' final reply is not valid JSON" in out.stderr
    assert "Data Docs (HTML): reports/validation/docs/index.html" in out.stderr  # points to the HTML
    assert (ws.root / "reports/validation/docs/index.html").exists()
    assert "params.yaml" in out.stderr  # says what to do
    assert "Traceback" not in without_prefect_server_teardown(out.stderr.split("stage validate failed")[-1])


# Prefect's ephemeral API server, stopping after the flow, can log SQLAlchemy's pool reset of an
# aiosqlite connection cancelled mid-shutdown, with its traceback (seen once in CI). That is
# Prefect's teardown, not the validation summary, and every frame of it is SQLAlchemy's or aiosqlite's.
TEARDOWN = re.compile(r"[^\n]*Exception during reset or similar\nTraceback \(most recent call last\):\n(?P<frames>.*?)"
                      r"asyncio\.exceptions\.CancelledError\n?", re.DOTALL)


def without_prefect_server_teardown(stderr: str) -> str:
    def cut(match: re.Match) -> str:
        files = re.findall(r'File "([^"]+)"', match["frames"])
        return "" if files and all("sqlalchemy" in f or "aiosqlite" in f for f in files) else match[0]

    return TEARDOWN.sub(cut, stderr)


def test_prefect_server_teardown_noise_is_all_that_is_cut():
    noise = ("ERROR sqlalchemy.pool.impl.AsyncAdaptedQueuePool Exception during reset or similar\n"
             "Traceback (most recent call last):\n"
             '  File "/v/site-packages/sqlalchemy/pool/base.py", line 1051, in _finalize_fairy\n'
             '  File "/v/site-packages/aiosqlite/core.py", line 160, in _execute\n'
             "asyncio.exceptions.CancelledError\n")
    ours = noise.replace("/v/site-packages/aiosqlite/core.py", "/w/tasks/validate.py")
    assert without_prefect_server_teardown("summary\n" + noise + "end\n") == "summary\nend\n"
    assert "Traceback" in without_prefect_server_teardown("summary\n" + ours)


def test_nothing_was_trained_and_earlier_outputs_are_kept(failed_run):
    ws, _ = failed_run
    assert not any((ws.root / "models" / s).exists() for s in ["embedding", "syntax", "thinking", "instructions"])
    assert (ws.root / "models/base/model.safetensors").exists()
    report = json.loads((ws.root / "reports/validation/syntax.json").read_text())
    failed = [e for e in report["expectations"] if not e["success"]]
    assert {e["name"] for e in failed} == {"expect_column_values_to_be_json_parseable(last_reply)"}
    # the 6 broken records, wherever the content-hash split put them
    assert sum(e["unexpected_count"] for e in failed) == 6
    lock = yaml.safe_load((ws.root / "dvc.lock").read_text())
    assert {"ingest", "base", "prepare"} <= set(lock["stages"]) and "validate" not in lock["stages"]


def test_fixed_data_resumes_without_rebuilding_the_base(failed_run, tmp_path):
    ws = copy_workspace(failed_run[0], tmp_path / "fixed")  # its own copy: the failed run stays as it was
    (ws.root / "data/sources/syntax.jsonl").write_text(user_syntax_file(broken=0))
    out = ws.dvc("repro", "validate")
    ran = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["ingest", "prepare", "validate"]
