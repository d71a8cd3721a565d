"""NF4 for fused MoE experts.

In transformers 5, Qwen3-MoE experts are 3-D `nn.Parameter`s (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), not `nn.Linear` layers, so `load_in_4bit` leaves them (most of the
model: ~29B of Qwen3-30B-A3B's parameters) in full precision. bitsandbytes can quantize any
parameter through a parametrization that dequantizes on access; this module applies it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def fused_expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules named `...experts` that hold fused 3-D expert weights (quantized or not)."""
    return [(name, module) for name, module in model.named_modules() if name.endswith("experts") and is_fused_experts(module)]


def is_fused_experts(module: nn.Module) -> bool:
    """Holds fused 3-D expert weights (parametrized to 4 bits, or plain), or wraps a module that does."""
    params = getattr(module, "parametrizations", None)
    return any(p in (params or {}) for p in EXPERT_PARAMETERS) or any(
        getattr(getattr(module, p, None), "ndim", 0) == 3 for p in EXPERT_PARAMETERS
    )


def quantize_fused_experts(model: nn.Module, compress_statistics: bool = True) -> int:
    """Put every fused expert weight in NF4 (double quantization); returns how many."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    from tasks.core.peft_fixes import fix_param_lora_on_4bit

    fix_param_lora_on_4bit()  # peft's LoRA on these experts stacks a parametrization on the 4-bit one
    count = 0
    for _, module in fused_expert_modules(model):
        for param in EXPERT_PARAMETERS:
            already = param in getattr(module, "parametrizations", {})
            if not already and getattr(getattr(module, param, None), "ndim", 0) == 3:
                replace_parameter_4bit(module, param, compress_statistics=compress_statistics, quant_type="nf4")
                count += 1
    return count
