"""The pipeline flow's typed parameters: the UI form's fields map onto params.yaml keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.overrides import apply_overrides
from flows.pipeline import pipeline
from flows.run_parameters import PARAMS_KEYS, RunParameters

PROJECT = Path(__file__).resolve().parents[1]


def lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_every_field_names_a_key_that_params_yaml_has():
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for field, key in PARAMS_KEYS.items():
        lookup(params, key)  # KeyError names the drifted key
        assert field in RunParameters.model_fields


def test_filled_fields_and_set_become_dotted_overrides():
    form = RunParameters(syntax_max_steps=20, quantization="nf4", set={"stages.syntax.train.learning_rate": 1e-3})
    assert form.overrides() == {"stages.syntax.train.max_steps": 20, "train.quantization": "nf4",
                                "stages.syntax.train.learning_rate": 1e-3}
    assert RunParameters().overrides() == {}


def test_a_key_given_twice_and_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="stages.syntax.train.max_steps given both"):
        RunParameters(syntax_max_steps=20, set={"stages.syntax.train.max_steps": 30}).overrides()
    with pytest.raises(ValueError):
        RunParameters(sytnax_max_steps=20)
    with pytest.raises(ValueError):
        RunParameters(quantization="int3")


def test_the_overrides_land_in_params_yaml_as_the_cli_ones_do(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text((PROJECT / "params.yaml").read_text())
    apply_overrides(target, RunParameters(thinking_max_steps=7, export_enabled=False).overrides())
    params = yaml.safe_load(target.read_text())
    assert params["stages"]["thinking"]["train"]["max_steps"] == 7 and params["export"]["enabled"] is False
    assert "# " in target.read_text()  # comments kept


def test_the_flow_signature_gives_the_ui_typed_fields_with_defaults():
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(pipeline.fn).model_dump()
    form = schema["definitions"]["RunParameters"]["properties"]
    assert form["quantization"]["anyOf"][0] == {"enum": ["none", "nf4"], "type": "string"}
    assert form["syntax_max_steps"]["anyOf"][0]["type"] == "integer"
    assert "stages.syntax.train.max_steps" in form["syntax_max_steps"]["description"]
    assert schema["properties"]["commit_results"]["default"] is False
