"""Parameter overrides: KEY=VALUE parsing, and writing into params.yaml with comments kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.overrides import apply_overrides, parse_assignment, set_dotted
from tasks.core.config import ConfigError, load_params

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
_LINES = PARAMS_FILE.read_text().splitlines()
COMMENT = next(line for line in _LINES if line.lstrip().startswith("# Qwen3-MoE experts"))  # a whole-line comment
INLINE_COMMENT = next(line for line in _LINES if line.startswith("  quantization:") and "#" in line)


@pytest.fixture
def params_copy(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copyfile(PARAMS_FILE, path)
    return path


class TestParseAssignment:
    @pytest.mark.parametrize(
        "text, key, value",
        [
            ("a.b=3", "a.b", 3),
            ("stages.syntax.train.learning_rate=0.002", "stages.syntax.train.learning_rate", 0.002),
            ("x=2.5e-3", "x", 2.5e-3),
            ("model.trust_remote_code=true", "model.trust_remote_code", True),
            ("flag=false", "flag", False),
            ("train.quantization=nf4", "train.quantization", "nf4"),
            ("model.name_or_path=Qwen/Qwen3-30B-A3B-Base", "model.name_or_path", "Qwen/Qwen3-30B-A3B-Base"),
            ("train.lora.target_modules=[q_proj, v_proj]", "train.lora.target_modules", ["q_proj", "v_proj"]),
            ("model.revision=null", "model.revision", None),
            ("  a.b = 7 ", "a.b", 7),
            ("note=a=b", "note", "a=b"),  # only the first `=` separates key from value
        ],
    )
    def test_values_parsed_as_yaml(self, text, key, value):
        assert parse_assignment(text) == (key, value)

    @pytest.mark.parametrize("text", ["a.b", "=3", "  =3", ""])
    def test_not_key_value(self, text):
        with pytest.raises(ConfigError, match=r"is not KEY=VALUE \(e\.g\. stages\.syntax\.train\.max_steps=200\)"):
            parse_assignment(text)


class TestSetDotted:
    def test_sets_existing_and_new_leaf(self):
        tree = {"a": {"b": 1}}
        set_dotted(tree, "a.b", 2)
        set_dotted(tree, "a.c", 3)
        assert tree == {"a": {"b": 2, "c": 3}}

    def test_missing_parent_named(self):
        with pytest.raises(ConfigError, match=r"^override a\.x\.y: no key a\.x in params\.yaml$"):
            set_dotted({"a": {"b": 1}}, "a.x.y", 1)

    def test_parent_not_mapping(self):
        with pytest.raises(ConfigError, match=r"^override a\.b\.c: a\.b is not a mapping$"):
            set_dotted({"a": {"b": 1}}, "a.b.c", 1)


class TestApplyOverrides:
    def test_sets_value_and_keeps_comments(self, params_copy):
        original = params_copy.read_text()
        assert COMMENT in original.splitlines() and INLINE_COMMENT in original.splitlines()
        thinking_steps = load_params(params_copy).stages["thinking"].train.max_steps

        apply_overrides(params_copy, dict([parse_assignment("stages.syntax.train.max_steps=200")]))

        text = params_copy.read_text()
        lines = text.splitlines()
        assert COMMENT in lines and INLINE_COMMENT in lines
        assert lines[0] == original.splitlines()[0]  # the header comment survives too
        params = load_params(params_copy)
        assert params.stages["syntax"].train.max_steps == 200
        assert params.stages["thinking"].train.max_steps == thinking_steps != 200  # neighbours untouched
        assert "      max_steps: 200" in lines  # the block layout kept, one line changed
        assert len(lines) == len(original.splitlines())

    def test_several_overrides_and_list_value(self, params_copy):
        apply_overrides(
            params_copy,
            {"train.lora.target_modules": ["q_proj"], "seed": 7, "stages.thinking.train.learning_rate": 0.001},
        )
        params = load_params(params_copy)
        assert params.train.lora.target_modules == ["q_proj"]
        assert params.seed == 7
        assert params.stages["thinking"].train.learning_rate == pytest.approx(0.001)

    def test_flow_mapping_keeps_its_layout(self, params_copy):
        apply_overrides(params_copy, {"stages.syntax.data.n_records": 50})
        assert "    data: {n_records: 50, sources: [], replay_share: 0.0, replay_from: {}, mix: {}}" in params_copy.read_text().splitlines()
        assert load_params(params_copy).stages["syntax"].data.n_records == 50

    def test_adds_optional_leaf(self, params_copy):
        apply_overrides(params_copy, {"stages.syntax.train.weight_decay": 0.01})
        assert load_params(params_copy).stages["syntax"].train.weight_decay == pytest.approx(0.01)

    def test_unknown_parent_leaves_file_untouched(self, params_copy):
        before = params_copy.read_bytes()
        with pytest.raises(ConfigError, match=r"override train\.stagez\.x: no key train\.stagez in params\.yaml"):
            apply_overrides(params_copy, dict([parse_assignment("train.stagez.x=1")]))
        assert params_copy.read_bytes() == before

    def test_unknown_leaf_leaves_file_untouched(self, params_copy):
        before = params_copy.read_bytes()
        with pytest.raises(ConfigError, match=r"stages\.syntax\.train\.learnin_rate: unknown key"):
            apply_overrides(params_copy, {"stages.syntax.train.learnin_rate": 0.1})
        assert params_copy.read_bytes() == before

    def test_invalid_value_leaves_file_untouched(self, params_copy):
        before = params_copy.read_bytes()
        with pytest.raises(ConfigError) as err:
            apply_overrides(params_copy, dict([parse_assignment("stages.syntax.train.learning_rate=-0.1")]))
        message = str(err.value)
        assert message.startswith(f"{params_copy} with overrides ['stages.syntax.train.learning_rate'] is invalid:")
        assert "  stages.syntax.train.learning_rate: Input should be greater than 0" in message
        assert params_copy.read_bytes() == before
