"""What the base pretraining and the LoRA stages share around the transformers `Trainer`:
arguments from typed config, padding, and a per-step history (loss, learning rate, tokens/s)."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.core.chat import IGNORE_INDEX
from tasks.core.lm_loss import chunked_loss

if TYPE_CHECKING:
    from transformers import TrainingArguments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """The optimisation settings one training run needs, whatever config section they came from."""

    max_steps: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    seed: int = 0
    save_steps: int | None = None  # checkpoint every N steps (None: no checkpoints)
    packed: bool = False  # rows are packed records (with position_ids): batches are flattened, no padding
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    optimizer: str = "adamw_torch"  # a transformers `optim` name (see resolve_optimizer)
    liger_kernels: bool = False  # Liger's fused kernels (GPU only; see resolve_liger)
    # LM head + loss a chunk of tokens at a time (tasks/core/lm_loss.py); None: full logits. Unused
    # under Liger, whose fused linear cross-entropy does the same.
    loss_chunk_tokens: int | None = None
    # cosine decay after the warm-up; `constant` holds the rate (the tiny base's copy warm-up, which
    # must keep learning until its last step)
    lr_scheduler: str = "cosine"


def resolve_optimizer(choice: str, on_gpu: bool, offload_expert_adapters: bool = False,
                      adapter_dtype: str = "fp32") -> str:
    """`auto`: paged 8-bit AdamW on a GPU (optimizer state in 8 bits, paged to host memory under
    pressure instead of crashing), plain AdamW on CPU; with expert adapters in host memory, torch's
    fused AdamW, which steps each device's parameters where they are in one kernel per device
    (bitsandbytes' optimizers are GPU-only); with bf16 adapters, bitsandbytes' 8-bit AdamW on a CPU
    too (its math is fp32 whatever the weights' dtype). Other names pass through."""
    if choice != "auto":
        return choice
    if adapter_dtype == "bf16":
        return "paged_adamw_8bit" if on_gpu else "adamw_8bit"
    if on_gpu and offload_expert_adapters:
        return "adamw_torch_fused"
    return "paged_adamw_8bit" if on_gpu else "adamw_torch"


def resolve_liger(choice: str, on_gpu: bool) -> bool:
    """`auto`: on when there is a GPU and liger-kernel is installed; `on` insists on both."""
    import importlib.util

    installed = importlib.util.find_spec("liger_kernel") is not None
    if choice == "on" and not (on_gpu and installed):
        from tasks.core.config import ConfigError

        missing = "a GPU" if not on_gpu else "the liger-kernel package (pip install 'stagewise[gpu]')"
        raise ConfigError(f"train.liger_kernels is on but this machine lacks {missing}; set it to auto or off")
    return choice != "off" and on_gpu and installed


def training_arguments(schedule: Schedule, output_dir: Path, logging_steps: int = 5) -> TrainingArguments:
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=schedule.max_steps,
        per_device_train_batch_size=schedule.batch_size,
        gradient_accumulation_steps=schedule.gradient_accumulation_steps,
        learning_rate=schedule.learning_rate,
        weight_decay=schedule.weight_decay,
        lr_scheduler_type=schedule.lr_scheduler,
        warmup_steps=schedule.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        logging_steps=logging_steps,
        logging_first_step=True,
        # Checkpoints hold adapter, optimizer, scheduler, RNG states and the data position, so a
        # killed stage resumes where it stopped; the stage's outputs are written by the step itself.
        save_strategy="steps" if schedule.save_steps else "no",
        save_steps=schedule.save_steps or 500,
        save_total_limit=2,
        report_to="none",  # the stage's own callback logs to its live MLflow run (tasks/core/tracking.py)
        seed=schedule.seed,
        data_seed=schedule.seed,
        use_cpu=not on_gpu,
        bf16=on_gpu,
        optim=schedule.optimizer,
        use_liger_kernel=schedule.liger_kernels,
        # a flattened packed batch has no padding and no attention mask: every token counts
        include_num_input_tokens_seen="all" if schedule.packed else "non_padding",
        activation_checkpointing=schedule.gradient_checkpointing,
        # non-reentrant: works with frozen (LoRA) inputs without forcing grads on the embeddings
        activation_checkpointing_kwargs={"use_reentrant": False} if schedule.gradient_checkpointing else None,
        dataloader_num_workers=0,
        # every LoRA factor (fused experts included) gets a gradient each step: no unused-parameter scan
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


@dataclass
class PadCollator:
    """Right-pads a batch of {input_ids, labels}; padding is never trained on."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * (width - n))
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * (width - n))
            mask.append([1] * n + [0] * (width - n))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }


@dataclass(frozen=True)
class PackedCollator:
    """Padding-free batches: the packed rows of a batch laid end to end in one sequence.

    Each record keeps its own position ids (restarting at 0), and no attention mask is passed, so
    transformers builds a block-diagonal causal mask from the position ids: a token attends only
    to its own record. The first label of every record is already -100 (see tasks/data/packing.py),
    so no token is trained to follow the previous record. Every token in the batch is real.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        def flat(key: str) -> Any:
            return torch.tensor([[t for f in features for t in f[key]]], dtype=torch.long)

        # use_cache=False: with a KV cache, transformers ignores the position ids when it builds the
        # mask, and records would attend to each other.
        return {"input_ids": flat("input_ids"), "labels": flat("labels"), "position_ids": flat("position_ids"),
                "use_cache": False}


class RouterLoadMonitor:
    """Counts which experts each MoE router picks, per layer, between two reads.

    The entropy of a layer's expert load, normalised by log(num_experts), is 1.0 when every
    expert gets the same share of tokens and falls towards 0 as routing collapses onto a few
    experts: the first thing to watch when fine-tuning an MoE. (Padding tokens are routed too and
    counted.)
    """

    def __init__(self, model) -> None:
        self._counts: dict[int, Any] = {}
        self._handles = []
        routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "top_k")]
        for layer, router in enumerate(routers):
            self._handles.append(router.register_forward_hook(self._hook(layer, router)))

    def _hook(self, layer: int, router):
        import torch

        def record(_module, _inputs, output) -> None:
            indices = output[2] if isinstance(output, tuple) and len(output) == 3 else None
            if indices is None:
                return
            counts = torch.bincount(indices.reshape(-1).detach().cpu(), minlength=router.num_experts)
            self._counts[layer] = self._counts.get(layer, 0) + counts

        return record

    def take(self) -> dict[str, float]:
        """Per-layer and mean normalised load entropy since the last call; resets the counts."""
        import math

        out: dict[str, float] = {}
        for layer, counts in sorted(self._counts.items()):
            share = counts.double() / max(int(counts.sum()), 1)
            entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
            out[f"router_entropy.layer{layer}"] = entropy / math.log(len(counts)) if len(counts) > 1 else 1.0
        if out:
            out["router_entropy"] = sum(out.values()) / len(out)
        self._counts.clear()
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def peak_memory_gib() -> float:
    """Peak memory so far: allocated GPU memory on a GPU, else the process's peak resident size."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def step_history_callback(history: list[dict[str, float]], router: RouterLoadMonitor | None = None,
                          sink: Callable[[dict[str, float]], None] | None = None,
                          on_checkpoint: Callable[[], None] | None = None):
    """A TrainerCallback that appends each logged step (with tokens/s, peak memory and, for MoE
    models, the router load entropy) to `history`, and hands it to `sink` (live MLflow) at once;
    `on_checkpoint` is called once each checkpoint is on disk."""
    from transformers import TrainerCallback

    class StepHistory(TrainerCallback):
        def __init__(self) -> None:
            self._last = (time.perf_counter(), 0)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if not logs or "loss" not in logs:
                return
            now, tokens = time.perf_counter(), int(state.num_input_tokens_seen or 0)
            elapsed = max(now - self._last[0], 1e-9)
            row = {
                "step": state.global_step,
                "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "grad_norm": float(logs.get("grad_norm", 0.0)),
                "tokens_per_second": (tokens - self._last[1]) / elapsed,
                "peak_memory_gib": peak_memory_gib(),
            }
            if router is not None:
                row |= router.take()
            history.append(row)
            if sink is not None:
                sink(row)
            self._last = (now, tokens)

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            if on_checkpoint is not None:
                on_checkpoint()

    return StepHistory()


LIVE_ONLY = ("tokens_per_second", "peak_memory_gib")


def merged_history(log_history: list[dict], live: list[dict[str, float]]) -> list[dict[str, float]]:
    """Every logged step, including those before a resume (restored in the trainer state);
    tokens/s and router entropy are known only for steps this process ran."""
    measured = {row["step"]: {k: v for k, v in row.items() if k in LIVE_ONLY or k.startswith("router_")} for row in live}
    rows = []
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        row = {
            "step": entry["step"],
            "loss": float(entry["loss"]),
            "learning_rate": float(entry.get("learning_rate", 0.0)),
            "grad_norm": float(entry.get("grad_norm", 0.0)),
        }
        row |= measured.get(entry["step"], {})
        rows.append(row)
    return rows


@dataclass
class TrainingSummary:
    resumed_from_step: int
    steps: int
    train_loss: float
    first_loss: float
    last_loss: float
    tokens_seen: int
    seconds: float
    tokens_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def untrained(cls) -> TrainingSummary:
        """A stage of 0 steps: nothing trained, no loss to report (null in its metrics)."""
        return cls(resumed_from_step=0, steps=0, train_loss=None, first_loss=None, last_loss=None,  # type: ignore[arg-type]
                   tokens_seen=0, seconds=0.0, tokens_per_second=0.0)

    def metrics(self) -> dict[str, float]:
        out = {k: v for k, v in self.__dict__.items() if k != "history"}
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


@functools.cache
def trainer_class() -> type:
    """The transformers Trainer with one change, built on first use (importing the Trainer takes
    seconds that config checks should not pay)."""
    from transformers import Trainer

    class StagewiseTrainer(Trainer):
        """The stock `floating_point_ops` (which only feeds the logged `total_flos`) counts the model's
        parameters again on every step: 1 ms a step for a LoRA model on CPU, 1.2 s of the thinking
        stage's 71 s on 2 cores. The count cannot change while training, so it is taken once."""

        non_embedding_parameters: int | None = None

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            main_input = getattr(self.model, "main_input_name", "input_ids")
            if main_input not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self.non_embedding_parameters is None:
                self.non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main_input].numel() * self.non_embedding_parameters

    return StagewiseTrainer


