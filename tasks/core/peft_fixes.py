"""Fixes for peft's parameter LoRA on top of bitsandbytes' 4-bit parametrization (NF4 experts).

peft's `ParamWrapper` applies LoRA to a bare `nn.Parameter` (the fused MoE experts) by registering
a parametrization for the duration of each forward and removing it afterwards. When the parameter
already carries bitsandbytes' dequantizing parametrization, peft 0.21 goes wrong in two ways, both
silent at first:

1. It removes only a `_LoraParameterProxy` from the stack, but for a single adapter on experts it
   registers a `_LoraFactorsProxy`, which is left behind ("Could not find any LoRA
   parametrization" warning). Proxies pile up, and the second step fails (`requires_grad_` on the
   uint8 storage).
2. It registers its proxy with torch's safety check on, which reads the parameter. With two
   wrappers nested on one experts module (gate_up_proj and down_proj), the inner read happens
   inside the outer wrapper's `parametrize.cached()` block, so the dequantized weight *without*
   LoRA is cached and the forward uses it: the inner adapter gets no gradient and never learns.
   (`get_param`, read for dtype and device, does the same.)

`fix_param_lora_on_4bit` installs the fixes for 4-bit parameters only (others keep peft's code):
the proxy is registered without the check (it keeps shape and dtype by construction), either proxy
type is removed afterwards, and `get_param` answers with a free stand-in of the right shape, dtype
and device. Besides being right, this saves three dequantizations and one LoRA fold of every expert
stack per forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

_PATCHED = "_stagewise_param_lora_on_4bit"


def fix_param_lora_on_4bit() -> bool:
    """Install the fixes on peft's ParamWrapper; idempotent. True when installed by this call."""
    from peft.tuners.lora import layer
    from torch.nn.utils import parametrize

    wrapper = getattr(layer, "ParamWrapper", None)
    if wrapper is None or getattr(wrapper, _PATCHED, False):
        return False
    proxies = tuple(t for t in (getattr(layer, "_LoraParameterProxy", None), getattr(layer, "_LoraFactorsProxy", None)) if t)
    original_remove, original_get_param = wrapper._remove_parametrizations, wrapper.get_param
    original_activate = wrapper._activate_lora

    @contextmanager
    def activate_lora(self, active_adapters: list[str]):
        base, name = self.get_base_layer(), self.parameter_name
        adapters = [a for a in active_adapters or [] if a in self.lora_A]
        if four_bit_stand_in(base, name) is None or not adapters:
            with original_activate(self, active_adapters):
                yield
            return
        if len(adapters) == 1 and self.num_experts > 1:
            proxy = layer._LoraFactorsProxy(*self.get_delta_factors(adapters[0]))
        else:
            proxy = layer._LoraParameterProxy(sum(self.get_delta_weight(a) for a in adapters))
        parametrize.register_parametrization(base, name, proxy, unsafe=True)
        try:
            with parametrize.cached():
                yield
        finally:
            self._remove_parametrizations()

    def remove_lora_proxy(self) -> None:
        stack = self.get_base_layer().parametrizations[self.parameter_name]
        if len(stack) > 1:
            for i in reversed(range(len(stack))):
                if isinstance(stack[i], proxies):
                    del stack[i]
                    return
        original_remove(self)

    def get_param(self) -> Any:
        stand_in = four_bit_stand_in(self.get_base_layer(), self.parameter_name)
        return stand_in if stand_in is not None else original_get_param(self)

    wrapper._remove_parametrizations = remove_lora_proxy
    wrapper.get_param = get_param
    wrapper._activate_lora = activate_lora
    setattr(wrapper, _PATCHED, True)
    return True


def four_bit_stand_in(module, name: str):
    """A zero-cost tensor with the shape, dtype and device a 4-bit parameter dequantizes to, when
    `module.<name>` is stored in 4 bits with no other parametrization on it; else None."""
    import torch
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    stacks = getattr(module, "parametrizations", None)
    if stacks is None or name not in stacks:
        return None
    stack = stacks[name]
    if len(stack) != 1 or not isinstance(stack[0], Bnb4bitParametrization):
        return None
    state = stack[0].quant_state
    shape = tuple(state.shape)
    return torch.empty((1,) * len(shape), dtype=state.dtype, device=stack.original.device).expand(shape)


def nest_expert_lora_as_on_4bit(model) -> int:
    """Make peft nest LoRA on a full-precision model's fused experts the way it does on 4-bit ones;
    returns how many experts modules were reordered.

    Two target parameters of one module get two nested ParamWrappers, and the nesting names the
    adapter's keys (`experts.base_layer.lora_A` is the inner wrapper's). peft nests plain parameters
    in registration order (gate_up_proj inside) but parametrized ones, as NF4 experts are, in sorted
    name order (down_proj inside), so an adapter trained on NF4 experts fails to load on the
    full-precision base ("size mismatch for ...experts.base_layer.lora_A"). Listing the plain
    parameters in sorted order too gives the 4-bit nesting. Call it before peft wraps the model."""
    count = 0
    for name, module in model.named_modules():
        if not name.endswith("experts"):
            continue
        fused = sorted(p for p, value in module._parameters.items() if value is not None and value.ndim == 3)
        if len(fused) > 1:
            for p in fused:  # re-inserted in sorted order, after any other parameter
                module._parameters[p] = module._parameters.pop(p)
            count += 1
    return count
