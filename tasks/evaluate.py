"""`evaluate` stage: every model of the curriculum scored with the same code.

The base and the model after each stage, on every stage's eval split: loss and perplexity over
trainable tokens, which form the forgetting matrix (`metrics/evaluate.json`, `plots/forgetting.csv`
for `dvc plots`, `reports/evaluation/forgetting.png`). By generation (greedy, batched, with the KV
cache; batches shrink on out-of-memory), scored per chat stage by its data contract (see
`reply_scores`): final-answer exact match and well-formed `<think>` blocks, valid JSON with slot
precision/recall/F1 and SQL exact match, or ROUGE-L and reply lengths. The base and the final
model are scored on every eval set; each stage's model on its own. A few replies per eval set go
to `reports/evaluation/generations.jsonl` for people to read. Tasks of lm-evaluation-harness listed
in `evaluate.lm_eval.tasks` run on the final model too (`lm_eval.<task>.<metric>`;
tasks/evaluation/harness.py).

    python -m tasks.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from prefect import task

from tasks.core import paths
from tasks.core.cli import run_stage_cli
from tasks.core.config import DataStageSpec, EvaluateConfig, Params, load_params
from tasks.core.records import write_json

def generate_replies(model, tokenizer, prompts: list[str], cfg: EvaluateConfig) -> list[str]:
    """Greedy, batched, left-padded generation with the KV cache; batches halve on out-of-memory."""
    import torch

    from tasks.evaluation.batching import run_in_batches

    tokenizer.padding_side = "left"
    model.eval()

    def generate(batch_prompts) -> list[str]:
        batch = tokenizer(list(batch_prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    return run_in_batches(prompts, cfg.batch_size, generate)


def eval_records(stage: str, limit: int) -> list[list[dict]]:
    """Conversations of the stage's eval split, in a stable order, at most `limit`."""
    import pyarrow.parquet as pq

    rows = pq.read_table(paths.prepared_file(stage, "eval"), columns=["record_json"]).to_pylist()
    records = [json.loads(r["record_json"]) for r in rows]
    return [r["messages"] for r in records if "messages" in r][:limit]


def reply_scores(spec: DataStageSpec, replies: list[str], references: list[str]) -> dict[str, float]:
    """What a stage's replies are scored on, by its data contract and its targets' shape:
    `think_block` -> final-answer exact match and well-formed `<think>`; `json_target` -> valid
    JSON, plus slot precision/recall/F1 and intent accuracy on `{"intent", "slots"}` targets and
    normalised exact match on SQL targets; any other chat stage -> ROUGE-L and reply lengths."""
    from tasks.evaluation import answers, structured, text

    n = len(replies)
    out: dict[str, float] = {}
    if spec.checks.think_block:
        out["exact_match"] = sum(answers.answers_match(r, ref) for r, ref in zip(replies, references)) / n
        out["think_well_formed"] = sum(map(answers.think_well_formed, replies)) / n
    if spec.checks.json_target:
        out["json_valid"] = sum(map(structured.parses_as_json, replies)) / n
        slotted = [(r, ref) for r, ref in zip(replies, references) if structured.intent_and_slots(ref) is not None]
        if slotted:
            counts = sum((structured.slot_counts(r, ref) for r, ref in slotted), structured.SlotCounts())
            out |= {f"slot_{k}": v for k, v in structured.prf(counts).items()}
            out["intent_accuracy"] = sum(structured.intent_matches(r, ref) for r, ref in slotted) / len(slotted)
        sql = [(r, ref) for r, ref in zip(replies, references) if structured.looks_like_sql(ref)]
        if sql:
            out["sql_exact_match"] = sum(structured.sql_exact_match(r, ref) for r, ref in sql) / len(sql)
    if not (spec.checks.think_block or spec.checks.json_target):
        out["rouge_l"] = sum(text.rouge_l(r, ref) for r, ref in zip(replies, references)) / n
        out |= {f"reply_{k}": v for k, v in text.length_stats(replies).items()}
    return out


def generation_metrics(model, tokenizer, params: Params, stages: list[str] | None = None,
                       samples: list[dict] | None = None) -> dict[str, float]:
    """`<stage>_<score>` for every chat stage in `stages` (None: all), from greedy replies to its
    eval prompts; the first `evaluate.samples` replies per stage are appended to `samples`."""
    from tasks.core.chat import generation_prompt

    metrics: dict[str, float] = {}
    for stage, spec in params.data.stages.items():
        if spec.kind != "sft" or (stages is not None and stage not in stages):
            continue
        conversations = eval_records(stage, params.evaluate.max_generate)
        if not conversations:
            continue
        prompts = [generation_prompt(tokenizer, m) for m in conversations]
        replies = generate_replies(model, tokenizer, prompts, params.evaluate)
        references = [m[-1]["content"] for m in conversations]
        metrics |= {f"{stage}_{k}": v for k, v in reply_scores(spec, replies, references).items()}
        if samples is not None:
            samples += [{"eval_set": stage, "prompt": p, "reference": ref, "reply": r}
                        for p, ref, r in list(zip(prompts, references, replies))[: params.evaluate.samples]]
    return metrics


