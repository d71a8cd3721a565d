"""LoRA on fused MoE experts applied to the routed tokens, not folded into every expert's weight.

peft adapts a fused expert stack (`mlp.experts.gate_up_proj`, `[experts, out, in]`) by folding its
update into the weight on each forward: `W + s·B·A` for all 128 experts of a layer, a full copy in
the compute dtype that autograd keeps for the backward, and whose gradient, as large again, the
backward makes. For Qwen3-30B-A3B that is ~2.3 GiB per layer in flight (`expert_fold` in the
preflight), although each token reaches only 8 experts.

Routed, the same update is applied where it acts: expert e's tokens get `x·Wₑᵀ + s·(x·Aₑᵀ)·Bₑᵀ`,
two thin grouped matmuls (rank r) beside the base one. `x·(W + s·B·A)ᵀ` is that sum, so outputs and
LoRA gradients are the fold's up to float rounding (tests/test_routed_lora.py, bf16 and NF4); the
weight is never copied and gets no gradient. The adapter is peft's own (same `lora_A`/`lora_B`
tensors, same saved keys); only how a forward uses them changes, so an adapter trained one way
loads and runs the other way, and merging (`chain_policy: merge`) is peft's.

A 4-bit stack is dequantized again in the backward rather than kept from the forward (its
gradient with respect to the input needs the weight, not a copy held across the layer), which also
helps experts without LoRA: an attention-only adapter still backpropagates through them.

`route_expert_lora(model)` switches every fused experts module of a model to this path
(`train.expert_compute: routed`); the Qwen3-MoE experts layout (gated, no biases, weights
`[experts, out, in]`) is what it supports, and anything else gets a clear error. Measured on an
H200 (bench/results/gpu_qlora-h200-*.json): the flagship step's peak 22.14 GiB against 22.32 folded.
"""

from __future__ import annotations

from functools import cache
from types import MethodType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# On a routed experts module: {parameter name: (B [experts, out, r], A [experts, r, in], scale)},
# filled by each peft ParamWrapper around it for the span of its forward.
FACTORS = "_stagewise_routed_lora"
_PATCHED = "_stagewise_routed_forward"


class RoutedLoraUnsupported(ValueError):
    """The experts module is not laid out the way routed LoRA computes it."""


def route_expert_lora(model: nn.Module) -> int:
    """Every fused experts module of `model` computes on its routed tokens: LoRA (under a peft
    wrapper) as x·A·B, and a 4-bit weight dequantized again for the backward rather than kept
    (experts without LoRA too: an attention-only adapter still backpropagates through them).
    Returns how many modules it switched; idempotent."""
    from peft.tuners.lora.layer import ParamWrapper

    from tasks.core.quantize import is_fused_experts

    _patch_param_wrapper(ParamWrapper)
    routed = 0
    for name, experts in model.named_modules():
        if isinstance(experts, ParamWrapper) or not is_fused_experts(experts) or getattr(experts, FACTORS, None) is not None:
            continue  # peft's wrappers hand their factors to the experts module they wrap
        _check_layout(name, experts)
        setattr(experts, FACTORS, {})
        experts.forward = MethodType(_routed_experts_forward, experts)
        routed += 1
    return routed


def is_routed(model: nn.Module) -> bool:
    """Whether `route_expert_lora` switched any experts module of `model`."""
    return any(getattr(m, FACTORS, None) is not None for m in model.modules())


def _check_layout(name: str, experts: nn.Module) -> None:
    problems = [what for what, bad in (
        ("has biases", getattr(experts, "has_bias", False)),
        ("is not gated", not getattr(experts, "has_gate", True)),
        ("stores weights [experts, in, out]", getattr(experts, "is_transposed", False)),
        ("normalises expert outputs", getattr(experts, "has_post_expert_norm", False)),
        ("is expert-parallel", getattr(experts, "_is_expert_parallel", False)),
        ("has no gate_up_proj / down_proj", not all(hasattr(experts, p) for p in ("gate_up_proj", "down_proj"))),
    ) if bad]
    if problems:
        raise RoutedLoraUnsupported(
            f"{name}: routed expert LoRA supports Qwen3-MoE-style fused experts, but this module "
            f"({type(experts).__name__}) {', '.join(problems)}; set train.expert_compute: fold")


