"""The stagewise pipeline as a Prefect flow: the DVC stages of `dvc.yaml`, in DAG order.

Each stage is a Prefect task that asks DVC whether the stage is up to date and, if not, runs it
with `dvc repro --single-item`, so DVC records it in `dvc.lock` exactly as `dvc repro` would: a
flow run followed by `dvc repro` is a no-op, and the other way round. The DVC and git work itself is
in flows/dvc_stages.py; this module only wires it into a flow.

    python -m flows.pipeline                                  # run on Prefect's local API
    python -m flows.pipeline --set stages.syntax.train.max_steps=200
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# RunParameters at module level, though only the flow uses it: Prefect resolves the flow's
# annotations (the UI's form) in this module's namespace.
from flows import dvc_stages, plan_ahead, remote
from flows.overrides import apply_overrides, check_overrides, parse_assignment
from flows.run_parameters import RunParameters
from tasks.core.config import ConfigError, load_params

# No phoning home from the embedded default: the local API runs with analytics off. Set before
# Prefect is imported (on first use of the flow) and inherited by the stage commands.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# Built on first access by __getattr__ below; `from flows.pipeline import pipeline` and the
# deployment entrypoint `flows/pipeline.py:pipeline` get the real Prefect objects.
PREFECT_OBJECTS = ("pipeline", "run_dvc_stage", "run_stage_on_pool", "publish")
DEPLOYMENT_POLL_SECONDS = 1  # how often a stage dispatched to a pool is checked on


def __getattr__(name: str) -> Any:
    """PEP 562: the flow and its tasks are built when first asked for, because importing Prefect
    takes a second or two that `--help`, test collection and the stage plumbing should not pay."""
    if name in PREFECT_OBJECTS:
        return getattr(_flow_and_tasks(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _flow_and_tasks() -> SimpleNamespace:
    """The Prefect flow and its tasks, once per process; each task is a few lines around flows/dvc_stages.py."""
    from prefect import flow, get_run_logger, task
    from prefect.runtime import flow_run
    from prefect.states import Completed

    def skipped(name: str) -> Any:
        return Completed(message=f"{name} up to date", name="Skipped", data="skipped")

    @task(name="dvc-stage", retries=0)
    def run_dvc_stage(name: str, project: str) -> Any:
        """Run one DVC stage unless DVC says it is up to date."""
        logger = get_run_logger()
        root = Path(project)
        if dvc_stages.stage_is_up_to_date(root, name):
            logger.info("%s is up to date; skipped", name)
            return skipped(name)
        dvc_stages.run_stage(root, name, logger.info)
        return "ran"

    @task(name="dvc-stage-on-pool", retries=0)
    def run_stage_on_pool(name: str, project: str, deployment: str) -> Any:
        """Run a training stage on the pool behind `deployment` and wait; then restore its outputs here
        from the DVC remote's run cache, so dvc.lock records it as if it had run here."""
        from prefect.deployments import run_deployment

        logger = get_run_logger()
        root = Path(project)
        if dvc_stages.stage_is_up_to_date(root, name):
            logger.info("%s is up to date; skipped", name)
            return skipped(name)
        remote.push(project)  # what the stage needs, as outputs and run records
        parameters = {"stage": name, "params_yaml": (root / "params.yaml").read_text(),
                      "git_commit": dvc_stages.shared_commit(root)}
        logger.info("%s: dispatched to deployment %s", name, deployment)
        # Poll each second (Prefect's default is 5 s): a stage's end reaches the parent at once, and one
        # read a second per running stage is nothing for the API.
        child = run_deployment(name=deployment, parameters=parameters, timeout=None, as_subflow=True,
                               poll_interval=DEPLOYMENT_POLL_SECONDS)
        if not child.state or not child.state.is_completed():
            state = child.state.name if child.state else "unknown"
            raise dvc_stages.StageFailed(f"stage {name} failed on deployment {deployment} (flow run {child.name}: "
                                         f"{state}): {child.state.message if child.state else ''}")
        dvc_stages.restore_stage(root, name, deployment, logger.info)
        return "ran on pool"

    @task(name="publish", retries=0)
    def publish(project: str, commit_results: bool, run_name: str) -> str:
        """Push outputs and run records to the DVC remote, then (if asked) commit dvc.lock, params and
        the uncached outputs. The commit comes after a successful push only: git never records
        results the remote does not hold."""
        remote.push(project)
        if not commit_results:
            return "pushed"
        return f"pushed; {dvc_stages.commit_results(Path(project), run_name)}"

    def check_plan(root: Path, params_path: Path, loaded, here: bool) -> str:
        from tasks.plan import no_fit_message, render

        ahead = plan_ahead.take(root, params_path, here)
        plan = ahead or plan_ahead.make_run_plan(root, loaded, here)
        if not plan.fits:
            raise ConfigError(no_fit_message(plan))
        return ("plan (made while Prefect's server started):\n" if ahead else "plan:\n") + render(plan)

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
        root = Path(project_dir).resolve()
        params_path = root / params_file
        changes = (params.overrides() if params else {}) | (overrides or {})
        before = params_path.read_text()
        if changes:
            apply_overrides(params_path, changes)
        loaded = load_params(params_path)  # fail on bad config before any stage runs
        deployment = dvc_stages.train_deployment_for(train_deployment)
        # What will run and what it costs, in the run's log; a stage that cannot fit stops it here,
        # and params.yaml is as it was. Trained on a pool elsewhere, only train.memory_limit_gb limits.
        try:
            get_run_logger().info("%s", check_plan(root, params_path, loaded, here=deployment is None))
        except ConfigError:
            params_path.write_text(before)
            raise
        outcomes: dict[str, str] = {}
        for name in dvc_stages.stage_order(root):
            if deployment and name.startswith("train@"):
                outcomes[name] = run_stage_on_pool.with_options(task_run_name=name)(name, str(root), deployment)
            else:
                outcomes[name] = run_dvc_stage.with_options(task_run_name=name)(name, str(root))
        if remote.default_remote(root):
            outcomes["publish"] = publish(str(root), commit_results, flow_run.get_name() or "local")
        return outcomes

    return SimpleNamespace(pipeline=pipeline, run_dvc_stage=run_dvc_stage, run_stage_on_pool=run_stage_on_pool,
                           publish=publish)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml value by dotted key (repeatable)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)  # before Prefect is imported: `--help` and usage errors answer at once
    try:
        overrides = dict(parse_assignment(a) for a in args.assignments)
        # Bad config fails here, in a second, not after Prefect has started its temporary server.
        check_overrides(Path(args.params), overrides)
        flow = _flow_and_tasks().pipeline  # Prefect imported first: the plan then overlaps the server's start
        if not overrides:  # with overrides, the flow's params.yaml differs: it plans itself
            plan_ahead.start(Path(args.params), here=dvc_stages.train_deployment_for(None) is None)
        outcomes = flow(overrides=overrides or None, params_file=args.params)
    except (ConfigError, dvc_stages.StageFailed, remote.RemoteError) as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 1
    finally:
        plan_ahead.settle()
    pushed = outcomes.pop("publish", None)
    ran = [n for n, o in outcomes.items() if o in ("ran", "ran on pool")]
    print(f"pipeline: {len(ran)} stage(s) ran ({', '.join(ran) or 'none'}); {len(outcomes) - len(ran)} up to date"
          + (f"; {pushed}" if pushed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
