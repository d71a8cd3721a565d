"""Where each step reads and writes, relative to the project root.

These mirror the deps and outs in `dvc.yaml`; change both together.
"""

from __future__ import annotations

from pathlib import Path

SOURCES_DIR = Path("data/sources")  # user-provided stage files live here so DVC hashes them
BENCHMARKS_DIR = Path("data/benchmarks")  # prepare.decontaminate.benchmark_files: a dep of prepare
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
BASE_DIR = MODELS_DIR / "base"
VALIDATION_DIR = Path("reports/validation")
TRAIN_METRICS_DIR = Path("metrics/train")
EVALUATE_METRICS = Path("metrics/evaluate.json")
EVALUATION_DIR = Path("reports/evaluation")
FORGETTING_PLOT = Path("plots/forgetting.csv")  # `dvc plots show`: eval loss of each set after each stage
FORGETTING_HEATMAP = EVALUATION_DIR / "forgetting.png"
GENERATION_SAMPLES = EVALUATION_DIR / "generations.jsonl"  # a few replies per eval set, next to references
REGISTRATION_REPORT = Path("reports/registration.json")
# The final model merged into one checkpoint (`export`). Not under models/: `evaluate` and
# `export` depend on models/, and DVC refuses an output inside a stage's own dependency.
EXPORT_DIR = Path("exports")
MERGED_DIR = EXPORT_DIR / "merged"
MERGE_INFO = MERGED_DIR / "merge.json"
EXPORT_METRICS = Path("metrics/export.json")

SPLITS = ("train", "eval")


def raw_file(stage: str) -> Path:
    return RAW_DIR / f"{stage}.jsonl"


def prepared_file(stage: str, split: str) -> Path:
    return PREPARED_DIR / stage / f"{split}.parquet"


def adapter_dir(stage: str) -> Path:
    return MODELS_DIR / stage


def model_dir(name: str) -> Path:
    """`base` or a stage name: where that model (base weights or stage adapter) lives."""
    return BASE_DIR if name == "base" else adapter_dir(name)


def validation_report(stage: str) -> Path:
    return VALIDATION_DIR / f"{stage}.json"


# Great Expectations Data Docs (HTML) of the last validate run: every stage's results, one site.
VALIDATION_DOCS_DIR = VALIDATION_DIR / "docs"
VALIDATION_DOCS_INDEX = VALIDATION_DOCS_DIR / "index.html"


def train_metrics(stage: str) -> Path:
    return TRAIN_METRICS_DIR / f"{stage}.json"


TRAIN_HISTORY_DIR = Path("logs/train")


def train_history(stage: str) -> Path:
    """Per-step metrics of a training stage, one JSON object a line."""
    return TRAIN_HISTORY_DIR / f"{stage}.jsonl"


CHECKPOINTS_DIR = Path("checkpoints")  # not a DVC output: DVC clears outputs before a stage runs


def checkpoint_dir(stage: str, run_key: str) -> Path:
    """Checkpoints of one stage for one exact set of inputs and settings."""
    return CHECKPOINTS_DIR / stage / run_key


def raw_rejects(stage: str) -> Path:
    """Items of a stage's sources that `ingest` dropped or repaired, with the reason."""
    return RAW_DIR / f"{stage}.rejects.jsonl"


def raw_report(stage: str) -> Path:
    return RAW_DIR / f"{stage}.report.json"


def prepared_rejects(stage: str) -> Path:
    """Everything dropped or changed on the way to training: ingest's rejects plus prepare's."""
    return PREPARED_DIR / stage / "rejects.jsonl"


def packed_file(stage: str) -> Path:
    return PREPARED_DIR / stage / "train_packed.parquet"


DATA_REPORT = Path("metrics/data.json")  # per stage: counts per reason, tokens, packing efficiency
