"""`model.name_or_path` naming a local folder: `base` records a usable one, and refuses an unusable
one with exit code 2 and a message that names the folder, what is missing and what to do.

Each bad folder is the Qwen3-shaped stand-in (tasks/tools/standin.py, written once for the module)
with one thing taken away or changed; big files are linked, not copied. Every case runs the base
stage's own CLI, `tasks.base.main`, in a temp folder, as DVC would.

    pytest tests/test_model_folder.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from tasks import base as base_step

PROJECT = Path(__file__).resolve().parents[1]
SFT_STAGES = "syntax, thinking, instructions"  # the sft stages of the project's params.yaml
BIG_FILES = {"model.safetensors", "tokenizer.json"}


def model_copy(source: Path, target: Path, drop: tuple[str, ...] = ()) -> Path:
    """The stand-in's files in `target`, less `drop`; weights and tokenizer.json linked, not copied."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.name in drop:
            continue
        if file.name in BIG_FILES:
            os.symlink(file, target / file.name)
        else:
            shutil.copy2(file, target / file.name)
    return target


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def run_base(tmp_path: Path, monkeypatch, capsys, name_or_path: str, **model) -> tuple[int, str, str]:
    """`python -m tasks.base --params params.yaml` in `tmp_path/work`, on the project's params with
    `model.name_or_path` (and any other `model.*`) set: (exit code, stdout, stderr)."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["model"].update(name_or_path=name_or_path, **model)
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(work)
    capsys.readouterr()
    code = base_step.main(["--params", "params.yaml"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result: tuple[int, str, str], folder: Path, *parts: str) -> str:
    code, out, err = result
    assert code == 2, (out, err)
    assert "Traceback" not in err and str(folder.resolve()) in err, err
    for part in parts:
        assert part in err, f"{part!r} not in:\n{err}"
    assert not Path("models/base/base.json").exists()  # nothing recorded
    return err


class TestUsable:
    def test_standin_is_recorded_as_external(self, standin_folder, tmp_path, monkeypatch, capsys, offline):
        code, out, err = run_base(tmp_path, monkeypatch, capsys, str(standin_folder))
        assert code == 0, err
        info = json.loads(Path("models/base/base.json").read_text())
        assert info["kind"] == "external" and info["name_or_path"] == str(standin_folder.resolve())
        assert info["trust_remote_code"] is False
        assert f"base: external model at {standin_folder.resolve()}" in out

    def test_relative_path_is_recorded_resolved(self, standin_folder, tmp_path, monkeypatch, capsys, offline):
        model_copy(standin_folder, tmp_path / "my-model")
        code, _, err = run_base(tmp_path, monkeypatch, capsys, "../my-model")
        assert code == 0, err
        assert json.loads(Path("models/base/base.json").read_text())["name_or_path"] == str((tmp_path / "my-model").resolve())

    def test_chat_template_in_tokenizer_config_is_enough(self, standin_folder, tmp_path, monkeypatch, capsys, offline):
        folder = model_copy(standin_folder, tmp_path / "model", drop=("chat_template.jinja",))
        edit_json(folder / "tokenizer_config.json", chat_template=(standin_folder / "chat_template.jinja").read_text())
        assert run_base(tmp_path, monkeypatch, capsys, str(folder))[0] == 0

    def test_hub_id_is_only_recorded(self, tmp_path, monkeypatch, capsys, offline):
        code, _, err = run_base(tmp_path, monkeypatch, capsys, "Qwen/Qwen3-30B-A3B-Base", revision="main")
        assert code == 0, err  # offline: it would fail if anything were fetched
        info = json.loads(Path("models/base/base.json").read_text())
        assert info["kind"] == "external" and info["name_or_path"] == "Qwen/Qwen3-30B-A3B-Base" and info["revision"] == "main"


class TestRefused:
    def test_no_config_json(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model", drop=("config.json",))
        assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                       "no config.json", "point model.name_or_path at the folder save_pretrained wrote")

    def test_no_config_json_names_the_subfolder_that_has_one(self, standin_folder, tmp_path, monkeypatch, capsys):
        model_copy(standin_folder, tmp_path / "download" / "snapshot")
        folder = tmp_path / "download"
        assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                       "no config.json", "snapshot has one: point model.name_or_path there?")

    def test_no_tokenizer(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model", drop=("tokenizer.json", "tokenizer_config.json"))
        err = assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                             "no tokenizer (tokenizer.json or tokenizer_config.json)",
                             f"AutoTokenizer.from_pretrained(<its source>).save_pretrained('{folder.resolve()}')")
        assert "chat template" not in err  # chat_template.jinja is still there

    def test_no_chat_template(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model", drop=("chat_template.jinja",))
        assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                       "no chat template (chat_template in tokenizer_config.json, or chat_template.jinja)",
                       f"the sft stages {SFT_STAGES} render conversations with it",
                       f"to {folder.resolve() / 'chat_template.jinja'}")

    def test_only_pytorch_pickles(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model", drop=("model.safetensors",))
        (folder / "pytorch_model.bin").write_bytes(b"not even a pickle: the check must not open it")
        assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                       "weights only as PyTorch pickles (pytorch_model.bin), no .safetensors",
                       "the pipeline loads safetensors only",
                       f"M.from_pretrained('{folder.resolve()}', use_safetensors=False, dtype='auto')"
                       f".save_pretrained('{folder.resolve()}')")

    def test_no_weights_at_all(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model", drop=("model.safetensors",))
        assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                       "no weights (*.safetensors)", "copy the model's model.safetensors")

    def test_missing_shard(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model")
        index = {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                       "model.safetensors.index.json names shards that are not in the folder: "
                       "model-00002-of-00002.safetensors")

    def test_unknown_model_type_with_its_own_code(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model")
        edit_json(folder / "config.json", model_type="my_moe",
                  auto_map={"AutoModelForCausalLM": "modeling_my_moe.MyMoeForCausalLM"})
        assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                       "config.json's model_type 'my_moe' is not one transformers",
                       "model.trust_remote_code is false", "set model.trust_remote_code: true in params.yaml",
                       "its auto_map names the folder's code: AutoModelForCausalLM -> modeling_my_moe.MyMoeForCausalLM")

    def test_auto_map_on_a_known_model_type(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model")
        edit_json(folder / "config.json", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
        err = assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                             "config.json has an auto_map", "runs only with trust_remote_code",
                             "transformers would build its own qwen3_moe instead",
                             "remove auto_map from config.json if the model is transformers' own qwen3_moe")
        assert "is not one transformers" not in err

    def test_auto_map_in_the_tokenizer_config(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model")
        edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
        assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                       "tokenizer_config.json has an auto_map (AutoTokenizer -> ['tokenization_x.XTokenizer', None])",
                       "remove auto_map from tokenizer_config.json")

    def test_remote_code_allowed_passes(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model")
        edit_json(folder / "config.json", model_type="my_moe", auto_map={"AutoModelForCausalLM": "modeling_my_moe.M"})
        code, _, err = run_base(tmp_path, monkeypatch, capsys, str(folder), trust_remote_code=True)
        assert code == 0, err
        assert json.loads(Path("models/base/base.json").read_text())["trust_remote_code"] is True

    def test_every_problem_at_once(self, tmp_path, monkeypatch, capsys):
        folder = tmp_path / "empty"
        folder.mkdir()
        err = assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                             "no config.json", "no weights", "no tokenizer", "no chat template")
        assert err.count("\n  - ") == 4

    def test_config_json_that_is_not_json(self, standin_folder, tmp_path, monkeypatch, capsys):
        folder = model_copy(standin_folder, tmp_path / "model", drop=("config.json",))
        (folder / "config.json").write_text('{"model_type": "qwen3_moe",')
        err = assert_refused(run_base(tmp_path, monkeypatch, capsys, str(folder)), folder,
                             "config.json is not valid JSON (")
        assert "no config.json" not in err
