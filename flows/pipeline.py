"""The stagewise pipeline as a Prefect flow: the DVC stages of `dvc.yaml`, in DAG order.

Each stage is a Prefect task that asks DVC whether the stage is up to date and, if not, runs it
with `dvc repro --single-item`, so DVC records it in `dvc.lock` exactly as `dvc repro` would: a
flow run followed by `dvc repro` is a no-op, and the other way round.

    python -m flows.pipeline                                  # run on Prefect's local API
    python -m flows.pipeline --set train.stages.syntax.max_steps=200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# No phoning home from the embedded default: the local API runs with analytics off.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.states import Completed  # noqa: E402

from flows import remote  # noqa: E402
from flows.overrides import apply_overrides, parse_assignment  # noqa: E402
from flows.run_parameters import RunParameters  # noqa: E402
from tasks.core.config import ConfigError, load_params  # noqa: E402


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; earlier stages' outputs stay in place and are resumable."""


def stage_order(project: Path) -> list[str]:
    """Stage names of dvc.yaml in an order where every stage follows its dependencies."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        ordered = list(reversed(list(nx.lexicographical_topological_sort(graph, key=lambda s: s.addressing))))
        return [stage.addressing for stage in ordered if getattr(stage, "cmd", None)]


def stage_is_up_to_date(project: Path, name: str) -> bool:
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


def stream_dvc(root: Path, args: list[str], name: str) -> list[str]:
    """Run `dvc <args>` in root, logging its output line by line; its lines, or StageFailed."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:  # type: ignore[union-attr]
        line = line.rstrip()
        if line:
            logger.info(line)
            lines.append(line)
    if proc.wait() != 0:
        raise StageFailed(f"stage {name} failed (exit {proc.returncode}):\n" + "\n".join(lines[-30:]))
    return lines


@task(name="dvc-stage", retries=0)
def run_dvc_stage(name: str, project: str) -> Any:
    """Run one DVC stage unless DVC says it is up to date."""
    logger = get_run_logger()
    root = Path(project)
    if stage_is_up_to_date(root, name):
        logger.info("%s is up to date; skipped", name)
        return Completed(message=f"{name} up to date", name="Skipped", data="skipped")
    stream_dvc(root, ["repro", "--single-item", name], name)
    return "ran"


@task(name="dvc-stage-on-pool", retries=0)
def run_stage_on_pool(name: str, project: str, deployment: str) -> Any:
    """Run a training stage on the pool behind `deployment` and wait; then restore its outputs here
    from the DVC remote's run cache, so dvc.lock records it as if it had run here."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    root = Path(project)
    if stage_is_up_to_date(root, name):
        logger.info("%s is up to date; skipped", name)
        return Completed(message=f"{name} up to date", name="Skipped", data="skipped")
    remote.push(project)  # what the stage needs, as outputs and run records
    parameters = {"stage": name, "params_yaml": (root / "params.yaml").read_text(), "git_commit": shared_commit(root)}
    logger.info("%s: dispatched to deployment %s", name, deployment)
    child = run_deployment(name=deployment, parameters=parameters, timeout=None, as_subflow=True)
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise StageFailed(f"stage {name} failed on deployment {deployment} (flow run {child.name}: {state}): "
                          f"{child.state.message if child.state else ''}")
    lines = stream_dvc(root, ["repro", "--single-item", "--pull", name], name)
    if not any("is cached - skipping run" in line for line in lines):
        raise StageFailed(f"stage {name} ran on {deployment} but its run record was not in the DVC remote, "
                          "so it ran again here; check that the worker's workspace uses the same remote")
    return "ran on pool"


def git_head(root: Path) -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def shared_commit(root: Path) -> str | None:
    """The newest commit the GPU worker's clone can fetch: HEAD's merge-base with its upstream
    branch (the workspace's own commits only add dvc.lock, params and metrics, which travel
    otherwise), or HEAD when there is no upstream."""
    base = subprocess.run(["git", "merge-base", "HEAD", "@{upstream}"], cwd=root, capture_output=True, text=True)
    return base.stdout.strip() if base.returncode == 0 and base.stdout.strip() else git_head(root)


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


@task(name="publish", retries=0)
def publish(project: str, commit_results: bool, run_name: str) -> str:
    """Push outputs and run records to the DVC remote, then (if asked) commit dvc.lock, params and
    the uncached outputs, so a fresh clone's `dvc pull` + `dvc repro` has nothing to do. The commit
    comes after a successful push only: git never records results the remote does not hold."""
    root = Path(project)
    remote.push(project)
    if not commit_results:
        return "pushed"
    files = ["dvc.lock", "params.yaml", *uncached_outputs(root)]
    files += [str(f.relative_to(root)) for f in root.rglob(".gitignore") if ".dvc" not in f.parts and ".git" not in f.parts]
    # -f: the project ignores metrics/ and reports/ (a clean clone starts without results); a
    # published run carries the ones DVC does not cache.
    subprocess.run(["git", "add", "-f", "--", *files], cwd=root, check=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=root).returncode == 0:
        return "pushed; nothing new to commit"
    subprocess.run(["git", "commit", "-qm", f"stagewise run {run_name}: dvc.lock, params and metrics"], cwd=root, check=True)
    return f"pushed; committed {git_head(root)}"


@flow(name="stagewise-pipeline")
def pipeline(params: RunParameters | None = None, overrides: dict[str, Any] | None = None,
             params_file: str = "params.yaml", project_dir: str = ".", train_deployment: str | None = None,
             commit_results: bool = False) -> dict[str, str]:
    """Run every DVC stage in DAG order; stages DVC finds up to date are skipped.

    `params` (the UI's form) and `overrides` (dotted params keys) are validated, then written
    into params.yaml (as `dvc exp run --set-param` does) before anything runs. With a train
    deployment, each train@<stage> runs on that deployment's pool; with a default DVC remote, the
    results are pushed there at the end (and committed to git when `commit_results`).
    """
    from prefect.runtime import flow_run

    root = Path(project_dir).resolve()
    params_path = root / params_file
    changes = (params.overrides() if params else {}) | (overrides or {})
    if changes:
        apply_overrides(params_path, changes)
    load_params(params_path)  # fail on bad config before any stage runs
    deployment = train_deployment_for(train_deployment)
    outcomes: dict[str, str] = {}
    for name in stage_order(root):
        if deployment and name.startswith("train@"):
            outcomes[name] = run_stage_on_pool.with_options(task_run_name=name)(name, str(root), deployment)
        else:
            outcomes[name] = run_dvc_stage.with_options(task_run_name=name)(name, str(root))
    if remote.default_remote(root):
        outcomes["publish"] = publish(str(root), commit_results, flow_run.get_name() or "local")
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml value by dotted key (repeatable)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_assignment(a) for a in args.assignments)
        outcomes = pipeline(overrides=overrides or None, params_file=args.params)
    except (ConfigError, StageFailed, remote.RemoteError) as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 1
    pushed = outcomes.pop("publish", None)
    ran = [n for n, o in outcomes.items() if o in ("ran", "ran on pool")]
    print(f"pipeline: {len(ran)} stage(s) ran ({', '.join(ran) or 'none'}); {len(outcomes) - len(ran)} up to date"
          + (f"; {pushed}" if pushed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
