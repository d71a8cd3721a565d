"""Does the curriculum help on this data? The ablation as a Prefect flow: every variant of
params.yaml's `ablation:` block under every seed, each a DVC experiment, then the verdict.

The data and base every variant shares (`dvc repro validate`) are made once; each run is
`dvc exp run` up to `evaluate` with its overrides, so stages shared with an earlier run come back
from DVC's run cache. The verdict table (mean and spread over seeds; a gap within the spread is "no
difference"), each variant's forgetting matrix and a plot go to reports/ablation/ and to one MLflow
parent run with a child per variant. params.yaml, dvc.lock and the outputs are put back after.

    python -m flows.ablation                                   # every variant, every seed
    python -m flows.ablation --variants staged,mixed --seeds 1234
    dvc exp show --only-changed                                # the runs, as DVC experiments
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flows.dvc_stages import StageFailed
from tasks.core.config import ConfigError

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PREFECT_OBJECTS = ("ablation",)


def __getattr__(name: str) -> Any:
    """The flow is built on first use (see flows/pipeline.py): `--help` does not import Prefect."""
    if name in PREFECT_OBJECTS:
        return getattr(_flow_and_tasks(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _flow_and_tasks() -> SimpleNamespace:
    from prefect import flow, get_run_logger, task
    from prefect.cache_policies import NO_CACHE

    from flows import dvc_experiments as exps
    from tasks.ablation.report import REPORT_DIR, by_variant, write_reports
    from tasks.ablation.tracking import log_ablation
    from tasks.ablation.variants import plan_runs, tokens_drawn, with_overrides
    from tasks.ablation.verdict import verdicts
    from tasks.core import paths
    from tasks.core.config import load_params

    @task(name="shared-stages")
    def shared_stages(project: str) -> dict[str, float]:
        """ingest, base, prepare and validate on the workspace's params: once for every variant."""
        return exps.run_shared_stages(Path(project), get_run_logger().info)

    @task(name="ablation-run", cache_policy=NO_CACHE)
    def run_one(project: str, run, params_text: str, target: str):
        """One variant under one seed, as a DVC experiment."""
        return exps.run_experiment(Path(project), run, params_text, target, get_run_logger().info)

    @task(name="verdict", cache_policy=NO_CACHE)
    def verdict(project: str, name: str, results: list, shared: dict[str, float], metrics: list[str],
                experiment: str, descriptions: dict[str, str]) -> dict[str, Any]:
        """The verdict table, the reports and the MLflow parent run."""
        judged = verdicts({variant: [r.final for r in group] for variant, group in by_variant(results).items()},
                          metrics or None)
        files = write_reports(results, judged, descriptions, Path(project) / REPORT_DIR, shared)
        run_id = log_ablation(name, experiment, results, judged, files, descriptions)
        get_run_logger().info("verdict:\n%s", files["table"].read_text())
        return {"name": name, "mlflow_run_id": run_id, "table": str(files["table"]),
                "runs": [r.experiment for r in results]}

    @flow(name="stagewise-ablation")
    def ablation(variants: list[str] | None = None, seeds: list[int] | None = None, project_dir: str = ".",
                 params_file: str = "params.yaml") -> dict[str, Any]:
        """Every chosen variant (default: all of `ablation.variants`) under every seed (default:
        `ablation.seeds`) at the same token budget, then the verdict."""
        logger = get_run_logger()
        root = Path(project_dir).resolve()
        exps.require_git(root)
        params = load_params(root / params_file)
        suffix = time.strftime("%m%d-%H%M%S")
        target = "register" if params.ablation.register_ else "evaluate"
        with exps.workspace_kept(root, logger.info) as params_text:
            shared = shared_stages(str(root))
            report = json.loads((root / paths.DATA_REPORT).read_text())
            runs = plan_runs(params, report, suffix, variants, seeds)
            for run in runs:  # the budget each run trains, by whose data: equal across variants
                drawn = tokens_drawn(with_overrides(params, run.overrides), report)
                logger.info("%s: %s tokens to train (%s); overrides %s", run.name, f"{sum(drawn.values()):,.0f}",
                            ", ".join(f"{s} {t:,.0f}" for s, t in drawn.items()), run.overrides or "none")
            results = [run_one.with_options(task_run_name=run.name)(str(root), run, params_text, target) for run in runs]
        descriptions = {name: v.description for name, v in params.ablation.variants.items()}
        return verdict(str(root), f"ablation-{suffix}", results, shared, params.ablation.metrics,
                       params.register_.experiment, descriptions)

    return SimpleNamespace(ablation=ablation)


def _names(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Variants and seeds live in params.yaml's `ablation:` block.")
    parser.add_argument("--variants", help="comma-separated variant names (default: all of ablation.variants)")
    parser.add_argument("--seeds", help="comma-separated training seeds (default: ablation.seeds)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in _names(args.seeds) or []] or None
    except ValueError:
        print(f"ablation: --seeds takes integers separated by commas, not {args.seeds!r}", file=sys.stderr)
        return 2
    try:
        from tasks.core.config import load_params

        load_params(args.params)  # bad config fails here, before Prefect starts
        out = _flow_and_tasks().ablation(variants=_names(args.variants), seeds=seeds, params_file=args.params)
    except (ConfigError, StageFailed, ValueError) as exc:
        print(f"ablation: {exc}", file=sys.stderr)
        return 1
    print(Path(out["table"]).read_text())
    print(f"ablation: {len(out['runs'])} runs ({', '.join(out['runs'])}); table {out['table']}; "
          f"MLflow parent run {out['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
