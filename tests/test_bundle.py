"""A registered version rebuilt from the registry alone (tasks/core/bundle.py) and served by
`python -m tasks.serve`: a real MLflow store on sqlite, a two-stage `merge` chain on the tiny MoE,
registered the way `register` does it (source `runs:/<final run>/adapter`, `adapter_run.<stage>` tags)."""

from __future__ import annotations

import json

import pytest
import torch

from tasks import serve
from tasks.core import paths
from tasks.core.bundle import BundleError, download_version, load_version, log_serving_bundle, resolve_version
from tests.chain_workspace import STAGES, build_chain
from tests.conftest import UNIT_CORPUS

NAME = "stagewise-assistant"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, unit_tokenizer):
    """The chain in a project root, each stage's adapter in its own run, the last one registered
    as v1 (`champion`, with the serving bundle) and again as v2 (`challenger`, without it)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        build_chain(root, unit_tokenizer, UNIT_CORPUS[:12])
        client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        experiment = client.create_experiment("stagewise", artifact_location=(root / "mlruns").as_uri())
        runs = {}
        for stage in STAGES:
            runs[stage] = client.create_run(experiment, run_name=f"train@{stage}").info.run_id
            client.log_artifacts(runs[stage], str(paths.adapter_dir(stage)), "adapter")
        client.create_registered_model(NAME)
        tags = {f"adapter_run.{s}": r for s, r in runs.items()}
        v1 = client.create_model_version(NAME, source=f"runs:/{runs['s2']}/adapter", run_id=runs["s2"], tags=tags)
        log_serving_bundle(client, runs["s2"])
        client.set_registered_model_alias(NAME, "champion", v1.version)
        other = client.create_run(experiment, run_name="train@s2").info.run_id
        client.log_artifacts(other, str(paths.adapter_dir("s2")), "adapter")
        v2 = client.create_model_version(NAME, source=f"runs:/{other}/adapter", run_id=other, tags=tags)
        client.set_registered_model_alias(NAME, "challenger", v2.version)
        yield root, client


@pytest.fixture
def in_registry(registry, monkeypatch):
    root, client = registry
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    return root, client


def test_bundle_holds_the_tiny_base_and_its_description(in_registry):
    _, client = in_registry
    version = client.get_model_version_by_alias(NAME, "champion")
    files = {a.path for a in client.list_artifacts(version.run_id, "base")}
    assert {"base/base.json", "base/model.safetensors", "base/tokenizer.json", "base/config.json"} <= files
    assert "base/pretrain.json" not in files


def test_registered_version_rebuilds_the_model_of_the_working_tree(in_registry, tmp_path):
    from tasks.core.chain import load_stage_model
    from tasks.core.modeling import BaseInfo

    _, client = in_registry
    files = download_version(client, resolve_version(client, f"models:/{NAME}@champion"), tmp_path)
    assert [s for s, _ in files.merged_chain] == ["s1"] and files.describe() == "base + s1 (merged) + s2"
    assert files.base.kind == "tiny" and str(tmp_path) in files.base.name_or_path  # not models/base
    model, _ = load_version(files)
    ids = torch.tensor([[5, 17, 42, 99, 3, 8, 120]])
    with torch.no_grad():
        served = model(input_ids=ids).logits
        local = load_stage_model(BaseInfo.load(), "s2")(input_ids=ids).logits
    assert torch.equal(served, local)


def test_serve_answers_prompts_like_the_local_chain(in_registry, capsys):
    from tasks.core.chain import load_stage_model
    from tasks.core.modeling import BaseInfo, load_tokenizer

    prompts = ["What is 2+2?", "Answer in JSON."]
    code = serve.main(["--model", f"models:/{NAME}@champion", "--json", "--max-new-tokens", "12",
                       "--prompt", prompts[0], "--prompt", prompts[1]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"models:/{NAME}@champion = v1 (base + s1 (merged) + s2)" in captured.err
    replies = [json.loads(line) for line in captured.out.splitlines()]
    info = BaseInfo.load()
    local = serve.answer(load_stage_model(info, "s2"), load_tokenizer(info), prompts, 12)
    assert [r["prompt"] for r in replies] == prompts and [r["reply"] for r in replies] == local
    assert any(local)  # the tiny random model says something


def test_download_writes_the_files_a_lora_server_needs(in_registry, tmp_path, capsys):
    assert serve.main(["--model", f"models:/{NAME}/1", "--download", str(tmp_path / "v1")]) == 0
    where = json.loads(capsys.readouterr().out)
    assert where["version"] == "1" and where["adapter"].endswith("s2") and len(where["merged_chain"]) == 1
    assert (tmp_path / "v1" / "adapters" / "s2" / "adapter_config.json").exists()
    assert (tmp_path / "v1" / "adapters" / "s1" / "adapter_model.safetensors").exists()
    assert where["base"] == str(tmp_path / "v1" / "base") and (tmp_path / "v1" / "base" / "model.safetensors").exists()


def test_a_version_without_the_bundle_says_why_it_cannot_be_served(in_registry, capsys):
    assert serve.main(["--model", f"models:/{NAME}@challenger", "--prompt", "hi"]) == 2
    assert "has no `base/` artifact" in capsys.readouterr().err


@pytest.mark.parametrize("uri", ["stagewise-assistant@champion", "models:/x", "models:/x@", "runs:/abc/adapter"])
def test_model_uri_must_name_a_version_or_alias(in_registry, uri):
    with pytest.raises(BundleError, match="is not a model URI"):
        resolve_version(in_registry[1], uri)


def test_unknown_alias_is_a_clear_error(in_registry, capsys):
    assert serve.main(["--model", f"models:/{NAME}@nope", "--prompt", "hi"]) == 2
    assert f"models:/{NAME}@nope: no such registered version" in capsys.readouterr().err


def test_a_version_is_read_from_the_clients_store_not_the_process_wide_one(in_registry, tmp_path):
    """`mlflow.set_tracking_uri` (as `tasks/core/tracking.py` calls it) outranks the environment, and
    MLflow resolves `models:/` URIs against that process-wide registry: another store holding a
    model of the same name must not be where the client's version is looked up."""
    import mlflow
    from mlflow import MlflowClient

    _, client = in_registry
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    other = MlflowClient(tracking_uri=other_uri)
    run = other.create_run(other.create_experiment("other", artifact_location=(tmp_path / "runs").as_uri()))
    other.create_registered_model(NAME)
    other.create_model_version(NAME, source=f"runs:/{run.info.run_id}/adapter", run_id=run.info.run_id)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(other_uri)
    try:
        files = download_version(client, resolve_version(client, f"models:/{NAME}/1"), tmp_path / "v1")
    finally:
        mlflow.set_tracking_uri(previous)
    assert files.describe() == "base + s1 (merged) + s2"
