"""`evaluate` stage: score the base model and the final adapter with the same code.

Per stage eval split: loss and perplexity over trainable tokens. By generation (greedy): exact
match of the final answer and well-formed `<think>` blocks on stages whose data contract has
`checks.think_block`, and the share of outputs that parse as JSON where it has `checks.json_target`.

    python -m tasks.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
import math
import re
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from prefect import task

from tasks.core import paths
from tasks.core.cli import run_stage_cli
from tasks.core.config import EvaluateConfig, Params, load_params
from tasks.core.records import write_json

_ANSWER = re.compile(r"answer is\s*:?\s*\$?((?<![\w-])-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"(?:(?<![\w-])-)?\d[\d,]*\.?\d*")


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: after `</think>` if present, `answer is N` first,
    else `#### N`, else the last number. Numbers are normalised (no commas, no trailing .0)."""
    tail = text.split("</think>")[-1]
    found = _ANSWER.search(tail)
    if found is None and "####" in tail:
        found = _NUMBER.search(tail.split("####")[-1])
        value = found.group(0) if found else None
    elif found is not None:
        value = found.group(1)
    else:
        numbers = _NUMBER.findall(tail)
        value = numbers[-1] if numbers else None
    if value is None:
        return None
    value = value.replace(",", "").rstrip(".")
    try:
        number = Decimal(value)  # exact: long integers must not round through float
    except InvalidOperation:
        return None
    return str(int(number)) if number == number.to_integral_value() else str(number.normalize())


def parses_as_json(text: str) -> bool:
    try:
        json.loads(text.strip())
    except ValueError:
        return False
    return True


def generate_replies(model, tokenizer, prompts: list[str], cfg: EvaluateConfig) -> list[str]:
    """Greedy, batched, left-padded generation with the KV cache."""
    import torch

    tokenizer.padding_side = "left"
    replies: list[str] = []
    model.eval()
    for i in range(0, len(prompts), cfg.batch_size):
        batch = tokenizer(prompts[i : i + cfg.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        replies += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return replies


def eval_records(stage: str, limit: int) -> list[list[dict]]:
    """Conversations of the stage's eval split, in a stable order, at most `limit`."""
    import pyarrow.parquet as pq

    rows = pq.read_table(paths.prepared_file(stage, "eval"), columns=["record_json"]).to_pylist()
    records = [json.loads(r["record_json"]) for r in rows]
    return [r["messages"] for r in records if "messages" in r][:limit]


def generation_metrics(model, tokenizer, params: Params) -> dict[str, float]:
    """Scores that need generated replies, for the stages whose data contract asks for them:
    `<stage>_exact_match` and `<stage>_think_well_formed` where `checks.think_block`,
    `<stage>_json_valid` where `checks.json_target`."""
    from tasks.core.chat import generation_prompt

    metrics: dict[str, float] = {}
    for stage, spec in params.data.stages.items():
        if not (spec.checks.think_block or spec.checks.json_target):
            continue
        conversations = eval_records(stage, params.evaluate.max_generate)
        if not conversations:
            continue
        prompts = [generation_prompt(tokenizer, m) for m in conversations]
        replies = generate_replies(model, tokenizer, prompts, params.evaluate)
        references = [m[-1]["content"] for m in conversations]
        if spec.checks.think_block:
            answers = [extract_answer(r) for r in replies]
            hits = [a is not None and a == extract_answer(ref) for a, ref in zip(answers, references)]
            formed = ["<think>" in r and "</think>" in r.split("<think>", 1)[-1] for r in replies]
            metrics[f"{stage}_think_well_formed"] = sum(formed) / len(formed)
            metrics[f"{stage}_exact_match"] = sum(hits) / len(hits)
        if spec.checks.json_target:
            metrics[f"{stage}_json_valid"] = sum(map(parses_as_json, replies)) / len(replies)
    return metrics


def score_model(model, tokenizer, params: Params) -> dict[str, float]:
    from tasks.train import mean_token_loss, read_rows

    scores: dict[str, float] = {}
    for stage in params.stage_names:
        loss = mean_token_loss(model, read_rows(stage, "eval"), tokenizer.pad_token_id, params.evaluate.batch_size)
        scores[f"{stage}_eval_loss"] = round(loss, 6)
        scores[f"{stage}_perplexity"] = round(math.exp(min(loss, 50.0)), 6)
    generated = generation_metrics(model, tokenizer, params)
    return scores | {k: round(v, 6) for k, v in generated.items()}


def evaluate_pipeline(params: Params) -> dict[str, dict[str, float]]:
    """Scores of the base and of the final stage's adapter, on every stage's eval split."""
    import torch

    from tasks.core.chain import load_stage_model
    from tasks.core.modeling import BaseInfo, load_base_model, load_tokenizer

    torch.manual_seed(params.seed)
    info = BaseInfo.load()
    tokenizer = load_tokenizer(info)
    final = params.train.final_stage
    results = {}
    quantization = params.train.quantization
    for label, load in (("base", lambda: load_base_model(info, quantization)),
                        ("final", lambda: load_stage_model(info, final, quantization))):
        results[label] = score_model(load(), tokenizer, params)
    results["final_stage"] = final  # type: ignore[assignment]
    return results


def write_metrics(results: dict, path: Path = paths.EVALUATE_METRICS) -> None:
    write_json(path, results)


@task(name="evaluate")
def evaluate_task(params: Params) -> dict[str, dict[str, float]]:
    """Score the base and the final model."""
    results = evaluate_pipeline(params)
    write_metrics(results)
    return results


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        results = evaluate_pipeline(load_params(args.params))
        write_metrics(results)
        return [
            f"evaluate: {key:32s} base {results['base'][key]:10.4f}  final {results['final'][key]:10.4f}"
            for key in sorted(results["base"])
        ]

    return run_stage_cli("evaluate", __doc__, run, argv)

if __name__ == "__main__":
    sys.exit(main())