def _patch_param_wrapper(wrapper: type) -> None:
    """peft's ParamWrapper.forward, for a routed experts module: hand the experts the LoRA factors
    instead of registering peft's folding parametrization. Other wrappers keep peft's forward."""
    if getattr(wrapper, _PATCHED, False):
        return
    original = wrapper.forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        factors = getattr(self.get_base_layer(), FACTORS, None)
        if factors is None or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return original(self, x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        if len(adapters) > 1:
            raise NotImplementedError(f"routed expert LoRA runs one active adapter; {adapters} are active")
        factors[self.parameter_name] = self.get_delta_factors(adapters[0])
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            factors.pop(self.parameter_name, None)

    wrapper.forward = forward
    setattr(wrapper, _PATCHED, True)


def _routed_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' forward with each stack's LoRA applied to the tokens routed to each expert
    (a stack without factors, adapters off or not targeted, is the base alone)."""
    import torch

    factors = getattr(self, FACTORS)
    tokens, top_k = top_k_index.shape
    expert_of_pair = top_k_index.reshape(-1)
    order = torch.argsort(expert_of_pair, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(expert_of_pair, minlength=self.num_experts)
    ends = torch.cumsum(counts, dim=0).to(torch.int32)
    routed = hidden_states[order // top_k]
    gate_up = _linear_with_lora(self, "gate_up_proj", routed, factors.get("gate_up_proj"), ends)
    if hasattr(self, "_apply_gate"):
        activated = self._apply_gate(gate_up)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        activated = self.act_fn(gate) * up
    out = _linear_with_lora(self, "down_proj", activated, factors.get("down_proj"), ends)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    unsorted = torch.empty_like(out).index_copy(0, order, out)  # back to (token, slot) order
    return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)  # fixed order: deterministic


def _linear_with_lora(experts: nn.Module, name: str, x: torch.Tensor, lora: tuple | None,
                      ends: torch.Tensor) -> torch.Tensor:
    """Per expert group of rows: x·Wₑᵀ, plus s·(x·Aₑᵀ)·Bₑᵀ when the stack has LoRA."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(experts, name):  # 4-bit: dequantized again for the backward, not kept
        out = _dequantizing_grouped_linear().apply(x, ends, experts, name)
    else:
        out = grouped_linear(x, getattr(experts, name), ends)
    if lora is None:
        return out
    lora_b, lora_a, scale = _rank_padded(*lora)
    return out + grouped_linear(grouped_linear(x, lora_a, ends), lora_b, ends) * scale


def _rank_padded(lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float) -> tuple:
    """peft's views of its lora_B [experts, out, r] / lora_A [experts, r, in] made dense, the rank
    padded with zeros to 16 bytes: torch's grouped matmul wants 16-byte-aligned rows (rank 1, 2 or 4
    in bf16 are not). Zero rows and columns add nothing, and their gradients fall off in the pad."""
    from torch.nn import functional as F

    pad = -lora_a.shape[1] % max(1, 16 // lora_a.element_size())
    if pad:
        return F.pad(lora_b, (0, pad)), F.pad(lora_a, (0, 0, 0, pad)), scale
    return lora_b.contiguous(), lora_a.contiguous(), scale


@cache  # one class, made on first use: torch is imported inside
def _dequantizing_grouped_linear():
    import torch

    class DequantizingGroupedLinear(torch.autograd.Function):
        """x·Wₑᵀ per expert group with a frozen 4-bit W: the backward dequantizes W again instead of
        autograd keeping the dequantized copy (a layer's 128 experts in bf16, ~1.1 GiB for
        Qwen3-30B-A3B) from the forward to the backward. W gets no gradient; x does: gᵧ·Wₑ."""

        @staticmethod
        def forward(ctx, x, ends, experts, name):
            ctx.experts, ctx.name, ctx.x_dtype = experts, name, x.dtype
            ctx.save_for_backward(ends)
            return grouped_linear(x, getattr(experts, name), ends)

        @staticmethod
        def backward(ctx, grad_out):
            (ends,) = ctx.saved_tensors
            with torch.no_grad():
                weight = getattr(ctx.experts, ctx.name)  # [experts, out, in]; gᵧ·Wₑ = gᵧ·((Wₑᵀ)ᵀ), a view, no copy
                grad_x = grouped_linear(grad_out.contiguous(), weight.transpose(-2, -1), ends)
            return grad_x.to(ctx.x_dtype), None, None, None

    return DequantizingGroupedLinear


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows [ends[e-1], ends[e]) of x times weight[e]ᵀ (weight: [experts, out, in]). transformers'
    own grouped matmul where its kernel takes these shapes (torch's grouped_mm wants 16-byte-aligned
    rows), so routed and folded LoRA run the same kernel; else a loop over the experts."""
    try:
        from transformers.integrations.moe import _grouped_linear
    except ImportError:  # a transformers without it: exact, slower
        return _looped_linear(x, weight, ends)
    size = weight.element_size()
    aligned = all(n * size % 16 == 0 for n in weight.shape[1:]) and weight.data_ptr() % 16 == 0
    return _grouped_linear(x, weight, ends) if aligned else _looped_linear(x, weight, ends)


def _looped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    import torch

    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    parts = [rows @ weight[e].to(rows.dtype).T for e, rows in enumerate(torch.split(x, sizes)) if sizes[e]]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])
