"""The scale-out path end to end, on loopback: the project's own scripts start an S3 store, an
MLflow server (sqlite, artifacts in S3), a Prefect server and a worker per pool; the `pipeline`
deployment is triggered through the Prefect API as the UI's custom run does, the CPU worker runs
the DAG and hands each training stage to the GPU pool's worker, which moves data through the DVC
remote. Then: what the UI, MLflow, the bucket and a fresh clone show; failures and a store that
goes away; no credentials anywhere; and everything the stack started is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stack_harness import ACCESS_KEY, SECRET_KEY, Stack, fresh_clone, start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("git") is None, reason="needs git")]

STAGES = ["ingest", "base", "prepare", "validate", "train@embedding", "train@syntax", "train@thinking",
          "train@instructions", "evaluate", "export", "register"]
ARTIFACTS = Path(os.environ.get("STAGEWISE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "reports" / "test-artifacts"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    started = start_stack(tmp_path_factory.mktemp("stack"))
    yield started
    if started.state["processes"]:
        stop_stack(started)


@pytest.fixture(scope="module")
def first_run(stack):
    """One pipeline run from the deployment, with one override from the form's typed fields."""
    run = stack.trigger({"params": {"syntax_max_steps": 6}})
    return stack.wait(run.id)


def test_the_pipeline_deployment_runs_every_stage_with_training_on_the_gpu_pool(stack, first_run):
    assert first_run.state.name == "Completed", first_run.state.message
    tasks = stack.task_runs(first_run.id)
    assert [s for s in STAGES if s not in tasks] == []
    assert all(tasks[s] == "Completed" for s in STAGES), tasks
    # the override reached params.yaml, and the run was committed with its dvc.lock
    params = yaml.safe_load((stack.cpu / "params.yaml").read_text())
    assert params["stages"]["syntax"]["train"]["max_steps"] == 6
    log = subprocess.run(["git", "log", "--format=%s", "-1"], cwd=stack.cpu, capture_output=True, text=True).stdout
    assert log.startswith(f"stagewise run {first_run.name}")
    # each training stage ran as a flow run of `train-stage`, in the GPU worker's workspace
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with stack.prefect() as client:
        children = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train-stage"])))
    assert sorted(c.parameters["stage"] for c in children) == sorted(s for s in STAGES if s.startswith("train@"))
    assert {c.state.name for c in children} == {"Completed"}
    assert (stack.gpu / "models" / "instructions" / "adapter_model.safetensors").is_file()


def test_mlflow_server_holds_the_runs_and_the_registered_version(stack, first_run):
    client = stack.mlflow()
    experiment = client.get_experiment_by_name("stagewise")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {f"train@{s}" for s in ("embedding", "syntax", "thinking", "instructions")} <= children
    assert parent.data.params["stages.syntax.train.max_steps"] == "6"
    version = client.get_model_version_by_alias("stagewise-assistant", "challenger")
    assert client.get_run(version.run_id).info.run_name == "train@instructions"  # the final adapter's run
    assert parent.data.tags["registered_version"] == version.version
    assert version.tags["gate"] in ("passed", "failed")


def test_the_bucket_holds_the_adapter_reports_and_the_dvc_remote(stack, first_run):
    keys = stack.s3_keys()
    assert any(k.startswith("mlflow/") and k.endswith("adapter/adapter_model.safetensors") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("forgetting.png") for k in keys)
    assert any(k.startswith("dvc/files/md5/") for k in keys)
    assert any(k.startswith("dvc/runs/") for k in keys)  # run records: how the GPU worker got its inputs


def test_a_fresh_clone_pulls_and_finds_nothing_to_do(stack, first_run, tmp_path):
    done = fresh_clone(stack, tmp_path / "fresh")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Running stage" not in done.stdout
    assert "Data and pipelines are up to date." in done.stdout
    assert (tmp_path / "fresh" / "models" / "instructions" / "adapter_model.safetensors").is_file()


