"""The ablation's parts without a pipeline run: variants as overrides at an equal token budget, the
verdict (ties within the seeds' spread), the mixture prepare builds, the reports and MLflow runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.dvc_experiments import stage_times
from tasks.ablation.report import RunResult, write_reports
from tasks.ablation.tracking import ABLATION_TAG, log_ablation
from tasks.ablation.variants import (
    mix_overrides,
    plan_runs,
    replay_row_count,
    rows_per_step,
    tokens_drawn,
    variant_overrides,
    with_overrides,
)
from tasks.ablation.verdict import NO_DIFFERENCE, Cell, judge, markdown_table, verdicts
from tasks.core.config import AblationVariant, ConfigError, parse_params
from tasks.data.rows import Rows
from tasks.prepare import mix_rows
from tests.pipeline_workspace import PROJECT

# metrics/data.json as prepare writes it, for stages of different row lengths
REPORT = {
    "embedding": {"train_rows": 2160, "train_rows_replayed": 0, "train_tokens": 2160 * 120, "train_tokens_replayed": 0},
    "syntax": {"train_rows": 540, "train_rows_replayed": 0, "train_tokens": 540 * 40, "train_tokens_replayed": 0},  # replays nothing
    "thinking": {"train_rows": 771, "train_rows_replayed": 231, "train_tokens": 540 * 90, "train_tokens_replayed": 231 * 100},
    "instructions": {"train_rows": 771, "train_rows_replayed": 231, "train_tokens": 540 * 25, "train_tokens_replayed": 231 * 95},
}
LONGEST_ROW = 120


def project_raw() -> dict:
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


def test_the_default_declares_staged_no_replay_and_mixed_with_two_seeds():
    params = parse_params(project_raw())
    assert list(params.ablation.variants) == ["staged", "staged-no-replay", "mixed"]
    assert len(params.ablation.seeds) >= 2 and params.ablation.register_ is False


def test_mixed_trains_the_same_rows_of_each_stage_as_staged_in_one_stage():
    params = parse_params(project_raw())
    overrides = mix_overrides(params, ["syntax", "thinking", "instructions"], REPORT)
    mixed = with_overrides(params, overrides)
    assert [mixed.stages[s].train.max_steps for s in ("syntax", "thinking")] == [0, 0]
    drawn = {s: params.stages[s].train.max_steps * rows_per_step(params.stages[s].train) for s in ("syntax", "thinking", "instructions")}
    # each stage's weight: the rows staged training draws from it over the rows it has
    assert overrides["stages.instructions.data.mix"] == {s: pytest.approx(drawn[s] / REPORT[s]["train_rows"], abs=1e-6) for s in drawn}
    assert mixed.stages["instructions"].train.max_steps == math.ceil(sum(drawn.values()) / rows_per_step(params.stages["instructions"].train))


def test_each_variant_trains_the_same_tokens_within_one_batch():
    params = parse_params(project_raw())
    staged = tokens_drawn(params, REPORT)
    mixed = tokens_drawn(with_overrides(params, variant_overrides(params, params.ablation.variants["mixed"], REPORT)), REPORT)
    no_replay_overrides = variant_overrides(params, params.ablation.variants["staged-no-replay"], REPORT)
    no_replay = tokens_drawn(with_overrides(params, no_replay_overrides), REPORT)
    assert "stages.syntax.train.max_steps" not in no_replay_overrides  # syntax replays nothing already
    for stage in ("thinking", "instructions"):  # shorter rows without the replay: more steps
        assert no_replay_overrides[f"stages.{stage}.train.max_steps"] > params.stages[stage].train.max_steps
    for stage in ("syntax", "thinking", "instructions"):
        batch = rows_per_step(params.stages[stage].train)
        assert abs(no_replay[stage] - staged[stage]) <= batch * LONGEST_ROW / 2  # rounded to the nearest step
    batch = rows_per_step(params.stages["instructions"].train)
    assert abs(sum(mixed.values()) - sum(staged.values())) <= batch * LONGEST_ROW
    # and from the same stages' data, in the same amounts (the mixture only removes the order)
    assert mixed == pytest.approx(staged, rel=0.01)


def test_the_replay_a_variant_gets_counts_what_replay_share_counts():
    params = parse_params(project_raw())
    share = params.stages["thinking"].data.replay_share
    line = REPORT["thinking"] | {"train_trainable_tokens": 540 * 40, "train_trainable_tokens_replayed": 231 * 80}
    by_rows = with_overrides(params, {"prepare.replay_unit": "rows"})
    by_tokens = with_overrides(params, {"prepare.replay_unit": "tokens"})
    assert replay_row_count(by_rows, line, "thinking") == round(540 * share / (1 - share)) == 231
    # 540 rows train 21,600 tokens; replayed rows train 80 each: 0.3 of the trained tokens is 116 of them
    assert replay_row_count(by_tokens, line, "thinking") == round(540 * 40 * share / (1 - share) / 80) == 116
    assert replay_row_count(by_tokens, line, "embedding") == 0  # the first stage has nothing to replay


def test_a_variant_that_sets_a_stage_s_training_keeps_it():
    params = parse_params(project_raw())
    variant = AblationVariant(overrides={"stages.syntax.data.replay_share": 0.0, "stages.syntax.train.max_steps": 50})
    overrides = variant_overrides(params, variant, REPORT)
    assert overrides == {"stages.syntax.data.replay_share": 0.0, "stages.syntax.train.max_steps": 50}


def test_mixing_a_stage_into_an_earlier_one_is_refused():
    raw = project_raw()
    raw["stages"]["syntax"]["data"]["mix"] = {"thinking": 1.0}
    with pytest.raises(ConfigError, match="stages.syntax.data.mix names thinking"):
        parse_params(raw)


def test_a_variant_mixing_an_unknown_stage_is_refused():
    raw = project_raw()
    raw["ablation"]["variants"]["mixed"]["mix"] = ["syntax", "reasoning"]
    params = parse_params(raw)  # the pipeline itself does not read the ablation block
    with pytest.raises(ConfigError, match="mix names reasoning, not stages of the curriculum"):
        plan_runs(params, REPORT, "x", variants=["mixed"])


def test_runs_are_every_variant_under_every_seed_with_the_workspace_seed_left_as_is():
    params = parse_params(project_raw())
    runs = plan_runs(params, REPORT, "x1", variants=["staged", "staged-no-replay"], seeds=[params.seed, 7])
    assert [(r.variant, r.seed, r.name) for r in runs] == [
        ("staged", params.seed, f"staged-s{params.seed}-x1"), ("staged", 7, "staged-s7-x1"),
        ("staged-no-replay", params.seed, f"staged-no-replay-s{params.seed}-x1"),
        ("staged-no-replay", 7, "staged-no-replay-s7-x1")]
    assert runs[0].overrides == {}  # the workspace's own training: DVC finds it cached
    assert runs[1].overrides == {"train.seed": 7}
    assert runs[3].overrides["stages.thinking.data.replay_share"] == 0.0 and runs[3].overrides["train.seed"] == 7
    with pytest.raises(ConfigError, match="no variant reversed"):
        plan_runs(params, REPORT, "x1", variants=["reversed"])


def test_a_gap_within_the_spread_is_no_difference():
    cells = {"staged": Cell((0.50, 0.30)), "mixed": Cell((0.42, 0.38))}  # means 0.40 and 0.40... and spreads
    verdict = judge("thinking_exact_match", cells)
    assert verdict.winner is None and NO_DIFFERENCE in verdict.outcome
    cells = {"staged": Cell((0.52, 0.50)), "mixed": Cell((0.30, 0.33))}
    verdict = judge("thinking_exact_match", cells)
    assert verdict.winner == "staged" and verdict.runner_up == "mixed" and verdict.gap == pytest.approx(0.195)


def test_lower_wins_for_losses_and_lengths_are_not_judged():
    finals = {"staged": [{"syntax_eval_loss": 0.3, "syntax_reply_words_mean": 4.0}, {"syntax_eval_loss": 0.31, "syntax_reply_words_mean": 5.0}],
              "mixed": [{"syntax_eval_loss": 0.5, "syntax_reply_words_mean": 9.0}, {"syntax_eval_loss": 0.52, "syntax_reply_words_mean": 1.0}]}
    judged = verdicts(finals)
    assert [v.metric for v in judged] == ["syntax_eval_loss"]
    assert judged[0].winner == "staged" and not judged[0].higher_is_better
    with pytest.raises(ValueError, match="ablation.metrics: rouge"):
        verdicts(finals, ["rouge"])


def test_the_table_marks_the_winner_and_says_when_one_seed_cannot_decide():
    judged = verdicts({"staged": [{"a_exact_match": 0.5}, {"a_exact_match": 0.6}], "mixed": [{"a_exact_match": 0.1}, {"a_exact_match": 0.2}]})
    table = markdown_table(judged, ["staged", "mixed"], seeds=2)
    assert "| a_exact_match | higher | **0.550 [0.500, 0.600]** | 0.150 [0.100, 0.200] | staged by 0.400 |" in table
    one = markdown_table(verdicts({"staged": [{"a_exact_match": 0.5}], "mixed": [{"a_exact_match": 0.4}]}), ["staged", "mixed"], seeds=1)
    assert "One seed: there is no spread" in one


def test_a_mix_repeats_each_stage_by_its_weight_and_marks_the_copies():
    def rows(stage: str, n: int) -> Rows:
        ids = np.arange(3 * n, dtype=np.int32)
        strings = {name: [""] * n for name in ("split", "record_json", "text", "roles", "last_reply", "origin", "source")}
        return Rows(input_ids=ids, labels=ids.copy(), offsets=np.arange(0, 3 * n + 1, 3, dtype=np.int64),
                    content_hash=[f"{stage}{i}" for i in range(n)], source_stage=[stage] * n, **strings)

    prepared = {"syntax": rows("syntax", 4), "thinking": rows("thinking", 10)}
    prepared["thinking"].content_hash[:2] = ["syntax0", "syntax1~1"]  # thinking replays syntax rows
    mixed = mix_rows("thinking", prepared, {"syntax": 2.5, "thinking": 0.5}, seed=1)
    stages = list(mixed.source_stage)
    assert stages.count("syntax") == 10 and stages.count("thinking") == 5
    assert len(set(mixed.content_hash)) == len(mixed)  # validate's uniqueness check holds
    assert {h.split("~")[0] for h in mixed.content_hash} <= {f"syntax{i}" for i in range(4)} | {f"thinking{i}" for i in range(10)}
    assert sum(h.startswith("syntax0") for h in mixed.content_hash) >= 2
    assert mix_rows("thinking", prepared, {"syntax": 2.5, "thinking": 0.5}, seed=1).content_hash == mixed.content_hash


def test_stage_times_reads_what_dvc_ran_and_reused():
    lines = [(0.0, "Stage 'ingest' didn't change, skipping"), (1.0, "Running stage 'prepare':"), (1.5, "> python -m tasks.prepare"),
             (4.0, "Updating lock file 'dvc.lock'"), (4.1, "Stage 'base' is cached - skipping run, checking out outputs"),
             (5.0, "Running stage 'evaluate':"), (9.0, "Ran experiment(s): staged-s1-x")]
    ran, reused = stage_times(lines)
    assert ran == {"prepare": 3.0, "evaluate": 4.0} and reused == ["ingest", "base"]


def result(variant: str, seed: int, exact: float) -> RunResult:
    matrix = {"base": {"syntax": 2.0}, "syntax": {"syntax": 1.0 + seed / 100}}
    return RunResult(variant, seed, f"{variant}-s{seed}-x", {"train.seed": seed}, {"syntax_exact_match": exact, "syntax_eval_loss": 1.0},
                     matrix, 1000 + seed, 10.0, {"train@syntax": 5.0}, ["ingest"])


def test_reports_and_mlflow_parent_with_a_child_per_variant(tmp_path: Path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    results = [result("staged", 1, 0.6), result("staged", 2, 0.5), result("mixed", 1, 0.2), result("mixed", 2, 0.1)]
    judged = verdicts({"staged": [r.final for r in results[:2]], "mixed": [r.final for r in results[2:]]})
    files = write_reports(results, judged, {"staged": "as configured", "mixed": "one stage"}, tmp_path / "reports/ablation",
                          shared={"ingest": 2.0, "base": 100.0})
    verdict = json.loads(files["verdict"].read_text())
    assert verdict["wins"] == {"staged": 1} and verdict["tokens_trained"] == {"staged": 1002, "mixed": 1002}
    assert json.loads((tmp_path / "reports/ablation/forgetting-staged.json").read_text())["syntax"]["syntax"] == pytest.approx(1.015)
    assert files["plot"].stat().st_size > 0 and "staged by 0.400" in files["table"].read_text()
    runs = json.loads(files["runs"].read_text())
    assert runs["saved_by_caching_seconds"] == 8.0  # each of 4 runs reused ingest, 2 s where it ran
    assert runs["seconds"] == 142.0 and [r["experiment"] for r in runs["runs"]][0] == "staged-s1-x"
    parent_id = log_ablation("ablation-x", "stagewise", results, judged, files, {"staged": "as configured"})
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("stagewise").experiment_id], f"tags.`{ABLATION_TAG}` = 'ablation-x'")
    children = {r.data.tags["variant"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"staged", "mixed"}
    assert children["staged"].data.metrics["syntax_exact_match"] == pytest.approx(0.55)
    assert children["staged"].data.metrics["syntax_exact_match.spread"] == pytest.approx(0.1)
    assert children["mixed"].data.tags["dvc_experiments"] == "mixed-s1-x,mixed-s2-x"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"verdict.md", "verdict.json", "runs.json", "metrics.png"}
