"""`train@<stage>`: one LoRA (or QLoRA) stage of the curriculum.

The stage starts from `init_from`: a fresh adapter on the base, or the previous stage's adapter,
which it keeps training (`train.chain_policy: continue`) or merges into the base before training a
new adapter (`merge`). It writes the adapter (safetensors), a summary
metrics file and the per-step history that `register` logs to MLflow.

    python -m tasks.train <stage> [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from prefect import task

from tasks.core import paths
from tasks.core.chain import STAGE_INFO_FILE
from tasks.core.cli import run_stage_cli
from tasks.core.config import ConfigError, LoraConfig, Params, load_params
from tasks.core.launcher import (
    gathered_adapter_state,
    in_distributed_worker,
    is_main_process,
    process_rank,
    relaunch,
    world_size,
)
from tasks.core.preflight import PreflightError
from tasks.core.records import write_json
from tasks.core.trainer import Schedule, TrainingSummary, resolve_liger, resolve_optimizer, run_trainer

log = logging.getLogger(__name__)
PREFLIGHT_FILE = "preflight.json"


@dataclass(frozen=True)
class StageResult:
    stage: str
    init_from: str
    trainable_parameters: int
    eval_loss: float
    summary: TrainingSummary
    merged_chain: list[str]  # adapters merged into the base before this one was trained


def expand_target_parameters(model, names: list[str]) -> list[str]:
    """Short names (`mlp.experts.gate_up_proj`) -> every full parameter name they mean.

    peft matches a parameter that is already parametrized (as NF4 experts are) only by its full
    module path, so the suffixes users write in params.yaml are resolved against the model here.
    """
    full = []
    for module_name, module in model.named_modules():
        for name in names:
            owner, _, param = name.rpartition(".")
            if (module_name == owner or module_name.endswith(f".{owner}")) and getattr(module, param, None) is not None:
                full.append(f"{module_name}.{param}")
    return full


def peft_lora_config(cfg: LoraConfig, model=None):
    from peft import LoraConfig as PeftLoraConfig

    targets = list(cfg.target_parameters)
    if model is not None and targets:
        targets = expand_target_parameters(model, targets)
    tied = bool(model is not None and getattr(model.config, "tie_word_embeddings", False))
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        target_parameters=targets or None,
        modules_to_save=list(cfg.modules_to_save) or None,
        # a tied embedding and LM head trained in full must stay one matrix
        ensure_weight_tying=tied and bool(cfg.modules_to_save),
        bias="none",
        task_type="CAUSAL_LM",
    )


EMBEDDING_MODULES = ["embed_tokens", "lm_head"]


def stage_lora(stage: str, params: Params, info) -> LoraConfig:
    """The stage's LoRA settings; a first stage also trains the embeddings and LM head in full when
    `model.add_tokens` gave the tokenizer tokens the base had no embedding for."""
    from tasks.core.modeling import new_token_count

    lora = params.train.lora_for(stage)
    if params.train.stages[stage].init_from != "base" or not new_token_count(info):
        return lora
    extra = [m for m in EMBEDDING_MODULES if m not in lora.modules_to_save]
    log.info("train@%s: new tokens %s: training %s in full", stage, info.added_tokens, ", ".join(extra) or "them")
    return lora.model_copy(update={"modules_to_save": [*lora.modules_to_save, *extra]})


def attach_adapter(model, stage: str, params: Params, info=None):
    """A new adapter (on the base, or under `merge` on the base with earlier adapters merged in),
    or under `continue` the previous stage's adapter loaded for more training."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from tasks.core.modeling import BaseInfo

    spec = params.train.stages[stage]
    if params.train.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.init_from == "base" or params.train.chain_policy == "merge":
        lora = stage_lora(stage, params, info or BaseInfo.load())
        return get_peft_model(model, peft_lora_config(lora, model))
    previous = paths.adapter_dir(spec.init_from)
    if not (previous / "adapter_config.json").exists():
        raise FileNotFoundError(f"{previous} holds no adapter: run train@{spec.init_from} first")
    return PeftModel.from_pretrained(model, str(previous), is_trainable=True)


