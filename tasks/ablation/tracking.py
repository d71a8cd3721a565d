"""The ablation in MLflow: one parent run, a child run per variant (mean and spread of each final
metric over its seeds, its overrides, its DVC experiments), so the MLflow UI compares the variants
side by side; the report files go to the parent."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.ablation.report import RunResult, by_variant
from tasks.ablation.verdict import MetricVerdict, wins

ABLATION_TAG = "stagewise.ablation"


def log_ablation(name: str, experiment: str, results: list[RunResult], judged: list[MetricVerdict],
                 files: dict[str, Path], descriptions: dict[str, str]) -> str:
    """Log the parent run and its children; the parent's run id."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.core.tracking import configure_mlflow

    configure_mlflow()
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    client = MlflowClient()
    groups = by_variant(results)
    parent = client.create_run(experiment_id, run_name=name, tags={ABLATION_TAG: name})
    pid = parent.info.run_id
    client.log_param(pid, "variants", ",".join(groups))
    client.log_param(pid, "seeds", ",".join(str(r.seed) for r in next(iter(groups.values()))))
    for variant, count in wins(judged).items():
        client.log_metric(pid, f"metrics_won.{variant}", count)
    for path in files.values():
        client.log_artifact(pid, str(path))
    for variant, group in groups.items():
        child = client.create_run(experiment_id, run_name=f"{name}/{variant}",
                                  tags={"mlflow.parentRunId": pid, ABLATION_TAG: name, "variant": variant,
                                        "dvc_experiments": ",".join(r.experiment for r in group),
                                        "mlflow.note.content": descriptions.get(variant, "")})
        cid = child.info.run_id
        client.log_param(cid, "overrides", json.dumps(group[0].overrides, sort_keys=True)[:6000])
        client.log_param(cid, "seeds", ",".join(str(r.seed) for r in group))
        for v in judged:
            cell = v.cells[variant]
            client.log_metric(cid, v.metric, cell.mean)
            client.log_metric(cid, f"{v.metric}.spread", cell.spread)
        client.log_metric(cid, "tokens_trained", sum(r.tokens_trained for r in group) / len(group))
        if (heatmap := files.get(f"forgetting-{variant}")) is not None:
            client.log_artifact(cid, str(heatmap))
        client.set_terminated(cid)
    client.set_terminated(pid)
    return pid
