"""The runs of a curriculum ablation: each variant of `ablation.variants` under each seed, as the
params.yaml overrides that make it, at the same training-token budget.

A variant is the current params.yaml with its `set` applied. A `mix` variant trains several stages
as one: the last of them trains on all their training rows (`stages.<last>.data.mix`), each stage's
rows weighted to the rows the staged curriculum draws from it (steps x batch), for the sum of their
steps; the others train 0 steps. The mixture then holds the same rows, and so the same tokens, as
the staged run, in one shuffled stage instead of in order. A variant whose rows are shorter or
longer on average (no replay of the long pretraining rows, say) trains each stage for more or fewer
steps, so every stage still trains the tokens it trains in the configured curriculum; a stage whose
training the variant sets itself keeps its settings.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from tasks.core.config import AblationVariant, ConfigError, Params, StageTraining, parse_params, set_dotted


@dataclass(frozen=True)
class AblationRun:
    """One DVC experiment of the ablation: a variant under one training seed."""

    variant: str
    seed: int
    name: str  # the DVC experiment's name
    overrides: dict[str, Any] = field(default_factory=dict)


def rows_per_step(train: StageTraining) -> int:
    """Training rows one optimizer step draws (in one process)."""
    return train.batch_size * train.gradient_accumulation_steps


def train_rows(report: dict, stage: str) -> int:
    """The stage's training rows as prepared (its own and its replay), from metrics/data.json."""
    line = report.get(stage)
    if not line or not line.get("train_rows"):
        raise ConfigError(f"metrics/data.json has no training rows for stage {stage!r}: run `dvc repro validate` first")
    return int(line["train_rows"])


def mix_overrides(params: Params, stages: list[str], report: dict) -> dict[str, Any]:
    """The overrides that train `stages` as one mixture in the last of them (see the module docstring)."""
    if params.train.packing:
        raise ConfigError("ablation: a `mix` variant needs train.packing: false (its budget is counted in unpacked rows)")
    if unknown := [s for s in stages if s not in params.stages]:
        raise ConfigError(f"ablation: mix names {', '.join(unknown)}, not stages of the curriculum "
                          f"({', '.join(params.stage_names)}): edit the variant in params.yaml's ablation block")
    ordered = [s for s in params.stage_names if s in stages]
    last = ordered[-1]
    target = params.stages[last].train
    drawn = {s: params.stages[s].train.max_steps * rows_per_step(params.stages[s].train) for s in ordered}
    weights = {s: round(drawn[s] / train_rows(report, s), 6) for s in ordered}
    steps = math.ceil(sum(drawn.values()) / rows_per_step(target))
    overrides: dict[str, Any] = {f"stages.{s}.train.max_steps": 0 for s in ordered[:-1]}
    return overrides | {f"stages.{last}.data.mix": weights, f"stages.{last}.train.max_steps": steps}


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """`params` with dotted-key overrides applied, validated."""
    raw = params.model_dump(mode="json", by_alias=True)
    for key, value in overrides.items():
        set_dotted(raw, key, copy.deepcopy(value))
    return parse_params(raw, f"params.yaml with overrides {sorted(overrides)}")


def replay_row_count(params: Params, line: dict, stage: str) -> int:
    """Rows `prepare` replays into `stage` under `params`, from the stage's line in metrics/data.json:
    `replay_share` of its rows, or with `prepare.replay_unit: tokens` of its trained tokens (counted
    in rows that train as many tokens as the replayed rows metrics/data.json reports do, on average)."""
    share = params.stages[stage].data.replay_share
    if not share or not params.stage_names.index(stage):
        return 0
    replayed = line.get("train_rows_replayed", 0)
    own_rows = max(line["train_rows"] - replayed, 1)
    if params.prepare.replay_unit == "rows":
        return round(own_rows * share / (1 - share))
    own_trained = line.get("train_trainable_tokens", line["train_tokens"])
    replay_trained = (line["train_trainable_tokens_replayed"] / replayed
                      if replayed and "train_trainable_tokens_replayed" in line else own_trained / own_rows)
    return round(own_trained * share / (1 - share) / max(replay_trained, 1e-9))


