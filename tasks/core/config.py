"""Typed configuration: `params.yaml` parsed once into pydantic models.

Every step takes the part of this tree it needs. Unknown keys, wrong types and impossible values
fail here, before any work, with the dotted key that is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """params.yaml is invalid; the message names the file and the dotted key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data -----------------------------------------------------------------------------------


SourceFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "text", "hf_disk"]


class SourceSpec(Strict):
    """One input of a stage: where it is, how to read it, and how to map it to stage records."""

    # A file, a glob (`data/sources/*.jsonl`), a folder written by `datasets.save_to_disk`, or an
    # `s3://bucket/key` URI (glob allowed in the key; endpoint and credentials from the environment).
    path: str
    # auto: from the file extension (.jsonl/.json/.csv/.parquet/.txt), hf_disk for a folder.
    format: SourceFormat = "auto"
    # How an input item becomes stage records (see tasks/data/presets/); None: `text` for a
    # pretrain stage, `messages` for an sft stage.
    preset: str | None = None
    # Field-name overrides for the preset, e.g. {instruction: prompt, output: completion}.
    fields: dict[str, str] = Field(default_factory=dict)
    # Preset-specific settings, e.g. {drop_synthetic: true} for `oasst`.
    options: dict[str, Any] = Field(default_factory=dict)
    # Mixture weight of this source's training records: 0.5 keeps a seeded half, 2 repeats them twice.
    weight: PositiveFloat = 1.0
    # At most this many records from the source: a seeded sample (the same every run), in file order.
    limit: PositiveInt | None = None


class StageChecks(Strict):
    """Content contracts of a stage's own records, enforced by `validate` (see tasks/validate.py)."""

    # Each final assistant reply opens with one balanced <think>...</think> block and an answer after it.
    think_block: bool = False
    # Each final assistant reply parses as JSON.
    json_target: bool = False


class StageData(Strict):
    """Where a stage's records come from (read by `ingest`) and how much earlier data it replays
    (read by `prepare`)."""

    n_records: PositiveInt | None = None  # synthetic records to generate when there are no sources
    sources: list[SourceSpec] = Field(default_factory=list)
    # Share of this stage's training drawn from earlier stages' training data, against forgetting
    # what they taught (sampled deterministically in `prepare`): of its trained tokens or of its
    # rows, as `prepare.replay_unit` says.
    replay_share: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Stage -> weight: this stage trains on those stages' training rows as prepared (their own rows
    # plus their replay), each repeated by its weight, instead of on its own rows alone. The
    # ablation's `mixed` variant writes it (tasks/ablation/variants.py); a stage may name itself and
    # stages listed before it.
    mix: dict[str, PositiveFloat] = Field(default_factory=dict)
    # Stage -> weight: the earlier stages the replay draws on, each giving that part of it (of rows
    # or trained tokens, as `prepare.replay_unit` says); a stage left out gives nothing. {}: every
    # earlier stage, as `prepare.replay_balance` says.
    replay_from: dict[str, PositiveFloat] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_data(self) -> StageData:
        if self.n_records is None and not self.sources:
            raise ValueError("set n_records (synthetic data) or sources (your files)")
        return self


class DataConfig(Strict):
    # A source whose share of rejected items exceeds this fails `ingest` (wrong preset or format?)
    # after writing its rejects, instead of training on what little got through.
    max_reject_share: Fraction = 0.5


# --- model ----------------------------------------------------------------------------------


