"""Preflight: what is about to be trained, in what precision, and whether it fits — checked before
the first step, so a silent full-precision expert or a LoRA that misses the experts fails loudly
instead of costing GPU hours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

PARTS = ("attention", "experts", "router", "embeddings", "other")
# Activation bytes per token per layer per hidden unit, without activation checkpointing
# (Korthikanti et al., 2022: ~34 values of 16-bit activations per token and hidden unit).
_ACTIVATION_FACTOR = 34


class PreflightError(RuntimeError):
    """Training would run wrongly or not fit; the message says what and how to fix it."""


@dataclass
class PreflightReport:
    quantization: str
    parameters_by_storage: dict[str, int] = field(default_factory=dict)  # "4bit" / "full"
    parameters_by_part: dict[str, int] = field(default_factory=dict)
    four_bit_by_part: dict[str, int] = field(default_factory=dict)
    trainable_by_part: dict[str, int] = field(default_factory=dict)
    adapter_bytes: int = 0
    adapter_bytes_by_part: dict[str, int] = field(default_factory=dict)  # what each part's rank costs
    estimated_peak_bytes: int = 0
    estimated_terms: dict[str, int] = field(default_factory=dict)  # what the peak estimate adds up
    available_bytes: int | None = None
    levers: dict[str, str] = field(default_factory=dict)  # the memory settings the estimate assumed
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gib = 2**30
        lines = [
            f"preflight ({self.quantization}): "
            + ", ".join(f"{k} {v:,}" for k, v in self.parameters_by_storage.items()) + " parameters",
            "  by part: " + ", ".join(f"{p} {self.parameters_by_part.get(p, 0):,} ({self.four_bit_by_part.get(p, 0):,} in 4-bit)" for p in PARTS),
            "  trainable: " + ", ".join(f"{p} {self.trainable_by_part.get(p, 0):,} ({self.adapter_bytes_by_part.get(p, 0) / 2**20:.2f} MiB)"
                                        for p in PARTS),
            f"  adapter {self.adapter_bytes / 2**20:.2f} MiB; estimated peak {self.estimated_peak_bytes / gib:.2f} GiB"
            + (f" of {self.available_bytes / gib:.2f} GiB available" if self.available_bytes else ""),
            "  = " + " + ".join(f"{name} {size / gib:.2f}" for name, size in self.estimated_terms.items()) + " GiB",
            "  levers: " + ", ".join(f"{name} {value}" for name, value in self.levers.items()),
        ]
        return "\n".join(lines + [f"  PROBLEM: {p}" for p in self.problems])


def part_of(name: str) -> str:
    """Which part of a decoder a parameter belongs to, by its (peft-wrapped or plain) name."""
    if "experts" in name:
        return "experts"
    if "mlp.gate." in name or name.endswith("mlp.gate.weight") or ".router" in name:
        return "router"
    if "self_attn" in name:
        return "attention"
    if "embed_tokens" in name or "lm_head" in name:
        return "embeddings"
    return "other"


def _numel(name: str, tensor) -> int:
    """Logical parameter count: a 4-bit tensor packs two values a byte."""
    return tensor.numel() * 2 if _is_four_bit(name, tensor) else tensor.numel()


def _is_four_bit(name: str, tensor) -> bool:
    import torch

    return tensor.dtype == torch.uint8 and ("parametrizations" in name or tensor.__class__.__name__ == "Params4bit")


def count_parameters(model: nn.Module, report: PreflightReport) -> None:
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied embeddings count once
            continue
        seen.add(id(param))
        part, n = part_of(name), _numel(name, param)
        is_lora = "lora_" in name
        if not is_lora:
            storage = "4bit" if _is_four_bit(name, param) else "full"
            report.parameters_by_storage[storage] = report.parameters_by_storage.get(storage, 0) + n
            report.parameters_by_part[part] = report.parameters_by_part.get(part, 0) + n
            if storage == "4bit":
                report.four_bit_by_part[part] = report.four_bit_by_part.get(part, 0) + n
        if param.requires_grad:
            report.trainable_by_part[part] = report.trainable_by_part.get(part, 0) + n
            size = param.numel() * param.element_size()
            report.adapter_bytes += size
            report.adapter_bytes_by_part[part] = report.adapter_bytes_by_part.get(part, 0) + size


# NF4 with double quantization: 4 bits a value, an 8-bit absmax per 64 values, an fp32 one per 256
# of those (measured on an H200: the flagship's 29.9 B 4-bit parameters and 1.2 B bf16 ones hold
# 15.57 GiB, this figure gives 15.55).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

# Optimizer state bytes per trainable parameter: two Adam moments in fp32, or in 8 bits.
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}


def memory_terms(config, weights_bytes: int, trainable: int, tokens: int, loss_chunk_tokens: int | None = None,
                 gradient_checkpointing: bool = False, optimizer: str = "adamw_torch", activation_bytes: int = 2,
                 expert_targets: Sequence[str] = (), quantized_experts: bool = False,
                 routed_experts: bool = False, host_trainable: int = 0,
                 experts_per_dequant: int | None = None, adapter_bytes: float = 4) -> dict[str, int]:
    """The peak's terms in bytes, from the model's config and what it holds: weights as stored,
    trainable params with grads and Adam moments, activations (every layer's; with gradient
    checkpointing each layer's input plus one layer's during its recompute) in `activation_bytes`
    (2: bf16 on a GPU, 4: fp32 on a CPU), the logits: all `tokens`' at once, or one chunk's
    (`train.loss_chunk_tokens`, tasks/core/lm_loss.py), and the expert weights in flight
    (`expert_weight_terms`). Adapter weights and their gradients are fp32 (peft keeps them so) or bf16; the
    optimizer's two moments are fp32 or 8-bit (`optimizer`, a transformers name), `optimizer_paged`
    for a paged optimizer. The preflight (a loaded model) and `tasks.plan` (a model on the meta
    device) both use it; bench/gpu_qlora.py checks it against an H200 (bench/results/).
    `host_trainable` of the trainable parameters are expert factors kept in host memory
    (tasks/core/expert_offload.py): they, their gradients and moments leave the GPU terms, and one
    layer's share comes over at a time (`adapter_in_flight`: fp32 copy, its gradient, its cast).
    `adapter_bytes`: bytes of a trainable weight (4; 2 under `train.adapter_dtype: bf16`), its
    gradient the same."""
    layers, hidden = config.num_hidden_layers, config.hidden_size
    if gradient_checkpointing:
        activations = layers * tokens * hidden * 2 + tokens * hidden * _ACTIVATION_FACTOR  # bf16 layer inputs
    else:
        activations = layers * tokens * hidden * _ACTIVATION_FACTOR
    logit_rows = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    # A paged optimizer's moments live in CUDA managed memory: on the GPU while it has room, evicted
    # to the host under pressure, and outside torch's allocator count (torch.cuda.max_memory_allocated).
    optimizer_term = "optimizer_paged" if optimizer.startswith("paged_") else "optimizer"
    on_gpu = trainable - host_trainable
    terms = {
        "weights": int(weights_bytes),
        "adapter": int(on_gpu * adapter_bytes * 2),  # weights and their gradients (fp32, or bf16)
        optimizer_term: on_gpu * OPTIMIZER_STATE_BYTES.get(optimizer, 8),
        "activations": activations * activation_bytes // 2,  # the factor is counted in 16-bit values
        "logits": logit_rows * config.vocab_size * 4 * 2,  # fp32 logits and their gradient
    }
    if host_trainable:
        terms["adapter_in_flight"] = host_trainable // layers * (4 + 4 + activation_bytes)
    kept_layers = 1 if gradient_checkpointing else layers
    terms.update(expert_weight_terms(config, expert_targets, activation_bytes, quantized_experts, routed_experts,
                                     kept_layers, experts_per_dequant))
    return terms


def host_adapter_bytes(host_trainable: int) -> int:
    """Host memory of offloaded expert factors: fp32 weights, gradients and two fp32 Adam moments."""
    return host_trainable * (4 + 4 + 8)


def expert_weight_terms(config, targets: Sequence[str], compute_bytes: int, quantized: bool, routed: bool,
                        kept_layers: int, experts_per_dequant: int | None = None) -> dict[str, int]:
    """Copies of fused expert weights in the compute dtype that a step holds beyond the stored weights.

    fold (peft's way, `train.expert_compute: fold`): each targeted stack gets LoRA added to a full
    copy of the layer's experts on every forward; autograd keeps that copy for the backward (each
    kept layer's: every layer, or one at a time under gradient checkpointing) and the backward adds
    its gradient, as large (`expert_fold`). Under NF4 the stacks without LoRA are dequantized and
    kept the same way (`expert_dequant`).
    routed (tasks/core/routed_lora.py): LoRA acts on the routed tokens, nothing is folded, and a 4-bit
    stack is dequantized again in the backward instead of kept: one stack's copy at a time, the
    larger (gate_up_proj, 2/3 of a layer's experts) (`expert_dequant`), and of it only
    `experts_per_dequant` experts at once (`train.experts_per_dequant`); nothing in bf16.
    """
    experts = getattr(config, "num_experts", 0) or 0
    layer = experts * 3 * config.hidden_size * (getattr(config, "moe_intermediate_size", 0) or 0) * compute_bytes
    if not layer:
        return {}
    if routed:
        share = min(experts_per_dequant or experts, experts)
        return {"expert_dequant": layer * 2 // 3 * share // experts} if quantized else {}
    targeted = {t.rsplit(".", 1)[-1] for t in targets}
    folded = layer * (2 * ("gate_up_proj" in targeted) + ("down_proj" in targeted)) // 3
    terms = {"expert_fold": folded * (kept_layers + 1)} if folded else {}
    if quantized and folded < layer:
        terms["expert_dequant"] = (layer - folded) * kept_layers
    return terms


def estimate_terms(model: nn.Module, batch_size: int, seq_len: int, loss_chunk_tokens: int | None = None,
                   gradient_checkpointing: bool = False, optimizer: str = "adamw_torch",
                   offload_expert_adapters: bool = False) -> dict[str, int]:
    """`memory_terms` of a loaded model: its weights as they are stored, its trainable parameters,
    its compute dtype, the expert stacks its adapter targets, whether they are 4-bit, whether they
    compute routed (`tasks.core.routed_lora.route_expert_lora`) and whether their adapters are
    kept on the host."""
    from torch.nn.utils import parametrize

    from tasks.core.quantize import EXPERT_PARAMETERS
    from tasks.core.routed_lora import is_routed

    params = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    frozen = [(n, p) for n, p in params if not p.requires_grad]  # trainable ones are the adapter term
    weights = sum(_numel(n, p) * NF4_BYTES_PER_PARAM if _is_four_bit(n, p) else p.numel() * p.element_size()
                  for n, p in frozen)  # 4-bit: the packed values and their quantization statistics
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    trainable_bytes = sum(p.numel() * p.element_size() for _, p in params if p.requires_grad)
    compute_bytes = compute_dtype_bytes(model)
    targets = [t for config in getattr(model, "peft_config", {}).values() for t in config.target_parameters or []]
    quantized = any(parametrize.is_parametrized(m, p) for m in model.modules() for p in EXPERT_PARAMETERS)
    return memory_terms(model.config, weights, trainable, batch_size * seq_len, loss_chunk_tokens, gradient_checkpointing,
                        optimizer, compute_bytes, targets, quantized, is_routed(model),
                        host_trainable(model) if offload_expert_adapters else 0, experts_per_dequant(model),
                        trainable_bytes / trainable if trainable else 4)


def experts_per_dequant(model: nn.Module) -> int | None:
    """What `route_expert_lora` set on the model's routed experts (None: whole stacks)."""
    from tasks.core.routed_lora import DEQUANT_CHUNK

    return next((getattr(m, DEQUANT_CHUNK) for m in model.modules() if getattr(m, DEQUANT_CHUNK, None)), None)


def host_trainable(model: nn.Module) -> int:
    """Trainable parameters `offload_expert_adapters` keeps on the host: the routed experts' factors."""
    from tasks.core.expert_offload import expert_adapter_parameters

    return sum(p.numel() for p, _home in expert_adapter_parameters(model))


def compute_dtype_bytes(model: nn.Module) -> int:
    """Bytes of the dtype the model computes in: the one it was loaded in (config.dtype), which
    stays bf16 when train.upcast_frozen casts the frozen embeddings to fp32; else its embeddings'."""
    import torch

    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    return model.get_input_embeddings().weight.element_size()


def estimate_peak_bytes(model: nn.Module, batch_size: int, seq_len: int, loss_chunk_tokens: int | None = None,
                        gradient_checkpointing: bool = False) -> int:
    return sum(estimate_terms(model, batch_size, seq_len, loss_chunk_tokens, gradient_checkpointing).values())


def available_bytes() -> int | None:
    """Memory training can use where it will run: on a GPU, what is free plus what this process's
    allocator holds already (the preflight runs with the model loaded, and the estimate counts its
    weights: free memory alone would count them twice and fail a card the step fits); else the
    machine's free memory."""
    import torch

    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return int(free) + int(torch.cuda.memory_reserved())
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def run_preflight(model: nn.Module, quantization: str, expects_experts: bool, batch_size: int, seq_len: int,
                  memory_limit_bytes: int | None = None, loss_chunk_tokens: int | None = None,
                  gradient_checkpointing: bool = False, optimizer: str = "adamw_torch",
                  offload_expert_adapters: bool = False) -> PreflightReport:
    """Build the report and record every problem; `check` turns problems into an error."""
    report = PreflightReport(quantization=quantization)
    count_parameters(model, report)
    report.estimated_terms = estimate_terms(model, batch_size, seq_len, loss_chunk_tokens, gradient_checkpointing, optimizer,
                                            offload_expert_adapters)
    report.estimated_peak_bytes = sum(report.estimated_terms.values())
    report.levers = memory_levers(model, loss_chunk_tokens, gradient_checkpointing, optimizer, offload_expert_adapters)
    report.available_bytes = memory_limit_bytes or available_bytes()
    has_experts = report.parameters_by_part.get("experts", 0) > 0
    full_experts = report.parameters_by_part.get("experts", 0) - report.four_bit_by_part.get("experts", 0)
    if quantization == "nf4" and has_experts and full_experts > 0:
        report.problems.append(
            f"quantization is nf4 but {full_experts:,} expert parameters are in full precision: the fused "
            "experts were not quantized (load the model through tasks.core.modeling.load_base_model)"
        )
    if expects_experts and has_experts and not report.trainable_by_part.get("experts"):
        report.problems.append(
            "the LoRA config targets experts (train.lora.target_parameters) but no expert parameter is "
            "adapted: check the names against the model (e.g. mlp.experts.gate_up_proj, mlp.experts.down_proj)"
        )
    if report.available_bytes and report.estimated_peak_bytes > report.available_bytes:
        gib = 2**30
        report.problems.append(
            f"estimated peak memory {report.estimated_peak_bytes / gib:.2f} GiB exceeds the "
            f"{report.available_bytes / gib:.2f} GiB available: lower batch_size or prepare.max_length, "
            "use quantization: nf4"
            + ("" if loss_chunk_tokens else ", or set train.loss_chunk_tokens (no full-vocabulary logits)")
        )
    return report


def memory_levers(model: nn.Module, loss_chunk_tokens: int | None, gradient_checkpointing: bool,
                  optimizer: str, offload_expert_adapters: bool = False) -> dict[str, str]:
    """How this step is set to spend memory, one line in the preflight: each lever a setting."""
    from tasks.core.quantize import is_fused_experts
    from tasks.core.routed_lora import is_routed

    levers = {
        "loss chunks (train.loss_chunk_tokens)": f"{loss_chunk_tokens} tokens" if loss_chunk_tokens else "off: full logits",
        "gradient checkpointing": "on" if gradient_checkpointing else "off",
        "optimizer": optimizer,
        "adapter weights (train.adapter_dtype)": next(
            (str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad), "none"),
    }
    if any(is_fused_experts(m) for m in model.modules()):
        levers["experts (train.expert_compute)"] = "routed" if is_routed(model) else "fold"
        chunk = experts_per_dequant(model) if is_routed(model) else None
        levers["4-bit experts dequantized at once (train.experts_per_dequant)"] = str(chunk) if chunk else "all"
        host = host_adapter_bytes(host_trainable(model)) if offload_expert_adapters else 0
        levers["expert adapters (train.offload_expert_adapters)"] = (
            f"host ({host / 2**30:.2f} GiB of host memory)" if host else "GPU")
    return levers


def check(report: PreflightReport) -> None:
    if report.problems:
        raise PreflightError("preflight failed:\n" + "\n".join(f"  - {p}" for p in report.problems))
