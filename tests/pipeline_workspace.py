"""A throwaway copy of the project in its own git repo, with small params, for end-to-end tests.

Everything runs for real in it: `python -m flows.pipeline` on a fresh Prefect home, `dvc repro`,
MLflow on a sqlite file inside the copy. A workspace starts as a clean clone would: the project's
source, without any pipeline output or run-time store that a run in the checkout (`make run`) left
there. `copy_workspace` gives each test its own copy of a workspace the pipeline already ran in.
"""

from __future__ import annotations

import copy
import os
import posixpath
import re
import shutil
import sqlite3
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
    for name, stage in p["stages"].items():
        stage["data"]["n_records"] = 400 if name == "embedding" else 200
        stage["train"].update(max_steps=12 if name == "embedding" else 30, batch_size=8)
    pre = p["model"]["tiny"]["pretrain"]
    pre.update(max_steps=80, batch_size=16, max_length=128)
    pre["copy_warmup"].update(steps=20, batch_size=8)  # runs the warm-up, without waiting for it to teach
    p["model"]["tiny"].update(hidden_size=64, num_hidden_layers=2, head_dim=16, moe_intermediate_size=64, vocab_size=512)
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

    def mlflow_client(self):
        """A client on this workspace's MLflow store. MLflow caches each run's artifact store in the
        process by run id alone, and copies of a workspace share run ids: the cache is emptied so
        this client reads and writes this workspace's own artifacts."""
        from mlflow import MlflowClient
        from mlflow.tracking._tracking_service import utils

        getattr(utils, "_artifact_repos_cache", {}).clear()
        return MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])


# What running the pipeline or its tools writes besides the outputs dvc.yaml names; a workspace
# starts without them, as a clean clone does (dvc.lock records one machine's results).
RUN_TIME_STORES = ("dvc.lock", "mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm", "mlruns",
                   "mlartifacts", ".prefect", ".prefect-home", ".dvc-site", ".dvc/cache", ".dvc/tmp")
OUTPUT_SECTIONS = ("outs", "metrics", "plots")
TEMPLATED = re.compile(r"\$\{[^}]*\}")


def output_pattern(path: str) -> re.Pattern[str]:
    """A dvc.yaml output path as a regex over project-relative paths: the path or anything under
    it, each `${...}` (a foreach `${key}`, a params value) standing for one path segment."""
    pattern = "[^/]+".join(re.escape(part) for part in TEMPLATED.split(path))
    return re.compile(f"{pattern}(?:/.*)?")


def pipeline_outputs(project: Path = PROJECT, dvc_files: list[str] | None = None) -> list[re.Pattern[str]]:
    """Every out, metric and plot of every stage (foreach stages included) of each dvc.yaml among
    `dvc_files` (default: the root one), as patterns over paths relative to the project root."""
    patterns = []
    for dvc_file in dvc_files if dvc_files is not None else ["dvc.yaml"]:
        if posixpath.basename(dvc_file) != "dvc.yaml" or not (project / dvc_file).is_file():
            continue
        stages = (yaml.safe_load((project / dvc_file).read_text()) or {}).get("stages") or {}
        for stage in stages.values():
            body = stage.get("do", stage)  # a foreach stage's outputs are in its `do` template
            wdir = posixpath.join(posixpath.dirname(dvc_file), body.get("wdir", "."))
            for section in OUTPUT_SECTIONS:
                for entry in body.get(section) or []:
                    for path in [entry] if isinstance(entry, str) else list(entry):  # `- path: {cache: false}`
                        patterns.append(output_pattern(posixpath.normpath(posixpath.join(wdir, path))))
    return patterns