def row_tokens(params: Params, report: dict, stage: str) -> float:
    """Mean tokens per training row of `stage` under `params`: its own rows and its replay (whose
    mean length metrics/data.json gives) in the proportion its replay_share makes."""
    line = report[stage]
    replayed = line.get("train_rows_replayed", 0)
    own_rows = max(line["train_rows"] - replayed, 1)
    own_mean = line["train_tokens"] / own_rows
    replay_mean = line["train_tokens_replayed"] / replayed if replayed and "train_tokens_replayed" in line else own_mean
    n_replay = replay_row_count(params, line, stage)
    return (own_rows * own_mean + n_replay * replay_mean) / (own_rows + n_replay)


def equal_budget(baseline: Params, variant: Params, report: dict, kept: set[str]) -> dict[str, Any]:
    """`max_steps` overrides that give each stage of `variant` the tokens it trains under
    `baseline`, for the stages whose rows change length on average; stages in `kept` (the variant
    sets their training itself), mixtures and 0-step stages are left as they are."""
    out: dict[str, Any] = {}
    for stage, spec in variant.stages.items():
        if stage in kept or spec.data.mix or not spec.train.max_steps or stage not in baseline.stages:
            continue
        base = baseline.stages[stage].train
        tokens = base.max_steps * rows_per_step(base) * row_tokens(baseline, report, stage)
        steps = max(1, round(tokens / (rows_per_step(spec.train) * row_tokens(variant, report, stage))))
        if steps != spec.train.max_steps:
            out[f"stages.{stage}.train.max_steps"] = steps
    return out


def variant_overrides(params: Params, variant: AblationVariant, report: dict) -> dict[str, Any]:
    """The params.yaml overrides of one variant (before its seed), at the baseline's token budget."""
    overrides = dict(variant.overrides)
    if variant.mix:
        overrides |= mix_overrides(params, variant.mix, report)
    kept = {key.split(".")[1] for key in variant.overrides if key.startswith("stages.") and ".train." in key}
    return overrides | equal_budget(params, with_overrides(params, overrides), report, kept)


def seed_override(params: Params, seed: int) -> dict[str, Any]:
    """`train.seed`, unless training already uses that seed: then the run is the workspace's own
    training, and DVC finds it cached."""
    current = params.seed if params.train.seed is None else params.train.seed
    return {} if seed == current else {"train.seed": seed}


def plan_runs(params: Params, report: dict, suffix: str, variants: list[str] | None = None,
              seeds: list[int] | None = None) -> list[AblationRun]:
    """Every (variant, seed) run, variants in params order; `suffix` keeps DVC experiment names unique."""
    chosen = variants or list(params.ablation.variants)
    if unknown := [v for v in chosen if v not in params.ablation.variants]:
        raise ConfigError(f"ablation: no variant {', '.join(unknown)} in params.yaml "
                          f"(ablation.variants: {', '.join(params.ablation.variants)})")
    runs = []
    for name in chosen:
        overrides = variant_overrides(params, params.ablation.variants[name], report)
        for seed in seeds or params.ablation.seeds:
            runs.append(AblationRun(name, seed, f"{name}-s{seed}-{suffix}", overrides | seed_override(params, seed)))
    return runs


def tokens_drawn(params: Params, report: dict) -> dict[str, float]:
    """Training tokens each stage's data contributes under `params`: rows drawn x mean tokens per row
    (`row_tokens`). A mixed stage draws from each stage it mixes in proportion to the rows it holds
    of it. This is the budget the variants are held equal on."""
    drawn: dict[str, float] = {}
    for stage, spec in params.stages.items():
        rows = spec.train.max_steps * rows_per_step(spec.train)
        if not spec.data.mix:
            drawn[stage] = drawn.get(stage, 0.0) + rows * row_tokens(params, report, stage)
            continue
        held = {s: w * train_rows(report, s) for s, w in spec.data.mix.items()}
        for source, n in held.items():
            drawn[source] = drawn.get(source, 0.0) + rows * n / sum(held.values()) * row_tokens(params, report, source)
    return drawn
