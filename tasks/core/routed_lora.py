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

A 4-bit stack is also dequantized a chunk of experts at a time (`train.experts_per_dequant`),
each chunk's grouped matmul on its own slice, so a layer's whole stack never exists in bf16 at
once; and factors kept in host memory (tasks/core/expert_offload.py) are copied to the layer's
device as it computes (`delta_factors`).

`route_expert_lora(model)` switches every fused experts module of a model to this path
(`train.expert_compute: routed`); the Qwen3-MoE experts layout (gated, no biases, weights
`[experts, out, in]`) is what it supports, and anything else gets a clear error. Measured on an
H200 (bench/results/gpu_qlora-h200-*.json): the flagship step's peak 22.14 GiB against 22.32
folded; with 32 experts dequantized at a time, 21.15.
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
# On a routed experts module: how many experts of a 4-bit stack to dequantize at a time (None: all).
DEQUANT_CHUNK = "_stagewise_experts_per_dequant"


class RoutedLoraUnsupported(ValueError):
    """The experts module is not laid out the way routed LoRA computes it."""


def route_expert_lora(model: nn.Module, experts_per_dequant: int | None = None) -> int:
    """Every fused experts module of `model` computes on its routed tokens: LoRA (under a peft
    wrapper) as x·A·B, and a 4-bit weight dequantized again for the backward rather than kept
    (experts without LoRA too: an attention-only adapter still backpropagates through them), at
    most `experts_per_dequant` experts at a time (`train.experts_per_dequant`; None: the whole
    stack). Returns how many modules it switched; idempotent (the chunk is set again)."""
    from peft.tuners.lora.layer import ParamWrapper

    from tasks.core.quantize import is_fused_experts

    _patch_param_wrapper(ParamWrapper)
    routed = 0
    for name, experts in model.named_modules():
        if isinstance(experts, ParamWrapper) or not is_fused_experts(experts):
            continue  # peft's wrappers hand their factors to the experts module they wrap
        setattr(experts, DEQUANT_CHUNK, experts_per_dequant)
        if getattr(experts, FACTORS, None) is not None:
            continue
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
        factors[self.parameter_name] = delta_factors(self, adapters[0], x.device)
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            factors.pop(self.parameter_name, None)

    wrapper.forward = forward
    setattr(wrapper, _PATCHED, True)


def delta_factors(wrapper: nn.Module, adapter: str, device: torch.device) -> tuple:
    """peft's `ParamWrapper.get_delta_factors`: (lhs [experts, out, r], rhs [experts, r, in], scale),
    the update being scale·lhs·rhs, with the factors on `device`. Adapters kept on the host
    (`train.offload_expert_adapters`, tasks/core/expert_offload.py) come over here as they are (fp32,
    a differentiable copy whose gradient goes back to the host) and are cast to the stack's dtype on
    arrival; peft's own would cast them on the host first. Elsewhere it is peft's, to the bit
    (tests/test_expert_offload.py)."""
    weight_a, weight_b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
    if weight_a.device != device:
        weight_a, weight_b = weight_a.to(device, non_blocking=True), weight_b.to(device, non_blocking=True)
    experts = wrapper.num_experts
    weight_a = weight_a.reshape(experts, -1, weight_a.shape[-1])  # [experts, r, in]
    weight_b = weight_b.reshape(weight_b.shape[0], -1, experts).permute(2, 0, 1)  # [experts, out, r]
    if wrapper._did_swap_in_out_features:
        lhs, rhs = weight_b, weight_a
    else:  # a stack stored [experts, in, out]
        lhs, rhs = weight_a.transpose(-2, -1), weight_b.transpose(-2, -1)
    dtype = wrapper.get_param().dtype  # 4-bit stacks: a stand-in, nothing dequantized (peft_fixes)
    return lhs.to(dtype), rhs.to(dtype), wrapper.scaling[adapter]


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
            return dequantized_grouped_linear(x, experts, name, ends)

        @staticmethod
        def backward(ctx, grad_out):
            (ends,) = ctx.saved_tensors
            with torch.no_grad():  # gᵧ·Wₑ = gᵧ·((Wₑᵀ)ᵀ): the transpose is a view, no copy
                grad_x = dequantized_grouped_linear(grad_out.contiguous(), ctx.experts, ctx.name, ends, transposed=True)
            return grad_x.to(ctx.x_dtype), None, None, None

    return DequantizingGroupedLinear


