"""flows/: the flow modules import without Prefect (so `--help` answers at once), and their
deployment entrypoints still load as real Prefect flows.

    pytest tests/test_flows_cli.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]

ENTRYPOINTS = {"flows/pipeline.py:pipeline": "stagewise-pipeline",
               "flows/train_stage.py:train_stage": "stagewise-train-stage"}


def python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter in the project root: this process has imported Prefect long ago."""
    return subprocess.run([sys.executable, *args], cwd=PROJECT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.train_stage", "flows.remote", "flows.dvc_stages"])
def test_importing_a_flow_module_does_not_import_prefect(module):
    done = python("-c", f"import {module}, sys; print('prefect' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", f"importing {module} imported prefect"


def test_help_answers_with_usage():
    done = python("-m", "flows.pipeline", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and "--set KEY=VALUE" in done.stdout


def test_a_bad_override_fails_before_prefect_starts(tmp_path):
    """Config errors answer at once: no temporary Prefect server is started to report them."""
    params = tmp_path / "params.yaml"
    params.write_text((PROJECT / "params.yaml").read_text())
    done = python("-c", "import sys, flows.pipeline as p; code = p.main(sys.argv[1:]); "
                  "print('prefect' in sys.modules); sys.exit(code)",
                  "--params", str(params), "--set", "stages.syntax.train.learning_rate=-1")
    assert done.returncode == 1
    assert "stages.syntax.train.learning_rate" in done.stderr
    assert done.stdout.strip() == "False"
    assert params.read_text() == (PROJECT / "params.yaml").read_text()


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_deployment_entrypoints_load_as_prefect_flows(entrypoint, monkeypatch):
    from prefect.flows import Flow, load_flow_from_entrypoint

    monkeypatch.chdir(PROJECT)  # prefect.yaml's entrypoints are relative to the project root
    flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    assert isinstance(flow, Flow)
    assert flow.name == ENTRYPOINTS[entrypoint]


def test_the_flow_and_its_tasks_are_built_once_on_access():
    from prefect import Flow, Task

    import flows.pipeline as pipeline_module

    assert pipeline_module.pipeline is pipeline_module.pipeline
    assert isinstance(pipeline_module.pipeline, Flow)
    assert all(isinstance(getattr(pipeline_module, name), Task)
               for name in ("run_dvc_stage", "run_stage_on_pool", "publish"))
    with pytest.raises(AttributeError, match="no attribute 'pipelin'"):
        pipeline_module.pipelin  # noqa: B018 - a typo fails as usual, not with a Prefect import


def test_stream_dvc_logs_every_line_and_fails_with_the_last_ones(tmp_path):
    from flows.dvc_stages import StageFailed, stream_dvc

    logged: list[str] = []
    lines = stream_dvc(tmp_path, ["--version"], "version", logged.append)
    assert lines == logged and lines
    with pytest.raises(StageFailed, match="stage nothing failed"):
        stream_dvc(tmp_path, ["repro", "nothing"], "nothing", logged.append)  # not a DVC repository


def test_shared_commit_is_head_without_an_upstream_and_none_outside_git(tmp_path, monkeypatch):
    from flows.dvc_stages import git_head, shared_commit

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path
    assert git_head(tmp_path) is None and shared_commit(tmp_path) is None
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "one"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_head(tmp_path) == head == shared_commit(tmp_path)