def read_rows(stage: str, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(paths.prepared_file(stage, split), columns=["input_ids", "labels"])
    return table.to_pylist()


def read_packed_rows(stage: str) -> list[dict]:
    """The stage's training rows as packed by `prepare` (records end to end, position ids per record)."""
    import pyarrow.parquet as pq

    path = paths.packed_file(stage)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train.packing needs prepare.packing.enabled: true")
    return pq.read_table(path, columns=["input_ids", "labels", "position_ids"]).to_pylist()


def mean_token_loss(model, rows: list[dict], pad_token_id: int, batch_size: int = 16) -> float:
    """Loss averaged over trainable tokens (not over batches), so splits of any shape compare.
    Batches shrink on out-of-memory instead of failing the stage."""
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


def train_stage(stage: str, params: Params) -> StageResult:
    import torch
    from transformers import set_seed

    from tasks.core.chain import base_with_chain, merged_chain_for
    from tasks.core.modeling import BaseInfo, load_tokenizer

    if stage not in params.train.stages:
        raise ConfigError(f"train: no stage {stage!r} in train.stages ({', '.join(params.stage_names)})")
    spec = params.train.stages[stage]
    on_gpu = torch.cuda.is_available()
    info = BaseInfo.load()
    tokenizer = load_tokenizer(info)
    chain = merged_chain_for(spec.init_from, params.train.chain_policy)
    set_seed(params.seed)  # before the adapter exists: LoRA's initial weights come from this RNG
    model = attach_adapter(base_with_chain(info, chain, params.train.quantization), stage, params, info)
    preflight_stage(model, stage, params)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    schedule = Schedule(
        max_steps=spec.max_steps,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        warmup_ratio=spec.warmup_ratio,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        weight_decay=spec.weight_decay,
        seed=params.seed,
        save_steps=params.train.checkpoint_every,
        packed=params.train.packing,
        gradient_checkpointing=params.train.gradient_checkpointing,
        optimizer=resolve_optimizer(params.train.optimizer, on_gpu),
        liger_kernels=resolve_liger(params.train.liger_kernels, on_gpu),
    )
    log.info("train@%s from %s: %d trainable parameters, %d steps", stage, spec.init_from, trainable, spec.max_steps)
    workdir = paths.checkpoint_dir(stage, run_key(stage, params))
    rows = read_packed_rows(stage) if params.train.packing else read_rows(stage, "train")
    with live_run(stage, params, workdir) as run:
        summary = run_trainer(model, rows, schedule, tokenizer.pad_token_id, workdir,
                              on_step=run.log_step if run else None)
        if is_main_process():  # the processes share one checkpoints folder
            shutil.rmtree(paths.CHECKPOINTS_DIR / stage, ignore_errors=True)  # done: nothing left to resume
        eval_loss = mean_token_loss(model, read_rows(stage, "eval"), tokenizer.pad_token_id)
        result = StageResult(stage, spec.init_from, trainable, eval_loss, summary, chain)
        save_stage(model, result, params)
        if run:
            run.finish(json.loads(paths.train_metrics(stage).read_text()),
                       paths.adapter_dir(stage) / "adapter_model.safetensors")
    return result


@contextmanager
def live_run(stage: str, params: Params, workdir):
    """The stage's live MLflow run (None when `train.mlflow_live` is off): step and system metrics
    while it trains, the stage's params, and the adapter's hash that `register` finds it by.
    Under several processes only the main one logs."""
    if not params.train.mlflow_live or not is_main_process():
        yield None
        return
    from tasks.core.tracking import stage_params, stage_run

    with stage_run(stage, params.register_.experiment, workdir, params.train.system_metrics,
                   tags={"init_from": params.train.stages[stage].init_from}) as run:
        if not run.resumed:
            run.log_params(stage_params(stage, params))
        yield run


def run_key(stage: str, params: Params) -> str:
    """Identifies the exact work of a stage run, so only a checkpoint of the same work resumes:
    its settings, its training data and the adapter it starts from."""
    spec = params.train.stages[stage]
    digest = hashlib.sha256()
    settings = {"stage": spec.model_dump(), "lora": params.train.lora_for(stage).model_dump(),
                "quantization": params.train.quantization, "policy": params.train.chain_policy, "seed": params.seed,
                "packing": params.train.packing, "optimizer": params.train.optimizer,
                "liger_kernels": params.train.liger_kernels, "processes": world_size()}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    inputs = [paths.BASE_DIR / "base.json",
              paths.packed_file(stage) if params.train.packing else paths.prepared_file(stage, "train")]
    if spec.init_from != "base":
        inputs.append(paths.adapter_dir(spec.init_from) / "adapter_model.safetensors")
    for file in inputs:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def preflight_stage(model, stage: str, params: Params) -> None:
    """Report precision, trainable parts and memory before the first step; fail on problems.
    Every process checks (so each fails loudly); only the main one writes the report."""
    from tasks.core.preflight import check, run_preflight

    lora = params.train.lora_for(stage)
    limit = params.train.memory_limit_gb
    report = run_preflight(
        model,
        params.train.quantization,
        expects_experts=any("experts" in t for t in lora.target_parameters),
        batch_size=params.train.stages[stage].batch_size,
        seq_len=params.prepare.max_length,
        memory_limit_bytes=int(limit * 2**30) if limit else None,
    )
    if is_main_process():
        write_json(paths.adapter_dir(stage) / PREFLIGHT_FILE, report.to_dict())
        log.info("%s", report.summary())
    check(report)


def save_stage(model, result: StageResult, params: Params) -> None:
    """The stage's outputs, written once, by the main process when several trained it. Every
    process must call it: under FSDP2 / ZeRO-3 the adapter is first gathered from their shards."""
    state = gathered_adapter_state(model)  # None: the model holds its adapter whole (one process, DDP)
    if not is_main_process():
        return
    out = paths.adapter_dir(result.stage)
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state)
    info = {
        "stage": result.stage,
        "init_from": result.init_from,
        "policy": params.train.chain_policy,
        "merged_chain": result.merged_chain,
        "quantization": params.train.quantization,
        "kind": params.data.stages[result.stage].kind,
        "processes": world_size(),  # the global batch is batch_size x processes
    }
    write_json(out / STAGE_INFO_FILE, info)
    metrics = result.summary.metrics() | {
        "eval_loss": round(result.eval_loss, 6),
        "trainable_parameters": result.trainable_parameters,
        "processes": world_size(),
    }
    write_json(paths.train_metrics(result.stage), metrics)
    history = paths.train_history(result.stage)
    history.parent.mkdir(parents=True, exist_ok=True)
    history.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in result.summary.history))


