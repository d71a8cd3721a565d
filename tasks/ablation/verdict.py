"""The ablation's verdict: per metric, each variant's mean and spread over seeds, and which variant
wins by how much, where a gap no larger than the seeds' spread is "no difference", not a win.

The spread of a variant is max - min of the metric over its seeds. The best variant wins a metric
when its gap to the runner-up is larger than the wider of their two spreads; with one seed there is
no spread, so every gap would count: the table says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean

NO_DIFFERENCE = "no difference"


@dataclass(frozen=True)
class Cell:
    """One variant's values of one metric over its seeds."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return fmean(self.values)

    @property
    def spread(self) -> float:
        return max(self.values) - min(self.values)

    def text(self) -> str:
        if len(self.values) == 1:
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} [{min(self.values):.3f}, {max(self.values):.3f}]"


@dataclass(frozen=True)
class MetricVerdict:
    metric: str
    higher_is_better: bool
    cells: dict[str, Cell]  # variant -> its values
    winner: str | None  # None: no difference between the best two
    runner_up: str | None
    gap: float  # |best mean - runner-up mean|
    noise: float  # the wider spread of the two

    @property
    def outcome(self) -> str:
        if self.runner_up is None:
            return "one variant"
        return f"{self.winner} by {self.gap:.3f}" if self.winner else f"{NO_DIFFERENCE} (gap {self.gap:.3f} <= spread {self.noise:.3f})"


def direction(metric: str) -> bool | None:
    """True: higher is better; False: lower is; None: descriptive (reply lengths), no winner."""
    if metric.endswith(("_mean", "_median", "_max", "_p90", "_count")):
        return None
    return not metric.endswith(("_loss", "_perplexity"))


def judge(metric: str, cells: dict[str, Cell]) -> MetricVerdict | None:
    """The verdict on one metric; None for a descriptive one."""
    higher = direction(metric)
    if higher is None:
        return None
    ranked = sorted(cells, key=lambda v: cells[v].mean, reverse=higher)
    best = ranked[0]
    if len(ranked) == 1:
        return MetricVerdict(metric, higher, cells, best, None, 0.0, cells[best].spread)
    second = ranked[1]
    gap = abs(cells[best].mean - cells[second].mean)
    noise = max(cells[best].spread, cells[second].spread)
    return MetricVerdict(metric, higher, cells, best if gap > noise else None, second, gap, noise)


def verdicts(finals: dict[str, list[dict[str, float]]], metrics: list[str] | None = None) -> list[MetricVerdict]:
    """`finals`: variant -> the final metrics of each of its seeds' runs (metrics/evaluate.json
    `final`). Metrics every run reports, in name order, or `metrics` as given."""
    runs = [run for per_variant in finals.values() for run in per_variant]
    shared = sorted(set.intersection(*(set(run) for run in runs))) if runs else []
    if metrics:
        if missing := [m for m in metrics if m not in shared]:
            raise ValueError(f"ablation.metrics: {', '.join(missing)} not in every run's final metrics "
                             f"(they have: {', '.join(shared)})")
        shared = list(metrics)
    out = []
    for metric in shared:
        cells = {variant: Cell(tuple(float(run[metric]) for run in per_variant)) for variant, per_variant in finals.items()}
        if (judged := judge(metric, cells)) is not None:
            out.append(judged)
    return out


def markdown_table(judged: list[MetricVerdict], variants: list[str], seeds: int) -> str:
    """The verdict as a Markdown table: mean [min, max] over seeds per variant, the outcome."""
    head = "| metric | better | " + " | ".join(variants) + " | verdict |"
    rule = "|---|---|" + "---|" * len(variants) + "---|"
    lines = [head, rule]
    for v in judged:
        cells = " | ".join(("**" + v.cells[name].text() + "**") if name == v.winner else v.cells[name].text() for name in variants)
        lines.append(f"| {v.metric} | {'higher' if v.higher_is_better else 'lower'} | {cells} | {v.outcome} |")
    note = (f"Mean over {seeds} seeds, [min, max] in brackets. A variant wins a metric only when its gap to the "
            "runner-up is larger than the wider spread (max - min) of the two; otherwise: no difference.")
    if seeds == 1:
        note = "One seed: there is no spread, so every gap counts as a win; run >= 2 seeds (ablation.seeds) for a verdict."
    return "\n".join(lines) + "\n\n" + note + "\n"


def wins(judged: list[MetricVerdict]) -> dict[str, int]:
    """Metrics won per variant (ties count for nobody)."""
    counts: dict[str, int] = {}
    for v in judged:
        if v.winner and v.runner_up:
            counts[v.winner] = counts.get(v.winner, 0) + 1
    return counts
