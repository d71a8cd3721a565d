"""MLflow while a stage trains: one run per training stage, with step metrics as they happen and
the machine's system metrics (CPU, memory, GPU), so a long run can be watched in the MLflow UI.

The run carries the stage's params and, once the adapter is written, its sha256 as a tag; that is
how `register` finds it later and nests it under the pipeline run (`adapter_run`). A resumed stage
(after a kill) continues the run it started: its id is kept in the stage's checkpoint folder.

The tracking server is `MLFLOW_TRACKING_URI` (credentials, if any, also from the environment),
else the embedded `sqlite:///mlflow.db`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from tasks.core.config import TrainJob

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_ID_FILE = "mlflow_run_id"
ADAPTER_TAG = "adapter_sha256"
STAGE_TAG = "stage"
SYSTEM_METRICS_INTERVAL_S = 5.0
# Step metrics go to the store in one batch at most this often. One write per logged step cost the
# thinking stage 14 s of its 76 on 2 cores (1,200 steps, sqlite): the training loop waited on it.
STEP_FLUSH_INTERVAL_S = 10.0
MAX_METRICS_PER_BATCH = 1000  # MLflow's cap on one log_batch


def configure_mlflow() -> None:
    """Point MLflow at the configured server (or the embedded sqlite file), without telemetry."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested params -> {"stages.syntax.train.learning_rate": "0.003", ...} for MLflow."""
    import json

    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): json.dumps(tree) if isinstance(tree, list) else str(tree)}


def stage_params(job: TrainJob) -> dict[str, str]:
    """What a training stage ran with: its own settings, its LoRA and the train-wide switches."""
    out = flatten(job.spec.train.model_dump(exclude={"lora"})) | flatten(job.lora.model_dump(), "lora.")
    out |= {"init_from": job.spec.init_from, "kind": job.spec.kind}
    wide = job.train.model_dump(include={"quantization", "upcast_frozen", "chain_policy", "packing",
                                         "gradient_checkpointing", "loss_chunk_tokens", "expert_compute",
                                         "offload_expert_adapters", "experts_per_dequant", "adapter_dtype", "optimizer",
                                         "liger_kernels", "launcher"})
    return out | flatten(wide)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class StageRun:
    """The live run of one training stage; `log_step` is the Trainer callback's sink. Steps are
    kept and written together every STEP_FLUSH_INTERVAL_S seconds, at each checkpoint (a stage
    killed and resumed has every step it does not redo in MLflow) and when the run ends, so the
    MLflow UI lags the stage by seconds while the training loop does not wait on the store."""

    client: MlflowClient
    run_id: str
    resumed: bool
    pending: list[Metric] = field(default_factory=list)
    flushed_at: float = field(default_factory=time.monotonic)

    def log_step(self, row: dict[str, float]) -> None:
        from mlflow.entities import Metric

        step, now = int(row["step"]), now_ms()
        self.pending += [Metric(k, float(v), now, step) for k, v in row.items() if k != "step"]
        if time.monotonic() - self.flushed_at >= STEP_FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Write the steps kept so far; a failure is logged, not raised."""
        metrics, self.pending, self.flushed_at = self.pending, [], time.monotonic()
        try:
            for lo in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[lo : lo + MAX_METRICS_PER_BATCH])
        except Exception as error:  # noqa: BLE001 - a tracking hiccup must not kill hours of training
            log.warning("MLflow step metrics not logged (%d values up to step %d): %s",
                        len(metrics), metrics[-1].step, error)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for lo in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[lo : lo + 100])

    def finish(self, summary: dict[str, float], adapter_file: Path) -> None:
        from mlflow.entities import Metric

        self.flush()
        now = now_ms()
        numbers = [Metric(f"final_{k}", float(v), now, 0) for k, v in summary.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=numbers)
        for key, value in summary.items():  # e.g. the device the stage trained on
            if isinstance(value, str):
                self.client.set_tag(self.run_id, key, value)
        self.client.set_tag(self.run_id, ADAPTER_TAG, file_sha256(adapter_file))


@contextmanager
def stage_run(stage: str, experiment: str, workdir: Path, system_metrics: bool,
              tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """Open (or, after a kill, reopen) the stage's MLflow run; it ends FINISHED, or FAILED when
    the block raises. `workdir` is the stage's checkpoint folder, where the run id is kept."""
    import mlflow
    from mlflow import MlflowClient

    configure_mlflow()
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    id_file = workdir / RUN_ID_FILE
    previous = id_file.read_text().strip() if id_file.exists() else None
    if previous and not _run_exists(previous):
        previous = None
    run_tags = {"pipeline": "stagewise", STAGE_TAG: stage, **(tags or {})}
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        run_tags["prefect_flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    with mlflow.start_run(run_id=previous, experiment_id=experiment_id, run_name=f"train@{stage}",
                          tags=None if previous else run_tags, log_system_metrics=system_metrics) as run:
        workdir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.info.run_id)
        if previous:
            log.info("MLflow: continuing run %s of train@%s", previous, stage)
        live = StageRun(MlflowClient(), run.info.run_id, resumed=previous is not None)
        try:
            yield live
        finally:  # a stage that fails keeps the steps it logged
            live.flush()


def find_stage_run(client: MlflowClient, experiment_id: str, stage: str, adapter_file: Path) -> str | None:
    """The live training run that wrote this exact adapter and is not yet part of a pipeline run."""
    digest = file_sha256(adapter_file)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{ADAPTER_TAG} = '{digest}' and tags.{STAGE_TAG} = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags:
            return run.info.run_id
    return None


def _run_exists(run_id: str) -> bool:
    from mlflow import MlflowClient

    try:
        MlflowClient().get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - another server, or the store was reset
        return False


def now_ms() -> int:
    """Now, in the milliseconds MLflow stamps metrics with."""
    return int(time.time() * 1000)


def export_metrics(metrics_file: Path | None = None) -> dict[str, float]:
    """metrics/export.json as flat MLflow metrics (`export.kl_mean`, ..., `export.passed` 0/1)."""
    import json

    from tasks.core import paths

    metrics_file = metrics_file or paths.EXPORT_METRICS
    if not metrics_file.exists():
        return {}
    data = json.loads(metrics_file.read_text())
    return {f"export.{k}": float(v) for k, v in data.items() if isinstance(v, (int, float))}
