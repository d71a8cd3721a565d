"""The end-to-end tests' workspaces (tests/pipeline_workspace.py): a new workspace carries the
project's source but never a pipeline output or run-time store left in the checkout by `make run`;
a copy of a workspace is independent of it, MLflow's artifact paths included.

Everything happens in scratch git repos under tmp_path that mimic the project's layout; the
checkout itself is only read (its dvc.yaml).
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.pipeline_workspace import (
    PROJECT,
    Workspace,
    copy_workspace,
    make_workspace,
    pipeline_outputs,
    project_files,
    rehome_sqlite,
)

# A dvc.yaml with every way this project names an output: plain, `cache: false`, metrics, plots,
# a foreach stage with `${key}` in its paths, a stage with its own wdir, and a second dvc.yaml.
DVC_YAML = """\
stages:
  ingest:
    cmd: python -m tasks.ingest
    deps:
      - tasks/ingest.py
      - data/sources
    outs:
      - data/raw
  train:
    foreach: ${train.stages}
    do:
      cmd: python -m tasks.train ${key}
      deps:
        - tasks/train.py
        - data/prepared/${key}
      outs:
        - models/${key}
        - logs/train/${key}.jsonl
      metrics:
        - metrics/train/${key}.json
  evaluate:
    cmd: python -m tasks.evaluate
    outs:
      - reports/evaluation
    metrics:
      - metrics/evaluate.json
    plots:
      - plots/forgetting.csv:
          cache: false
  report:
    cmd: python make_report.py
    wdir: tools
    outs:
      - out/report.html:
          cache: false
"""
NESTED_DVC_YAML = "stages:\n  extra:\n    cmd: python run.py\n    outs:\n      - result.json\n"

TEXT = {"dvc.yaml": DVC_YAML, "pipelines/extra/dvc.yaml": NESTED_DVC_YAML, ".dvc/config": "",
        ".dvc/.gitignore": "/config.local\n/tmp\n/cache\n"}
SOURCES = ["dvc.yaml", "params.yaml", "tasks/ingest.py", "tasks/train.py", "data/sources/syntax.jsonl",
           "tools/make_report.py", "pipelines/extra/dvc.yaml", "pipelines/extra/run.py", ".dvc/config", ".dvc/.gitignore"]
NEW_SOURCES = ["tasks/new_step.py", "data/sources/more.jsonl", "notes/plan.md", "models.md",
               "plots/README.md", "logs/train/syntax/notes.txt"]
OUTPUTS = ["data/raw/syntax.jsonl", "models/syntax/adapter_model.safetensors", "models/base/config.json",
           "logs/train/syntax.jsonl", "metrics/train/syntax.json", "metrics/evaluate.json",
           "reports/evaluation/forgetting.png", "plots/forgetting.csv", "tools/out/report.html",
           "pipelines/extra/result.json"]
STORES = ["dvc.lock", "mlflow.db", "mlruns/1/abc/meta.yaml", "mlartifacts/1/x", ".prefect/prefect.db",
          ".prefect-home/prefect.db", ".dvc/cache/files/md5/ab/cdef", ".dvc/tmp/lock", ".dvc-site/repo/x"]


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def write(root: Path, rel: str, text: str = "x\n") -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A checkout after `make run`: committed source, new source files, and what the run wrote; no
    root .gitignore, so git lists every output and store as an untracked file."""
    root = tmp_path / "checkout"
    for rel in SOURCES:
        write(root, rel, TEXT.get(rel, "x\n"))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "source")
    for rel in NEW_SOURCES + OUTPUTS + STORES:
        write(root, rel)
    return root


class TestProjectFiles:
    def test_outputs_and_stores_stay_behind_while_source_travels(self, checkout):
        files = project_files(checkout)
        assert sorted(files) == sorted(SOURCES + NEW_SOURCES)

    def test_a_committed_output_stays_behind_too(self, checkout):
        git(checkout, "add", "-f", "plots/forgetting.csv", "metrics/evaluate.json")
        git(checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "metrics in git")
        files = project_files(checkout)
        assert "plots/forgetting.csv" not in files and "metrics/evaluate.json" not in files
        assert "tasks/new_step.py" in files

    def test_the_projects_own_dvc_yaml(self, tmp_path):
        """What `make run` leaves untracked in the checkout (DVC git-ignores cached outputs only)."""
        root = tmp_path / "project"
        write(root, "dvc.yaml", (PROJECT / "dvc.yaml").read_text())
        write(root, "tasks/train.py")
        git(root, "init", "-q")
        left_by_make_run = ["plots/forgetting.csv", "metrics/export.json", "reports/registration.json",
                            "models/syntax/adapter_model.safetensors", "logs/train/syntax.jsonl", "mlflow.db"]
        for rel in left_by_make_run:
            write(root, rel)
        assert sorted(project_files(root)) == ["dvc.yaml", "tasks/train.py"]


@pytest.mark.parametrize(("path", "is_output"), [
    ("data/raw", True), ("data/raw/a/b.jsonl", True), ("data/rawer/a.jsonl", False), ("data/sources/a", False),
    ("models/syntax", True), ("models/syntax/adapter/x.safetensors", True), ("models", False), ("models.md", False),
    ("logs/train/thinking.jsonl", True), ("logs/train/a/b.jsonl", False), ("logs/train/thinking.jsonl.bak", False),
    ("metrics/train/syntax.json", True), ("metrics/train.json", False),
    ("plots/forgetting.csv", True), ("plots/forgetting.csv.orig", False),
    ("tools/out/report.html", True), ("out/report.html", False),
    ("pipelines/extra/result.json", True), ("result.json", False),
])
def test_output_patterns(checkout, path, is_output):
    patterns = pipeline_outputs(checkout, ["dvc.yaml", "pipelines/extra/dvc.yaml"])
    assert any(p.fullmatch(path) for p in patterns) is is_output