class CopyWarmupConfig(Strict):
    """Steps on random token spans said twice, before the tiny base reads its corpus.

    Copying a value from the prompt is what every SFT stage of the embedded default asks for, and
    a real base model can do it. Pretraining on ~1 M tokens of text does not teach the tiny base
    to: the heads that copy (induction heads) form only after a long plateau. On short rows of
    short spans, trained on the repeat alone, they form in a few hundred steps
    (bench/base_skills.py measures what they give the base).
    """

    steps: Annotated[int, Field(ge=0)] = 0  # 0: no warm-up
    batch_size: PositiveInt = 32
    learning_rate: PositiveFloat = 3.0e-3
    row_length: Annotated[int, Field(ge=8)] = 32
    min_span: Annotated[int, Field(ge=2)] = 3
    max_span: Annotated[int, Field(ge=2)] = 8

    @model_validator(mode="after")
    def _spans_fit(self) -> CopyWarmupConfig:
        if self.min_span > self.max_span:
            raise ValueError(f"min_span ({self.min_span}) is above max_span ({self.max_span})")
        if 2 * self.max_span + 1 > self.row_length:
            raise ValueError(f"a span of max_span ({self.max_span}) said twice does not fit row_length ({self.row_length})")
        return self


class PretrainConfig(Strict):
    """Full pretraining of the tiny base on the `embedding` corpus (the embedded default only)."""

    max_steps: PositiveInt
    batch_size: PositiveInt
    learning_rate: PositiveFloat
    warmup_ratio: Fraction = 0.05
    max_length: PositiveInt = 256
    # Share of corpus documents wrapped in chat markup, so the base knows its template tokens.
    chat_markup_share: Fraction = 0.3
    copy_warmup: CopyWarmupConfig = CopyWarmupConfig()


class TinyModelConfig(Strict):
    """A Qwen3-MoE small enough to train on a CPU: same architecture family as the flagship."""

    vocab_size: PositiveInt = 1024
    hidden_size: PositiveInt = 128
    num_hidden_layers: PositiveInt = 4
    num_attention_heads: PositiveInt = 4
    num_key_value_heads: PositiveInt = 2
    head_dim: PositiveInt = 32
    num_experts: PositiveInt = 8
    num_experts_per_tok: PositiveInt = 2
    moe_intermediate_size: PositiveInt = 128
    max_position_embeddings: PositiveInt = 1024
    pretrain: PretrainConfig

    @model_validator(mode="after")
    def _experts_fit(self) -> TinyModelConfig:
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok must not exceed num_experts")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelConfig(Strict):
    # None builds the tiny embedded model; a local path or hub id is only resolved and recorded.
    name_or_path: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    # Tokens the base's tokenizer lacks (e.g. <think>, </think> for a base without them). They are
    # added to the tokenizer, the embeddings are resized, and the first stage (init_from: base)
    # trains the embeddings and LM head in full (peft modules_to_save) so the new rows are learned.
    add_tokens: list[str] = Field(default_factory=list)
    tiny: TinyModelConfig


# --- prepare / validate ---------------------------------------------------------------------


class CleanConfig(Strict):
    """Text cleaning applied to every record before tokenization (see tasks/data/clean.py)."""

    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    remove_control_chars: bool = True
    # Replace e-mail addresses, phone numbers, IP addresses and API-key-like strings by placeholders.
    scrub_pii: bool = False


class DedupeConfig(Strict):
    exact: bool = True  # drop records whose normalized text hashes equal an earlier one's
    # MinHash LSH Jaccard threshold for near-duplicates; None turns near-dedupe off.
    near_threshold: Annotated[float, Field(gt=0, le=1)] | None = 0.9
    num_perm: PositiveInt = 64  # MinHash permutations: more is more exact and slower
    shingle_words: PositiveInt = 5  # words per shingle


class DecontaminateConfig(Strict):
    enabled: bool = True
    ngram: PositiveInt = 13  # words; a training record sharing one such n-gram with eval text is dropped
    # Benchmark files (any source format, read with the `text` or `messages` preset) to keep out of training.
    benchmark_files: list[str] = Field(default_factory=list)


class PackingConfig(Strict):
    enabled: bool = True
    row_length: PositiveInt | None = None  # tokens per packed row; None: prepare.max_length


