"""The export stage: the adapter chain merged into one bf16 checkpoint, and the parity check that
lets bf16 rounding through and stops a broken merge (a missing adapter, a changed weight).

A two-stage `merge` chain on a tiny random MoE (tests/chain_workspace.py), so the final model is
base + s1 (merged) + s2: the same shape as the curriculum's `merge` policy.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tasks import export as export_step
from tasks.core import paths
from tasks.core.tracking import export_metrics
from tasks.core.config import ExportConfig
from tests.chain_workspace import STAGES, build_chain, raw_params
from tests.conftest import UNIT_CORPUS


@pytest.fixture(scope="module")
def chain_root(tmp_path_factory, unit_tokenizer):
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        build_chain(root, unit_tokenizer, UNIT_CORPUS[:12])
        yield root


@pytest.fixture
def in_chain(chain_root, monkeypatch):
    monkeypatch.chdir(chain_root)
    return chain_root


@pytest.fixture(scope="module")
def reference(chain_root):
    """The adapted model's next-token log-probabilities on the held-out rows."""
    from tasks.core.chain import load_stage_model
    from tasks.core.modeling import BaseInfo

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(chain_root)
        rows = export_step.held_out_rows(STAGES, ExportConfig().n_prompts)
        return rows, export_step.next_token_logprobs(load_stage_model(BaseInfo.load(), "s2"), rows)


def exported(tmp_path, dtype="bf16"):
    from tasks.core.modeling import BaseInfo

    return export_step.export_model(BaseInfo.load(), "s2", STAGES, ExportConfig(dtype=dtype), tmp_path / "merged")


def test_chain_is_merged_into_one_bf16_checkpoint_that_passes_parity(in_chain, tmp_path):
    result = exported(tmp_path)
    out = tmp_path / "merged"
    assert result.chain == ["s1", "s2"] and result.dtype == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    # saved the way the hub's Qwen3-MoE checkpoints are (one tensor per expert), which vLLM reads
    assert not any("lora" in k for k in keys) and "model.layers.1.mlp.experts.3.gate_proj.weight" in keys
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    p = result.parity
    # the figure includes the bf16 rounding (not zero), which the default threshold lets through
    assert p.passed and 1e-5 < p.kl_mean < ExportConfig().max_kl and p.dtype == "float32"
    assert p.n_tokens == sum(len(r) for r in export_step.held_out_rows(STAGES, ExportConfig().n_prompts))


def test_float32_export_reproduces_the_chain_to_rounding(in_chain, tmp_path):
    """Without bf16 the merge itself is exact: what the bf16 figure measures is the rounding."""
    assert exported(tmp_path, "fp32").parity.kl_mean < 1e-6


def test_a_merge_missing_the_last_adapter_fails_parity(in_chain, tmp_path, reference, unit_tokenizer):
    from tasks.core.chain import base_with_chain
    from tasks.core.modeling import BaseInfo

    rows, ref = reference
    partial = base_with_chain(BaseInfo.load(), ["s1"])  # s2 never merged
    export_step.save_merged(partial, unit_tokenizer, tmp_path / "merged", "bf16")
    parity = export_step.measure_parity(ref, export_step.load_merged(tmp_path / "merged", torch.float32), rows,
                                        ExportConfig().max_kl)
    assert not parity.passed and parity.kl_mean > 10 * ExportConfig().max_kl
    result = export_step.ExportResult(True, str(tmp_path / "merged"), "s2", ["s1", "s2"], "bfloat16", parity)
    with pytest.raises(export_step.MergeParityError, match=r"does not match its adapter chain \(s1 \+ s2\).*export.max_kl 0.01"):
        export_step.check_parity(result)


def test_one_changed_weight_in_the_saved_checkpoint_fails_parity(in_chain, tmp_path, reference):
    rows, ref = reference
    exported(tmp_path)
    file = tmp_path / "merged" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.experts.0.down_proj.weight"].zero_()  # one expert of one layer lost
    save_file(tensors, file, metadata={"format": "pt"})
    parity = export_step.measure_parity(ref, export_step.load_merged(tmp_path / "merged", torch.float32), rows,
                                        ExportConfig().max_kl)
    assert not parity.passed, parity


def write_params(root, export: dict) -> str:
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params(export), sort_keys=False))
    return str(root / "params.yaml")


def test_stage_fails_loudly_before_register_and_keeps_the_figure(in_chain, capsys):
    params = write_params(in_chain, {"max_kl": 1e-9})  # stricter than bf16 rounding can meet
    assert export_step.main(["--params", params]) == 2
    err = capsys.readouterr().err
    assert "export: the merged model in exports/merged does not match its adapter chain (s1 + s2)" in err
    metrics = json.loads(paths.EXPORT_METRICS.read_text())
    assert metrics["passed"] is False and metrics["threshold"] == 1e-9 and metrics["kl_mean"] > 1e-9
    merge = json.loads(paths.MERGE_INFO.read_text())
    assert merge["passed"] is False and merge["chain"] == ["s1", "s2"] and merge["chain_policy"] == "merge"


def test_stage_writes_weights_merge_record_and_metrics(in_chain, capsys):
    assert export_step.main(["--params", write_params(in_chain, {})]) == 0
    assert "export: s1 + s2 merged into exports/merged (bfloat16)" in capsys.readouterr().out
    metrics = json.loads(paths.EXPORT_METRICS.read_text())
    assert set(metrics) >= {"kl_mean", "kl_max", "threshold", "passed", "n_tokens"} and metrics["passed"] is True
    merge = json.loads(paths.MERGE_INFO.read_text())
    assert set(merge["adapter_sha256"]) == {"s1", "s2"} and merge["base"]["kind"] == "tiny"
    assert (paths.MERGED_DIR / "model.safetensors").exists()
    assert export_metrics()["export.passed"] == 1.0


def test_disabled_export_writes_only_a_skipped_record(in_chain, capsys):
    assert export_step.main(["--params", write_params(in_chain, {"enabled": False})]) == 0
    assert "export: skipped" in capsys.readouterr().out
    assert json.loads(paths.EXPORT_METRICS.read_text()) == {"enabled": False, "skipped": True, "passed": None,
                                                            "final_stage": "s2"}
    assert sorted(p.name for p in paths.MERGED_DIR.iterdir()) == ["merge.json"]
    assert export_metrics() == {"export.enabled": 0.0, "export.skipped": 1.0}


def test_export_config_rejects_unknown_dtype():
    from tasks.core.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="export.dtype"):
        parse_params(raw_params({"dtype": "int8"}))


def test_generation_config_keeps_the_tiny_base_single_stop(in_chain, tmp_path, unit_tokenizer):
    """The end of turn is added to generation_config.json's eos only where it differs from eos: the
    tiny base's eos is <|im_end|> already (Qwen3's two stops: tests/test_qwen3_generation.py)."""
    from tasks.core.modeling import BaseInfo, load_base_model

    export_step.save_merged(load_base_model(BaseInfo.load()), unit_tokenizer, tmp_path / "merged", "bf16")
    saved = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == unit_tokenizer.eos_token_id == unit_tokenizer.convert_tokens_to_ids("<|im_end|>")
