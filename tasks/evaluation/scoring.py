"""Scoring one model on the prepared eval splits: losses over trainable tokens and metrics of its
greedy replies, per each stage's data contract. One module, so `train` (a stage's eval loss),
`evaluate` (every model of the curriculum), `register` (a re-scored champion) and `serve` (the
same generation) all measure with the same code.
"""

from __future__ import annotations

import json
import math

from tasks.core import paths
from tasks.core.config import EvaluateConfig, StageSpec


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


def reply_scores(spec: StageSpec, replies: list[str], references: list[str]) -> dict[str, float]:
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


def generation_metrics(model, tokenizer, stages: dict[str, StageSpec], cfg: EvaluateConfig,
                       only: list[str] | None = None, samples: list[dict] | None = None) -> dict[str, float]:
    """`<stage>_<score>` for every chat stage in `only` (None: all), from greedy replies to its
    eval prompts; the first `cfg.samples` replies per stage are appended to `samples`."""
    from tasks.core.chat import generation_prompt

    metrics: dict[str, float] = {}
    for stage, spec in stages.items():
        if spec.kind != "sft" or (only is not None and stage not in only):
            continue
        conversations = eval_records(stage, cfg.max_generate)
        if not conversations:
            continue
        prompts = [generation_prompt(tokenizer, m) for m in conversations]
        replies = generate_replies(model, tokenizer, prompts, cfg)
        references = [m[-1]["content"] for m in conversations]
        metrics |= {f"{stage}_{k}": v for k, v in reply_scores(spec, replies, references).items()}
        if samples is not None:
            samples += [{"eval_set": stage, "prompt": p, "reference": ref, "reply": r}
                        for p, ref, r in list(zip(prompts, references, replies))[: cfg.samples]]
    return metrics


def mean_token_loss(model, rows: list[dict], pad_token_id: int, batch_size: int = 16) -> float:
    """Loss averaged over trainable tokens (not over batches), so splits of any shape compare.
    Batches shrink on out-of-memory instead of failing the stage. `train` reports a stage's eval
    loss with it, and `evaluate` fills the forgetting matrix with it: one definition of the loss."""
    import torch

    from tasks.core.trainer import PadCollator
    from tasks.evaluation.batching import run_in_batches

    collate = PadCollator(pad_token_id)

    def batch_loss(batch_rows) -> list[tuple[float, int]]:
        batch = {k: v.to(model.device) for k, v in collate(list(batch_rows)).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return [(float(loss), int((shift_labels != -100).sum()))]

    model.eval()
    with torch.no_grad():
        parts = run_in_batches(rows, batch_size, batch_loss)
    return sum(total for total, _ in parts) / max(sum(count for _, count in parts), 1)


def eval_losses(model, tokenizer, stage_names: list[str], batch_size: int) -> dict[str, float]:
    """Eval loss and perplexity of one model on every stage's eval split."""
    from tasks.data.rows import read_rows

    scores: dict[str, float] = {}
    for stage in stage_names:
        loss = mean_token_loss(model, read_rows(stage, "eval"), tokenizer.pad_token_id, batch_size)
        scores[f"{stage}_eval_loss"] = round(loss, 6)
        scores[f"{stage}_perplexity"] = round(math.exp(min(loss, 50.0)), 6)
    return scores


def score_model(model, tokenizer, stages: dict[str, StageSpec], cfg: EvaluateConfig, generate_for: list[str] | None = None,
                samples: list[dict] | None = None, losses: bool = True) -> dict[str, float]:
    """Losses on every eval split (`losses=False`: none, for a model whose tokenizer differs from
    the one the splits were tokenized with), and generation metrics on `generate_for` (None: every stage).
    `evaluate` scores every model of the curriculum with it, and `register` a champion it re-scores."""
    generated = generation_metrics(model, tokenizer, stages, cfg, generate_for, samples)
    scored = eval_losses(model, tokenizer, list(stages), cfg.batch_size) if losses else {}
    return scored | {k: round(v, 6) for k, v in generated.items()}