def eval_losses(model, tokenizer, params: Params) -> dict[str, float]:
    """Eval loss and perplexity of one model on every stage's eval split."""
    from tasks.train import mean_token_loss, read_rows

    scores: dict[str, float] = {}
    for stage in params.stage_names:
        loss = mean_token_loss(model, read_rows(stage, "eval"), tokenizer.pad_token_id, params.evaluate.batch_size)
        scores[f"{stage}_eval_loss"] = round(loss, 6)
        scores[f"{stage}_perplexity"] = round(math.exp(min(loss, 50.0)), 6)
    return scores


def score_model(model, tokenizer, params: Params, generate_for: list[str] | None = None,
                samples: list[dict] | None = None, losses: bool = True) -> dict[str, float]:
    """Losses on every eval split (`losses=False`: none, for a model whose tokenizer differs from
    the one the splits were tokenized with), and generation metrics on `generate_for` (None: every stage)."""
    generated = generation_metrics(model, tokenizer, params, generate_for, samples)
    scored = eval_losses(model, tokenizer, params) if losses else {}
    return scored | {k: round(v, 6) for k, v in generated.items()}


def evaluate_pipeline(params: Params) -> dict:
    """Every model of the curriculum on every stage's eval split, with the same code.

    Rows: the base and the model after each stage (its chain rebuilt as it was trained). Each row
    has every eval loss (the forgetting matrix); generation metrics run on every eval set for the
    base and the final model, and on its own stage's set for the models in between (did the stage
    teach what it was for). `base` and `final` keep the shape the promotion gates read."""
    import torch

    from tasks.core.chain import load_stage_model
    from tasks.core.modeling import BaseInfo, load_base_model, load_tokenizer
    from tasks.evaluation.forgetting import change_since_trained
    from tasks.evaluation.harness import require_harness

    require_harness(params.evaluate.lm_eval)
    torch.manual_seed(params.seed)
    info = BaseInfo.load()
    tokenizer = load_tokenizer(info)
    final, quantization = params.train.final_stage, params.train.quantization
    samples: dict[str, list[dict]] = {"base": [], final: []}
    rows = {"base": score_model(load_base_model(info, quantization), tokenizer, params, None, samples["base"])}
    harness: dict[str, dict[str, float]] = {}
    for stage in params.stage_names:
        own = None if stage == final else [stage]
        stage_model = load_stage_model(info, stage, quantization)
        rows[stage] = score_model(stage_model, tokenizer, params, own, samples.get(stage))
        if stage == final and params.evaluate.lm_eval.tasks:  # the model is loaded now: no second load
            from tasks.evaluation.harness import harness_scores

            harness = harness_scores(stage_model, tokenizer, params.evaluate.lm_eval)
    matrix = {row: {s: scores[f"{s}_eval_loss"] for s in params.stage_names} for row, scores in rows.items()}
    return {
        "base": rows["base"],
        "final": rows[final],
        "final_stage": final,
        "after": {stage: rows[stage] for stage in params.stage_names},
        "forgetting": matrix,
        "forgetting_change": change_since_trained(matrix, params.stage_names),
        "samples": [{"model": model, **row} for model, rows_ in samples.items() for row in rows_],
    } | ({"lm_eval": harness} if harness else {})


def write_metrics(results: dict, path: Path = paths.EVALUATE_METRICS) -> None:
    """The scores, the forgetting matrix as a `dvc plots` CSV and a heatmap, and sample replies."""
    from tasks.evaluation.forgetting import write_csv, write_heatmap

    results = dict(results)
    samples = results.pop("samples", [])
    write_json(path, results)
    paths.GENERATION_SAMPLES.parent.mkdir(parents=True, exist_ok=True)
    paths.GENERATION_SAMPLES.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    write_csv(results["forgetting"], paths.FORGETTING_PLOT)
    write_heatmap(results["forgetting"], paths.FORGETTING_HEATMAP)


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
        ] + [f"evaluate: lm_eval.{task}.{metric} {value:.4f}"
             for task, row in sorted(results.get("lm_eval", {}).items()) for metric, value in sorted(row.items())]

    return run_stage_cli("evaluate", __doc__, run, argv)

if __name__ == "__main__":
    sys.exit(main())