def dequantized_grouped_linear(x: torch.Tensor, experts: nn.Module, name: str, ends: torch.Tensor,
                               transposed: bool = False) -> torch.Tensor:
    """`grouped_linear` with a 4-bit stack dequantized a chunk of experts at a time
    (`DEQUANT_CHUNK`): a chunk's rows of x are contiguous (rows are sorted by expert), so each
    chunk is one grouped matmul on its own dequantized slice, and the outputs concatenate in order.
    A stack bitsandbytes' slicing does not fit (see `dequantize_experts`) is dequantized whole."""
    import torch

    chunk = getattr(experts, DEQUANT_CHUNK, None)
    count = ends.shape[0]
    if not chunk or chunk >= count or not _sliceable(experts, name):
        weight = getattr(experts, name)
        return grouped_linear(x, weight.transpose(-2, -1) if transposed else weight, ends)
    starts = torch.cat([ends.new_zeros(1), ends])  # starts[e]: expert e's first row; starts[count]: all rows
    bounds = starts[list(range(0, count, chunk)) + [count]].tolist()  # each chunk's first row, then the end
    scales = stack_scales(experts, name)
    state = experts.parametrizations[name][0].quant_state
    width = state.shape[2] if transposed else state.shape[1]
    parts = []
    for index, first in enumerate(range(0, count, chunk)):
        last = min(first + chunk, count)
        rows = x[bounds[index]:bounds[index + 1]]
        if not rows.shape[0]:  # no token routed to these experts: nothing to dequantize
            parts.append(x.new_zeros(0, width))
            continue
        weight = dequantize_experts(experts, name, first, last, scales)
        parts.append(grouped_linear(rows, weight.transpose(-2, -1) if transposed else weight,
                                    ends[first:last] - bounds[index]))
    return torch.cat(parts)


def _sliceable(experts: nn.Module, name: str) -> bool:
    """One bitsandbytes 4-bit parametrization whose rows are whole quantization blocks: then no block
    straddles two experts, and the CUDA kernel's flat block order and the CPU kernel's row-wise one
    agree (with shorter rows they differ on a CPU). Qwen3-30B-A3B's stacks (rows of 2048 and 768
    values, blocks of 64) are; a stack that is not is dequantized whole."""
    plist = experts.parametrizations[name]
    state = getattr(plist[0], "quant_state", None) if len(plist) == 1 else None
    return state is not None and len(state.shape) == 3 and state.shape[-1] % state.blocksize == 0


def stack_scales(experts: nn.Module, name: str) -> torch.Tensor:
    """A 4-bit stack's block scales (absmax) in fp32; under double quantization, dequantized from
    their own 8-bit form (1/64 of the stack's values: 24 MiB for a Qwen3-30B-A3B gate_up stack)."""
    from bitsandbytes.functional import dequantize_blockwise

    state = experts.parametrizations[name][0].quant_state
    if state.nested:
        return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


def dequantize_experts(experts: nn.Module, name: str, first: int, last: int, scales: torch.Tensor) -> torch.Tensor:
    """Experts [first, last) of a 4-bit fused stack in its compute dtype, the rest left packed:
    the packed bytes and block scales (`stack_scales`) of those experts only, through bitsandbytes'
    own kernel. Bit for bit the matching slice of the whole stack's dequantization (tests/test_routed_lora.py)."""
    import torch

    plist = experts.parametrizations[name]
    state, packed = plist[0].quant_state, plist.original
    per_expert = state.shape[1] * state.shape[2]
    blocks = slice(first * per_expert // state.blocksize, last * per_expert // state.blocksize)
    data = packed.reshape(-1)[first * per_expert // 2:last * per_expert // 2].reshape(-1, 1)
    shape = torch.Size((last - first, *state.shape[1:]))
    return torch.ops.bitsandbytes.dequantize_4bit.default(data, scales[blocks].contiguous(), state.blocksize,
                                                          state.quant_type, shape, state.dtype)


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
