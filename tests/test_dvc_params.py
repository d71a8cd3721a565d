"""dvc.yaml as the one definition of what a stage reads: keys, values, and the guard against a
curriculum stage that params.yaml has and dvc.yaml does not name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks.core.cli import check_declared
from tasks.core.config import ConfigError, load_params
from tasks.core.dvc_params import declared_keys, declared_values, undeclared_stage_keys

PROJECT = Path(__file__).resolve().parents[1]


def test_foreach_keys_name_the_stage():
    keys = declared_keys("train@thinking")
    assert {"stages.thinking.train", "stages.thinking.init_from", "train.lora", "seed"} <= set(keys)
    assert not any("${" in k for k in keys)


def test_values_come_from_the_resolved_params():
    params = load_params(PROJECT / "params.yaml")
    values = declared_values("train@syntax", params.model_dump(mode="json", by_alias=True))
    assert values["stages.syntax.train"]["learning_rate"] == pytest.approx(params.stages["syntax"].train.learning_rate)
    assert values["stages.syntax.train"]["max_steps"] == params.stages["syntax"].train.max_steps
    assert values["prepare.max_length"] == 256


def test_register_depends_on_the_whole_file():
    assert declared_keys("register") == [""]


def test_every_curriculum_stage_of_the_repo_is_declared():
    names = load_params(PROJECT / "params.yaml").stage_names
    for stage in ("ingest", "base", "prepare", "validate", "evaluate", "export"):
        assert undeclared_stage_keys(stage, names) == [], stage


def test_a_stage_added_to_params_only_is_refused_by_name(tmp_path, monkeypatch):
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["stages"]["code"] = dict(raw["stages"]["instructions"], init_from="instructions")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(PROJECT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"`validate` stage does not list stages.code.checks, stages.code.kind"):
        check_declared("validate", "params.yaml")
    check_declared("export", "params.yaml")  # reads no stage block: nothing to add


def test_the_train_command_is_checked_as_its_foreach_stage(tmp_path, monkeypatch):
    """`python -m tasks.train <stage>` checks as `train`: its keys come from `${key}`, never missing."""
    shutil.copy(PROJECT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert undeclared_stage_keys("train", load_params("params.yaml").stage_names) == []
    check_declared("train", "params.yaml")


def test_benchmark_files_outside_prepare_s_deps_are_named(tmp_path):
    from tasks.core.dvc_params import undeclared_files

    (tmp_path / "dvc.yaml").write_text("stages:\n  prepare:\n    cmd: x\n    deps: [data/raw, data/benchmarks, extra/one.jsonl]\n")
    files = ["data/benchmarks/a.jsonl", "data/benchmarks/sub/b.csv", "extra/one.jsonl", "elsewhere/c.jsonl",
             "data/benchmarks_old/d.jsonl", str(tmp_path / "data/benchmarks/e.jsonl"), "/tmp/outside.jsonl", "s3://b/k.jsonl"]
    assert undeclared_files("prepare", files, tmp_path / "dvc.yaml") == [
        "elsewhere/c.jsonl", "data/benchmarks_old/d.jsonl", "/tmp/outside.jsonl"]


def test_prepare_refuses_a_benchmark_file_dvc_would_not_see(tmp_path, monkeypatch):
    from tasks.core.config import ConfigError, PrepareConfig
    from tasks.prepare import check_benchmarks_are_deps

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  prepare:\n    cmd: x\n    deps: [data/benchmarks]\n")
    cfg = PrepareConfig(decontaminate={"benchmark_files": ["data/benchmarks/ok.jsonl", "gsm8k_test.jsonl"]})
    with pytest.raises(ConfigError, match=r"gsm8k_test.jsonl is not a dependency of `prepare` in dvc.yaml.*data/benchmarks/"):
        check_benchmarks_are_deps(cfg)
    check_benchmarks_are_deps(PrepareConfig(decontaminate={"benchmark_files": ["data/benchmarks/ok.jsonl"]}))
