"""The register step's pure parts: promotion gates, params flattening, lineage from dvc.lock, and
which validation files go to which artifact path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.core import paths
from tasks.core.promotion import ChampionScores, decide
from tasks.core.records import write_json
from tasks.register import data_lineage, data_metrics, flatten, log_validation


CHAMPION = ChampionScores("3", {"syntax_json_valid": 0.8, "thinking_exact_match": 0.30}, "same eval data")


@pytest.mark.parametrize(
    ("final", "thresholds", "champion", "tolerance", "promoted", "reasons"),
    [
        ({"syntax_json_valid": 0.9}, {"syntax_json_valid": 0.5}, None, 0.0, True, ["all thresholds passed; no champion before"]),
        ({"syntax_json_valid": 0.5}, {"syntax_json_valid": 0.5}, None, 0.0, True, None),  # the minimum itself passes
        ({"syntax_json_valid": 0.4}, {"syntax_json_valid": 0.5}, None, 0.0, False, ["syntax_json_valid: 0.4000 < threshold 0.5"]),
        ({}, {"thinking_exact_match": 0.1}, None, 0.0, False,
         ["thinking_exact_match: not measured (metrics/evaluate.json has no such score)"]),
        ({"a": 1.0}, {}, None, 0.0, True, None),
        # against the champion: a regression beyond the tolerance blocks, within it passes
        ({"syntax_json_valid": 0.7, "thinking_exact_match": 0.4}, {"syntax_json_valid": 0.5, "thinking_exact_match": 0.0},
         CHAMPION, 0.05, False, ["syntax_json_valid: 0.7000 < champion v3's 0.8000 - tolerance 0.05"]),
        ({"syntax_json_valid": 0.78, "thinking_exact_match": 0.3}, {"syntax_json_valid": 0.5, "thinking_exact_match": 0.0},
         CHAMPION, 0.05, True, ["all thresholds passed; not worse than champion v3 (same eval data)"]),
        # only gate metrics are compared with the champion
        ({"syntax_json_valid": 0.9}, {"syntax_json_valid": 0.5}, CHAMPION, 0.0, True, None),
    ],
)
def test_promotion_gate(final, thresholds, champion, tolerance, promoted, reasons):
    decision = decide(final, thresholds, champion, tolerance)
    assert decision.promoted is promoted
    if reasons is not None:
        assert decision.reasons == reasons


def test_model_card_has_scores_forgetting_data_plan_cost_and_lineage(tmp_path, monkeypatch):
    from tasks.core.config import load_params
    from tasks.core.cost import DeviceUse
    from tasks.core.model_card import render_card

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for stage, (count, seconds) in {"embedding": (2, 1800.0), "syntax": (2, 900.0)}.items():
        write_json(paths.train_metrics(stage), DeviceUse("NVIDIA H200", count, seconds).fields(1_000_000, 555.5))
    scores = {"base": {"syntax_json_valid": 0.0}, "final": {"syntax_json_valid": 0.9},
              "forgetting": {"base": {"syntax": 2.0}, "syntax": {"syntax": 0.5}}, "forgetting_change": {"syntax": 0.0}}
    card = render_card("m", params.stages, params.train, scores, {"syntax": {"train_rows": 10, "eval_rows": 2}}, CHAMPION,
                       decide(scores["final"], {"syntax_json_valid": 0.5}, CHAMPION, 0.0), {"git_commit": "abc"})
    assert "| syntax_json_valid | 0.0000 | 0.9000 | 0.8000 |" in card
    assert "| syntax | 0.5000 |" in card and "forgetting.png" in card
    assert "| syntax | sft | synthetic" in card and "| thinking | syntax |" in card
    assert "`git_commit`: abc" in card and "promoted to `champion`" in card
    assert "| embedding | 2 x NVIDIA H200 | 1800 s | 1.0000 | 1,000,000 | 556 |" in card
    assert "| thinking | – | 0 s | 0.0000 |" in card  # no metrics file: nothing claimed
    assert "GPU-hours across the chain: 1.5000" in card


def test_flatten_gives_dotted_keys_and_json_lists():
    tree = {"seed": 3, "train": {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "x": None}}
    assert flatten(tree) == {
        "seed": "3",
        "train.lora.r": "8",
        "train.lora.target_modules": '["q_proj", "v_proj"]',
        "train.x": "None",
    }


def test_data_lineage_reads_prepared_data_hashes_from_dvc_lock(tmp_path):
    lock = {
        "schema": "2.0",
        "stages": {
            "train@syntax": {"deps": [{"path": "tasks/train.py", "md5": "aaa"}, {"path": "data/prepared/syntax", "md5": "bbb.dir"}]},
            "train@thinking": {"deps": [{"path": "data/prepared/thinking", "md5": "ccc.dir"}]},
        },
    }
    file = tmp_path / "dvc.lock"
    file.write_text(yaml.safe_dump(lock))
    assert data_lineage(["syntax", "thinking", "instructions"], file) == {
        "data_md5.syntax": "bbb.dir",
        "data_md5.thinking": "ccc.dir",
    }
    assert data_lineage(["syntax"], tmp_path / "missing.lock") == {}


def mlflow_run(tmp_path, monkeypatch):
    """A real MLflow client on a throwaway SQLite store, and a run to log to."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    return client, client.create_run(experiment).info.run_id


def artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path):
        files += artifact_files(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(files)


def write_validation(with_docs: bool) -> None:
    paths.VALIDATION_DIR.mkdir(parents=True)
    for stage in ["embedding", "syntax"]:
        paths.validation_report(stage).write_text("{}\n")
    if with_docs:
        (paths.VALIDATION_DOCS_DIR / "validations").mkdir(parents=True)
        paths.VALIDATION_DOCS_INDEX.write_text("<html>syntax.train</html>")
        (paths.VALIDATION_DOCS_DIR / "validations" / "page.html").write_text("<html></html>")


@pytest.mark.parametrize("with_docs", [True, False], ids=["with_docs", "reports_only"])
def test_validation_reports_and_data_docs_go_to_separate_artifact_paths(tmp_path, monkeypatch, with_docs):
    monkeypatch.chdir(tmp_path)
    write_validation(with_docs)
    client, run_id = mlflow_run(tmp_path, monkeypatch)
    log_validation(client, run_id)
    docs = ["validation/data_docs/index.html", "validation/data_docs/validations/page.html"] if with_docs else []
    # the HTML sits apart from the JSON reports, not mixed in under validation/docs
    assert artifact_files(client, run_id) == sorted(["validation/embedding.json", "validation/syntax.json", *docs])


def test_data_report_becomes_flat_metrics_with_mlflow_safe_names(tmp_path):
    import json

    report = tmp_path / "data.json"
    report.write_text(json.dumps({"syntax": {
        "train_rows": 10, "sources": [{"path": "a.jsonl"}], "packing": {"efficiency": 0.97, "row_length": 256},
        "prepare": {"changed.control_chars_removed,unicode_normalized": 2, "dropped.exact_duplicate": 1},
        "flag": True}}))
    assert data_metrics(report) == {
        "data.syntax.train_rows": 10.0,
        "data.syntax.packing.efficiency": 0.97,
        "data.syntax.packing.row_length": 256.0,
        "data.syntax.prepare.changed.control_chars_removed_unicode_normalized": 2.0,
        "data.syntax.prepare.dropped.exact_duplicate": 1.0,
    }
    assert data_metrics(tmp_path / "missing.json") == {}


def test_gpu_hours_are_devices_times_wall_time_summed_over_the_chain(tmp_path, monkeypatch):
    from tasks.core.cost import DeviceUse, StageClock, chain_gpu_hours

    monkeypatch.chdir(tmp_path)
    assert DeviceUse("NVIDIA H200", 4, 900.0).gpu_hours == 1.0
    assert DeviceUse("cpu", 0, 900.0).gpu_hours == 0.0
    write_json(paths.train_metrics("a"), DeviceUse("NVIDIA H200", 1, 3600.0).fields(10, 1.0))
    write_json(paths.train_metrics("b"), DeviceUse("NVIDIA H200", 8, 450.0).fields(10, 1.0))
    assert chain_gpu_hours(["a", "b"]) == 2.0
    assert chain_gpu_hours(["a", "b", "not-trained"]) == 2.0
    from tasks.core import cost

    monkeypatch.setattr(cost, "this_device", lambda: "cpu")
    assert StageClock(processes=4).use().device_count == 0  # a CPU run holds no GPU
    monkeypatch.setattr(cost, "this_device", lambda: "NVIDIA H200")
    use = StageClock(processes=4).use()  # one GPU per process
    assert (use.device, use.device_count) == ("NVIDIA H200", 4) and use.gpu_hours > 0
