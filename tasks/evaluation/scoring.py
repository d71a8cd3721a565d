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

# A user turn and a finished reply, with and without reasoning: how a template renders replies it trains.
_PROBE_USER = {"role": "user", "content": "Hi"}
_PROBE_REPLY = {True: "<think>\nGreet them back.\n</think>\n\nHello.", False: "Hello."}
END_OF_TURN_FALLBACK = "<|im_end|>"


def thinking_kwargs(tokenizer, enable_thinking: bool | None) -> dict[str, bool]:
    """`{"enable_thinking": ...}` for the chat template, or `{}` (its plain prompt) when None, or
    when the switch's prompt is not how the template begins a reply it renders in that mode.

    Stages train each reply on the template's render of it after the plain generation prompt.
    Qwen3's template writes an empty think block before a reply without reasoning, which is what its
    `enable_thinking=False` prompt ends with: the model answers after it as it learnt to. The tiny
    base's ChatML renders such a reply bare, so an empty block in its prompt is text it never saw
    there, and it keeps its plain prompt."""
    if enable_thinking is None:
        return {}
    reply = {"role": "assistant", "content": _PROBE_REPLY[enable_thinking]}
    try:
        prompt = tokenizer.apply_chat_template([_PROBE_USER], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=enable_thinking)
        trained = tokenizer.apply_chat_template([_PROBE_USER, reply], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe (needs a system turn...): plain prompt
        return {}
    return {"enable_thinking": enable_thinking} if trained.startswith(prompt) else {}


def reply_prompts(tokenizer, histories: list[list[dict]], enable_thinking: bool | None = None) -> list[str]:
    """Each history (the messages before the reply) rendered with the template's own generation
    prompt, as `tasks.core.chat.generation_prompt` renders it, with the thinking switch when it applies."""
    kwargs = thinking_kwargs(tokenizer, enable_thinking)
    return [tokenizer.apply_chat_template(h, tokenize=False, add_generation_prompt=True, **kwargs) for h in histories]


def stage_thinking(spec: StageSpec, cfg: EvaluateConfig) -> bool:
    """`evaluate.enable_thinking` for one stage: `auto` is the stage's checks.think_block."""
    return spec.checks.think_block if cfg.enable_thinking == "auto" else cfg.enable_thinking


def end_of_turn_token(tokenizer) -> str | None:
    """The token the chat template closes an assistant turn with: the added token right after a
    reply in its render (`<|im_end|>` in ChatML and Qwen3, `<|eot_id|>` in Llama 3), else
    `<|im_end|>` when the vocabulary has it."""
    added = tokenizer.get_added_vocab()
    marker = "\ue000reply\ue001"
    try:
        text = tokenizer.apply_chat_template([_PROBE_USER, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001
        text = ""
    tail = text.partition(marker)[2].lstrip()
    found = [token for token in added if tail.startswith(token)]
    if found:
        return max(found, key=len)
    return END_OF_TURN_FALLBACK if END_OF_TURN_FALLBACK in added else None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids generation stops at: the tokenizer's eos, the model's generation_config eos, and the
    template's end of turn. A Base model's generation_config names only `<|endoftext|>`, while a
    chat reply ends with `<|im_end|>`: without it every reply runs to max_new_tokens."""
    config = getattr(model, "generation_config", None)
    eot = end_of_turn_token(tokenizer)
    ids: list[int] = []
    for found in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None),
                  tokenizer.convert_tokens_to_ids(eot) if eot else None):
        for token_id in found if isinstance(found, (list, tuple)) else [found]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return ids


def generate_replies(model, tokenizer, prompts: list[str], cfg: EvaluateConfig) -> list[str]:
    """Greedy, batched, left-padded generation with the KV cache, stopping at the end of turn as
    well as at eos (`stop_token_ids`); batches halve on out-of-memory."""
    import torch

    from tasks.evaluation.batching import run_in_batches

    tokenizer.padding_side = "left"
    model.eval()
    stop = stop_token_ids(tokenizer, model)

    def generate(batch_prompts) -> list[str]:
        batch = tokenizer(list(batch_prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
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
    normalised exact match on SQL targets; any other chat stage -> ROUGE-L and reply lengths. All
    but `think_well_formed` and the lengths read the answer after any think block, empty or not."""
    from tasks.evaluation import answers, structured, text

    n = len(replies)
    out: dict[str, float] = {}
    if spec.checks.think_block:
        out["exact_match"] = sum(answers.answers_match(r, ref) for r, ref in zip(replies, references)) / n
        out["think_well_formed"] = sum(map(answers.think_well_formed, replies)) / n
    # the rest reads what follows any think block, empty or not (see answers.final_reply)
    pairs = [(answers.final_reply(r), answers.final_reply(ref)) for r, ref in zip(replies, references)]
    if spec.checks.json_target:
        out["json_valid"] = sum(structured.parses_as_json(r) for r, _ in pairs) / n
        slotted = [(r, ref) for r, ref in pairs if structured.intent_and_slots(ref) is not None]
        if slotted:
            counts = sum((structured.slot_counts(r, ref) for r, ref in slotted), structured.SlotCounts())
            out |= {f"slot_{k}": v for k, v in structured.prf(counts).items()}
            out["intent_accuracy"] = sum(structured.intent_matches(r, ref) for r, ref in slotted) / len(slotted)
        sql = [(r, ref) for r, ref in pairs if structured.looks_like_sql(ref)]
        if sql:
            out["sql_exact_match"] = sum(structured.sql_exact_match(r, ref) for r, ref in sql) / len(sql)
    if not (spec.checks.think_block or spec.checks.json_target):
        out["rouge_l"] = sum(text.rouge_l(r, ref) for r, ref in pairs) / n
        out |= {f"reply_{k}": v for k, v in text.length_stats(replies).items()}  # whole replies: thinking costs time too
    return out


def generation_metrics(model, tokenizer, stages: dict[str, StageSpec], cfg: EvaluateConfig,
                       only: list[str] | None = None, samples: list[dict] | None = None) -> dict[str, float]:
    """`<stage>_<score>` for every chat stage in `only` (None: all), from greedy replies to its
    eval prompts (thinking per `evaluate.enable_thinking`); the first `cfg.samples` replies per
    stage are appended to `samples`."""
    metrics: dict[str, float] = {}
    for stage, spec in stages.items():
        if spec.kind != "sft" or (only is not None and stage not in only):
            continue
        conversations = eval_records(stage, cfg.max_generate)
        if not conversations:
            continue
        histories = [m[: max(i for i, turn in enumerate(m) if turn["role"] == "assistant")] for m in conversations]
        prompts = reply_prompts(tokenizer, histories, stage_thinking(spec, cfg))
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
