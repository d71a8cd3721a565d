"""`register` compares a new version with the champion on the same eval sets: when the champion was
evaluated on other eval data, it is rebuilt from the registry and re-scored on the current data
(tasks/evaluation/champion.py). Real models (the tiny two-stage chain), real `evaluate`, real
`register` on an MLflow sqlite store: v1 becomes champion; then the eval data and the last adapter
change, and v2 is gated against v1 re-scored; then the champion's files vanish, and register goes on.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.evaluated_chain import NAME, build_project, project_params, redraw_adapter, write_eval_splits, write_params

pytestmark = pytest.mark.slow  # ~1 minute on 2 cores: three models evaluated twice, five registrations

RESCORED = "re-scored on the current eval data"


def evaluate_and_register(params_file: Path = Path("params.yaml"), evaluate: bool = True):
    from tasks.core.config import load_params
    from tasks.evaluate import evaluate_pipeline, write_metrics
    from tasks.register import register_pipeline

    params = load_params(params_file)
    if evaluate:
        write_metrics(evaluate_pipeline(params))
    return register_pipeline(params, params_file)


@pytest.fixture(scope="module")
def project(tmp_path_factory, unit_tokenizer):
    """v1 registered (champion) on eval data 0; then eval data 1 and a redrawn last adapter, v2."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("rescore")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        build_project(root, unit_tokenizer)
        first = evaluate_and_register()
        write_eval_splits(unit_tokenizer, 1)
        redraw_adapter("s2", seed=7)
        second = evaluate_and_register()
        client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        yield {"root": root, "client": client, "first": first, "second": second, "mp": mp, "tokenizer": unit_tokenizer}


def test_first_version_has_no_champion_to_compare_with(project):
    client, first = project["client"], project["first"]
    assert first.gate_passed and first.aliases == ["challenger", "champion"]
    assert client.get_model_version(NAME, first.version).tags["compared_with_champion"] == "none (no champion yet)"


def test_champion_on_other_eval_data_is_rescored_on_the_current_data(project):
    client, first, second = project["client"], project["first"], project["second"]
    v1, v2 = client.get_model_version(NAME, first.version), client.get_model_version(NAME, second.version)
    assert v1.tags["eval_data_sha256"] != v2.tags["eval_data_sha256"]
    assert v2.tags["compared_with_champion"] == f"v{first.version} ({RESCORED})"
    assert v2.tags["gate_reasons"] == f"all thresholds passed; not worse than champion v{first.version} ({RESCORED})"
    assert second.gate_passed and "champion" in second.aliases


def test_rescored_scores_are_the_champions_model_evaluated_on_the_new_data(project, tmp_path):
    """What the gate used (logged as `champion.*` on the pipeline run, and in the model card) is
    exactly `evaluate`'s scoring of v1's model, rebuilt from the registry, on eval data 1."""
    import mlflow

    from tasks.core.bundle import load_registered_model
    from tasks.core.config import load_params
    from tasks.evaluation.scoring import score_model

    client, second = project["client"], project["second"]
    metrics = client.get_run(second.parent_run_id).data.metrics
    used = {k.removeprefix("champion."): v for k, v in metrics.items() if k.startswith("champion.")}
    final = {k.removeprefix("final."): v for k, v in metrics.items() if k.startswith("final.")}

    model, tokenizer, files = load_registered_model(client, f"models:/{NAME}/{project['first'].version}", tmp_path)
    params = load_params()
    expected = score_model(model, tokenizer, params.stages, params.evaluate)
    assert used == expected
    assert {"s1_eval_loss", "s2_eval_loss", "s1_perplexity", "s2_rouge_l", "s2_reply_words_mean"} <= set(used)
    assert used["s2_eval_loss"] != final["s2_eval_loss"]  # v1's adapter, not the new one's
    card = Path(mlflow.artifacts.download_artifacts(run_id=second.stage_run_ids["s2"], artifact_path="adapter/README.md",
                                                    tracking_uri=client.tracking_uri)).read_text()
    row = next(line for line in card.splitlines() if line.startswith("| s2_eval_loss |"))
    assert row.endswith(f"| {used['s2_eval_loss']:.4f} |")  # the champion's column


def test_a_champion_that_cannot_be_loaded_does_not_stop_register(project, unit_tokenizer):
    """v2 (champion) loses its base artifact; the eval data changes again: v3 is registered, with the
    reason it was not compared."""
    client, second = project["client"], project["second"]
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == second.version
    shutil.rmtree(Path(urlparse(client.get_run(champion.run_id).info.artifact_uri).path) / "base")
    write_eval_splits(unit_tokenizer, 2)
    third = evaluate_and_register(evaluate=False)
    tag = client.get_model_version(NAME, third.version).tags["compared_with_champion"]
    assert tag.startswith(f"none (champion v{second.version} could not be loaded from the registry: BundleError: ")
    assert "has no `base/` artifact" in tag
    assert not any(k.startswith("champion.") for k in client.get_run(third.parent_run_id).data.metrics)


def test_rescoring_can_be_switched_off(project, unit_tokenizer):
    client = project["client"]
    champion = client.get_model_version_by_alias(NAME, "champion")
    write_eval_splits(unit_tokenizer, 3)
    params_file = write_params(project_params(register={"rescore_champion": False}), Path("params-off.yaml"))
    fourth = evaluate_and_register(params_file, evaluate=False)
    tag = client.get_model_version(NAME, fourth.version).tags["compared_with_champion"]
    assert tag == (f"none (champion v{champion.version} was evaluated on other eval data and "
                   "register.rescore_champion is off)")
