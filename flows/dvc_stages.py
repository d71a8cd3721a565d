"""DVC and git plumbing under the flows: which stages there are, in what order, whether one is up to
date, running one the way `dvc repro` does, and the commits a run starts from and ends with.

No Prefect here: the flows pass a log callable (`get_run_logger().info` inside a run), so this module
imports in milliseconds and its functions run, and can be tested, outside any flow run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

Log = Callable[[str], object]
"""Where a stage's output lines go: `get_run_logger().info` in a flow run, a logging method outside."""

_logger = logging.getLogger(__name__)

# What `dvc repro --pull` prints for a stage it restored from the run cache instead of running.
RESTORED_MARK = "is cached - skipping run"


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; earlier stages' outputs stay in place and are resumable."""


def stage_order(project: Path) -> list[str]:
    """Stage names of dvc.yaml in an order where every stage follows its dependencies."""
    from dvc.repo import Repo

    from tasks.core.dag import ordered_stages

    with Repo(str(project)) as repo:
        return [stage.addressing for stage in ordered_stages(repo)]


def stage_is_up_to_date(project: Path, name: str) -> bool:
    """DVC's own verdict (`dvc status name` is empty), so a flow skips exactly what `dvc repro` would."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return not repo.status(targets=[name])


def _stage_env() -> dict[str, str]:
    """The stage commands call `python`: make it this interpreter, virtual environment or not."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Progress bars redraw with carriage returns, which a log turns into walls of text; the
    # trainer logs a line every few steps instead.
    env.setdefault("TQDM_DISABLE", "1")
    return env


def stream_dvc(root: Path, args: list[str], name: str, log: Log = _logger.info) -> list[str]:
    """Run `dvc <args>` in root, passing its output to `log` line by line; its lines, or StageFailed."""
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:  # type: ignore[union-attr]
        line = line.rstrip()
        if line:
            log(line)
            lines.append(line)
    if proc.wait() != 0:
        raise StageFailed(f"stage {name} failed (exit {proc.returncode}):\n" + "\n".join(lines[-30:]))
    return lines


def run_stage(root: Path, name: str, log: Log = _logger.info) -> list[str]:
    """`dvc repro --single-item name`: this stage only, recorded in dvc.lock as `dvc repro` records it."""
    return stream_dvc(root, ["repro", "--single-item", name], name, log)


def restore_stage(root: Path, name: str, ran_on: str, log: Log = _logger.info) -> None:
    """Restore a stage that ran elsewhere from the DVC remote's run cache, so dvc.lock records it as
    if it had run here; StageFailed when DVC had to run it again instead (the record was missing)."""
    lines = stream_dvc(root, ["repro", "--single-item", "--pull", name], name, log)
    if not any(RESTORED_MARK in line for line in lines):
        raise StageFailed(f"stage {name} ran on {ran_on} but its run record was not in the DVC remote, "
                          "so it ran again here; check that the worker's workspace uses the same remote")


def stages_that_ran(lines: list[str]) -> list[str]:
    """The `Running stage '...'` lines of a `dvc repro` output: what it ran rather than restored."""
    return [line for line in lines if line.startswith("Running stage")]


def git_head(root: Path) -> str | None:
    """HEAD's commit, or None outside a git repository (or before its first commit)."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def shared_commit(root: Path) -> str | None:
    """The newest commit the GPU worker's clone can fetch: HEAD's merge-base with its upstream
    branch (the workspace's own commits only add dvc.lock, params and metrics, which travel
    otherwise), or HEAD when there is no upstream."""
    base = subprocess.run(["git", "merge-base", "HEAD", "@{upstream}"], cwd=root, capture_output=True, text=True)
    return base.stdout.strip() if base.returncode == 0 and base.stdout.strip() else git_head(root)


def checkout(project: Path, commit: str | None) -> None:
    """The pipeline's commit, fetched from this clone's origin when it is not here yet."""
    if not commit or git_head(project) == commit:
        return
    have = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=project).returncode == 0
    if not have:
        subprocess.run(["git", "fetch", "-q", "origin"], cwd=project, check=True, timeout=300)
    # --force: params.yaml (and dvc.lock) here are the last run's, written by this flow; the new ones follow
    subprocess.run(["git", "checkout", "-q", "--force", "--detach", commit], cwd=project, check=True)


def train_deployment_for(given: str | None) -> str | None:
    """The deployment training stages go to: the flow parameter, else STAGEWISE_TRAIN_DEPLOYMENT
    (set on the CPU worker by infra/stack), else none: they run here."""
    return given or os.environ.get("STAGEWISE_TRAIN_DEPLOYMENT") or None


def uncached_outputs(root: Path) -> list[str]:
    """Outputs DVC keeps out of its cache (metrics, plots, the registration): git carries them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return sorted(str(Path(out.fs_path).relative_to(root)) for out in repo.index.outs
                      if not out.use_cache and Path(out.fs_path).exists())


def commit_results(root: Path, run_name: str) -> str:
    """Commit dvc.lock, params and the uncached outputs (with the .gitignore files DVC wrote), so a
    fresh clone's `dvc pull` + `dvc repro` has nothing to do; what happened, in a few words."""
    files = ["dvc.lock", "params.yaml", *uncached_outputs(root)]
    files += [str(f.relative_to(root)) for f in root.rglob(".gitignore") if ".dvc" not in f.parts and ".git" not in f.parts]
    # -f: the project ignores metrics/ and reports/ (a clean clone starts without results); a
    # published run carries the ones DVC does not cache.
    subprocess.run(["git", "add", "-f", "--", *files], cwd=root, check=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=root).returncode == 0:
        return "nothing new to commit"
    subprocess.run(["git", "commit", "-qm", f"stagewise run {run_name}: dvc.lock, params and metrics"], cwd=root, check=True)
    return f"committed {git_head(root)}"
