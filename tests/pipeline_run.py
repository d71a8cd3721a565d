"""One run of the whole pipeline through the Prefect flow, shared by the end-to-end tests that only
need a workspace the flow already ran in (tests/test_pipeline_e2e.py, tests/test_serve.py).

The run takes about 3 minutes on 2 cores, so it happens once per `pytest` invocation, also under
`pytest -n` (the Makefile's default): the first worker to need it runs it under a file lock in the
temp folder all workers share, and the others open what it left. A test never works in it, but in
its own copy (tests/pipeline_workspace.py::copy_workspace).

The promotion gate is set to pass (thresholds every model meets, a tolerance no score in [0, 1]
exceeds), so which aliases each version gets is known in advance; the gate's decisions themselves
are tested in tests/test_register.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock

from tests.pipeline_workspace import (
    PROJECT,
    Workspace,
    make_workspace,
    small_params,
    workspace_env,
)

GATE_ALWAYS_PASSES = {"thresholds": {"syntax_json_valid": 0.0, "thinking_exact_match": 0.0}, "champion_tolerance": 1.0}
RESULT = "flow-result.json"  # written last: a folder without it holds a run that did not finish


@dataclass(frozen=True)
class PipelineRun:
    """A workspace the flow ran in, once, and what it printed. Tests never change it: they copy it."""

    workspace: Workspace
    flow: subprocess.CompletedProcess


def flow_ran(flow_output: str) -> list[str]:
    """The DVC stages the flow ran, in order, from its summary line."""
    match = re.search(r"pipeline: \d+ stage\(s\) ran \(([^)]*)\)", flow_output)
    assert match, f"no summary line in flow output:\n{flow_output[-3000:]}"
    return [] if match.group(1) == "none" else match.group(1).split(", ")


def run_pipeline(root: Path) -> PipelineRun:
    """The flow, run once in a fresh workspace at `root` on the small params."""
    params = small_params(yaml.safe_load((PROJECT / "params.yaml").read_text()))
    params["register"].update(GATE_ALWAYS_PASSES)
    ws = make_workspace(root, params)
    return PipelineRun(ws, ws.flow())


def shared_pipeline_run(temp: Path) -> PipelineRun:
    """`run_pipeline` once for every process of a test session: `temp` is a folder they all see.
    The first runs it under the lock; the others wait, then open the workspace and the flow's output."""
    root = temp / "pipeline-run"
    with FileLock(str(temp / "pipeline-run.lock")):
        result = root.parent / RESULT
        if not result.exists():
            shutil.rmtree(root, ignore_errors=True)  # what a failed attempt left
            root.mkdir(parents=True)
            run = run_pipeline(root)
            flow = run.flow
            result.write_text(json.dumps({"args": flow.args, "returncode": flow.returncode,
                                          "stdout": flow.stdout, "stderr": flow.stderr}))
            return run
        flow = json.loads(result.read_text())
    return PipelineRun(Workspace(root, workspace_env(root)),
                       subprocess.CompletedProcess(flow["args"], flow["returncode"], flow["stdout"], flow["stderr"]))


def session_temp(tmp_path_factory) -> Path:
    """The temp folder every process of this test session sees: under `pytest -n`, each worker's
    base temp is a subfolder of it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
