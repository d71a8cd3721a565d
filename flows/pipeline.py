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

from flows.overrides import apply_overrides, parse_assignment  # noqa: E402
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


@task(name="dvc-stage", retries=0)
def run_dvc_stage(name: str, project: str) -> Any:
    """Run one DVC stage unless DVC says it is up to date."""
    logger = get_run_logger()
    root = Path(project)
    if stage_is_up_to_date(root, name):
        logger.info("%s is up to date; skipped", name)
        return Completed(message=f"{name} up to date", name="Skipped", data="skipped")
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", name]
    proc = subprocess.Popen(cmd, cwd=root, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:  # type: ignore[union-attr]
        line = line.rstrip()
        if line:
            logger.info(line)
            tail = (tail + [line])[-30:]
    if proc.wait() != 0:
        raise StageFailed(f"stage {name} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return "ran"


@flow(name="stagewise-pipeline")
def pipeline(overrides: dict[str, Any] | None = None, params_file: str = "params.yaml", project_dir: str = ".") -> dict[str, str]:
    """Run every DVC stage in DAG order; stages DVC finds up to date are skipped.

    `overrides` maps dotted params keys to values; they are validated, then written into
    params.yaml (as `dvc exp run --set-param` does) before anything runs.
    """
    root = Path(project_dir).resolve()
    params_path = root / params_file
    if overrides:
        apply_overrides(params_path, overrides)
    load_params(params_path)  # fail on bad config before any stage runs
    outcomes: dict[str, str] = {}
    for name in stage_order(root):
        outcomes[name] = run_dvc_stage.with_options(task_run_name=name)(name, str(root))
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
    except (ConfigError, StageFailed) as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 1
    ran = [n for n, o in outcomes.items() if o == "ran"]
    print(f"pipeline: {len(ran)} stage(s) ran ({', '.join(ran) or 'none'}); {len(outcomes) - len(ran)} up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
