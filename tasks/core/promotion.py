"""Who becomes `champion`: the promotion gate of `register`, as a pure decision.

A new version always becomes `challenger`. It takes `champion` only if every gate metric passes its
threshold (a minimum: gate metrics are higher-is-better scores such as exact match or JSON
validity) and no gate metric is worse than the current champion's by more than the tolerance. The
champion's scores must come from the same eval sets: `register` passes them only when they do.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChampionScores:
    version: str
    scores: dict[str, float]
    basis: str  # how they were obtained, e.g. "same eval data (stored scores)"


@dataclass
class Decision:
    promoted: bool
    reasons: list[str] = field(default_factory=list)  # why not, or what it beat

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)


def threshold_failures(final: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    reasons = []
    for metric, minimum in sorted(thresholds.items()):
        value = final.get(metric)
        if value is None:
            reasons.append(f"{metric}: not measured (metrics/evaluate.json has no such score)")
        elif value < minimum:
            reasons.append(f"{metric}: {value:.4f} < threshold {minimum}")
    return reasons


def champion_regressions(final: dict[str, float], champion: ChampionScores, metrics: list[str],
                         tolerance: float) -> list[str]:
    reasons = []
    for metric in sorted(metrics):
        ours, theirs = final.get(metric), champion.scores.get(metric)
        if ours is None or theirs is None:
            continue  # not measured on one side: the threshold check speaks for it
        if ours < theirs - tolerance:
            reasons.append(f"{metric}: {ours:.4f} < champion v{champion.version}'s {theirs:.4f} - tolerance {tolerance}")
    return reasons


def decide(final: dict[str, float], thresholds: dict[str, float], champion: ChampionScores | None,
           tolerance: float) -> Decision:
    """Promote when every threshold passes and nothing regresses against the champion."""
    failures = threshold_failures(final, thresholds)
    if champion is not None:
        failures += champion_regressions(final, champion, list(thresholds), tolerance)
    if failures:
        return Decision(False, failures)
    if champion is None:
        return Decision(True, ["all thresholds passed; no champion before"])
    return Decision(True, [f"all thresholds passed; not worse than champion v{champion.version} ({champion.basis})"])