def test_a_failing_stage_fails_the_run_naming_it_and_a_rerun_queued_behind_it_resumes_there(stack, first_run):
    """The fix is triggered while the failing run is running: the deployment's concurrency limit of
    1 makes it wait in line, then it resumes where the failed run stopped."""
    failing = stack.trigger({"params": {"set": {"export.max_kl": 1e-12}}})
    stack.wait_until_running(failing.id)  # it holds the slot: the fix cannot overtake it
    fix = stack.trigger({"params": {"set": {"export.max_kl": 0.02}}})
    failed, resumed = stack.wait(failing.id), stack.wait(fix.id)
    assert failed.state.name == "Failed"
    assert "stage export failed" in failed.state.message
    tasks = stack.task_runs(failed.id)
    assert tasks["export"] == "Failed" and "register" not in tasks
    assert failed.end_time <= resumed.start_time  # in line, not side by side
    assert resumed.state.name == "Completed", resumed.state.message
    tasks = stack.task_runs(resumed.id)
    assert {tasks[s] for s in STAGES[:8]} == {"Skipped"}  # everything before export was kept
    assert tasks["export"] == tasks["register"] == "Completed"


def test_the_store_going_away_fails_the_push_after_retries_and_records_nothing(stack, first_run):
    from infra.stack import services
    from infra.stack.processes import Managed, stop
    from infra.stack.settings import StackState

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=stack.cpu, capture_output=True, text=True).stdout
    state = StackState.load(stack.home)
    stop(state.processes["s3"])
    run = stack.wait(stack.trigger({}).id)
    assert run.state.name == "Failed"
    assert "DVC remote 'stack'" in run.state.message and "is unreachable" in run.state.message
    with stack.prefect() as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        pushes = [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
                  if t.name.startswith("dvc-push")]
    assert pushes and pushes[0].run_count == 4  # the first try and 3 retries
    after = subprocess.run(["git", "rev-parse", "HEAD"], cwd=stack.cpu, capture_output=True, text=True).stdout
    assert after == head  # no commit of results the remote does not hold
    # the store comes back on the same port and folder: the next run publishes
    env_before = dict(os.environ)
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    try:
        state.processes["s3"] = services.start_s3(state)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    state.save()
    assert isinstance(state.processes["s3"], Managed)
    again = stack.wait(stack.trigger({}).id)
    assert again.state.name == "Completed", again.state.message


def test_the_ui_pages_show_the_stage_runs_and_the_compared_runs(stack, first_run):
    from browser import screenshot_pages

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    client = stack.mlflow()
    experiment = client.get_experiment_by_name("stagewise")
    pipelines = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "pipeline"][:2]
    assert len(pipelines) == 2
    pages = screenshot_pages(stack.state["urls"], first_run.id, experiment.experiment_id,
                             [r.info.run_id for r in pipelines], ARTIFACTS)
    prefect_text, mlflow_text = pages["prefect"], pages["mlflow"]
    assert first_run.name in prefect_text
    assert all(stage in prefect_text for stage in ("train@embedding", "train@instructions", "evaluate", "register"))
    assert all(r.info.run_id in mlflow_text for r in pipelines) and "pipeline" in mlflow_text  # ids and run names
    assert "stages.syntax.train.max_steps" in mlflow_text
    assert (ARTIFACTS / "prefect-flow-run.png").stat().st_size > 10_000
    assert (ARTIFACTS / "mlflow-compare.png").stat().st_size > 10_000


def test_no_credential_is_written_to_logs_params_tags_or_committed_config(stack, first_run):
    haystacks = {"prefect logs": stack.logs()}
    for log in (stack.home / "logs").glob("*.log"):
        haystacks[str(log)] = log.read_text(errors="replace")
    client = stack.mlflow()
    experiment = client.get_experiment_by_name("stagewise")
    for run in client.search_runs([experiment.experiment_id]):
        haystacks[f"mlflow run {run.info.run_id}"] = json.dumps([run.data.params, run.data.tags])
    for version in client.search_model_versions("name='stagewise-assistant'"):
        haystacks[f"model version {version.version}"] = json.dumps(version.tags)
    for workspace in (stack.cpu, stack.gpu):
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=workspace, capture_output=True, text=True).stdout
        for name in filter(None, tracked.split("\0")):
            path = workspace / name
            if path.is_file() and path.stat().st_size < 5_000_000:
                haystacks[str(path)] = path.read_text(errors="replace")
        haystacks[f"{workspace}/.dvc/config.local"] = (workspace / ".dvc" / "config.local").read_text()
    leaks = [where for where, text in haystacks.items() if SECRET_KEY in text or ACCESS_KEY in text]
    assert leaks == []
    assert len(haystacks) > 50  # the scan read the stores, not nothing


def test_down_stops_every_process_it_started(stack, first_run):
    assert stop_stack(stack) == []
    assert json.loads((stack.home / "stack.json").read_text())["processes"] == {}