def project_files(project: Path = PROJECT) -> list[str]:
    """Files a clean clone would have: tracked, plus new files git does not ignore; never what the
    pipeline writes (DVC does not git-ignore a `cache: false` output, so after `make run` one is an
    untracked file that a run in the workspace would rewrite) nor a run-time store."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=project, capture_output=True, text=True, check=True)
    listed = out.stdout.splitlines()
    outputs = pipeline_outputs(project, listed)

    def written_by_a_run(rel: str) -> bool:
        return any(rel == s or rel.startswith(f"{s}/") for s in RUN_TIME_STORES) or any(p.fullmatch(rel) for p in outputs)

    return [f for f in listed if (project / f).is_file() and not written_by_a_run(f)]


def workspace_env(root: Path) -> dict[str, str]:
    """The environment commands run in, in a workspace at `root`: its own Prefect home and MLflow
    store, git identity, no progress bars."""
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(root / ".prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # the flow's temporary server builds its database first: 20 s (the default) is too short on a busy CI box
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        # DVC's analytics daemon outlives the command and opens the repo, writing its site cache
        # and .dvc/tmp/btime into the workspace at some later moment (a busy machine: mid-test)
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="stagewise test", GIT_AUTHOR_EMAIL="test@stagewise.local",
        GIT_COMMITTER_NAME="stagewise test", GIT_COMMITTER_EMAIL="test@stagewise.local",
        TQDM_DISABLE="1",
    )
    env.pop("PREFECT_API_URL", None)
    return env


def make_workspace(root: Path, params: dict[str, Any], project: Path = PROJECT) -> Workspace:
    for rel in project_files(project):
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, target)
    env = workspace_env(root)
    ws = Workspace(root, env)
    ws.write_params(params)
    ws.run("git", "init", "-q")
    # The tools' own state lives in the workspace but is no part of the project under test.
    (root / ".git/info/exclude").write_text("/.dvc-site/\n/.prefect-home/\n")
    ws.dvc("config", "--local", "core.site_cache_dir", str(root / ".dvc-site"))
    ws.commit("workspace")
    return ws


def copy_workspace(ws: Workspace, dest: Path) -> Workspace:
    """An independent copy of `ws` at `dest` (which must not exist yet), for one test to change.

    The whole tree travels: git history and index, DVC's cache and outputs, the MLflow and Prefect
    stores. The absolute paths into `ws` that the tools recorded (MLflow's artifact locations in
    mlflow.db, DVC's site cache dir, the environment) are moved to the copy, so a test working in
    the copy neither reads nor writes the original."""
    src = ws.root.resolve()
    shutil.copytree(src, dest, symlinks=True)
    dest = dest.resolve()
    for link in (p for p in dest.rglob("*") if p.is_symlink()):
        target = Path(os.readlink(link))
        if target.is_absolute() and target.is_relative_to(src):
            raise AssertionError(f"{link} links into the original workspace ({target}), so a test could change the "
                                 "original through it: keep DVC's default cache.type (copies) in test workspaces")
    if (dest / "mlflow.db").exists():
        rehome_sqlite(dest / "mlflow.db", str(src), str(dest))
    config = dest / ".dvc" / "config.local"
    if config.exists():
        config.write_text(config.read_text().replace(str(src), str(dest)))
    return Workspace(dest, {k: v.replace(str(src), str(dest)) for k, v in ws.env.items()})


def rehome_sqlite(db: Path, old: str, new: str) -> int:
    """Move the path `old` to `new` in every text cell of a sqlite file (MLflow records each
    experiment's and run's artifact folder as an absolute path or file:// URI); returns the number
    of cells changed. `old` followed by `/`, or alone: /tmp/ws1 never matches /tmp/ws10."""
    changed = 0
    with sqlite3.connect(db) as con:
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in con.execute(f'PRAGMA table_info("{table}")')]:
                changed += con.execute(
                    f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                    f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0',
                    (f"{old}/", f"{new}/", f"{old}/"),
                ).rowcount
                changed += con.execute(f'UPDATE "{table}" SET "{column}" = ? WHERE "{column}" = ?', (new, old)).rowcount
    con.close()
    return changed


def build_prepared_project(root: Path, params) -> None:
    """Run ingest -> base -> prepare in-process in `root` (the cwd must be `root`)."""
    from tasks.base import resolve_base
    from tasks.ingest import ingest_all
    from tasks.prepare import prepare_all

    assert Path.cwd() == root, "build_prepared_project runs in the project root it builds"
    ingest_all(params)
    resolve_base(params)
    prepare_all(params)
