"""One training stage as its own flow, for a GPU work pool (deployment `train-stage`).

The pipeline flow dispatches `train@<stage>` here when it is given a train deployment. This runs on
the GPU worker, in that worker's workspace (a clone of the project whose default DVC remote is the
shared bucket): it checks out the pipeline's commit and params, restores every upstream stage from
the remote's run cache (`dvc repro --pull`: nothing upstream runs again), runs the stage and pushes
its outputs and run record back.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flows import dvc_stages, remote
from tasks.core.config import load_params


def __getattr__(name: str) -> Any:
    """PEP 562: the flow is built when first asked for (the deployment entrypoint
    `flows/train_stage.py:train_stage` asks), so importing this module does not import Prefect."""
    if name == "train_stage":
        return _train_stage_flow()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _train_stage_flow() -> Any:
    from prefect import flow, get_run_logger

    # Written out as a decorator on `def train_stage`: tests/test_infra_manifests.py reads the flow
    # name from this source to check the pipeline's STAGEWISE_TRAIN_DEPLOYMENT against it.
    @flow(name="stagewise-train-stage")
    def train_stage(stage: str, params_yaml: str, git_commit: str | None = None, project_dir: str = ".") -> str:
        """Run DVC stage `stage` (e.g. train@syntax) here with the pipeline's params; push the result."""
        logger = get_run_logger()
        root = Path(project_dir).resolve()
        if not stage.startswith("train@"):
            raise ValueError(f"train-stage runs train@<stage> stages only, not {stage!r}")
        dvc_stages.checkout(root, git_commit)
        params_path = root / "params.yaml"
        params_path.write_text(params_yaml)
        load_params(params_path)  # bad params fail here, before any transfer
        logger.info("%s: restoring its inputs from the remote's run cache, then training", stage)
        output = dvc_stages.stream_dvc(root, ["repro", "--pull", stage], stage, logger.info)
        ran = dvc_stages.stages_that_ran(output)
        logger.info("%s: %s", stage, "; ".join(ran) or "every stage was restored from the run cache")
        remote.push(str(root))
        return "ran" if any(f"'{stage}'" in line for line in ran) else "restored"

    return train_stage


if __name__ == "__main__":
    raise SystemExit("deploy this flow (prefect.yaml: train-stage); the pipeline flow dispatches to it")
