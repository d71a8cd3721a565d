"""The scale-out stack for end-to-end tests: started by the project's own `python -m infra.stack`,
on free loopback ports, with a throwaway origin repo, a CPU and a GPU workspace and their workers.

Everything here talks to the stack the way a user or the UI would: the stack CLI, the Prefect
API, the MLflow server, boto3 against the S3 store.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline_workspace import PROJECT, Workspace, make_workspace, small_params

# Test credentials, made up per session (so no file holds them): the S3 store accepts exactly
# these, and a test scans every log, store and committed file for them.
ACCESS_KEY = f"e2e-access-{secrets.token_hex(6)}"
SECRET_KEY = f"e2e-secret-{secrets.token_hex(12)}"
PIPELINE = "stagewise-pipeline/pipeline"


@dataclass
class Stack:
    home: Path
    origin: Workspace
    cpu: Path
    gpu: Path
    env: dict[str, str]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "infra.stack", "--home", str(self.home), *args], cwd=PROJECT,
                              env=self.env, capture_output=True, text=True, timeout=600)
        if check and done.returncode != 0:
            raise AssertionError(f"infra.stack {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.home / "stack.json").read_text())

    def client_env(self) -> dict[str, str]:
        lines = self.cli("env").stdout.splitlines()
        return dict(line.removeprefix("export ").split("=", 1) for line in lines)

    def prefect(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.state["urls"]["prefect_api"])

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.state["urls"]["mlflow"])

    def s3_keys(self) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.state["urls"]["s3"], region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.state["bucket"])
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def trigger(self, parameters: dict[str, Any]):
        """What the UI's custom run does: a flow run of the deployment with these parameters."""
        with self.prefect() as client:
            deployment = client.read_deployment_by_name(PIPELINE)
            return client.create_flow_run_from_deployment(deployment.id, parameters=parameters)

    def wait(self, flow_run_id, timeout: float = 1500):
        deadline = time.monotonic() + timeout
        with self.prefect() as client:
            while time.monotonic() < deadline:
                run = client.read_flow_run(flow_run_id)
                if run.state and run.state.is_final():
                    return run
                time.sleep(3)
        raise AssertionError(f"flow run {flow_run_id} not finished after {timeout:.0f} s; logs in {self.home / 'logs'}")

    def wait_until_running(self, flow_run_id, timeout: float = 300):
        """Until the flow run is Running (holds the deployment's slot) or has already ended."""
        deadline = time.monotonic() + timeout
        with self.prefect() as client:
            while time.monotonic() < deadline:
                run = client.read_flow_run(flow_run_id)
                if run.state and (run.state.is_running() or run.state.is_final()):
                    return run
                time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} not started after {timeout:.0f} s; logs in {self.home / 'logs'}")

    def task_runs(self, flow_run_id) -> dict[str, str]:
        """Task run name -> state name, for one flow run."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with self.prefect() as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {run.name: run.state.name for run in runs if run.state}

    def logs(self) -> str:
        """Every Prefect log line of every flow run, as the UI shows them."""
        from prefect.client.schemas.filters import LogFilter

        messages: list[str] = []
        with self.prefect() as client:
            while True:  # the API serves at most 200 per page
                page = client.read_logs(log_filter=LogFilter(), limit=200, offset=len(messages))
                messages += [log.message for log in page]
                if len(page) < 200:
                    return "\n".join(messages)


def start_stack(base: Path) -> Stack:
    params = small_params(yaml.safe_load((PROJECT / "params.yaml").read_text()))
    for stage in params["stages"].values():  # the stack is under test here, not learning
        stage["train"]["max_steps"] = 8
    params["evaluate"].update(max_generate=4, max_new_tokens=24)
    origin = make_workspace(base / "origin", params)
    env = {k: v for k, v in origin.env.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, PYTHONPATH=str(PROJECT))
    stack = Stack(base / "stack", origin, base / "ws-cpu", base / "ws-gpu", env)
    stack.cli("up", "--free-ports")
    try:
        for workspace in (stack.cpu, stack.gpu):
            stack.cli("workspace", "--repo", str(origin.root), str(workspace))
        stack.cli("deploy", "--cpu-workspace", str(stack.cpu), "--gpu-workspace", str(stack.gpu))
        stack.cli("worker", "--pool", stack.state["cpu_pool"], "--workspace", str(stack.cpu))
        stack.cli("worker", "--pool", stack.state["gpu_pool"], "--workspace", str(stack.gpu))
    except BaseException:
        stack.cli("down", check=False)
        raise
    return stack


def stop_stack(stack: Stack) -> list[int]:
    """`down`, then the PIDs it had started that are still alive (none, if it worked)."""
    from infra.stack.processes import alive

    pids = [p["pid"] for p in stack.state["processes"].values()]
    stack.cli("down")
    return [pid for pid in pids if alive(pid)]


def fresh_clone(stack: Stack, target: Path) -> subprocess.CompletedProcess:
    """Clone the CPU workspace, point it at the bucket, `dvc pull`, then `dvc repro`."""
    subprocess.run(["git", "clone", "-q", str(stack.cpu), str(target)], check=True)
    env = stack.env | stack.client_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["remote", "add", "--local", "-d", "stack", f"s3://{stack.state['bucket']}/dvc"],
                 ["remote", "modify", "--local", "stack", "endpointurl", stack.state["urls"]["s3"]],
                 ["pull", "-q"]):
        subprocess.run(dvc + args, cwd=target, env=env, check=True, capture_output=True, timeout=600)
    return subprocess.run(dvc + ["repro"], cwd=target, env=env, capture_output=True, text=True, timeout=900)
