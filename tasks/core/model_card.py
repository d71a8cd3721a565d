"""The model card of a registered version (README.md next to its adapter): what it scores against
the base and the champion, what each stage cost the others, what data it saw, how it was trained,
and where it came from."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.core.config import LoraConfig, StageSpec, TrainConfig
    from tasks.core.promotion import ChampionScores, Decision


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def metrics_section(scores: dict, champion: ChampionScores | None) -> str:
    header = ["metric", "base", "this version"] + ([f"champion v{champion.version}"] if champion else [])
    rows = []
    for metric in sorted(scores["final"]):
        row = [metric, _num(scores["base"].get(metric)), _num(scores["final"][metric])]
        rows.append(row + ([_num(champion.scores.get(metric))] if champion else []))
    return "## Scores (same eval sets, same code)\n\n" + _table(header, rows)


def forgetting_section(scores: dict) -> str:
    matrix = scores.get("forgetting") or {}
    if not matrix:
        return ""
    columns = list(next(iter(matrix.values())))
    rows = [[row, *(_num(cells[c]) for c in columns)] for row, cells in matrix.items()]
    change = scores.get("forgetting_change", {})
    note = ", ".join(f"{k} {v:+.4f}" for k, v in change.items())
    return ("## Forgetting (eval loss; rows: model after stage, columns: eval set)\n\n"
            + _table(["after", *columns], rows)
            + f"\n\nLoss after the last stage minus loss right after its own stage: {note}.\n\n![forgetting](forgetting.png)")


def data_section(stages: dict[str, StageSpec], data_report: dict) -> str:
    rows = []
    for stage, spec in stages.items():
        data = spec.data
        sources = ", ".join(f"`{s.path}` ({s.preset or 'default'})" for s in data.sources) or f"synthetic ({data.n_records})"
        report = data_report.get(stage, {})
        rows.append([stage, spec.kind, sources, str(report.get("train_rows", "–")), str(report.get("eval_rows", "–"))])
    return "## Data\n\n" + _table(["stage", "kind", "sources", "train rows", "eval rows"], rows)


def plan_section(stages: dict[str, StageSpec], shared_lora: LoraConfig, chain_policy: str, quantization: str) -> str:
    rows = []
    for stage, spec in stages.items():
        lora, train = spec.train.lora or shared_lora, spec.train
        rows.append([stage, spec.init_from, str(train.max_steps), str(train.batch_size), f"{train.learning_rate:g}",
                     f"r {lora.r}, alpha {lora.alpha:g}, {len(lora.target_parameters)} expert params"])
    policy = f"chain policy `{chain_policy}`, quantization `{quantization}`"
    return "## Stage plan\n\n" + _table(["stage", "init from", "steps", "batch", "lr", "LoRA"], rows) + f"\n\n{policy}."


def cost_section(stages: list[str]) -> str:
    """What training the chain cost, stage by stage (tasks/core/cost.py)."""
    from tasks.core.cost import chain_gpu_hours, cost_table

    header = ["stage", "devices", "wall time", "GPU-hours", "tokens trained", "tokens/s"]
    return (f"## Cost\n\n{_table(header, cost_table(stages))}\n\n"
            f"GPU-hours across the chain: {chain_gpu_hours(stages):.4f} (devices x wall time of each stage's run).")


def render_card(name: str, stages: dict[str, StageSpec], train: TrainConfig, scores: dict, data_report: dict, champion: ChampionScores | None,
                decision: Decision, tags: dict[str, str]) -> str:
    verdict = "promoted to `champion`" if decision.promoted else "kept as `challenger` (not promoted)"
    lineage = "\n".join(f"- `{k}`: {v}" for k, v in sorted(tags.items()) if not k.startswith("gate"))
    sections = [
        f"# {name}\n\nA stagewise curriculum model (final stage `{list(stages)[-1]}`): {verdict}.\n\n"
        f"Gate: {decision.summary}.",
        metrics_section(scores, champion),
        forgetting_section(scores),
        data_section(stages, data_report),
        plan_section(stages, train.lora, train.chain_policy, train.quantization),
        cost_section(list(stages)),
        "## Lineage\n\n" + lineage,
    ]
    return "\n\n".join(s for s in sections if s) + "\n"