def run_trainer(model, train_rows: list[dict], schedule: Schedule, pad_token_id: int, workdir: Path,
                on_step: Callable[[dict[str, float]], None] | None = None,
                on_checkpoint: Callable[[], None] | None = None) -> TrainingSummary:
    """Train `model` on rows of {input_ids, labels} with the transformers Trainer, resuming from
    the last checkpoint in `workdir` if an earlier run of the same work was interrupted.
    `on_step` gets each logged step's metrics as they happen; `on_checkpoint` is called after each
    checkpoint is saved (the live MLflow run writes what it kept: a resumed stage redoes the rest)."""
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    history: list[dict[str, float]] = []
    router = RouterLoadMonitor(model)
    trainer = trainer_class()(
        model=model,
        args=training_arguments(schedule, workdir),
        train_dataset=Dataset.from_list(train_rows),
        data_collator=PackedCollator() if schedule.packed else PadCollator(pad_token_id),
        callbacks=[step_history_callback(history, router, on_step, on_checkpoint)],
    )
    last = get_last_checkpoint(str(workdir)) if workdir.is_dir() else None
    if last:
        log.info("resuming from %s", last)
    started = time.perf_counter()
    try:
        with chunked_loss(model, None if schedule.liger_kernels else schedule.loss_chunk_tokens):
            result = trainer.train(resume_from_checkpoint=last)
    finally:
        router.close()
    seconds = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    history = merged_history(trainer.state.log_history, history)
    return TrainingSummary(
        resumed_from_step=int(Path(last).name.rsplit("-", 1)[-1]) if last else 0,
        steps=int(result.global_step),
        train_loss=float(result.training_loss),
        first_loss=history[0]["loss"] if history else float("nan"),
        last_loss=history[-1]["loss"] if history else float("nan"),
        tokens_seen=tokens,
        seconds=seconds,
        tokens_per_second=tokens / max(seconds, 1e-9),
        history=history,
    )
