"""End to end: on a workspace the flow ran the whole DAG in (export included: the session's
`pipeline_run`, copied once for this module), `python -m tasks.serve` answers prompts with the
registered version from the registry alone, and its replies equal the working tree's adapter
chain's (greedy)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.pipeline_run import PipelineRun, flow_ran
from tests.pipeline_workspace import Workspace, copy_workspace

pytestmark = pytest.mark.slow

NAME = "stagewise-assistant"
PROMPTS = ["Tom has 3 apples and buys 4 more. How many apples does he have?", "Book a table for two at eight."]
MAX_NEW_TOKENS = "24"
# The working tree's final model (tasks/core/chain.py), answering as tasks.serve answers.
LOCAL_REPLIES = """
import json, sys
from tasks.core.chain import load_stage_model
from tasks.core.config import load_params
from tasks.core.modeling import BaseInfo, load_tokenizer
from tasks.serve import answer
info = BaseInfo.load()
model = load_stage_model(info, load_params().final_stage)
print(json.dumps(answer(model, load_tokenizer(info), json.loads(sys.argv[1]), int(sys.argv[2]))))
"""
@pytest.fixture(scope="module")
def pipeline(pipeline_run: PipelineRun, tmp_path_factory) -> Workspace:
    ws = copy_workspace(pipeline_run.workspace, tmp_path_factory.mktemp("serve") / "ws")
    ws.ran = flow_ran(pipeline_run.flow.stdout)  # type: ignore[attr-defined]
    registration = json.loads((ws.root / "reports" / "registration.json").read_text())
    assert registration["gate_passed"], registration
    client = ws.mlflow_client()
    version = client.get_model_version(NAME, registration["version"])
    ws.bundle_from_register = bool(client.list_artifacts(version.run_id, "base"))  # type: ignore[attr-defined]
    return ws


def serve(ws: Workspace, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tasks.serve", *args], cwd=ws.root, env=ws.env, input=stdin,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_export_runs_before_register_and_passes_parity(pipeline):
    from safetensors import safe_open

    ran = pipeline.ran
    assert "export" in ran and ran.index("export") < ran.index("register")
    metrics = json.loads((pipeline.root / "metrics" / "export.json").read_text())
    assert metrics["passed"] is True and 0 < metrics["kl_mean"] <= metrics["threshold"] == 0.01, metrics
    assert metrics["n_tokens"] > 0 and metrics["dtype"] == "bfloat16" and metrics["parity_dtype"] == "float32"
    merged = pipeline.root / "exports" / "merged"
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    merge = json.loads((merged / "merge.json").read_text())
    assert merge["chain"] == ["instructions"] and merge["chain_policy"] == "continue"
    lock = yaml.safe_load((pipeline.root / "dvc.lock").read_text())
    assert "metrics/export.json" in {d["path"] for d in lock["stages"]["register"]["deps"]}
    assert pipeline.dvc("status").stdout.strip().endswith("Data and pipelines are up to date.")


def test_registered_version_answers_like_the_local_chain(pipeline):
    model = f"models:/{NAME}@champion"
    done = serve(pipeline, "--model", model, "--json", "--max-new-tokens", MAX_NEW_TOKENS,
                 "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in replies] == PROMPTS
    local = json.loads(pipeline.run(sys.executable, "-c", LOCAL_REPLIES, json.dumps(PROMPTS), MAX_NEW_TOKENS).stdout)
    assert [r["reply"] for r in replies] == local
    # Generated, not empty. The reduced chain is barely trained (its greedy replies may be only
    # whitespace); what this test checks is that registry and working tree agree token for token.
    assert all(len(r["reply"]) > 0 for r in replies)
    assert f"{model} = v" in done.stderr and "(base + instructions)" in done.stderr


def test_serve_reads_prompts_from_stdin_and_defaults_to_the_champion(pipeline):
    done = serve(pipeline, "--max-new-tokens", MAX_NEW_TOKENS, stdin="\n".join(PROMPTS) + "\n")
    by_flag = serve(pipeline, "--max-new-tokens", MAX_NEW_TOKENS, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    assert done.stdout == by_flag.stdout and len(done.stdout) > len(PROMPTS)  # more than one newline per reply


def test_register_logs_the_serving_bundle(pipeline):
    assert pipeline.bundle_from_register, (
        "register did not log the serving bundle: call tasks.core.bundle.log_serving_bundle(client, final_run) "
        "right after create_model_version in tasks/register.py")