def test_new_workspace_is_a_clean_repo_without_outputs(checkout, tmp_path):
    ws = make_workspace(tmp_path / "ws", {"seed": 1}, project=checkout)
    present = sorted(str(p.relative_to(ws.root)) for p in ws.root.rglob("*")
                     if p.is_file() and not str(p.relative_to(ws.root)).startswith(".git/"))
    assert present == sorted(SOURCES + NEW_SOURCES + [".dvc/config.local"])
    assert git(ws.root, "status", "--porcelain") == ""  # the run's lineage tag git_dirty starts "false"


def test_rehome_sqlite_moves_whole_path_prefixes_only(tmp_path):
    db = tmp_path / "store.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE runs (id INTEGER, artifact_uri TEXT, note TEXT)")
        con.executemany("INSERT INTO runs VALUES (?, ?, ?)", [
            (1, "/r/ws1/mlruns/1/a/artifacts", "file:///r/ws1/mlruns/1"),
            (2, "/r/ws10/mlruns/1", "/r/ws1"),
            (3, None, "/r/ws1x"),
        ])
    con.close()
    assert rehome_sqlite(db, "/r/ws1", "/s/copy") == 3
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT * FROM runs ORDER BY id").fetchall()
    con.close()
    assert rows == [(1, "/s/copy/mlruns/1/a/artifacts", "file:///s/copy/mlruns/1"),
                    (2, "/r/ws10/mlruns/1", "/s/copy"),
                    (3, None, "/r/ws1x")]


class TestCopyWorkspace:
    @pytest.fixture
    def template(self, tmp_path, monkeypatch) -> tuple[Workspace, str]:
        """A workspace with what a pipeline run leaves: a git repo, DVC's local config naming its
        site cache dir, and an MLflow run whose artifact sits in ./mlruns (MLflow's default, stored
        as an absolute path). Returns it and the run id."""
        from mlflow import MlflowClient

        root = (tmp_path / "template").resolve()
        write(root, "params.yaml", "seed: 1\n")
        git(root, "init", "-q")
        write(root, ".dvc/config.local", f"[core]\n    site_cache_dir = {root / '.dvc-site'}\n")
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PREFECT_HOME": str(root / ".prefect-home"),
               "PATH": "/usr/bin"}
        monkeypatch.chdir(root)  # the pipeline's stages run in the workspace: ./mlruns is inside it
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        run = client.create_run(client.create_experiment("stagewise"))
        write(root, "card.md", "from the template\n")
        client.log_artifact(run.info.run_id, str(root / "card.md"), "adapter")
        assert client.get_run(run.info.run_id).info.artifact_uri.startswith(str(root))  # what the copy must fix
        monkeypatch.chdir(tmp_path)
        return Workspace(root, env), run.info.run_id

    def test_every_path_points_into_the_copy(self, template, tmp_path):
        ws, _ = template
        copy = copy_workspace(ws, tmp_path / "copy")
        assert copy.root == (tmp_path / "copy").resolve() and (copy.root / ".git").is_dir()
        assert copy.env == {"MLFLOW_TRACKING_URI": f"sqlite:///{copy.root / 'mlflow.db'}",
                            "PREFECT_HOME": str(copy.root / ".prefect-home"), "PATH": "/usr/bin"}
        assert (copy.root / ".dvc/config.local").read_text() == f"[core]\n    site_cache_dir = {copy.root / '.dvc-site'}\n"
        with sqlite3.connect(copy.root / "mlflow.db") as con:
            dump = "\n".join(con.iterdump())
        con.close()
        assert str(copy.root / "mlruns") in dump and f"{ws.root}/" not in dump

    def test_each_copy_reads_and_writes_its_own_artifacts(self, template, tmp_path):
        ws, run_id = template
        first, second = copy_workspace(ws, tmp_path / "first"), copy_workspace(ws, tmp_path / "second")
        (ws.root / "mlruns").rename(ws.root / "mlruns-gone")  # a copy must not need the template's store

        def card(copy: Workspace) -> str:
            client = copy.mlflow_client()
            return Path(client.download_artifacts(run_id, "adapter/card.md", str(tmp_path / "dl" / copy.root.name))).read_text()

        assert card(first) == "from the template\n"
        next(first.root.glob("mlruns/*/*/artifacts/adapter/card.md")).write_text("changed in the first copy\n")
        assert card(first) == "changed in the first copy\n"
        assert card(second) == "from the template\n"  # not the first copy's, though the run id is the same
        client = second.mlflow_client()
        write(second.root, "more.txt", "second copy only\n")
        client.log_artifact(run_id, str(second.root / "more.txt"))
        client.set_tag(run_id, "changed_in", "second")
        assert {a.path for a in client.list_artifacts(run_id)} == {"adapter", "more.txt"}
        assert [p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("more.txt") if "artifacts" in p.parts] == ["second"]
        assert "changed_in" not in first.mlflow_client().get_run(run_id).data.tags
        assert "changed_in" not in ws.mlflow_client().get_run(run_id).data.tags

    def test_a_link_into_the_original_is_refused(self, template, tmp_path):
        ws, _ = template
        (ws.root / "relative-link").symlink_to("params.yaml")  # stays inside whichever tree holds it
        copy = copy_workspace(ws, tmp_path / "fine")
        assert (copy.root / "relative-link").read_text() == "seed: 1\n"
        (ws.root / "absolute-link").symlink_to(ws.root / "params.yaml")
        with pytest.raises(AssertionError, match="links into the original workspace"):
            copy_workspace(ws, tmp_path / "refused")
