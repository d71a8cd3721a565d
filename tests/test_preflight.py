"""Preflight on the tiny Qwen3-MoE: NF4 reaches the fused experts, and each silent failure of the
usual QLoRA recipe on MoE models is caught before training."""

from __future__ import annotations

import pytest
import torch

from tasks.core.adapters import peft_lora_config
from tasks.core.config import LoraConfig
from tasks.core.modeling import BaseInfo, load_base_model
from tasks.core.preflight import PreflightError, check, part_of, run_preflight
from tiny_base import save_tiny_base

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> BaseInfo:
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def with_lora(model, target_parameters=EXPERTS):
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(LoraConfig(r=4, alpha=8, target_parameters=target_parameters), model))


def test_nf4_puts_attention_and_fused_experts_in_4bit(base):
    model = with_lora(load_base_model(base, "nf4"), target_parameters=[])
    report = run_preflight(model, "nf4", expects_experts=False, batch_size=2, seq_len=32)
    assert report.problems == []
    assert report.four_bit_by_part["experts"] == report.parameters_by_part["experts"] > 0
    assert report.four_bit_by_part["attention"] > 0
    assert report.trainable_by_part["attention"] > 0 and "experts" not in report.trainable_by_part
    assert "router" not in report.trainable_by_part
    assert "4bit" in report.parameters_by_storage and report.adapter_bytes > 0
    # The quantized model still computes: logits stay near the full-precision model's (an untrained
    # model's Gaussian weights lose ~10-15% to 4 bits; broken dequantization would be ~100%).
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    full = load_base_model(base, "none")(input_ids=ids).logits
    quant = load_base_model(base, "nf4")(input_ids=ids).logits
    assert (quant - full).norm() / full.norm() < 0.25


def test_lora_reaches_4bit_experts_and_passes_preflight(base):
    model = with_lora(load_base_model(base, "nf4"))
    report = run_preflight(model, "nf4", expects_experts=True, batch_size=2, seq_len=32)
    assert report.trainable_by_part["experts"] > 0  # the full-name expansion reached the 4-bit experts
    assert report.four_bit_by_part["experts"] == report.parameters_by_part["experts"]
    check(report)


