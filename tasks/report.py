"""`report`: compare the last pipeline runs from MLflow, as PNGs (no notebook needed).

    python -m tasks.report [--runs 5] [--out reports/compare] [--params params.yaml]

Writes `loss_<stage>.png` (training loss by step, one line per run, for every curriculum stage)
and `forgetting_<run>.png` (each run's forgetting heatmap, from the `forgetting.*` metrics that
`register` logs), plus `runs.json` naming the runs compared. Reads the tracking server of
`MLFLOW_TRACKING_URI` (else the embedded `sqlite:///mlflow.db`). Not a DVC stage: it reads the
history of many runs, not one run's outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_OUT = Path("reports/compare")


@dataclass
class PipelineRun:
    run_id: str
    name: str  # short label: start time and registered version
    forgetting: dict[str, dict[str, float]] = field(default_factory=dict)
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # stage -> (step, loss)


def last_pipeline_runs(client, experiment_id: str, n: int) -> list:
    runs = client.search_runs([experiment_id], filter_string="tags.pipeline = 'stagewise' and attributes.run_name = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=n)
    return list(reversed(runs))  # oldest first, so legends read in time order


def collect(client, experiment_id: str, parent) -> PipelineRun:
    from datetime import datetime, timezone

    started = datetime.fromtimestamp(parent.info.start_time / 1000, tz=timezone.utc).strftime("%m-%d %H:%M")
    version = parent.data.tags.get("registered_version", "?")
    run = PipelineRun(parent.info.run_id, f"{started} v{version}")
    for key, value in parent.data.metrics.items():
        if key.startswith("forgetting.") and key.count(".") == 2:
            _, row, column = key.split(".")
            run.forgetting.setdefault(row, {})[column] = value
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for child in children:
        stage = child.data.tags.get("stage") or child.info.run_name.removeprefix("train@")
        history = client.get_metric_history(child.info.run_id, "loss")
        run.losses[stage] = sorted((m.step, m.value) for m in history)
    return run


def plot_losses(runs: list[PipelineRun], stages: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stage in stages:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for run in runs:
            points = run.losses.get(stage)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=run.name)
        ax.set(title=f"train@{stage}: training loss", xlabel="step", ylabel="loss")
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"loss_{stage}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def order_matrix(matrix: dict[str, dict[str, float]], stages: list[str]) -> dict[str, dict[str, float]]:
    """Rows base then curriculum order, columns curriculum order (MLflow returns keys unordered)."""
    rows = [r for r in ["base", *stages] if r in matrix]
    return {r: {c: matrix[r][c] for c in stages if c in matrix[r]} for r in rows}


def write_report(runs: list[PipelineRun], stages: list[str], out: Path) -> list[Path]:
    from tasks.evaluation.forgetting import write_heatmap

    out.mkdir(parents=True, exist_ok=True)
    written = plot_losses(runs, stages, out)
    for run in runs:
        if run.forgetting:
            path = out / f"forgetting_{run.run_id[:8]}.png"
            write_heatmap(order_matrix(run.forgetting, stages), path, title=f"eval loss, run {run.name}")
            written.append(path)
    (out / "runs.json").write_text(json.dumps([{"run_id": r.run_id, "name": r.name} for r in runs], indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="how many of the latest pipeline runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    from mlflow import MlflowClient  # after parsing: --help answers without importing MLflow

    from tasks.core.config import load_params
    from tasks.core.tracking import configure_mlflow

    params = load_params(args.params)
    configure_mlflow()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(params.register_.experiment)
    if experiment is None:
        print(f"report: no MLflow experiment {params.register_.experiment!r}: run the pipeline first", file=sys.stderr)
        return 2
    runs = [collect(client, experiment.experiment_id, p) for p in last_pipeline_runs(client, experiment.experiment_id, args.runs)]
    if not runs:
        print("report: no pipeline run registered yet", file=sys.stderr)
        return 2
    for path in write_report(runs, params.stage_names, args.out):
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
