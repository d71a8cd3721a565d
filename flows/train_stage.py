"""One training stage as its own flow, for a GPU work pool (deployment `train-stage`).

The pipeline flow dispatches `train@<stage>` here when it is given a train deployment. This runs on
the GPU worker, in that worker's workspace (a clone of the project whose default DVC remote is the
shared bucket): it checks out the pipeline's commit and params, restores every upstream stage from
the remote's run cache (`dvc repro --pull`: nothing upstream runs again), runs the stage and pushes
its outputs and run record back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from prefect import flow, get_run_logger

from flows import remote
from flows.pipeline import stream_dvc
from tasks.core.config import load_params


def checkout(project: Path, commit: str | None) -> None:
    """The pipeline's commit, fetched from this clone's origin when it is not here yet."""
    if not commit:
        return
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    if head == commit:
        return
    have = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=project).returncode == 0
    if not have:
        subprocess.run(["git", "fetch", "-q", "origin"], cwd=project, check=True, timeout=300)
    # --force: params.yaml (and dvc.lock) here are the last run's, written by this flow; the new ones follow
    subprocess.run(["git", "checkout", "-q", "--force", "--detach", commit], cwd=project, check=True)


@flow(name="stagewise-train-stage")
def train_stage(stage: str, params_yaml: str, git_commit: str | None = None, project_dir: str = ".") -> str:
    """Run DVC stage `stage` (e.g. train@syntax) here with the pipeline's params; push the result."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    if not stage.startswith("train@"):
        raise ValueError(f"train-stage runs train@<stage> stages only, not {stage!r}")
    checkout(root, git_commit)
    params_path = root / "params.yaml"
    params_path.write_text(params_yaml)
    load_params(params_path)  # bad params fail here, before any transfer
    logger.info("%s: restoring its inputs from the remote's run cache, then training", stage)
    output = stream_dvc(root, ["repro", "--pull", stage], stage)
    ran = [line for line in output if line.startswith("Running stage")]
    logger.info("%s: %s", stage, "; ".join(ran) or "every stage was restored from the run cache")
    remote.push(str(root))
    return "ran" if any(f"'{stage}'" in line for line in ran) else "restored"


if __name__ == "__main__":
    raise SystemExit("deploy this flow (prefect.yaml: train-stage); the pipeline flow dispatches to it")
