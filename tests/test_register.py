"""The register step's pure parts: promotion gates, params flattening, lineage from dvc.lock."""

from __future__ import annotations

import pytest
import yaml

from tasks.register import check_gates, data_lineage, flatten


@pytest.mark.parametrize(
    ("final", "thresholds", "passed", "reasons"),
    [
        ({"syntax_json_valid": 0.9}, {"syntax_json_valid": 0.5}, True, []),
        ({"syntax_json_valid": 0.5}, {"syntax_json_valid": 0.5}, True, []),  # the minimum itself passes
        ({"syntax_json_valid": 0.4}, {"syntax_json_valid": 0.5}, False, ["syntax_json_valid: 0.4000 < 0.5"]),
        ({}, {"thinking_exact_match": 0.1}, False, ["thinking_exact_match: not measured (metrics/evaluate.json has no such score)"]),
        ({"a": 1.0}, {}, True, []),
    ],
)
def test_gates(final, thresholds, passed, reasons):
    assert check_gates(final, thresholds) == (passed, reasons)


def test_flatten_gives_dotted_keys_and_json_lists():
    tree = {"seed": 3, "train": {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "x": None}}
    assert flatten(tree) == {
        "seed": "3",
        "train.lora.r": "8",
        "train.lora.target_modules": '["q_proj", "v_proj"]',
        "train.x": "None",
    }


def test_data_lineage_reads_prepared_data_hashes_from_dvc_lock(tmp_path):
    lock = {
        "schema": "2.0",
        "stages": {
            "train@syntax": {"deps": [{"path": "tasks/train.py", "md5": "aaa"}, {"path": "data/prepared/syntax", "md5": "bbb.dir"}]},
            "train@thinking": {"deps": [{"path": "data/prepared/thinking", "md5": "ccc.dir"}]},
        },
    }
    file = tmp_path / "dvc.lock"
    file.write_text(yaml.safe_dump(lock))
    assert data_lineage(["syntax", "thinking", "instructions"], file) == {
        "data_md5.syntax": "bbb.dir",
        "data_md5.thinking": "ccc.dir",
    }
    assert data_lineage(["syntax"], tmp_path / "missing.lock") == {}
