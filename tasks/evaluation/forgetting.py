"""The forgetting matrix: every model of the curriculum scored on every stage's eval split.

Rows are the models (`base`, then the model after each stage), columns the eval sets; a cell is
the eval loss (mean over trainable tokens). Reading down a column shows what a stage taught and
what later stages cost it. Written as JSON (metrics), as long-format CSV (`dvc plots`) and as a
heatmap PNG (MLflow, the model card).
"""

from __future__ import annotations

import csv
from pathlib import Path

Matrix = dict[str, dict[str, float]]  # row (model) -> column (eval set) -> eval loss


def forgetting_rows(matrix: Matrix) -> list[dict[str, object]]:
    """Long format, one row per cell, in curriculum order: what `dvc plots` and tables read."""
    return [
        {"after": row, "eval_set": column, "eval_loss": value}
        for row, cells in matrix.items()
        for column, value in cells.items()
    ]


def write_csv(matrix: Matrix, path: Path) -> None:
    """Wide format for `dvc plots`: one line per model (`after`), one column per eval set."""
    columns = list(next(iter(matrix.values())))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["after", *columns])
        writer.writeheader()
        writer.writerows({"after": row, **cells} for row, cells in matrix.items())


def change_since_trained(matrix: Matrix, stages: list[str]) -> dict[str, float]:
    """Per eval set: its loss after the last stage minus its loss right after its own stage
    (positive: later stages made the model forget some of it)."""
    last = stages[-1]
    return {stage: round(matrix[last][stage] - matrix[stage][stage], 6) for stage in stages if stage in matrix}


def write_heatmap(matrix: Matrix, path: Path, title: str = "eval loss (rows: model after stage; columns: eval set)") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    rows = list(matrix)
    columns = list(next(iter(matrix.values())))
    values = [[matrix[r][c] for c in columns] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 1.2 + 0.6 * len(rows)))
    image = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
