"""lm-evaluation-harness tasks in `evaluate` (evaluate.lm_eval; tasks/evaluation/harness.py): a
local multiple-choice task (a YAML and a JSONL in tmp_path, no network) run on the tiny chain's
final model, its accuracy checked against the log-likelihoods computed by hand; and the error a
person gets when tasks are listed but the harness is not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tasks.evaluation.harness import numeric_metrics
from tests.evaluated_chain import build_project, project_params, write_params

TASK = "stagewise_tiny_mc"
DOCS = [
    {"question": "What is 2+2? The answer is", "choices": ["4", "7", "apples"], "label": 0},
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog", "answer"], "label": 0},
    {"question": "Tom has 3 apples and buys", "choices": ["4 more", "JSON", "the fox"], "label": 0},
    {"question": "Answer in", "choices": ["JSON", "apples"], "label": 0},
    {"question": "Think step by step, then give the final", "choices": ["answer", "dog"], "label": 0},
]
LIMIT = 4  # the last doc must not count


def write_task(folder: Path) -> None:
    """A multiple-choice task the harness reads from local files only."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def hand_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """Multiple choice as the harness defines it: the choice whose tokens (after a space) have the
    highest summed log-probability after the question's tokens."""
    import torch

    hits = 0
    for doc in docs:
        context = tokenizer.encode(doc["question"])
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(doc["question"] + " " + choice)
            assert whole[: len(context)] == context  # the space starts the continuation's first token
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return hits / len(docs)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub: the task's data is a local JSON file; the datasets cache goes to tmp_path."""
    for var, value in [("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                       ("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))]:
        monkeypatch.setenv(var, value)
    import datasets.config  # read at import: set them there too in case datasets came in earlier
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.slow  # ~40 s on 2 cores: the harness indexes its ~10k built-in task files first
def test_local_task_runs_on_the_final_model_and_lands_in_the_metrics(tmp_path, monkeypatch, unit_tokenizer, offline):
    pytest.importorskip("lm_eval", reason='the lmeval extra: pip install -e ".[lmeval]"')
    from tasks import evaluate
    from tasks.core.chain import load_stage_model
    from tasks.core.modeling import BaseInfo
    from tasks.register import evaluation_metrics

    monkeypatch.chdir(tmp_path)
    build_project(tmp_path, unit_tokenizer)
    write_task(tmp_path / "lm_tasks")
    lm_eval = {"tasks": [TASK], "include_path": str(tmp_path / "lm_tasks"), "limit": LIMIT}
    write_params(project_params(evaluate={"lm_eval": lm_eval}))

    assert evaluate.main([]) == 0
    scores = json.loads(Path("metrics/evaluate.json").read_text())
    acc = scores["lm_eval"][TASK]["acc"]
    expected = hand_accuracy(load_stage_model(BaseInfo.load(), "s2"), unit_tokenizer, DOCS[:LIMIT])
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(expected, abs=1e-12)
    assert set(scores["lm_eval"][TASK]) == {"acc", "acc_stderr"}
    assert evaluation_metrics(scores)[f"lm_eval.{TASK}.acc"] == acc  # logged with the other evaluation metrics
    assert "s2_rouge_l" in scores["final"]  # the rest of evaluate is unchanged


def test_tasks_without_the_harness_installed_fail_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no models/ here: had the check come later, the error would be another
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the package gives
    write_params(project_params(evaluate={"lm_eval": {"tasks": ["arc_easy"]}}))
    from tasks import evaluate

    assert evaluate.main([]) == 2
    err = capsys.readouterr().err
    assert "evaluate.lm_eval.tasks lists ['arc_easy']" in err and 'pip install -e ".[lmeval]"' in err


def test_no_tasks_needs_no_harness(tmp_path, monkeypatch):
    """The default lists no tasks and passes the check without the harness; the same settings with
    a task listed do not, so the check is about the tasks, not the package alone."""
    from tasks.core.config import ConfigError, load_params
    from tasks.evaluation.harness import require_harness

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    cfg = load_params(write_params(project_params())).evaluate.lm_eval
    assert cfg.tasks == []
    assert require_harness(cfg) is None
    with pytest.raises(ConfigError, match=r"evaluate.lm_eval.tasks lists \['arc_easy'\]"):
        require_harness(cfg.model_copy(update={"tasks": ["arc_easy"]}))


@pytest.mark.parametrize(("row", "expected"), [
    ({"alias": "t", "name": "t", "sample_len": 4, "acc,none": 0.5, "acc_stderr,none": 0.25},
     {"acc": 0.5, "acc_stderr": 0.25}),
    ({"exact_match,strict-match": 1, "exact_match_stderr,strict-match": "N/A", "exact_match,flexible-extract": 0.0},
     {"exact_match.strict-match": 1.0, "exact_match.flexible-extract": 0.0}),
])
def test_harness_results_become_numbers_by_metric(row, expected):
    assert numeric_metrics(row) == expected
