"""Routed expert LoRA (`train.expert_compute: routed`) computes what peft's fold computes:
the same logits, loss and LoRA gradients on the tiny Qwen3-MoE in fp32, bf16 and NF4 and on the
Qwen3-shaped stand-in, with the adapter's tensors and saved keys unchanged."""

from __future__ import annotations

import pytest
import torch

from tasks.core.adapters import new_adapter
from tasks.core.config import LoraConfig
from tasks.core.modeling import BaseInfo, load_base_model
from tasks.core.routed_lora import FACTORS, RoutedLoraUnsupported, route_expert_lora
from tiny_base import save_tiny_base

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> BaseInfo:
    return save_tiny_base(tmp_path_factory.mktemp("base"), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def adapted(info: BaseInfo, quantization: str, dtype: torch.dtype = torch.float32, targets=EXPERTS, r: int = 4):
    """The base with a LoRA whose B is not zero, so the experts' update is not trivially nothing."""
    torch.manual_seed(0)
    model = load_base_model(info, quantization)
    if quantization == "none":
        model = model.to(dtype)
    model = new_adapter(model, LoraConfig(r=r, alpha=2 * r, target_parameters=targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model


def run(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach().float(), out.loss.detach().float(), grads


def fold_then_routed(model, ids: torch.Tensor):
    folded = run(model, ids)
    assert route_expert_lora(model) == len(model.base_model.model.model.layers)  # one experts module a layer
    return folded, run(model, ids)


def assert_same(folded, routed, tol: dict) -> None:
    (logits_f, loss_f, grads_f), (logits_r, loss_r, grads_r) = folded, routed
    torch.testing.assert_close(logits_r, logits_f, **tol)
    torch.testing.assert_close(loss_r, loss_f, **tol)
    assert grads_r.keys() == grads_f.keys()
    experts = [n for n in grads_f if ".experts." in n]
    assert len(experts) == 8  # lora_A and lora_B of two stacks in two layers
    for name in grads_f:
        assert grads_f[name].abs().sum() > 0, f"{name}: no gradient, the comparison would be empty"
        torch.testing.assert_close(grads_r[name].float(), grads_f[name].float(), **tol, msg=name)


def ids_for(model, rows: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))


def test_routed_equals_fold_in_fp32(base):
    model = adapted(base, "none")
    assert_same(*fold_then_routed(model, ids_for(model)), tol={"rtol": 1e-4, "atol": 1e-5})


@pytest.mark.parametrize("r", [4, 1])  # ranks padded to 16-byte rows for the grouped matmul (8 in bf16)
def test_routed_equals_fold_in_bf16(base, r):
    model = adapted(base, "none", torch.bfloat16, r=r)
    assert_same(*fold_then_routed(model, ids_for(model)), tol={"rtol": 5e-2, "atol": 5e-3})  # bf16 rounding


@pytest.mark.parametrize("r", [4, 1])
def test_routed_equals_fold_on_nf4_experts(base, r):
    model = adapted(base, "nf4", r=r)
    assert_same(*fold_then_routed(model, ids_for(model)), tol={"rtol": 1e-4, "atol": 1e-5})


# uneven chunks (3, 3, 2); one expert a chunk on 3 tokens, so some chunks get no token
@pytest.mark.parametrize(("chunk", "length"), [(3, 24), (1, 3)])
def test_dequantizing_a_few_experts_at_a_time_changes_nothing(base, chunk, length):
    """train.experts_per_dequant: each chunk's slice is the whole stack's, bit for bit, and the
    step's logits, loss and LoRA gradients are those of whole-stack dequantization."""
    from tasks.core.routed_lora import _sliceable, dequantize_experts, stack_scales

    model = adapted(base, "nf4")
    ids = ids_for(model, rows=1, length=length)
    route_expert_lora(model)
    # first (bitsandbytes' CPU Linear4bit repacks its weights on its first no-grad call, which moves
    # later results by ~1e-3; both runs compared below come after it)
    with torch.no_grad():
        router = model(input_ids=ids, output_router_logits=True).router_logits[0]
    hit = torch.bincount(router.topk(2).indices.flatten(), minlength=8)
    assert (hit == 0).any() == (length == 3)
    whole = run(model, ids)
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    # gate_up_proj's rows (hidden 64) are whole 64-value blocks and are sliced; down_proj's (32) are
    # not, and it is dequantized whole (the flagship's 2048- and 768-value rows both slice)
    assert _sliceable(experts, "gate_up_proj") and not _sliceable(experts, "down_proj")
    for name in ("gate_up_proj",):
        full = getattr(experts, name)
        scales = stack_scales(experts, name)
        assert torch.equal(dequantize_experts(experts, name, 2, 5, scales), full[2:5])
        assert torch.equal(torch.cat([dequantize_experts(experts, name, e, e + 1, scales) for e in range(8)]), full)
    route_expert_lora(model, experts_per_dequant=chunk)
    assert_same(whole, run(model, ids), tol={"rtol": 1e-5, "atol": 1e-6})


def test_routed_equals_fold_with_one_stack_targeted(base):
    model = adapted(base, "nf4", targets=["mlp.experts.down_proj"])
    folded = run(model, ids := ids_for(model))
    route_expert_lora(model)
    logits, loss, grads = run(model, ids)
    torch.testing.assert_close(logits, folded[0], rtol=1e-4, atol=1e-5)
    assert all(torch.allclose(grads[n], g, rtol=1e-4, atol=1e-5) for n, g in folded[2].items())


def test_routed_equals_fold_on_the_qwen3_standin(standin_folder, offline):
    """The real vocabulary's LM head and the stand-in's routing, NF4 as the flagship trains."""
    model = adapted(BaseInfo(kind="external", name_or_path=str(standin_folder)), "nf4")
    assert_same(*fold_then_routed(model, ids_for(model, rows=1, length=16)), tol={"rtol": 1e-4, "atol": 1e-5})


def test_attention_only_adapters_route_the_4bit_experts_too(base):
    """No expert LoRA, but the backward still passes through the 4-bit experts: routed, they are
    dequantized again there instead of kept; the gradients are the same."""
    model = adapted(base, "nf4", targets=[])
    folded = run(model, ids := ids_for(model))
    assert route_expert_lora(model) == 2
    logits, loss, grads = run(model, ids)
    torch.testing.assert_close(logits, folded[0], rtol=1e-4, atol=1e-5)
    assert grads.keys() == folded[2].keys() and not [n for n in grads if ".experts." in n]
    for name, grad in folded[2].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def saved_expert_stacks(model, ids: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the expert-stack-sized tensors ([experts, a, b], a x b >= hidden x intermediate)
    that autograd keeps from the forward for the backward."""
    c = model.config
    stacks: dict[int, tuple[int, ...]] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 3 and tensor.shape[0] == c.num_experts and tensor[0].numel() >= c.hidden_size * c.moe_intermediate_size:
            stacks[tensor.untyped_storage().data_ptr()] = tuple(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sorted(stacks.values())


def test_routed_keeps_no_copy_of_the_experts_for_the_backward(base):
    """The lever itself: fold keeps each layer's two expert stacks, LoRA folded in, until the
    backward; routed keeps none of them (nor a dequantized copy), only thin rank-r activations."""
    model = adapted(base, "nf4")
    ids = ids_for(model)
    folded = saved_expert_stacks(model, ids)
    assert len(folded) == 2 * model.config.num_hidden_layers
    route_expert_lora(model)
    assert saved_expert_stacks(model, ids) == []


def test_routed_with_gradient_checkpointing_and_disabled_adapters(base):
    """Recomputation re-enters the routed path; with adapters off the experts run as the base does."""
    model = adapted(base, "nf4")
    ids = ids_for(model)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    folded = run(model, ids)
    route_expert_lora(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    routed = run(model, ids)
    torch.testing.assert_close(routed[0], folded[0], rtol=1e-4, atol=1e-5)
    for name, grad in folded[2].items():
        torch.testing.assert_close(routed[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits)
    experts = [m for m in model.modules() if getattr(m, FACTORS, None) is not None]
    assert experts and all(getattr(m, FACTORS) == {} for m in experts)  # nothing left behind after a step


def test_an_adapter_saves_the_same_keys_and_loads_back_routed(base, tmp_path):
    from peft import PeftModel

    model = adapted(base, "none")
    keys_before = set(model.state_dict())
    route_expert_lora(model)
    assert set(model.state_dict()) == keys_before
    model.save_pretrained(tmp_path / "adapter")
    ids = ids_for(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(load_base_model(base, "none"), str(tmp_path / "adapter"))
    route_expert_lora(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_an_unsupported_experts_layout_is_named():
    from peft import get_peft_model
    from peft import LoraConfig as PeftLoraConfig
    from torch import nn

    class BiasedExperts(nn.Module):
        has_bias = True

        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = nn.Parameter(torch.zeros(2, 4, 4))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = BiasedExperts()

    model = get_peft_model(Block(), PeftLoraConfig(r=2, target_modules=[], target_parameters=["experts.down_proj"]))
    with pytest.raises(RoutedLoraUnsupported, match=r"experts.*has biases.*train.expert_compute: fold"):
        route_expert_lora(model)
