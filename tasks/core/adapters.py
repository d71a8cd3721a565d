"""A stage's LoRA adapter: its peft config, and the adapter a stage trains (new, or the previous
stage's loaded to keep training). `train` builds adapters with it; tests and benchmarks build the
very same ones.
"""

from __future__ import annotations

import logging

from tasks.core import paths
from tasks.core.config import LoraConfig, TrainJob

log = logging.getLogger(__name__)

EMBEDDING_MODULES = ["embed_tokens", "lm_head"]


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


def expert_rank_patterns(cfg: LoraConfig) -> dict[str, dict]:
    """peft's rank_pattern and alpha_pattern giving the expert parameters `expert_r` (alpha scaled
    with it); empty when the experts take `r`. The patterns are the short names, which every full
    parameter path they mean ends with."""
    if cfg.expert_r is None or cfg.expert_r == cfg.r or not cfg.target_parameters:
        return {}
    return {"rank_pattern": {name: cfg.expert_r for name in cfg.target_parameters},
            "alpha_pattern": {name: cfg.alpha * cfg.expert_r / cfg.r for name in cfg.target_parameters}}


def peft_lora_config(cfg: LoraConfig, model=None):
    from peft import LoraConfig as PeftLoraConfig

    targets = list(cfg.target_parameters)
    if model is not None and targets:
        targets = expand_target_parameters(model, targets)
    tied = bool(model is not None and getattr(model.config, "tie_word_embeddings", False))
    return PeftLoraConfig(
        **expert_rank_patterns(cfg),
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


def new_adapter(model, lora: LoraConfig):
    """`model` with a new LoRA adapter of `lora`."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft 0.21 checks rank and alpha patterns against module targets only, and calls the
        # expert parameters' patterns unmatched although it applies them (tests/test_adapters.py).
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
        return get_peft_model(model, peft_lora_config(lora, model))


def stage_lora(job: TrainJob, info) -> LoraConfig:
    """The stage's LoRA settings; a first stage also trains the embeddings and LM head in full when
    `model.add_tokens` gave the tokenizer tokens the base had no embedding for."""
    from tasks.core.modeling import new_token_count

    if job.spec.init_from != "base" or not new_token_count(info):
        return job.lora
    extra = [m for m in EMBEDDING_MODULES if m not in job.lora.modules_to_save]
    log.info("train@%s: new tokens %s: training %s in full", job.stage, info.added_tokens, ", ".join(extra) or "them")
    return job.lora.model_copy(update={"modules_to_save": [*job.lora.modules_to_save, *extra]})


def attach_adapter(model, job: TrainJob, info=None):
    """A new adapter (on the base, or under `merge` on the base with earlier adapters merged in),
    or under `continue` the previous stage's adapter loaded for more training."""
    from peft import PeftModel

    from tasks.core.modeling import BaseInfo

    if job.train.quantization == "nf4":
        model = prepare_quantized(model, job.train.upcast_frozen)
    if job.spec.init_from == "base" or job.train.chain_policy == "merge":
        adapted = new_adapter(model, stage_lora(job, info or BaseInfo.load()))
    else:
        previous = paths.adapter_dir(job.spec.init_from)
        if not (previous / "adapter_config.json").exists():
            raise FileNotFoundError(f"{previous} holds no adapter: run train@{job.spec.init_from} first")
        adapted = PeftModel.from_pretrained(model, str(previous), is_trainable=True)
    cast_trainable(adapted, job.train.adapter_dtype)
    return with_expert_compute(adapted, job.train.expert_compute, job.train.experts_per_dequant)


def cast_trainable(model, adapter_dtype: str):
    """The trainable weights in `train.adapter_dtype`: peft makes them fp32 (and loads a saved
    adapter as fp32); bf16 halves them and their gradients, the optimizer keeping its math in fp32
    (tasks/core/trainer.py::resolve_optimizer)."""
    import torch

    if adapter_dtype == "bf16":
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model


def prepare_quantized(model, upcast_frozen: bool):
    """A 4-bit base made ready for an adapter: every weight frozen. With `upcast_frozen`, also what
    peft's prepare_model_for_kbit_training adds: the frozen 16-bit weights (embeddings, LM head,
    norms, router) cast to fp32, +1.3 GiB on Qwen3-30B-A3B, and an fp32 LM head that autocast casts
    back to bf16 for every loss chunk. Without it they stay as the checkpoint holds them, as in
    bench/gpu_qlora.py's measurements. On a CPU the base is fp32 already and both are the same."""
    if upcast_frozen:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def with_expert_compute(model, expert_compute: str, experts_per_dequant: int | None = None):
    """`model` with its fused experts computing as `train.expert_compute` says (routed: LoRA on the
    routed tokens, 4-bit stacks dequantized `train.experts_per_dequant` experts at a time,
    tasks/core/routed_lora.py; fold: peft's own way)."""
    if expert_compute == "routed":
        from tasks.core.routed_lora import route_expert_lora

        if count := route_expert_lora(model, experts_per_dequant):
            log.info("experts: LoRA on routed tokens in %d layers (train.expert_compute: routed)", count)
    return model