class PrepareConfig(Strict):
    max_length: PositiveInt = 256
    min_tokens: PositiveInt = 1
    # Over max_length: pretrain text is `split` into equal rows (or `truncate`d or `drop`ped);
    # a chat is `drop`ped to the rejects or `truncate`d (its tail, with the last reply, is lost).
    pretrain_overflow: Literal["split", "truncate", "drop"] = "split"
    chat_overflow: Literal["drop", "truncate"] = "drop"
    # Content holding a special token's text (<|im_start|>, <|endoftext|>...): `reject` the record, or
    # `strip` the text (tasks/data/control_tokens.py). Tokenized as is, it would forge control tokens.
    control_tokens: Literal["reject", "strip"] = "reject"
    # How a conversation becomes rows. single_render: one row, every reply trained (needs a
    # prefix-consistent template); per_turn: a row per reply, each as the template renders the
    # conversation when that reply is generated (templates that rewrite history, like Qwen3's);
    # last_turn: the last reply's row only. auto: single_render or per_turn, by probing the template.
    multi_turn: Literal["auto", "per_turn", "last_turn", "single_render"] = "auto"
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    # How a stage's replay (stages.<stage>.data.replay_share) is drawn from the stages before it.
    # row: from all their training rows pooled, so each gives in proportion to its size; stage: an
    # equal part from each, so a large pretraining corpus does not crowd out the SFT stages.
    replay_balance: Literal["row", "stage"] = "row"
    # What replay_share counts. rows: training rows; tokens: trained tokens, so a pretraining stage's
    # long rows (every token trained) replayed into an SFT stage (replies only) stay `share` of what it
    # learns from, instead of outweighing its own lesson.
    replay_unit: Literal["rows", "tokens"] = "rows"
    # A record longer than this (characters of text, or of all messages) goes to the rejects as
    # `too_large` before any work: one document costs prepare about 0.13 GB of memory a million
    # characters (bench/prepare_memory.py --line), so the default keeps one record under ~1.5 GB.
    max_record_chars: PositiveInt = 10_000_000
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    packing: PackingConfig = Field(default_factory=PackingConfig)


class ValidateConfig(Strict):
    min_tokens: PositiveInt = 4
    max_tokens: PositiveInt = 256
    min_trainable_share: Fraction = 0.05
    min_records: PositiveInt = 8

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self

    def for_stage(self, overrides: StageValidate) -> ValidateConfig:
        """These thresholds with a stage's own in place of each it sets."""
        return ValidateConfig(**(self.model_dump() | overrides.model_dump(exclude_none=True)))


class StageValidate(Strict):
    """A stage's own `validate` thresholds; null keeps the global `validate` value. For data whose
    shape differs from the rest: a set of one-word answers trains on a small share of each row."""

    min_tokens: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    min_trainable_share: Fraction | None = None
    min_records: PositiveInt | None = None


# --- train ----------------------------------------------------------------------------------


class LoraConfig(Strict):
    r: PositiveInt = 8
    alpha: PositiveFloat = 16
    # Rank of the expert adapters (target_parameters), alpha scaled to keep alpha / r; None: r.
    # Experts are most of a MoE's LoRA: Qwen3-30B-A3B at r 16 has 629 M expert LoRA parameters
    # (48 layers x 128 experts) against 13 M on attention; each halving of expert_r halves them.
    expert_r: PositiveInt | None = None
    dropout: Fraction = 0.0
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Fused MoE expert weights are 3-D parameters, reachable only through peft's target_parameters.
    target_parameters: list[str] = Field(default_factory=list)
    # Modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head]; added
    # automatically to the first stage when model.add_tokens added tokens.
    modules_to_save: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _dropout_with_parameters(self) -> LoraConfig:
        if self.target_parameters and self.dropout:
            raise ValueError("dropout must be 0 when target_parameters is set (peft cannot apply it there)")
        return self


class StageTraining(Strict):
    """A stage's optimisation settings (read by `train@<stage>`)."""

    # 0: the stage trains nothing and passes on the adapter it starts from (the ablation's `mixed`
    # variant, where one stage trains on the others' data).
    max_steps: Annotated[int, Field(ge=0)]
    batch_size: PositiveInt = 8
    gradient_accumulation_steps: PositiveInt = 1
    learning_rate: PositiveFloat
    warmup_ratio: Fraction = 0.1
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    # None: use train.lora, the default shared by every stage.
    lora: LoraConfig | None = None