def test_lora_on_4bit_experts_learns_like_lora_on_their_dequantized_weights(base):
    """QLoRA on fused experts: several steps run (peft 0.21 alone fails at the second), the 4-bit
    storage is untouched, the LoRA proxy is removed after each forward, and the LoRA gradients
    equal those of the same LoRA on full-precision experts holding the dequantized values."""
    from tasks.core.quantize import fused_expert_modules

    quantized = load_base_model(base, "nf4")
    dequantized = load_base_model(base, "none")
    for (_, q), (_, d) in zip(fused_expert_modules(quantized), fused_expert_modules(dequantized)):
        for name in ("gate_up_proj", "down_proj"):
            getattr(d, name).data.copy_(getattr(q, name))  # access dequantizes
    for layer_q, layer_d in zip(quantized.model.layers, dequantized.model.layers):  # same attention too
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer_d.self_attn, proj).weight.data.copy_(dequantize_linear(getattr(layer_q.self_attn, proj)))
    lora_q, lora_d = with_lora(quantized), with_lora(dequantized)
    storage = {n: p.clone() for n, p in lora_q.named_parameters() if "parametrizations" in n}  # 4-bit experts
    ids = torch.randint(0, quantized.config.vocab_size, (2, 12))
    optimizer = torch.optim.SGD([p for p in lora_q.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        with torch.no_grad():  # the twin starts each step from the same adapter
            twin = lora_factors(lora_d)
            for key, factor in lora_factors(lora_q).items():
                twin[key].copy_(factor)
        for model in (lora_q, lora_d):
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
        grads_q = {k: p.grad for k, p in lora_factors(lora_q).items() if ".experts." in k}
        grads_d = {k: p.grad for k, p in lora_factors(lora_d).items() if ".experts." in k}
        assert grads_q and grads_q.keys() == grads_d.keys()
        for name, grad in grads_q.items():
            assert grad is not None, f"{name} gets no gradient: its LoRA does not reach the forward"
            assert step == 0 or grad.abs().sum() > 0, name  # lora_A: zero while lora_B is still zero
            torch.testing.assert_close(grad, grads_d[name], rtol=1e-2, atol=1e-4)  # float noise only
        optimizer.step()
    for _, module in fused_expert_modules(lora_q):
        assert all(len(module.parametrizations[p]) == 1 for p in ("gate_up_proj", "down_proj"))
    changed = [n for n, p in lora_q.named_parameters() if n in storage and not torch.equal(p, storage[n])]
    assert not changed


def lora_factors(model) -> dict[str, torch.Tensor]:
    """Every LoRA factor by a name that does not depend on how peft nested its wrappers:
    `...experts.<parameter>.lora_A` for fused experts (wrappers may nest in either order)."""
    from peft.tuners.lora.layer import ParamWrapper

    factors = {n: p for n, p in model.named_parameters() if p.requires_grad and ".experts." not in n}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = name.split(".experts")[0]
            for factor in ("lora_A", "lora_B"):
                factors[f"{owner}.experts.{module.parameter_name}.{factor}"] = getattr(module, factor)["default"].weight
    return factors


def dequantize_linear(linear) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()


def test_plain_load_in_4bit_leaves_experts_full_precision_and_fails(base):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        base.name_or_path, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    )
    report = run_preflight(with_lora(model), "nf4", expects_experts=True, batch_size=2, seq_len=32)
    with pytest.raises(PreflightError, match="expert parameters are in full precision"):
        check(report)


def test_lora_that_misses_the_experts_fails(base):
    model = with_lora(load_base_model(base, "none"), target_parameters=[])
    report = run_preflight(model, "none", expects_experts=True, batch_size=2, seq_len=32)
    with pytest.raises(PreflightError, match="no expert parameter is adapted"):
        check(report)


def test_estimate_over_the_memory_limit_fails(base):
    model = with_lora(load_base_model(base, "none"))
    report = run_preflight(model, "none", expects_experts=True, batch_size=2, seq_len=32, memory_limit_bytes=2**20)
    assert report.estimated_peak_bytes > 2**20
    with pytest.raises(PreflightError, match=r"estimated peak memory .* exceeds the 0.00 GiB available"):
        check(report)
    bigger = run_preflight(model, "none", expects_experts=True, batch_size=8, seq_len=32, memory_limit_bytes=2**40)
    assert bigger.estimated_peak_bytes > report.estimated_peak_bytes and bigger.problems == []


def test_the_chunked_loss_bounds_the_logits_term_and_the_terms_add_up(base):
    model = with_lora(load_base_model(base, "none"))
    vocab = model.config.vocab_size
    full = run_preflight(model, "none", expects_experts=True, batch_size=4, seq_len=64)
    chunked = run_preflight(model, "none", expects_experts=True, batch_size=4, seq_len=64, loss_chunk_tokens=16)
    assert full.estimated_terms["logits"] == 4 * 64 * vocab * 8  # fp32 logits and their gradient, every token
    assert chunked.estimated_terms["logits"] == 16 * vocab * 8  # one chunk's
    assert {k: v for k, v in chunked.estimated_terms.items() if k != "logits"} == {
        k: v for k, v in full.estimated_terms.items() if k != "logits"}
    assert chunked.estimated_peak_bytes == sum(chunked.estimated_terms.values())
    assert "logits" in chunked.summary() and "adapter" in chunked.summary()
    over = run_preflight(model, "none", expects_experts=True, batch_size=4, seq_len=64, memory_limit_bytes=2**20)
    assert "train.loss_chunk_tokens" in over.problems[0]  # named as a lever where it is off


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "attention"),
        ("model.layers.1.mlp.experts.parametrizations.gate_up_proj.original", "experts"),
        ("model.layers.1.mlp.gate.weight", "router"),
        ("model.embed_tokens.weight", "embeddings"),
        ("model.norm.weight", "other"),
    ],
)
def test_part_of(name, part):
    assert part_of(name) == part


def test_gradient_checkpointing_keeps_layer_inputs_and_one_layers_activations(base):
    from tasks.core.preflight import estimate_terms

    model = with_lora(load_base_model(base, "none"))
    layers, hidden, tokens = model.config.num_hidden_layers, model.config.hidden_size, 4 * 64
    plain = estimate_terms(model, 4, 64)["activations"]
    checkpointed = estimate_terms(model, 4, 64, gradient_checkpointing=True)["activations"]
    assert plain == layers * tokens * hidden * 34 * 2  # fp32 on a CPU: twice the bf16 factor
    assert checkpointed == (layers * tokens * hidden * 2 + tokens * hidden * 34) * 2 < plain


