"""Expert adapters kept in host memory while a QLoRA stage trains on a GPU.

On Qwen3-30B-A3B at r 16, LoRA on the fused experts is 629 M parameters: 2.4 GiB of fp32 weights
and as much again of gradients on the GPU, next to 15.6 GiB of 4-bit weights. That is what keeps the
step over 18 GB (bench/results/gpu_qlora-h200-no-offload-whole-dequant.json: 22.1 GiB). Offloaded
(`train.offload_expert_adapters`), the expert factors, their gradients and their Adam moments live
in pinned host memory. Routed experts (tasks/core/routed_lora.py) copy one stack's factors to the
GPU while that layer computes (~26 MB each, fp32) through a differentiable copy, so the gradient
lands on the host parameter; the optimizer steps them there, in fp32 (torch's fused AdamW, one
kernel per device: bitsandbytes' 8-bit optimizers are GPU-only). Nothing is rounded differently:
the factors reach the GPU in fp32 and are cast there as they would be on the GPU, so the step
computes what it computes without offloading: on an H200, the same losses, gradients and updated
factors bit for bit (tests/test_expert_offload.py, bench/results/gpu_expert_offload-h200.json).

The cost is time: each step copies every layer's factors to the GPU twice (forward and recompute)
and their gradients back, and AdamW runs over 629 M parameters on the CPU: 1,155 against 1,829
tokens/s on an H200 at 2,048 tokens a step (bench/results/gpu_qlora-h200-*.json).
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tasks.core.config import LoraConfig, TrainConfig

log = logging.getLogger(__name__)


def resolve_expert_offload(train: TrainConfig, lora: LoraConfig, on_gpu: bool) -> bool:
    """Whether a stage (its `lora`) keeps its expert adapters on the host. `auto`: under nf4 on one GPU (QLoRA,
    the memory-first setting; the flagship's step then fits 18 GiB) when routed experts compute them
    and the optimizer can step host memory; `on` insists (ConfigError when it cannot be done); `off`
    never. On a CPU everything is in host memory already: nothing moves, so the answer is False."""
    from tasks.core.config import TORCH_OPTIMIZERS, ConfigError

    wanted = train.offload_expert_adapters
    blockers = [why for why, bad in (
        ("train.expert_compute is fold (peft folds the factors into the stack on the GPU)", train.expert_compute != "routed"),
        (f"train.optimizer {train.optimizer} steps on the GPU only (use auto or adamw_torch)",
         train.optimizer not in ("auto", *TORCH_OPTIMIZERS)),
        ("the launcher is accelerate (FSDP/DeepSpeed place parameters themselves)", train.launcher.kind != "python"),
        ("train.adapter_dtype is bf16 (it steps with bitsandbytes' optimizer, GPU memory only)", train.adapter_dtype == "bf16"),
    ) if bad]
    if wanted == "on" and blockers:
        raise ConfigError("train.offload_expert_adapters is on, but " + "; ".join(blockers))
    if wanted == "off" or not on_gpu or not lora.target_parameters:
        return False
    return wanted == "on" or (train.quantization == "nf4" and not blockers)


def expert_adapter_modules(model: nn.Module) -> list[tuple[nn.Module, torch.device]]:
    """The LoRA factor modules (peft's lora_A / lora_B layers) of every peft wrapper around a routed
    fused experts module, each with the device its experts compute on."""
    from peft.tuners.lora.layer import ParamWrapper

    from tasks.core.routed_lora import FACTORS

    found = []
    for module in model.modules():
        experts = module.get_base_layer() if isinstance(module, ParamWrapper) else None
        if experts is None or getattr(experts, FACTORS, None) is None:
            continue
        home = next(experts.parameters()).device  # the stack (4-bit storage under nf4)
        found.extend((layer, home) for factors in (module.lora_A, module.lora_B) for layer in factors.values())
    return found


def expert_adapter_parameters(model: nn.Module) -> list[tuple[nn.Parameter, torch.device]]:
    """The trainable parameters of `expert_adapter_modules`, each with its experts' device."""
    return [(p, home) for layer, home in expert_adapter_modules(model) for p in layer.parameters() if p.requires_grad]


def offload_expert_adapters(model: nn.Module) -> int:
    """Move the routed experts' LoRA factors to pinned host memory, where they then stay whatever
    moves the model (the Trainer calls `model.to(device)`, and accelerate's `prepare` again); their
    bytes. A no-op (0) without a GPU. Call it before the optimizer makes its state, so the state is
    made on the host: `train` does, before `run_trainer`. They stay there after training: the eval
    loss and saving work from there, and bringing 2.4 GiB back while the Trainer still holds its
    state would be the stage's peak."""
    import torch

    if not torch.cuda.is_available():
        return 0
    moved = 0
    for layer, _home in expert_adapter_modules(model):
        for param in layer.parameters():
            if param.device.type != "cpu":
                param.data = param.data.to("cpu").pin_memory()  # as Module.to does: the Parameter object stays
                param.grad = None
                moved += param.numel() * param.element_size()
        layer._apply = MethodType(_stay_on_host, layer)  # Module.to / .cuda() recurse through _apply
    torch.cuda.empty_cache()
    if moved:
        log.info("expert adapters: %.2f GiB of LoRA factors in host memory (train.offload_expert_adapters)", moved / 2**30)
    return moved


def _stay_on_host(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    return self

