"""A throwaway copy of the project in its own git repo, with small params, for end-to-end tests.

Everything runs for real in it: `python -m flows.pipeline` on a fresh Prefect home, `dvc repro`,
MLflow on a sqlite file inside the copy.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def small_params(raw: dict[str, Any]) -> dict[str, Any]:
    """The project's params.yaml cut down to run end to end in about a minute on 2 cores."""
    p = copy.deepcopy(raw)
    for name, stage in p["data"]["stages"].items():
        stage["n_records"] = 400 if name == "embedding" else 200
    pre = p["model"]["tiny"]["pretrain"]
    pre.update(max_steps=80, batch_size=16, max_length=128)
    p["model"]["tiny"].update(hidden_size=64, num_hidden_layers=2, head_dim=16, moe_intermediate_size=64, vocab_size=512)
    for name, stage in p["train"]["stages"].items():
        stage.update(max_steps=12 if name == "embedding" else 30, batch_size=8)
    p["evaluate"].update(max_generate=8, max_new_tokens=40)
    return p


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return done

    def flow(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "flows.pipeline", *extra, check=check)

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, params: dict[str, Any]) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)


def project_files() -> list[str]:
    """Files a clean clone would have: tracked, plus new files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT, capture_output=True, text=True, check=True)
    # dvc.lock records one machine's results; a workspace starts without it, as a clean clone does.
    return [f for f in out.stdout.splitlines() if (PROJECT / f).is_file() and f != "dvc.lock"]


def make_workspace(root: Path, params: dict[str, Any]) -> Workspace:
    for rel in project_files():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, target)
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(root / ".prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        GIT_AUTHOR_NAME="stagewise test", GIT_AUTHOR_EMAIL="test@stagewise.local",
        GIT_COMMITTER_NAME="stagewise test", GIT_COMMITTER_EMAIL="test@stagewise.local",
        TQDM_DISABLE="1",
    )
    env.pop("PREFECT_API_URL", None)
    ws = Workspace(root, env)
    ws.write_params(params)
    ws.run("git", "init", "-q")
    # The tools' own state lives in the workspace but is no part of the project under test.
    (root / ".git/info/exclude").write_text("/.dvc-site/\n/.prefect-home/\n")
    ws.dvc("config", "--local", "core.site_cache_dir", str(root / ".dvc-site"))
    ws.commit("workspace")
    return ws


def build_prepared_project(root: Path, params) -> None:
    """Run ingest -> base -> prepare in-process in `root` (the cwd must be `root`)."""
    from tasks.base import resolve_base
    from tasks.ingest import ingest_all
    from tasks.prepare import prepare_all

    assert Path.cwd() == root, "build_prepared_project runs in the project root it builds"
    ingest_all(params)
    resolve_base(params)
    prepare_all(params)
