"""`register` stage: log the pipeline run to MLflow and register the final adapter.

One parent run per pipeline run (all params, base vs final scores, the validation reports and
their Data Docs site), one child run per curriculum stage (its params, step metrics, adapter,
validation report). The final adapter becomes a new version of `register.model_name` with alias
`challenger`; it also takes `champion` when its final scores pass `register.thresholds` and are
not worse than the current champion's on the same eval sets (the champion is re-scored on them when
it was evaluated on other data: tasks/evaluation/champion.py). Versions carry lineage tags: git
commit, dirty flag, and the DVC hashes of each stage's data.

    python -m tasks.register [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from tasks.core import paths
from tasks.core.cli import exit_now, run_stage_cli
from tasks.core.config import Params, TrainJob, load_params
from tasks.core.cost import chain_gpu_hours
from tasks.core.records import write_json
from tasks.core.bundle import log_serving_bundle
from tasks.core.lineage import data_lineage, eval_data_fingerprint, git_lineage, library_versions, model_lineage
from tasks.core.promotion import ChampionScores, decide
from tasks.core.tracking import (
    ADAPTER_TAG,
    STAGE_TAG,
    configure_mlflow,
    export_metrics,
    file_sha256,
    find_stage_run,
    flatten,
    now_ms,
    stage_params,
)
from tasks.evaluation.champion import ChampionUnavailable, log_champion_metrics, rescore_champion

log = logging.getLogger(__name__)
STEP_METRICS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_gib")
MAX_TAG_REASON = 1000  # a load error can quote a whole traceback; MLflow caps tag values


@dataclass
class Registration:
    model_name: str
    version: str
    aliases: list[str]
    parent_run_id: str
    stage_run_ids: dict[str, str]
    gate_passed: bool
    gate_reasons: list[str] = field(default_factory=list)


def log_stage_run(client, experiment_id: str, parent_id: str, job: TrainJob) -> str:
    """The stage's child run: the live run that trained this exact adapter (found by its hash),
    nested under the pipeline run; or, when there is none (`train.mlflow_live` off, another
    tracking server), a new run with the stage's params and step history from its log file.
    Either way it gets the adapter, validation report and summary metrics as artifacts."""
    stage = job.stage
    adapter_file = paths.adapter_dir(stage) / "adapter_model.safetensors"
    run_id = find_stage_run(client, experiment_id, stage, adapter_file)
    if run_id:
        client.set_tag(run_id, "mlflow.parentRunId", parent_id)
    else:
        run_id = log_stage_history(client, experiment_id, parent_id, job)
    client.log_artifacts(run_id, str(paths.adapter_dir(stage)), "adapter")
    client.log_artifact(run_id, str(paths.validation_report(stage)), "validation")
    client.log_artifact(run_id, str(paths.train_metrics(stage)), "metrics")
    return run_id


def log_stage_history(client, experiment_id: str, parent_id: str, job: TrainJob) -> str:
    """A new, finished child run holding what the stage's files recorded."""
    from mlflow.entities import Metric, Param

    stage = job.stage
    run = client.create_run(experiment_id, run_name=f"train@{stage}", tags={"mlflow.parentRunId": parent_id, STAGE_TAG: stage})
    run_id = run.info.run_id
    history = [json.loads(line) for line in paths.train_history(stage).read_text().splitlines() if line]
    metrics = [
        Metric(key, float(value), now_ms(), int(row["step"]))
        for row in history
        for key, value in row.items()
        if key in STEP_METRICS or key.startswith("router_entropy")
    ]
    summary = json.loads(paths.train_metrics(stage).read_text())
    metrics += [Metric(f"final_{k}", float(v), now_ms(), 0) for k, v in summary.items() if isinstance(v, (int, float))]
    items = [Param(k, v) for k, v in stage_params(job).items()]
    client.log_batch(run_id, metrics=metrics, params=items)
    for key, value in summary.items():  # e.g. the device the stage trained on
        if isinstance(value, str):
            client.set_tag(run_id, key, value)
    client.set_tag(run_id, ADAPTER_TAG, file_sha256(paths.adapter_dir(stage) / "adapter_model.safetensors"))
    client.set_terminated(run_id)
    return run_id


def log_validation(client, run_id: str) -> None:
    """The data gate of this pipeline run: every stage's JSON report under `validation/`, and the
    Great Expectations Data Docs site (HTML) under `validation/data_docs` when validate built one."""
    for report in sorted(paths.VALIDATION_DIR.glob("*.json")):
        client.log_artifact(run_id, str(report), "validation")
    if paths.VALIDATION_DOCS_DIR.is_dir():
        client.log_artifacts(run_id, str(paths.VALIDATION_DOCS_DIR), "validation/data_docs")


