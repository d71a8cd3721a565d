"""The two-stage tiny chain of tests/chain_workspace.py, made something `evaluate` scores and
`register` registers, in seconds: chat eval splits (records and token rows), the files training and
validation leave for `register`, and params.yaml. Everything else (models, MLflow) is real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.chain_workspace import STAGES, build_chain, lora_config, raw_params

NAME = "stagewise-assistant"
# Chat pairs the tiny tokenizer knows the words of; each eval-data variant takes its own subset.
QA = [
    ("What is 2+2?", "The answer is 4."),
    ("Tom has 3 apples and buys 4 more.", "He has 7 apples."),
    ("Answer in JSON.", '{"name": "Ada", "age": 36}'),
    ("The quick brown fox", "jumps over the lazy dog."),
    ("Think step by step.", "Then give the final answer."),
    ("You are a helpful assistant.", "The answer is 4."),
]


def conversations(variant: int) -> list[list[dict]]:
    """Three conversations per variant, different for each variant (so the eval data hash differs)."""
    pairs = [QA[(variant + i) % len(QA)] for i in range(3)]
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]


def write_eval_splits(tokenizer, variant: int) -> None:
    """data/prepared/<stage>/eval.parquet as `prepare` writes it: token rows (every token trained
    on) and the record each came from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.core import paths
    from tasks.core.chat import render

    for i, stage in enumerate(STAGES):
        convs = conversations(variant + i)
        ids = [tokenizer(render(tokenizer, c), add_special_tokens=False)["input_ids"] for c in convs]
        table = pa.table({"input_ids": ids, "labels": ids,
                          "record_json": [json.dumps({"messages": c}) for c in convs]})
        paths.prepared_file(stage, "eval").parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, paths.prepared_file(stage, "eval"))


def write_training_records() -> None:
    """What train and validate leave behind for `register`: per-stage summary, step history,
    validation report."""
    from tasks.core import paths

    for stage in STAGES:
        for file, text in [(paths.train_metrics(stage), '{"loss": 1.5}\n'),
                           (paths.train_history(stage), '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'),
                           (paths.validation_report(stage), '{"success": true}\n')]:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text)


def project_params(**sections: dict[str, Any]) -> dict[str, Any]:
    """params.yaml of the chain: tiny generation settings, a gate on the last stage's ROUGE-L that
    any model passes (so the champion comparison decides), plus `sections` merged in."""
    raw = raw_params()
    raw["evaluate"] = {"batch_size": 4, "max_generate": 3, "max_new_tokens": 6, "samples": 1}
    raw["register"] = {"model_name": NAME, "thresholds": {"s2_rouge_l": 0.0}, "champion_tolerance": 1.0}
    for key, section in sections.items():
        raw[key] = raw.get(key, {}) | section
    return raw


def write_params(raw: dict[str, Any], file: Path = Path("params.yaml")) -> Path:
    file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return file


def build_project(root: Path, tokenizer) -> None:
    """The chain, eval variant 0, training records and params.yaml, in `root` (the cwd)."""
    from tests.conftest import UNIT_CORPUS

    build_chain(root, tokenizer, UNIT_CORPUS[:12])
    write_eval_splits(tokenizer, 0)
    write_training_records()
    write_params(project_params())


def redraw_adapter(stage: str, seed: int) -> None:
    """A different adapter for `stage` on the same chain (as retraining would give), so a new
    version's model differs from the registered one's."""
    import torch
    from peft import get_peft_model

    from tasks.core import paths
    from tasks.core.chain import base_with_chain, merged_chain_of
    from tasks.core.modeling import BaseInfo

    torch.manual_seed(seed)
    model = get_peft_model(base_with_chain(BaseInfo.load(), merged_chain_of(stage)), lora_config())
    model.save_pretrained(str(paths.adapter_dir(stage)), safe_serialization=True)
