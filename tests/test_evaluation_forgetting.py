"""The forgetting matrix outputs and the out-of-memory-adaptive batches of evaluate."""

from __future__ import annotations

import csv

import pytest

from tasks.evaluation.batching import run_in_batches
from tasks.evaluation.forgetting import change_since_trained, forgetting_rows, write_csv, write_heatmap
from tasks.register import evaluation_metrics

MATRIX = {
    "base": {"syntax": 2.0, "thinking": 3.0},
    "syntax": {"syntax": 0.5, "thinking": 2.8},
    "thinking": {"syntax": 0.9, "thinking": 1.1},
}


def test_change_since_trained_is_final_minus_right_after_own_stage():
    assert change_since_trained(MATRIX, ["syntax", "thinking"]) == {"syntax": 0.4, "thinking": 0.0}


def test_csv_is_one_line_per_model_and_one_column_per_eval_set(tmp_path):
    write_csv(MATRIX, tmp_path / "f.csv")
    rows = list(csv.DictReader((tmp_path / "f.csv").open()))
    assert [r["after"] for r in rows] == ["base", "syntax", "thinking"]
    assert float(rows[1]["thinking"]) == 2.8 and set(rows[0]) == {"after", "syntax", "thinking"}


def test_heatmap_is_a_png(tmp_path):
    write_heatmap(MATRIX, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_long_rows_and_mlflow_metric_names():
    assert forgetting_rows(MATRIX)[1] == {"after": "base", "eval_set": "thinking", "eval_loss": 3.0}
    scores = {"after": {"syntax": {"syntax_eval_loss": 0.5}}, "forgetting": MATRIX,
              "forgetting_change": {"syntax": 0.4}}
    metrics = evaluation_metrics(scores)
    assert metrics["after.syntax.syntax_eval_loss"] == 0.5
    assert metrics["forgetting.thinking.syntax"] == 0.9 and metrics["forgetting_change.syntax"] == 0.4


def fits_four(batch):
    if len(batch) > 4:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return [x * 10 for x in batch]


def test_batches_halve_on_out_of_memory_and_keep_every_item_in_order():
    seen: list[int] = []
    out = run_in_batches(list(range(21)), 16, lambda b: (seen.append(len(b)), fits_four(b))[1])
    assert out == [x * 10 for x in range(21)]
    assert seen[:3] == [16, 8, 4] and max(seen[2:]) == 4  # the smaller size sticks


def test_other_errors_and_a_single_item_that_does_not_fit_still_raise():
    with pytest.raises(ValueError):
        run_in_batches([1, 2], 2, lambda b: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(RuntimeError, match="out of memory"):
        run_in_batches([1], 1, lambda b: (_ for _ in ()).throw(RuntimeError("out of memory")))
