"""The plan `python -m flows.pipeline` makes while Prefect's server starts (flows/plan_ahead.py) is
the plan the flow would make, and the flow takes it only for the run it was made for."""

from __future__ import annotations

import pytest
import yaml

from flows import plan_ahead
from tasks.core.config import load_params
from tasks.plan import render
from tests.pipeline_workspace import PROJECT, make_workspace, small_params


@pytest.fixture
def ws(tmp_path, monkeypatch):
    params = small_params(yaml.safe_load((PROJECT / "params.yaml").read_text()))
    params["train"]["memory_limit_gb"] = 4  # a fixed limit: this machine's free memory moves between two plans
    ws = make_workspace(tmp_path / "ws", params)
    monkeypatch.chdir(ws.root)
    return ws


def test_the_plan_ahead_is_the_plan_the_flow_makes(ws):
    params = ws.root / "params.yaml"
    plan_ahead.start(params, here=True)
    ahead = plan_ahead.take(ws.root, params, here=True)
    assert ahead is not None
    assert render(ahead) == render(plan_ahead.make_run_plan(ws.root, load_params(params), here=True))
    assert [t.stage for t in ahead.training] == ["embedding", "syntax", "thinking", "instructions"]
    assert plan_ahead.take(ws.root, params, here=True) is None  # taken once


def test_a_plan_ahead_is_not_taken_for_another_run(ws, tmp_path):
    params = ws.root / "params.yaml"
    other = make_workspace(tmp_path / "other", small_params(yaml.safe_load((PROJECT / "params.yaml").read_text())))
    for root, here in ((other.root, True), (ws.root, False)):
        ahead = plan_ahead.PlanAhead.begin(params, here=True)
        assert ahead.take(root, root / "params.yaml", here) is None
    ahead = plan_ahead.PlanAhead.begin(params, here=True)
    params.write_text(params.read_text() + "\n# edited after the plan began\n")
    assert ahead.take(ws.root, params, here=True) is None


def test_a_plan_ahead_that_fails_leaves_the_flow_to_plan(ws):
    params = ws.root / "params.yaml"
    params.write_text("seed: [not, a, number]\n")
    plan_ahead.start(params, here=True)
    assert plan_ahead.take(ws.root, params, here=True) is None
    plan_ahead.settle()  # nothing pending: returns at once
