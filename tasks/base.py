"""`base` stage: resolve the base model every LoRA stage adapts.

Default (`model.name_or_path: null`): train a byte-level BPE tokenizer on the `embedding` corpus,
build a tiny Qwen3-MoE from `model.tiny`, pretrain it fully on that corpus, and save both to
`models/base/`. With `model.name_or_path` set, only resolve and record it: nothing is downloaded,
and a local folder is checked (from its small files, no weights loaded) to hold what later stages
load: config.json transformers can build without remote code, safetensors, a tokenizer, a chat template.

    python -m tasks.base [--params params.yaml]
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from tasks.core import paths
from tasks.core.cli import exit_now, run_stage_cli
from tasks.core.config import CleanConfig, CopyWarmupConfig, Params, StageSpec, TinyModelConfig, load_params
from tasks.core.modeling import (
    BaseInfo,
    build_tiny_model,
    check_model_folder,
    resolve_external,
    train_tokenizer,
)
from tasks.core.records import read_jsonl, write_json
from tasks.core.trainer import Schedule, TrainingSummary, run_trainer

log = logging.getLogger(__name__)


def pack_for_pretraining(token_lists: list[list[int]], length: int) -> list[dict[str, list[int]]]:
    """Concatenate documents (each already ending in end-of-text) and cut fixed-length rows."""
    stream = [t for ids in token_lists for t in ids]
    rows = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
    if not rows and stream:  # a corpus shorter than one row still trains
        rows = [stream]
    return [{"input_ids": r, "labels": r} for r in rows]


def with_chat_markup(texts: list[str], share: float, seed: int) -> list[str]:
    """Wrap a share of documents in ChatML turns, some sentences in think blocks.

    A real base model (Qwen3-Base included) has seen its chat-template tokens in pretraining; this
    gives the tiny base the same footing, so the SFT stages teach behaviour, not new token
    embeddings. The content stays the raw corpus: no stage's task is taught here.
    """
    import random

    from tasks.core.modeling import IM_END, IM_START, THINK_CLOSE, THINK_OPEN

    rng = random.Random(f"{seed}:chat-markup")
    out = []
    for text in texts:
        sentences = [s.strip() + "." for s in text.split(". ") if s.strip()]
        if len(sentences) < 2 or rng.random() >= share:
            out.append(text)
            continue
        cut = rng.randint(1, len(sentences) - 1)
        reply = " ".join(sentences[cut:])
        if rng.random() < 0.5:
            reply = f"{THINK_OPEN}\n{sentences[cut - 1]}\n{THINK_CLOSE}\n{reply}"
        out.append(f"{IM_START}user\n{' '.join(sentences[:cut])}{IM_END}\n{IM_START}assistant\n{reply}{IM_END}\n")
    return out


def copy_warmup(model, tokenizer, token_lists: list[list[int]], cfg: CopyWarmupConfig, seed: int) -> TrainingSummary:
    """Teach the fresh model to copy before it reads the corpus (see CopyWarmupConfig for why).

    A constant learning rate: the copying heads form late in the warm-up, so a decaying rate
    would starve the steps that matter.
    """
    from tasks.data.copy_rows import copy_rows, copy_token_pool

    pool = copy_token_pool(token_lists, tokenizer.all_special_ids)
    rows = copy_rows(pool, cfg.steps * cfg.batch_size, cfg.row_length, cfg.min_span, cfg.max_span,
                     tokenizer.eos_token_id, seed)
    schedule = Schedule(max_steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                        warmup_ratio=0.0, seed=seed, lr_scheduler="constant")
    log.info("copy warm-up: %d steps on spans of %d-%d of %d corpus tokens, said twice", cfg.steps,
             cfg.min_span, cfg.max_span, len(pool))
    with tempfile.TemporaryDirectory() as work:
        return run_trainer(model, rows, schedule, tokenizer.pad_token_id, Path(work))


def build_tiny_base(tiny: TinyModelConfig, corpus: list[str], seed: int, out_dir: Path = paths.BASE_DIR) -> BaseInfo:
    """Tokenizer + tiny Qwen3-MoE, pretrained on the corpus, saved as safetensors."""
    from tasks.core.chat import encode_text

    texts = with_chat_markup(corpus, tiny.pretrain.chat_markup_share, seed)
    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    model = build_tiny_model(tiny, tokenizer, seed)
    token_lists = [encode_text(tokenizer, t).input_ids for t in texts]
    record: dict = {}
    if tiny.pretrain.copy_warmup.steps:
        warmup = copy_warmup(model, tokenizer, token_lists, tiny.pretrain.copy_warmup, seed)
        record["copy_warmup"] = warmup.metrics() | {"history": warmup.history}
    rows = pack_for_pretraining(token_lists, tiny.pretrain.max_length)
    schedule = Schedule(
        max_steps=tiny.pretrain.max_steps,
        batch_size=tiny.pretrain.batch_size,
        learning_rate=tiny.pretrain.learning_rate,
        warmup_ratio=tiny.pretrain.warmup_ratio,
        seed=seed,
    )
    log.info("pretraining tiny base: %d params, %d rows of %d tokens", model.num_parameters(), len(rows), tiny.pretrain.max_length)
    with tempfile.TemporaryDirectory() as work:
        summary = run_trainer(model, rows, schedule, tokenizer.pad_token_id, Path(work))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_json(out_dir / "pretrain.json", summary.metrics() | {"history": summary.history} | record)
    return BaseInfo(kind="tiny", name_or_path=str(out_dir), num_parameters=model.num_parameters())


def pretraining_texts(corpus_stage: str, clean: CleanConfig, eval_fraction: float) -> list[str]:
    """The corpus stage's texts, cleaned as `prepare` cleans them, that `prepare` will put in the
    train split (decided on the cleaned content, as `prepare` decides it): its eval split must stay
    unseen by the base, or the base's eval perplexity is measured on training data."""
    from tasks.data.clean import final_content
    from tasks.data.split import split_of_cleaned

    kept = [final_content({"text": rec["text"]}, clean)[0] for rec in read_jsonl(paths.raw_file(corpus_stage))]
    return [record["text"] for record in kept if split_of_cleaned(record, eval_fraction) == "train"]


def corpus_stage(stages: dict[str, StageSpec]) -> str:
    """The stage whose raw text pretrains the tiny base: the first `pretrain` stage of the plan."""
    for name, spec in stages.items():
        if spec.kind == "pretrain":
            return name
    return next(iter(stages))


def resolve_base(params: Params, out_dir: Path = paths.BASE_DIR) -> BaseInfo:
    """Resolve (or build) the base model."""
    import dataclasses

    if params.model.name_or_path:
        local = Path(params.model.name_or_path).expanduser()
        if local.is_dir():  # a hub id is only recorded; a folder is checked now, not when training loads it
            sft = [name for name, spec in params.stages.items() if spec.kind == "sft"]
            check_model_folder(local, params.model.trust_remote_code, sft)
        info = resolve_external(params.model)
    else:
        corpus = pretraining_texts(corpus_stage(params.stages), params.prepare.clean, params.prepare.eval_fraction)
        info = build_tiny_base(params.model.tiny, corpus, params.seed, out_dir)
    info = dataclasses.replace(info, added_tokens=list(params.model.add_tokens))
    info.save(out_dir)
    return info


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        info = resolve_base(load_params(args.params))
        return [f"base: {info.kind} model at {info.name_or_path} ({info.num_parameters or '?'} parameters)"]

    return run_stage_cli("base", __doc__, run, argv)

if __name__ == "__main__":
    exit_now(main())