def evaluation_metrics(scores: dict) -> dict[str, float]:
    """Each stage's model on every eval set (`after.<stage>.<metric>`) and the forgetting figures
    (`forgetting.<model>.<eval set>`: eval loss; `forgetting_change.<eval set>`: loss after the
    last stage minus loss right after its own)."""
    out = {f"after.{stage}.{k}": float(v) for stage, row in scores.get("after", {}).items() for k, v in row.items()}
    out |= {f"forgetting.{row}.{col}": float(v) for row, cells in scores.get("forgetting", {}).items() for col, v in cells.items()}
    out |= {f"forgetting_change.{k}": float(v) for k, v in scores.get("forgetting_change", {}).items()}
    out |= {f"lm_eval.{task}.{k}": float(v) for task, row in scores.get("lm_eval", {}).items() for k, v in row.items()}
    return out


def log_evaluation(client, run_id: str, scores: dict) -> None:
    """The forgetting matrix as an MLflow table and heatmap, and the sample generations as a
    table a person can read next to the scores."""
    from tasks.evaluation.forgetting import forgetting_rows

    if scores.get("forgetting"):
        client.log_table(run_id, data=_columns(forgetting_rows(scores["forgetting"])), artifact_file="evaluation/forgetting.json")
    if paths.FORGETTING_HEATMAP.exists():
        client.log_artifact(run_id, str(paths.FORGETTING_HEATMAP), "evaluation")
    if paths.GENERATION_SAMPLES.exists():
        rows = [json.loads(line) for line in paths.GENERATION_SAMPLES.read_text().splitlines() if line]
        if rows:
            client.log_table(run_id, data=_columns(rows), artifact_file="evaluation/generations.json")


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


def data_metrics(report_file: Path = paths.DATA_REPORT) -> dict[str, float]:
    """metrics/data.json as flat MLflow metrics: `data.<stage>.<counter>` for every number in it
    (records, rows, tokens, counts per drop/change reason, packing efficiency)."""
    if not report_file.exists():
        return {}

    def numbers(tree: Any, prefix: str) -> dict[str, float]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{prefix}.{key}").items()}
        if isinstance(tree, (int, float)) and not isinstance(tree, bool):
            return {re.sub(r"[^\w./ -]", "_", prefix): float(tree)}  # MLflow refuses commas and the like
        return {}

    return numbers(json.loads(report_file.read_text()), "data")