def test_the_expert_fold_is_one_copy_of_a_layers_experts_per_kept_layer_plus_its_gradient(base):
    """peft folds B·A into a full copy of each layer's fused experts; the estimate counts it."""
    from tasks.core.preflight import estimate_terms

    model = with_lora(load_base_model(base, "none"))
    c = model.config
    layer = c.num_experts * 3 * c.hidden_size * c.moe_intermediate_size * 4  # fp32 on a CPU, gate_up + down
    assert estimate_terms(model, 4, 64)["expert_fold"] == layer * (c.num_hidden_layers + 1)
    assert estimate_terms(model, 4, 64, gradient_checkpointing=True)["expert_fold"] == layer * 2
    attention_only = with_lora(load_base_model(base, "none"), target_parameters=[])
    assert "expert_fold" not in estimate_terms(attention_only, 4, 64)


def test_routed_experts_hold_no_fold_and_under_nf4_one_dequantized_stack(base):
    """Routed expert LoRA (tasks/core/routed_lora.py) folds nothing; a 4-bit stack is dequantized
    again in the backward, so one stack's copy (gate_up_proj, 2/3 of the layer) is in flight.
    Folded, a 4-bit model also keeps the untargeted stacks dequantized per kept layer."""
    from tasks.core.preflight import estimate_terms
    from tasks.core.routed_lora import route_expert_lora

    c = load_base_model(base, "none").config
    layer = c.num_experts * 3 * c.hidden_size * c.moe_intermediate_size * 4  # fp32 on a CPU
    plain = with_lora(load_base_model(base, "none"))
    route_expert_lora(plain)
    assert not {"expert_fold", "expert_dequant"} & estimate_terms(plain, 4, 64).keys()
    quantized = with_lora(load_base_model(base, "nf4"))
    route_expert_lora(quantized)
    terms = estimate_terms(quantized, 4, 64)
    assert terms["expert_dequant"] == layer * 2 // 3 and "expert_fold" not in terms
    report = run_preflight(quantized, "nf4", expects_experts=True, batch_size=4, seq_len=64, loss_chunk_tokens=16,
                           gradient_checkpointing=True)
    assert ("levers: loss chunks (train.loss_chunk_tokens) 16 tokens, gradient checkpointing on, optimizer adamw_torch, "
            "adapter weights (train.adapter_dtype) float32, experts (train.expert_compute) routed, 4-bit experts "
            "dequantized at once (train.experts_per_dequant) all, expert adapters (train.offload_expert_adapters) GPU"
            ) in report.summary()
    down_only = with_lora(load_base_model(base, "nf4"), target_parameters=["mlp.experts.down_proj"])
    terms = estimate_terms(down_only, 4, 64, gradient_checkpointing=True)
    assert terms["expert_fold"] == layer // 3 * 2 and terms["expert_dequant"] == layer - layer // 3


def test_a_loaded_4bit_model_weighs_what_the_plan_says_its_config_weighs(base):
    """The preflight (a loaded model) and tasks.plan (its config on the meta device) count the same
    weights: 4-bit values with their quantization statistics, the rest as stored, the adapter apart."""
    from tasks.core.preflight import estimate_terms
    from tasks.plan import meta_model, weight_bytes

    model = with_lora(load_base_model(base, "nf4"))
    terms = estimate_terms(model, 1, 8)
    assert terms["weights"] == pytest.approx(weight_bytes(meta_model(model.config), "nf4", 4), rel=1e-6)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert terms["adapter"] == trainable * 8 and terms["optimizer"] == trainable * 8  # torch AdamW's two fp32 moments


def test_on_a_gpu_the_memory_the_loaded_model_holds_counts_as_available(monkeypatch):
    """The preflight runs with the model loaded and its estimate counts the weights, so what this
    process's allocator holds is available to the step too, beside what the GPU has free."""
    import torch

    from tasks.core.preflight import available_bytes

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (2 * gib, 24 * gib))  # 2 GiB free on a 24 GiB card
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 16 * gib)  # the 4-bit model and its adapter
    assert available_bytes() == 18 * gib
