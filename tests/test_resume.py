"""A training stage killed with SIGKILL resumes from its last checkpoint when run again, and ends
with the adapter an uninterrupted run makes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from tasks.core import paths
from tests.pipeline_workspace import PROJECT, build_prepared_project
from tests.test_train import tiny_params

pytestmark = pytest.mark.slow
STEPS, EVERY = 120, 10


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny_params()
    build_prepared_project(tmp_path, params)
    raw = params.model_dump(by_alias=True)
    raw["train"]["checkpoint_every"] = EVERY
    raw["stages"]["embedding"]["train"]["max_steps"] = STEPS
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path


def train_cmd(root):
    env = os.environ | {"PYTHONPATH": str(PROJECT), "TQDM_DISABLE": "1"}
    return dict(args=[sys.executable, "-m", "tasks.train", "embedding", "--params", "p.yaml"], cwd=root, env=env)


def kill_after_a_checkpoint(root) -> int:
    """Start training, SIGKILL it once a checkpoint past the first is on disk; returns that step."""
    proc = subprocess.Popen(**train_cmd(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = sorted(int(p.parent.name.split("-")[1]) for p in (root / paths.CHECKPOINTS_DIR).glob("embedding/*/checkpoint-*/trainer_state.json"))
            if done and done[-1] >= 2 * EVERY:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return done[-1]
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
    pytest.fail("training finished or stalled before a second checkpoint was written")


def test_killed_stage_resumes_and_matches_an_uninterrupted_run(project):
    killed_at = kill_after_a_checkpoint(project)
    assert killed_at < STEPS
    assert not (paths.adapter_dir("embedding") / "adapter_model.safetensors").exists()

    resumed = subprocess.run(**train_cmd(project), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoints/embedding/" in resumed.stderr
    metrics = yaml.safe_load(paths.train_metrics("embedding").read_text())
    assert metrics["resumed_from_step"] >= killed_at - EVERY and metrics["steps"] == STEPS
    assert not (project / paths.CHECKPOINTS_DIR / "embedding").exists()  # cleaned once finished
    after_resume = load_file(paths.adapter_dir("embedding") / "adapter_model.safetensors")
    # MLflow: the resumed process continued the run the killed one started, so one run holds the
    # whole stage, steps from before the kill included.
    runs = stage_runs(project)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in mlflow_client(project).get_metric_history(runs[0].info.run_id, "loss")]
    assert steps[0] == 1 and steps[-1] == STEPS and min(steps) < killed_at

    straight = subprocess.run(**train_cmd(project), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0 and "resuming" not in straight.stderr
    uninterrupted = load_file(paths.adapter_dir("embedding") / "adapter_model.safetensors")
    assert after_resume.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        # Tolerance: CPU kernels are deterministic here; allow float noise from reloaded optimizer state.
        assert (after_resume[key] - value).abs().max() <= 1e-5 + 1e-4 * value.abs().max(), key


def mlflow_client(root):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def stage_runs(root) -> list:
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("stagewise")
    return client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'train@embedding'")
