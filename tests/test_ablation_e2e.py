"""`python -m flows.ablation` for real, on a copy of the session's pipeline workspace (small
params): two variants, one seed, each a DVC experiment run through the Prefect flow, scored by
`evaluate`, compared in reports/ablation/ and MLflow; the workspace put back after."""

from __future__ import annotations

import json
import sys

import pytest

from tasks.ablation.tracking import ABLATION_TAG
from tests.pipeline_run import PipelineRun
from tests.pipeline_workspace import Workspace, copy_workspace

pytestmark = pytest.mark.slow

SHARED = {"ingest", "base", "prepare", "validate", "train@embedding"}


@pytest.fixture(scope="module")
def ablated(pipeline_run: PipelineRun, tmp_path_factory) -> tuple[Workspace, str, str]:
    ws = copy_workspace(pipeline_run.workspace, tmp_path_factory.mktemp("ablation") / "ws")
    ws.commit("the pipeline's results")  # DVC experiments start from a commit
    params_before = (ws.root / "params.yaml").read_text()
    seed = ws.params()["seed"]
    done = ws.run(sys.executable, "-m", "flows.ablation", "--variants", "staged,mixed", "--seeds", str(seed))
    return ws, done.stdout + done.stderr, params_before


def test_each_variant_is_a_dvc_experiment_with_its_params(ablated):
    ws, _, _ = ablated
    shown = json.loads(ws.dvc("exp", "show", "--json").stdout)
    experiments = {exp["name"]: exp for baseline in shown for exp in baseline.get("experiments") or []}
    names = {name.split("-s")[0]: name for name in experiments}
    assert set(names) == {"staged", "mixed"}
    mixed = experiments[names["mixed"]]["revs"][0]["data"]
    params = mixed["params"]["params.yaml"]["data"]
    assert params["stages"]["instructions"]["data"]["mix"].keys() == {"syntax", "thinking", "instructions"}
    assert params["stages"]["syntax"]["train"]["max_steps"] == 0
    assert "final" in mixed["metrics"]["metrics/evaluate.json"]["data"]


def test_shared_stages_ran_once_and_only_the_mixture_trained(ablated):
    ws, _, _ = ablated
    runs = {r["variant"]: r for r in json.loads((ws.root / "reports/ablation/runs.json").read_text())["runs"]}
    # The pipeline run already made everything the staged variant needs at this seed: all reused.
    assert runs["staged"]["stages_ran"] == {}
    ran = set(runs["mixed"]["stages_ran"])
    assert not ran & SHARED - {"prepare", "validate"}  # prepare writes the mixture, validate checks it
    assert {"train@instructions", "evaluate"} <= ran
    assert SHARED - {"prepare", "validate"} <= set(runs["mixed"]["stages_reused"])
    # the same training tokens within a batch of the longest rows (small params: batch 8 x 256)
    assert abs(runs["mixed"]["tokens_trained"] - runs["staged"]["tokens_trained"]) <= 8 * 256


def test_the_verdict_table_plot_and_forgetting_matrices_are_written(ablated):
    ws, output, _ = ablated
    table = (ws.root / "reports/ablation/verdict.md").read_text()
    assert "| metric | better | staged | mixed | verdict |" in table and "thinking_exact_match" in table
    assert "One seed" in table and "| metric | better |" in output
    verdict = json.loads((ws.root / "reports/ablation/verdict.json").read_text())
    assert {m["metric"] for m in verdict["metrics"]} >= {"syntax_json_valid", "thinking_eval_loss"}
    for name in ("metrics.png", "forgetting-staged.png", "forgetting-mixed.json"):
        assert (ws.root / "reports/ablation" / name).stat().st_size > 0


def test_one_mlflow_parent_run_with_a_child_per_variant(ablated):
    ws, _, _ = ablated
    client = ws.mlflow_client()
    experiment = client.get_experiment_by_name("stagewise")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{ABLATION_TAG}` LIKE 'ablation-%'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["variant"] for r in children) == ["mixed", "staged"]
    assert all("syntax_json_valid" in r.data.metrics for r in children)


def test_the_workspace_is_put_back_and_nothing_registered(ablated):
    ws, _, params_before = ablated
    assert (ws.root / "params.yaml").read_text() == params_before
    assert ws.dvc("status", "--json").stdout.strip() in ("{}", "")  # outputs back as dvc.lock records them
    registration = json.loads((ws.root / "reports/registration.json").read_text())
    client = ws.mlflow_client()
    versions = client.search_model_versions(f"name = '{registration['model_name']}'")
    assert len(versions) == 1  # the pipeline's own; the ablation registered none
