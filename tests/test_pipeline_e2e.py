"""End to end: the Prefect flow and `dvc repro` run the same DAG on the embedded default.

The flow runs once for the session (tests/pipeline_run.py, conftest's `pipeline_run`), in a
temp git repo copied from the project with small params; each test then works in its own copy of
that workspace (git, DVC cache, MLflow and Prefect stores included:
tests/pipeline_workspace.py::copy_workspace), so a test that changes its workspace changes nothing
another test sees, and each passes run alone. Checked: the flow runs everything, `dvc repro` then
finds nothing to do, the MLflow store holds the runs and the registered version, training beat the
base, a changed training param re-runs exactly that stage and what follows it, and the comparison
report reads several runs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_run import flow_ran
from tests.pipeline_workspace import Workspace, copy_workspace

pytestmark = pytest.mark.slow

STAGES = ["embedding", "syntax", "thinking", "instructions"]
# The flow's order (flows/dvc_stages.py::stage_order); export and evaluate do not depend on each other.
ALL_DVC_STAGES = ["ingest", "base", "prepare", "validate", *[f"train@{s}" for s in STAGES], "export", "evaluate", "register"]
MODEL = "stagewise-assistant"


def train_key(stage: str, field: str) -> str:
    """The dotted params key of a stage's training setting (also MLflow's param name and --set's key)."""
    return f"stages.{stage}.train.{field}"


def train_setting(params: dict, stage: str, field: str):
    return params["stages"][stage]["train"][field]


def set_train(params: dict, stage: str, field: str, value) -> None:
    params["stages"][stage]["train"][field] = value


