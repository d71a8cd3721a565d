"""`train@<stage>`: one LoRA (or QLoRA) stage of the curriculum.

The stage starts from `init_from`: a fresh adapter on the base, or the previous stage's adapter,
which it keeps training (`train.chain_policy: continue`) or merges into the base before training a
new adapter (`merge`). A preflight checks precision, trainable parts and memory first; step metrics
go to the stage's live MLflow run while it trains. It writes the adapter (safetensors, with
`stage.json` and `preflight.json`), `metrics/train/<stage>.json` and the per-step history
`logs/train/<stage>.jsonl`; a killed stage resumes from its last checkpoint of the same work.

    python -m tasks.train <stage> [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass

from tasks.core import paths
from tasks.core.chain import STAGE_INFO_FILE
from tasks.core.cli import exit_now, run_stage_cli
from tasks.core.config import Params, TrainJob, load_params
from tasks.core.cost import DeviceUse, StageClock
from tasks.core.launcher import (
    gathered_adapter_state,
    in_distributed_worker,
    is_main_process,
    process_rank,
    relaunch,
    world_size,
)
from tasks.core.expert_offload import offload_expert_adapters, resolve_expert_offload
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
    device_use: DeviceUse | None = None  # devices and wall time of the whole stage (tasks/core/cost.py)


def train_stage(stage: str, params: Params) -> StageResult:
    import torch
    from transformers import set_seed

    from tasks.core.adapters import attach_adapter
    from tasks.core.chain import base_with_chain, merged_chain_for
    from tasks.core.modeling import BaseInfo, load_tokenizer
    from tasks.data.rows import read_packed_rows, read_rows
    from tasks.evaluation.scoring import mean_token_loss

    clock = StageClock(world_size())  # the devices are held from here: loading counts
    job = params.train_job(stage)
    on_gpu = torch.cuda.is_available()
    info = BaseInfo.load()
    tokenizer = load_tokenizer(info)
    chain = merged_chain_for(job.spec.init_from, job.train.chain_policy)
    set_seed(job.seed)  # before the adapter exists: LoRA's initial weights come from this RNG
    model = attach_adapter(base_with_chain(info, chain, job.train.quantization), job, info)
    offload = resolve_expert_offload(job.train, job.lora, on_gpu)
    preflight_stage(model, job, offload)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    schedule = stage_schedule(job, on_gpu, offload)
    if offload:
        # before the Trainer builds its optimizer, so the moments are made on the host; the factors
        # stay there (the Trainer's model.to leaves them), for the eval loss and saving too
        offload_expert_adapters(model)
    log.info("train@%s from %s: %d trainable parameters, %d steps", stage, job.spec.init_from, trainable, schedule.max_steps)
    workdir = paths.checkpoint_dir(stage, run_key(stage, params))
    rows = read_packed_rows(stage) if job.train.packing else read_rows(stage, "train")
    with live_run(job, workdir) as run:
        if schedule.max_steps:
            summary = run_trainer(model, rows, schedule, tokenizer.pad_token_id, workdir,
                                  on_step=run.log_step if run else None,
                                  on_checkpoint=run.flush if run else None)
        else:  # max_steps 0: the adapter it starts from goes on as this stage's (the ablation's `mixed`)
            log.info("train@%s: max_steps is 0: the adapter of %s passes on untrained", stage, job.spec.init_from)
            summary = TrainingSummary.untrained()
        if is_main_process():  # the processes share one checkpoints folder
            shutil.rmtree(paths.CHECKPOINTS_DIR / stage, ignore_errors=True)  # done: nothing left to resume
        eval_loss = mean_token_loss(model, read_rows(stage, "eval"), tokenizer.pad_token_id)
        result = StageResult(stage, job.spec.init_from, trainable, eval_loss, summary, chain, clock.use())
        save_stage(model, result, job)
        if run:
            run.finish(json.loads(paths.train_metrics(stage).read_text()),
                       paths.adapter_dir(stage) / "adapter_model.safetensors")
    return result


def stage_schedule(job: TrainJob, on_gpu: bool, offload: bool = False) -> Schedule:
    """The stage's Trainer settings; `offload`: its expert adapters are in host memory
    (`resolve_expert_offload`), which decides the optimizer `auto` picks."""
    spec = job.spec.train
    return Schedule(
        max_steps=spec.max_steps,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        warmup_ratio=spec.warmup_ratio,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        weight_decay=spec.weight_decay,
        seed=job.seed,
        save_steps=job.train.checkpoint_every,
        packed=job.train.packing,
        gradient_checkpointing=job.train.gradient_checkpointing,
        optimizer=resolve_optimizer(job.train.optimizer, on_gpu, offload, job.train.adapter_dtype),
        liger_kernels=resolve_liger(job.train.liger_kernels, on_gpu),
        loss_chunk_tokens=job.train.loss_chunk_tokens,
    )


@contextmanager
def live_run(job: TrainJob, workdir):
    """The stage's live MLflow run (None when `train.mlflow_live` is off): step and system metrics
    while it trains, the stage's params, and the adapter's hash that `register` finds it by.
    Under several processes only the main one logs."""
    if not job.train.mlflow_live or not is_main_process():
        yield None
        return
    from tasks.core.tracking import stage_params, stage_run

    with stage_run(job.stage, job.experiment, workdir, job.train.system_metrics,
                   tags={"init_from": job.spec.init_from}) as run:
        if not run.resumed:
            run.log_params(stage_params(job))
        yield run


def run_key(stage: str, params: Params) -> str:
    """Identifies the exact work of a stage run, so only a checkpoint of the same work resumes: the
    values of the params keys dvc.yaml declares for `train@<stage>` (the same list that decides
    when DVC re-runs it), the process count, its training data and the adapter it starts from."""
    from tasks.core.dvc_params import declared_values

    job = params.train_job(stage)
    settings = declared_values(f"train@{stage}", params.model_dump(mode="json", by_alias=True))
    digest = hashlib.sha256(json.dumps(settings | {"processes": world_size()}, sort_keys=True).encode())
    inputs = [paths.BASE_DIR / "base.json",
              paths.packed_file(stage) if job.train.packing else paths.prepared_file(stage, "train")]
    if job.spec.init_from != "base":
        inputs.append(paths.adapter_dir(job.spec.init_from) / "adapter_model.safetensors")
    for file in inputs:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def preflight_stage(model, job: TrainJob, offload: bool = False) -> None:
    """Report precision, trainable parts and memory before the first step; fail on problems.
    Every process checks (so each fails loudly); only the main one writes the report."""
    import torch

    from tasks.core.preflight import check, run_preflight

    limit = job.train.memory_limit_gb
    on_gpu = torch.cuda.is_available()
    report = run_preflight(
        model,
        job.train.quantization,
        expects_experts=any("experts" in t for t in job.lora.target_parameters),
        batch_size=job.spec.train.batch_size,
        seq_len=job.max_length,
        memory_limit_bytes=int(limit * 2**30) if limit else None,
        loss_chunk_tokens=job.train.loss_chunk_tokens,
        gradient_checkpointing=job.train.gradient_checkpointing,
        optimizer=resolve_optimizer(job.train.optimizer, on_gpu, offload, job.train.adapter_dtype),
        offload_expert_adapters=offload,
    )
    if is_main_process():
        write_json(paths.adapter_dir(job.stage) / PREFLIGHT_FILE, report.to_dict())
        log.info("%s", report.summary())
    check(report)


def save_stage(model, result: StageResult, job: TrainJob) -> None:
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
        "policy": job.train.chain_policy,
        "merged_chain": result.merged_chain,
        "quantization": job.train.quantization,
        "kind": job.spec.kind,
        "processes": world_size(),  # the global batch is batch_size x processes
    }
    write_json(out / STAGE_INFO_FILE, info)
    metrics = result.summary.metrics() | {
        "eval_loss": round(result.eval_loss, 6),
        "trainable_parameters": result.trainable_parameters,
        "processes": world_size(),
    }
    if result.device_use:
        metrics |= result.device_use.fields(result.summary.tokens_seen, result.summary.tokens_per_second)
    write_json(paths.train_metrics(result.stage), metrics)
    history = paths.train_history(result.stage)
    history.parent.mkdir(parents=True, exist_ok=True)
    history.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in result.summary.history))


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
        if not s.steps:
            return [f"train@{result.stage}: 0 steps: the adapter of {result.init_from} passed on, "
                    f"eval loss {result.eval_loss:.3f}"]
        return [
            f"train@{result.stage}: loss {s.first_loss:.3f} -> {s.last_loss:.3f} in {s.steps} steps, "
            f"eval loss {result.eval_loss:.3f}, {s.tokens_per_second:.0f} tokens/s"
            + (f", {processes} processes" if processes > 1 else "")
        ]

    status = run_stage_cli(
        "train", __doc__, run, argv, expected=(PreflightError,),
        add_arguments=lambda parser: parser.add_argument("stage", help="a stage name from `stages` in params.yaml"),
    )
    return launched[0] if launched and status == 0 else status

if __name__ == "__main__":
    exit_now(main())
