"""What an ablation leaves behind under reports/ablation/: the verdict table (Markdown and JSON),
every run's record, each variant's forgetting matrix (mean over seeds, JSON and heatmap) and a plot
of the judged metrics with their spread."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean

from tasks.ablation.verdict import MetricVerdict, markdown_table, wins

REPORT_DIR = Path("reports/ablation")


@dataclass(frozen=True)
class RunResult:
    """One finished run: its identity, what it scored and what it cost."""

    variant: str
    seed: int
    experiment: str  # the DVC experiment's name
    overrides: dict
    final: dict[str, float]  # metrics/evaluate.json `final`
    forgetting: dict[str, dict[str, float]]  # model after stage -> eval set -> loss
    tokens_trained: int  # summed over the training stages (metrics/train/*.json)
    seconds: float
    stages_ran: dict[str, float] = field(default_factory=dict)  # stage -> seconds, for those DVC ran
    stages_reused: list[str] = field(default_factory=list)  # up to date or restored from the run cache


def mean_matrix(matrices: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Cell-wise mean of forgetting matrices of the same shape."""
    first = matrices[0]
    return {row: {col: round(fmean(m[row][col] for m in matrices), 6) for col in first[row]} for row in first}


def by_variant(results: list[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.variant, []).append(r)
    return out


def caching_saved(results: list[RunResult], shared: dict[str, float]) -> float:
    """Seconds the runs did not spend because DVC reused a stage: each reused stage at the time it
    took where it did run (the shared stages' run, or another run)."""
    cost = dict(shared)
    for r in results:
        for stage, seconds in r.stages_ran.items():
            cost[stage] = max(cost.get(stage, 0.0), seconds)
    return round(sum(cost.get(stage, 0.0) for r in results for stage in r.stages_reused), 3)


def write_reports(results: list[RunResult], judged: list[MetricVerdict], descriptions: dict[str, str],
                  out: Path = REPORT_DIR, shared: dict[str, float] | None = None) -> dict[str, Path]:
    """Every file of the ablation's report; the paths by role (what MLflow logs)."""
    from tasks.evaluation.forgetting import write_heatmap

    groups = by_variant(results)
    variants = list(groups)
    seeds = max(len(g) for g in groups.values())
    out.mkdir(parents=True, exist_ok=True)
    files = {"table": out / "verdict.md", "verdict": out / "verdict.json", "runs": out / "runs.json", "plot": out / "metrics.png"}
    tokens = {v: round(fmean(r.tokens_trained for r in g)) for v, g in groups.items()}
    header = ["# Curriculum ablation", "", "| variant | what it is | runs | tokens trained (mean) |", "|---|---|---|---|"]
    header += [f"| {v} | {descriptions.get(v, '')} | {', '.join(r.experiment for r in groups[v])} | {tokens[v]:,} |" for v in variants]
    won = wins(judged)
    summary = ", ".join(f"{v} {won.get(v, 0)}" for v in variants)
    files["table"].write_text("\n".join(header) + "\n\n" + markdown_table(judged, variants, seeds)
                              + f"\nMetrics won: {summary} (of {len(judged)}).\n")
    files["verdict"].write_text(json.dumps({
        "variants": variants, "seeds": seeds, "tokens_trained": tokens, "wins": won,
        "metrics": [{"metric": v.metric, "higher_is_better": v.higher_is_better, "winner": v.winner,
                     "runner_up": v.runner_up, "gap": round(v.gap, 6), "spread": round(v.noise, 6),
                     "outcome": v.outcome,
                     "cells": {name: {"mean": round(c.mean, 6), "spread": round(c.spread, 6), "values": list(c.values)}
                               for name, c in v.cells.items()}} for v in judged],
    }, indent=2) + "\n")
    files["runs"].write_text(json.dumps({
        "shared_stages": shared or {}, "seconds": round(sum((shared or {}).values()) + sum(r.seconds for r in results), 3),
        "saved_by_caching_seconds": caching_saved(results, shared or {}), "runs": [asdict(r) for r in results]}, indent=2) + "\n")
    for variant, group in groups.items():
        matrix = mean_matrix([r.forgetting for r in group])
        (out / f"forgetting-{variant}.json").write_text(json.dumps(matrix, indent=2) + "\n")
        write_heatmap(matrix, out / f"forgetting-{variant}.png", title=f"{variant}: eval loss (rows: after stage; columns: eval set)")
        files[f"forgetting-{variant}"] = out / f"forgetting-{variant}.png"
    plot_metrics(judged, variants, files["plot"])
    return files


def plot_metrics(judged: list[MetricVerdict], variants: list[str], path: Path) -> None:
    """Scores (higher is better) and eval losses side by side: each variant's mean per metric, its
    [min, max] over seeds as the whisker. Perplexities are left out: they are the losses again."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("scores (higher is better)", [v for v in judged if v.higher_is_better]),
              ("eval loss (lower is better)", [v for v in judged if v.metric.endswith("_eval_loss")])]
    panels = [(title, metrics) for title, metrics in panels if metrics]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 + 1.2 * len(judged), 4), squeeze=False)
    width = 0.8 / max(len(variants), 1)
    for ax, (title, metrics) in zip(axes[0], panels):
        for k, variant in enumerate(variants):
            cells = [v.cells[variant] for v in metrics]
            errors = [[c.mean - min(c.values) for c in cells], [max(c.values) - c.mean for c in cells]]
            ax.bar([i + k * width for i in range(len(metrics))], [c.mean for c in cells], width, yerr=errors,
                   capsize=3, label=variant)
        ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(metrics))],
                      labels=[v.metric for v in metrics], rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("final metrics per variant: mean over seeds, whiskers at min and max", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