@task(name="train")
def train_task(stage: str, params: Params) -> StageResult:
    """Train one curriculum stage."""
    return train_stage(stage, params)


def main(argv: list[str] | None = None) -> int:
    launched: list[int] = []  # exit code of `accelerate launch`, when this process only launched the workers

    def run(args) -> list[str]:
        params = load_params(args.params)
        if params.train.launcher.kind == "accelerate" and not in_distributed_worker():
            launched.append(relaunch(args.stage, args.params, params.train.launcher))
            if launched[0]:
                log.error("train@%s: accelerate launch exited %d; the workers' errors are above", args.stage, launched[0])
            return []  # the workers printed the summary
        rank, processes = process_rank(), world_size()
        if processes > 1:
            log.info("train@%s: process %d of %d", args.stage, rank, processes)
        result = train_stage(args.stage, params)
        s = result.summary
        if processes > 1:  # the same eval loss on every process shows the replicas stayed in sync
            log.info("train@%s: process %d of %d done, eval loss %.6f", args.stage, rank, processes, result.eval_loss)
        if not is_main_process():
            return []
        return [
            f"train@{result.stage}: loss {s.first_loss:.3f} -> {s.last_loss:.3f} in {s.steps} steps, "
            f"eval loss {result.eval_loss:.3f}, {s.tokens_per_second:.0f} tokens/s"
            + (f", {processes} processes" if processes > 1 else "")
        ]

    status = run_stage_cli(
        "train", __doc__, run, argv, expected=(PreflightError,),
        add_arguments=lambda parser: parser.add_argument("stage", help="a stage name from train.stages"),
    )
    return launched[0] if launched and status == 0 else status

if __name__ == "__main__":
    sys.exit(main())