def register_pipeline(params: Params, params_file: Path) -> Registration:
    import mlflow
    from mlflow import MlflowClient

    configure_mlflow()
    cfg = params.register_
    client = MlflowClient()
    experiment = mlflow.set_experiment(cfg.experiment)
    scores = json.loads(paths.EVALUATE_METRICS.read_text())
    lineage = git_lineage() | data_lineage(params.stage_names)
    lineage["params_md5"] = hashlib.md5(params_file.read_bytes()).hexdigest()
    lineage["eval_data_sha256"] = eval_data_fingerprint(params.stage_names)
    run_tags = {"pipeline": "stagewise", **lineage}
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        run_tags["prefect_flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]

    parent = client.create_run(experiment.experiment_id, run_name="pipeline", tags=run_tags)
    parent_id = parent.info.run_id
    raw = yaml.safe_load(params_file.read_text())
    from mlflow.entities import Metric, Param

    score_metrics = [
        Metric(f"{model}.{k}", float(v), now_ms(), 0)
        for model in ("base", "final")
        for k, v in scores[model].items()
    ]
    score_metrics += [Metric(k, v, now_ms(), 0) for k, v in data_metrics().items()]
    score_metrics += [Metric(k, v, now_ms(), 0) for k, v in evaluation_metrics(scores).items()]
    score_metrics += [Metric(k, v, now_ms(), 0) for k, v in export_metrics().items()]
    run_params = [Param(k, v) for k, v in flatten(raw).items()]
    for lo in range(0, max(len(run_params), len(score_metrics)), 100):  # MLflow caps a batch at 100 params
        client.log_batch(parent_id, metrics=score_metrics[lo : lo + 100], params=run_params[lo : lo + 100])
    client.log_artifact(parent_id, str(params_file), "config")
    client.log_artifact(parent_id, str(paths.EVALUATE_METRICS), "metrics")
    if paths.EXPORT_METRICS.exists():
        client.log_artifact(parent_id, str(paths.EXPORT_METRICS), "metrics")
    if paths.DATA_REPORT.exists():
        client.log_artifact(parent_id, str(paths.DATA_REPORT), "metrics")
    log_validation(client, parent_id)
    log_evaluation(client, parent_id, scores)
    stage_runs = {s: log_stage_run(client, experiment.experiment_id, parent_id, params.train_job(s)) for s in params.stage_names}

    final_run = stage_runs[params.final_stage]
    try:
        client.get_registered_model(cfg.model_name)
    except Exception:  # noqa: BLE001 - MLflow raises RestException / MlflowException by store
        client.create_registered_model(cfg.model_name)
    champion, compared = champion_scores(client, cfg.model_name, lineage["eval_data_sha256"],
                                         lambda version: rescore_champion(client, version, params.stages, params.evaluate,
                                                                          params.seed) if cfg.rescore_champion else None)
    log_champion_metrics(client, parent_id, champion)
    decision = decide(scores["final"], cfg.thresholds, champion, cfg.champion_tolerance)
    version_tags = version_lineage(params.final_stage, params.train.chain_policy, lineage, stage_runs, parent_id) | {
        "gpu_hours": f"{chain_gpu_hours(params.stage_names):.6f}",  # every stage the final model was trained through
        "gate": "passed" if decision.promoted else "failed",
        "gate_reasons": decision.summary,
        "compared_with_champion": compared,
    }
    client.log_artifact(final_run, str(params_file), "config")  # the params themselves, next to the adapter
    version = client.create_model_version(
        cfg.model_name, source=f"runs:/{final_run}/adapter", run_id=final_run, tags=version_tags
    )
    log_serving_bundle(client, final_run)  # the base, for consumers of the registry alone (tasks/serve.py)
    aliases = ["challenger"] + (["champion"] if decision.promoted else [])
    for alias in aliases:
        client.set_registered_model_alias(cfg.model_name, alias, version.version)
    from tasks.core.model_card import render_card

    data_report = json.loads(paths.DATA_REPORT.read_text()) if paths.DATA_REPORT.exists() else {}
    log_model_card(client, final_run, render_card(cfg.model_name, params.stages, params.train, scores, data_report,
                                                   champion, decision, version_tags))
    client.set_tag(parent_id, "registered_version", version.version)
    client.set_tag(parent_id, "gate_reasons", decision.summary)
    client.set_terminated(parent_id)
    return Registration(cfg.model_name, str(version.version), aliases, parent_id, stage_runs, decision.promoted,
                        [] if decision.promoted else decision.reasons)


def log_model_card(client, run_id: str, card: str) -> None:
    """README.md (and the forgetting heatmap it shows) in the version's `adapter/` artifacts."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "README.md").write_text(card)
        if paths.FORGETTING_HEATMAP.exists():
            shutil.copy(paths.FORGETTING_HEATMAP, Path(tmp) / "forgetting.png")
        client.log_artifacts(run_id, tmp, "adapter")


def version_lineage(final: str, chain_policy: str, lineage: dict[str, str], stage_runs: dict[str, str],
                    parent_id: str) -> dict[str, str]:
    """Every lineage tag of a version: code, data, params, base model, adapter chain, libraries."""
    from tasks.core.chain import chain_description

    return lineage | model_lineage(final) | library_versions() | {
        "final_stage": final,
        "chain_policy": chain_policy,
        "adapter_chain": chain_description(final),
        "pipeline_run": parent_id,
    } | {f"adapter_run.{s}": r for s, r in stage_runs.items()}


def champion_scores(client, model_name: str, eval_data: str,
                    rescore: Callable[[Any], ChampionScores | None]) -> tuple[ChampionScores | None, str]:
    """The current champion's final scores on the same eval sets, and the `compared_with_champion`
    tag: its stored scores when it was evaluated on exactly this eval data; else its model re-scored
    on this data by `rescore` (None when `register.rescore_champion` is off); else None with the
    reason, since scores on other eval sets do not compare. A champion that cannot be loaded does
    not stop the registration."""
    try:
        champion = client.get_model_version_by_alias(model_name, "champion")
    except Exception:  # noqa: BLE001 - no champion yet
        return None, "none (no champion yet)"
    if champion.tags.get("eval_data_sha256") == eval_data and "pipeline_run" in champion.tags:
        stored = client.get_run(champion.tags["pipeline_run"]).data.metrics
        scores = {k.removeprefix("final."): v for k, v in stored.items() if k.startswith("final.")}
        found = ChampionScores(str(champion.version), scores, "same eval data, stored scores")
        return found, f"v{found.version} ({found.basis})"
    try:
        found = rescore(champion)
    except ChampionUnavailable as error:
        log.warning("champion %s: the new version is not compared with it", error)
        return None, f"none (champion {str(error)[:MAX_TAG_REASON]})"
    if found is None:
        reason = f"champion v{champion.version} was evaluated on other eval data and register.rescore_champion is off"
        log.warning("%s: its scores are not compared", reason)
        return None, f"none ({reason})"
    return found, f"v{found.version} ({found.basis})"


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        reg = register_pipeline(load_params(args.params), Path(args.params))
        write_json(paths.REGISTRATION_REPORT, asdict(reg))
        gate = "passed" if reg.gate_passed else "failed: " + "; ".join(reg.gate_reasons)
        return [f"register: {reg.model_name} version {reg.version} -> {', '.join(reg.aliases)} (gate {gate})"]

    return run_stage_cli("register", __doc__, run, argv)

if __name__ == "__main__":
    exit_now(main())