class StageSpec(Strict):
    """One curriculum stage, in one block: its kind, where it starts from, its data, the content
    contracts `validate` enforces on it, and its training settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["pretrain", "sft"]  # raw text (`text`) or chat (`messages`)
    init_from: str  # `base` or an earlier stage
    data: StageData
    checks: StageChecks = Field(default_factory=StageChecks)
    validate_: StageValidate = Field(default_factory=StageValidate, alias="validate")
    train: StageTraining

    @model_validator(mode="after")
    def _checks_fit_kind(self) -> StageSpec:
        if self.kind == "pretrain" and (self.checks.think_block or self.checks.json_target):
            raise ValueError("checks.think_block and checks.json_target apply to assistant replies: sft stages only")
        return self


class LauncherConfig(Strict):
    """How a training stage's process starts: one process, or `accelerate launch` for several
    GPUs (or several CPU processes). The same `python -m tasks.train <stage>` command re-executes
    itself under accelerate, so dvc.yaml and the flow stay the same."""

    kind: Literal["python", "accelerate"] = "python"
    # An accelerate config, e.g. infra/accelerate/fsdp2_qlora.yaml or deepspeed_zero3.yaml.
    config_file: str | None = None
    # None: the config file's num_processes. The global batch is batch_size x processes.
    num_processes: PositiveInt | None = None

    @model_validator(mode="after")
    def _config_for_accelerate(self) -> LauncherConfig:
        if self.kind == "accelerate" and not self.config_file:
            raise ValueError("kind accelerate needs config_file (see infra/accelerate/)")
        return self


# transformers `optim` names of torch's AdamW: its math is in the weights' dtype, and it steps
# parameters on any device (tasks/core/expert_offload.py steps host memory with it).
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


class TrainConfig(Strict):
    # Seed of training (adapter init, batch order); None: the top-level `seed`. Only the training
    # stages read it, so the ablation repeats training under several seeds without re-running the
    # data stages or the base.
    seed: int | None = None
    quantization: Literal["none", "nf4"] = "none"
    # nf4 only: cast the frozen 16-bit weights (embeddings, LM head, norms, router) to fp32 as peft's
    # prepare_model_for_kbit_training does; +1.3 GiB on Qwen3-30B-A3B for a little precision in
    # layers that compute in fp32 inside anyway (tasks/core/adapters.py::prepare_quantized).
    upcast_frozen: bool = False
    # continue: keep training the previous stage's adapter; merge: merge it into a full-precision
    # copy of the base and train a new adapter on top (see tasks/core/chain.py).
    chain_policy: Literal["continue", "merge"] = "continue"
    # Train on prepare's packed rows (train_packed.parquet), batches flattened without padding;
    # needs prepare.packing.enabled. batch_size then counts packed rows.
    packing: bool = False
    # Recompute activations in the backward pass instead of keeping them: the flagship needs it to
    # fit long sequences; results are the same, so DVC does not re-run a stage when it changes.
    gradient_checkpointing: bool = False
    # The LM head and cross-entropy this many tokens at a time, each chunk's logits recomputed in the
    # backward pass (tasks/core/lm_loss.py): [tokens, vocab] logits never exist at once (Qwen3's
    # 151,936-wide head: ~1.2 GB of fp32 logits per 2k tokens). Same results, so not a DVC param;
    # None: the model's own loss on full logits. Liger's fused loss replaces it when Liger is on.
    loss_chunk_tokens: PositiveInt | None = 128
    # How fused MoE experts compute under LoRA (tasks/core/routed_lora.py). routed: LoRA as x·A·B on
    # each expert's routed tokens, 4-bit experts dequantized again for the backward; fold: peft's
    # way, LoRA folded into a copy of every expert's weight (+~2.3 GiB per step for Qwen3-30B-A3B).
    # Same results, so not a DVC param.
    expert_compute: Literal["routed", "fold"] = "routed"
    # Keep the expert adapters' fp32 weights, gradients and Adam moments in host memory while a stage
    # trains on a GPU, each layer's factors copied over while it computes (tasks/core/expert_offload.py):
    # Qwen3-30B-A3B at r 16 then trains in under 18 GiB instead of 22, for speed. auto: under nf4 with
    # routed experts, a torch optimizer and one process; on: insist; off: adapters on the GPU. The
    # offloaded step uses torch AdamW (fp32 moments) where auto would pick paged 8-bit AdamW, so
    # results differ: a DVC param of the training stages. Nothing moves on a CPU.
    offload_expert_adapters: Literal["auto", "on", "off"] = "auto"
    # Routed 4-bit experts are dequantized this many at a time, each chunk's matmul on its own slice,
    # so a layer's whole stack never exists in bf16 (Qwen3-30B-A3B: 0.75 GiB a stack, 0.09 at 16 of
    # its 128). Same results (tests/test_routed_lora.py), so not a DVC param; None: the whole stack.
    experts_per_dequant: PositiveInt | None = 16
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # Memory the preflight check compares its estimate with; None: the device's free memory.
    memory_limit_gb: PositiveFloat | None = None
    # Checkpoint every N optimizer steps, so a killed stage resumes instead of starting over.
    checkpoint_every: PositiveInt | None = 50
    # auto: paged 8-bit AdamW (bitsandbytes) on GPU, torch AdamW on CPU; or a transformers optim name.
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit",
                       "paged_adamw_32bit"] = "auto"
    # Liger kernels (fused RMSNorm, SwiGLU, RoPE, linear cross-entropy): auto = on a GPU when the
    # liger-kernel package is installed; on = required (fails if it cannot be used).
    liger_kernels: Literal["auto", "on", "off"] = "auto"
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    # Log step metrics to MLflow while the stage runs (and, with system_metrics, CPU/GPU/memory use).
    mlflow_live: bool = True
    system_metrics: bool = True
    # The trainable weights (LoRA factors, modules_to_save) and their gradients in fp32, or in bf16
    # with the optimizer's math in fp32: bitsandbytes' 8-bit AdamW reads bf16 weights, updates in
    # fp32 and writes bf16, so `optimizer: auto` picks it (paged on a GPU). Half the adapter's memory
    # (Qwen3-30B-A3B r 16 on the GPU: 4.8 -> 2.4 GiB) for updates rounded to bf16. A torch optimizer
    # would do its math in bf16, and offloaded expert adapters step with one: neither goes with bf16.
    # Changes results: a DVC param of the training stages.
    adapter_dtype: Literal["fp32", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _bf16_adapters_need_fp32_optimizer_math(self) -> TrainConfig:
        if self.adapter_dtype == "bf16" and self.optimizer in TORCH_OPTIMIZERS:
            raise ValueError(f"adapter_dtype bf16 with optimizer {self.optimizer}: torch's AdamW does its math in "
                             "the weights' dtype; use optimizer auto (bitsandbytes' 8-bit AdamW, fp32 math) or "
                             "adapter_dtype fp32")
        if self.adapter_dtype == "bf16" and self.offload_expert_adapters == "on":
            raise ValueError("adapter_dtype bf16 with offload_expert_adapters on: offloaded adapters step with "
                             "torch's AdamW, in the weights' dtype; set one of them back")
        return self


# --- evaluate / register --------------------------------------------------------------------


class LmEvalConfig(Strict):
    """lm-evaluation-harness tasks run on the final model (`pip install -e ".[lmeval]"`); none by default."""

    tasks: list[str] = Field(default_factory=list)  # harness task or group names; [] skips the harness
    include_path: str | None = None  # a folder of your own task YAMLs, searched before the built-in ones
    limit: PositiveInt | PositiveFloat | None = None  # docs per task: a count, or a share when below 1
    num_fewshot: Annotated[int, Field(ge=0)] | None = None  # None: each task's own default
    batch_size: PositiveInt = 1


class EvaluateConfig(Strict):
    batch_size: PositiveInt = 16
    max_generate: PositiveInt = 48  # eval records per generation metric
    max_new_tokens: PositiveInt = 64
    samples: Annotated[int, Field(ge=0)] = 5  # replies per eval set kept for people to read (MLflow table)
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    # The chat template's `enable_thinking` for generated replies (Qwen3's switch; templates without
    # it ignore it). auto: on for stages whose checks.think_block is true, off for the others, as
    # Qwen3 is used; true / false: every stage.
    enable_thinking: bool | Literal["auto"] = "auto"


class RegisterConfig(Strict):
    model_name: str = "stagewise-assistant"
    experiment: str = "stagewise"
    # Metric name (as in metrics/evaluate.json `final`) -> minimum value to become `champion`.
    thresholds: dict[str, float] = Field(default_factory=dict)
    # A new version must also not fall below the current champion's score on any threshold metric
    # by more than this (on the same eval data: stored scores, or the champion re-scored on this data).
    champion_tolerance: Annotated[float, Field(ge=0)] = 0.0
    # When the champion was evaluated on other eval data, load it from the registry and score it
    # on the current eval sets (tasks/evaluation/champion.py); false: skip the comparison instead.
    rescore_champion: bool = True


class ExportConfig(Strict):
    """The final model merged into one checkpoint, checked against the adapter chain (tasks/export.py)."""

    # false: skip writing the merged copy (the flagship's is ~60 GB); register still runs.
    enabled: bool = True
    # Largest mean per-token KL(adapted || saved merged model) accepted on the held-out rows. bf16
    # rounding measured ~1e-3 on the tiny MoE; one dropped expert or one layer's q_proj LoRA >= 0.05.
    max_kl: PositiveFloat = 0.01
    n_prompts: PositiveInt = 8  # eval rows per stage (the first ones of its eval split)
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # of the saved weights


class AblationVariant(Strict):
    """One arm of the curriculum ablation (flows/ablation.py): the current params.yaml with `set`
    applied, and optionally several stages trained as one mixture."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    description: str = ""
    # Dotted params.yaml keys and the values this variant uses, e.g. {stages.syntax.data.replay_share: 0.0}.
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set")
    # Stages trained as one mixture: the last of them trains on all their training rows, each
    # weighted to the rows the staged curriculum draws from it, for their summed steps (the same
    # training tokens, in one stage); the others train 0 steps.
    mix: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _mix_of_two(self) -> AblationVariant:
        if len(self.mix) == 1:
            raise ValueError("mix needs at least two stages (or none)")
        return self


