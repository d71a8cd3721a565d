"""The current champion re-scored on this run's eval data, for the promotion gate of `register`.

Scores compare only on the same eval sets. When the champion was evaluated on other eval data (new
records, a re-split, another curriculum), its stored scores say nothing about this run's; so it is
rebuilt from the registry alone, exactly as `python -m tasks.serve` rebuilds it
(tasks/core/bundle.py), and scored by the code `evaluate` scores the final model with
(`tasks.evaluation.scoring.score_model`: every eval loss and every generation metric). Then base, new
version and champion are all measured on the same eval sets.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core.config import EvaluateConfig, StageSpec
from tasks.core.promotion import ChampionScores

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)
RESCORED = "re-scored on the current eval data"


class ChampionUnavailable(RuntimeError):
    """The champion cannot be rebuilt from the registry (artifacts gone, no serving bundle...)."""


def load_champion(client: MlflowClient, version: ModelVersion):
    """(model, tokenizer) of a registered version, or ChampionUnavailable saying why not. The files
    are only needed while loading: the model lives in memory after."""
    from tasks.core.bundle import download_version, load_version

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return load_version(download_version(client, version, Path(tmp)))
    except Exception as error:  # noqa: BLE001 - BundleError, MlflowException, OSError, a peft/transformers load error
        raise ChampionUnavailable(f"v{version.version} could not be loaded from the registry: "
                                  f"{type(error).__name__}: {error}") from error


def same_vocabulary(tokenizer, params_tokenizer) -> bool:
    """Eval losses read pre-tokenized rows: they mean something for the champion only when its
    tokenizer maps text to the same ids as the one the current splits were tokenized with."""
    return tokenizer.get_vocab() == params_tokenizer.get_vocab()


def rescore_champion(client: MlflowClient, version: ModelVersion, stages: dict[str, StageSpec], cfg: EvaluateConfig,
                     seed: int) -> ChampionScores:
    """The champion's scores on the current eval splits, by the final model's evaluation code.
    Raises ChampionUnavailable when it cannot be loaded; scoring errors are not caught: they
    are bugs of the evaluation code that `evaluate` shares."""
    import torch

    from tasks.core.modeling import BaseInfo, load_tokenizer
    from tasks.evaluation.scoring import score_model

    model, tokenizer = load_champion(client, version)
    losses = same_vocabulary(tokenizer, load_tokenizer(BaseInfo.load()))
    if not losses:
        log.warning("champion v%s has another tokenizer than models/base: scored by generation only", version.version)
    torch.manual_seed(seed)  # as evaluate does: greedy decoding, but the same state all the same
    scores = score_model(model, tokenizer, stages, cfg, losses=losses)
    log.info("champion v%s re-scored on the current eval data: %d metrics", version.version, len(scores))
    return ChampionScores(str(version.version), scores, RESCORED)


def log_champion_metrics(client: MlflowClient, run_id: str, champion: ChampionScores | None) -> None:
    """`champion.<metric>` on the pipeline run, next to `base.*` and `final.*`: the three models
    the gate looked at, on the same eval sets."""
    from mlflow.entities import Metric

    if champion is None:
        return
    now = int(time.time() * 1000)
    metrics = [Metric(f"champion.{k}", float(v), now, 0) for k, v in champion.scores.items()]
    for lo in range(0, len(metrics), 1000):  # MLflow's cap on metrics per batch
        client.log_batch(run_id, metrics=metrics[lo : lo + 1000])