def ran_stages(dvc_output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", dvc_output)


@pytest.fixture
def workspace(pipeline_run, tmp_path) -> Workspace:
    """This test's own copy of the workspace the flow ran in."""
    return copy_workspace(pipeline_run.workspace, tmp_path / "ws")


def test_flow_runs_every_stage_in_dag_order(pipeline_run, workspace):
    assert flow_ran(pipeline_run.flow.stdout) == ALL_DVC_STAGES
    logged = pipeline_run.flow.stdout + pipeline_run.flow.stderr
    # the plan, before any stage ran, made while Prefect's temporary server started (flows/plan_ahead.py)
    assert "plan (made while Prefect's server started):" in logged and "train@embedding        RUNS" in logged
    for stage in STAGES:
        assert (workspace.root / "models" / stage / "adapter_model.safetensors").exists()
        assert not list((workspace.root / "models" / stage).glob("*.bin"))
    lock = yaml.safe_load((workspace.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(ALL_DVC_STAGES)


def test_dvc_repro_after_the_flow_is_a_no_op(workspace):
    lock_before = (workspace.root / "dvc.lock").read_text()
    out = workspace.dvc("repro")
    assert ran_stages(out.stdout) == []
    assert (workspace.root / "dvc.lock").read_text() == lock_before
    assert workspace.dvc("status").stdout.strip().endswith("Data and pipelines are up to date.")


def test_training_beat_the_base_on_every_sft_stage(workspace):
    scores = json.loads((workspace.root / "metrics" / "evaluate.json").read_text())
    for stage in ["syntax", "thinking", "instructions"]:
        base, final = scores["base"][f"{stage}_eval_loss"], scores["final"][f"{stage}_eval_loss"]
        assert final < base, f"{stage}: final eval loss {final} is not below the base's {base}"
    assert 0.0 <= scores["final"]["syntax_json_valid"] <= 1.0
    assert 0.0 <= scores["final"]["thinking_exact_match"] <= 1.0
    assert 0.0 <= scores["final"]["instructions_rouge_l"] <= 1.0 and scores["final"]["instructions_reply_count"] > 0
    assert 0.0 <= scores["final"]["syntax_slot_f1"] <= 1.0  # the synthetic syntax targets are intent + slots


def test_forgetting_matrix_has_every_model_on_every_eval_set(workspace):
    """Rows: base and the model after each stage; each stage's model was scored by generation on
    its own set; the matrix also lands as a `dvc plots` CSV, a heatmap and sample replies."""
    import csv

    scores = json.loads((workspace.root / "metrics" / "evaluate.json").read_text())
    matrix = scores["forgetting"]
    assert sorted(matrix) == sorted(["base", *STAGES]) and all(sorted(row) == sorted(STAGES) for row in matrix.values())
    assert matrix["syntax"]["syntax"] < matrix["base"]["syntax"]  # the stage taught its own data
    assert matrix["instructions"] == {s: scores["final"][f"{s}_eval_loss"] for s in STAGES}
    assert "syntax_json_valid" in scores["after"]["syntax"] and "thinking_exact_match" not in scores["after"]["syntax"]
    rows = list(csv.DictReader((workspace.root / "plots" / "forgetting.csv").open()))
    assert [r["after"] for r in rows] == ["base", *STAGES]
    assert (workspace.root / "reports" / "evaluation" / "forgetting.png").read_bytes()[:4] == b"\x89PNG"
    samples = [json.loads(line) for line in (workspace.root / "reports" / "evaluation" / "generations.jsonl").open()]
    assert {s["model"] for s in samples} == {"base", "instructions"} and all(s["reference"] for s in samples)
    shown = workspace.dvc("plots", "show", "--json").stdout
    assert "forgetting.csv" in shown


def test_mlflow_holds_parent_stage_runs_and_registered_version(workspace):
    client = workspace.mlflow_client()
    experiment = client.get_experiment_by_name("stagewise")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(f"train@{s}" for s in STAGES)
    # the runs that trained live (step metrics as they happened) are the ones nested here
    assert all(r.data.tags.get("init_from") and r.data.tags.get("adapter_sha256") for r in children)
    max_steps = train_setting(workspace.params(), "syntax", "max_steps")
    assert parent.data.params[train_key("syntax", "max_steps")] == str(max_steps)
    assert "final.syntax_eval_loss" in parent.data.metrics
    assert "forgetting.base.syntax" in parent.data.metrics and "after.thinking.thinking_exact_match" in parent.data.metrics
    evaluation = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert {"evaluation/forgetting.json", "evaluation/forgetting.png", "evaluation/generations.json"} <= evaluation
    thinking = next(r for r in children if r.info.run_name == "train@thinking")
    history = client.get_metric_history(thinking.info.run_id, "loss")
    assert len(history) >= 2 and history[-1].value < history[0].value
    assert "tokens_per_second" in thinking.data.metrics and thinking.data.metrics["peak_memory_gib"] > 0
    assert 0.0 < thinking.data.metrics["router_entropy"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(thinking.info.run_id)}
    assert {"adapter", "validation", "metrics"} <= artifacts

    version = client.get_model_version_by_alias(MODEL, "challenger")
    head = workspace.run("git", "rev-parse", "HEAD").stdout.strip()
    assert version.tags["git_commit"] == head
    assert version.tags["git_dirty"] == "false"  # outputs are DVC's, not git's: the tree stays clean
    lock = yaml.safe_load((workspace.root / "dvc.lock").read_text())
    for stage in STAGES:
        dep = next(d for d in lock["stages"][f"train@{stage}"]["deps"] if d["path"] == f"data/prepared/{stage}")
        assert version.tags[f"data_md5.{stage}"] == dep["md5"]
    assert version.tags["adapter_chain"] == "base + instructions"  # continue: one adapter carries all
    assert version.tags["chain_policy"] == "continue"
    assert float(version.tags["gpu_hours"]) == 0.0  # trained on a CPU: no GPU time on record
    for tag in ("base_sha256", "adapter_sha256.instructions", "eval_data_sha256", "params_md5", "version.torch",
                "version.peft", "pipeline_run", "gate_reasons", "compared_with_champion"):
        assert version.tags.get(tag), tag
    card_files = {a.path for a in client.list_artifacts(version.run_id, "adapter")}
    assert {"adapter/README.md", "adapter/forgetting.png"} <= card_files
    card = Path(client.download_artifacts(version.run_id, "adapter/README.md", str(workspace.root.parent))).read_text()
    assert "## Forgetting" in card and "## Stage plan" in card and version.tags["git_commit"] in card
    assert version.run_id == next(r.info.run_id for r in children if r.info.run_name == "train@instructions")
    registration = json.loads((workspace.root / "reports" / "registration.json").read_text())
    assert registration["version"] == str(version.version)
    # the first version, through a gate set to pass: champion as well, with no champion to compare
    assert registration["gate_passed"] is True and version.tags["gate"] == "passed"
    assert version.tags["compared_with_champion"] == "none (no champion yet)"
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version


def test_changed_training_param_reruns_that_stage_and_downstream_only(workspace):
    params = workspace.params()
    set_train(params, "thinking", "learning_rate", 0.002)
    workspace.write_params(params)
    out = workspace.dvc("repro")
    assert ran_stages(out.stdout) == ["train@thinking", "train@instructions", "evaluate", "export", "register"]
    # the new version was gated against the champion (the flow's version) on the same eval sets
    client = workspace.mlflow_client()
    first, latest = sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    first, latest = client.get_model_version(MODEL, first.version), client.get_model_version(MODEL, latest.version)
    assert first.tags["gate"] == "passed" and latest.tags["gate"] == "passed"
    assert latest.tags["compared_with_champion"] == f"v{first.version} (same eval data, stored scores)"
    assert client.get_model_version_by_alias(MODEL, "champion").version == latest.version
    # ...and the flow then finds every stage up to date.
    assert flow_ran(workspace.flow().stdout) == []


def test_flow_override_is_recorded_in_params_and_reruns_downstream(workspace):
    """An override of a late stage's key (`--set` is one code path for every key; a training key's
    re-run is checked above through params.yaml, and through the form in tests/test_stack_e2e.py)."""
    out = workspace.flow("--set", "export.max_kl=0.05")
    assert flow_ran(out.stdout) == ["export", "register"]
    assert workspace.params()["export"]["max_kl"] == 0.05
    assert ran_stages(workspace.dvc("repro").stdout) == []


def test_bad_override_fails_before_any_work(workspace):
    before = {f: (workspace.root / f).read_text() for f in ("params.yaml", "dvc.lock")}
    out = workspace.flow("--set", f"{train_key('syntax', 'learning_rate')}=-1", check=False)
    assert out.returncode != 0
    assert train_key("syntax", "learning_rate") in out.stderr
    assert {f: (workspace.root / f).read_text() for f in before} == before
    assert len(workspace.mlflow_client().search_model_versions(f"name='{MODEL}'")) == 1


def test_report_compares_the_last_runs_side_by_side(workspace):
    """Three registered pipeline runs (the flow's, then two `dvc repro` with only register's params
    changed, which re-run register alone): one loss plot per stage and one forgetting heatmap per
    run, each run named in runs.json."""
    for tolerance in (0.5, 0.9):
        params = workspace.params()
        params["register"]["champion_tolerance"] = tolerance
        workspace.write_params(params)
        assert ran_stages(workspace.dvc("repro").stdout) == ["register"]
    out = workspace.run(sys.executable, "-m", "tasks.report", "--runs", "5", "--out", "reports/compare")
    folder = workspace.root / "reports" / "compare"
    runs = json.loads((folder / "runs.json").read_text())
    client = workspace.mlflow_client()
    parents = client.search_runs([client.get_experiment_by_name("stagewise").experiment_id],
                                 filter_string="attributes.run_name = 'pipeline'")
    assert len(runs) == 3 and {r["run_id"] for r in runs} == {p.info.run_id for p in parents}
    for stage in STAGES:
        assert (folder / f"loss_{stage}.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in folder.glob("forgetting_*.png")) == sorted(f"forgetting_{r['run_id'][:8]}.png" for r in runs)
    assert "report: reports/compare/loss_syntax.png" in out.stdout