def _default_variants() -> dict[str, AblationVariant]:
    return {"staged": AblationVariant(description="the curriculum as configured")}


class AblationConfig(Strict):
    """`python -m flows.ablation`: variants of this params.yaml trained at an equal token budget and
    evaluated by the same code; a verdict table says which wins each metric (README)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Training seeds (train.seed) each variant runs under: >= 2 to tell a difference from noise.
    seeds: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [1234, 1235])
    variants: dict[str, AblationVariant] = Field(default_factory=_default_variants)
    # true: each run also runs `register` (a model version per run)
    register_: bool = Field(default=False, alias="register")
    # The verdict's metrics, as named in metrics/evaluate.json `final`; [] = every one.
    metrics: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct(self) -> AblationConfig:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        if not self.variants:
            raise ValueError("list at least one variant")
        if bad := [name for name in self.variants if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name)]:
            raise ValueError(f"variant names are letters, digits, - and _ (they name DVC experiments): {bad}")
        return self


OLD_LAYOUT_KEYS = {"data.stages": "stages.<name>.{kind, data, checks}", "train.stages": "stages.<name>.{init_from, train}"}


class Params(Strict):
    seed: int = 0
    # The curriculum, in order: one block per stage (see StageSpec).
    stages: dict[str, StageSpec]
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    export: ExportConfig = Field(default_factory=ExportConfig)
    ablation: AblationConfig = Field(default_factory=AblationConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _chain(self) -> Params:
        if not self.stages:
            raise ValueError("the curriculum is empty: list at least one stage under `stages`")
        seen: list[str] = []
        for name, spec in self.stages.items():
            if name == "base":
                raise ValueError("`base` is reserved for the base model and cannot name a stage")
            if spec.init_from != "base" and spec.init_from not in seen:
                raise ValueError(
                    f"stages.{name}.init_from is {spec.init_from!r}: it must be `base` or a "
                    f"stage listed before it ({', '.join(seen) or 'none'})"
                )
            if unknown := [m for m in spec.data.mix if m not in (*seen, name)]:
                raise ValueError(f"stages.{name}.data.mix names {', '.join(unknown)}: it may name {name} "
                                 f"and the stages listed before it ({', '.join(seen) or 'none'})")
            if unknown := [r for r in spec.data.replay_from if r not in seen]:
                raise ValueError(f"stages.{name}.data.replay_from names {', '.join(unknown)}: it may name "
                                 f"the stages listed before it ({', '.join(seen) or 'none'})")
            if spec.train.lora is not None and spec.init_from != "base" and self.train.chain_policy == "continue":
                raise ValueError(
                    f"stages.{name}.train.lora is set, but under train.chain_policy `continue` {name} keeps "
                    f"training the adapter of {spec.init_from}, with its rank and targets: set chain_policy "
                    f"to `merge` (a new adapter per stage) or set the LoRA on the first stage")
            seen.append(name)
        return self

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages)

    @property
    def final_stage(self) -> str:
        return self.stage_names[-1]

    def lora_for(self, stage: str) -> LoraConfig:
        return self.stages[stage].train.lora or self.train.lora

    def train_job(self, stage: str) -> TrainJob:
        if stage not in self.stages:
            raise ConfigError(f"train: no stage {stage!r} in `stages` ({', '.join(self.stage_names)})")
        seed = self.seed if self.train.seed is None else self.train.seed
        return TrainJob(stage, self.stages[stage], self.train, self.lora_for(stage), seed,
                        self.prepare.max_length, self.register_.experiment)


@dataclass(frozen=True)
class TrainJob:
    """What one training stage reads of params.yaml: its own block, the shared training settings
    with its LoRA resolved, and the few other keys it needs. Built once by `Params.train_job`."""

    stage: str
    spec: StageSpec
    train: TrainConfig
    lora: LoraConfig  # the stage's own `train.lora`, else the shared `train.lora`
    seed: int
    max_length: int  # prepare.max_length: the longest row the preflight sizes memory for
    experiment: str  # register.experiment: where the live MLflow run goes


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part).removesuffix("_") if part in ("validate_", "register_") else str(part) for part in loc)


def reject_old_layout(raw: dict[str, Any], source: str) -> None:
    """params.yaml files written before one-block-per-stage get a message saying where each key went."""
    old = [key for key in OLD_LAYOUT_KEYS if isinstance(raw.get(key.split(".")[0]), dict)
           and key.split(".")[1] in raw[key.split(".")[0]]]
    if old:
        moves = "\n".join(f"  {key}.<name> -> {OLD_LAYOUT_KEYS[key]}" for key in old)
        raise ConfigError(
            f"{source} uses the old layout ({', '.join(old)}): each curriculum stage is now one block under "
            f"the top-level `stages:` key, e.g.\n{moves}\n"
            "  stages: {embedding: {kind: pretrain, init_from: base, data: {n_records: 1200}, "
            "train: {max_steps: 60, learning_rate: 2.0e-3}}}\n"
            "See params.yaml in the project for the full layout."
        )


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Build typed params from a mapping; errors name every bad dotted key."""
    reject_old_layout(raw, source)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = _dotted(err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against params.yaml's documented keys)"
            lines.append(f"  {key}: {msg}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set an existing or new leaf; the parent mapping must exist so typos fail loudly."""
    *parents, leaf = key.split(".")
    node = tree
    for depth, part in enumerate(parents):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"override {key}: no key {'.'.join(parents[: depth + 1])} in params.yaml")
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError(f"override {key}: {'.'.join(parents)} is not a mapping")
    node[leaf] = value


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return parse_params(raw, str(path))
