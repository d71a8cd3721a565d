"""Preflight on the tiny Qwen3-MoE: NF4 reaches the fused experts, and each silent failure of the
usual QLoRA recipe on MoE models is caught before training."""

from __future__ import annotations

import pytest
import torch

from tasks.core.config import LoraConfig, TinyModelConfig
from tasks.core.modeling import BaseInfo, build_tiny_model, load_base_model, train_tokenizer
from tasks.core.preflight import PreflightError, check, part_of, run_preflight
from tasks.train import peft_lora_config

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> BaseInfo:
    out = tmp_path_factory.mktemp("base")
    tok = train_tokenizer(["Mara has 3 red apples. 2 + 5 = 7."] * 20, vocab_size=300)
    cfg = TinyModelConfig(hidden_size=64, num_hidden_layers=2, head_dim=16, num_experts=4, moe_intermediate_size=64,
                          pretrain={"max_steps": 1, "batch_size": 1, "learning_rate": 1e-3})
    build_tiny_model(cfg, tok, seed=0).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return BaseInfo(kind="tiny", name_or_path=str(out))


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


def test_lora_reaches_4bit_experts_but_is_refused_before_training(base):
    model = with_lora(load_base_model(base, "nf4"))
    report = run_preflight(model, "nf4", expects_experts=True, batch_size=2, seq_len=32)
    assert report.trainable_by_part["experts"] > 0  # the full-name expansion reached the 4-bit experts
    with pytest.raises(PreflightError, match="LoRA on 4-bit fused experts is not supported yet"):
        check(report)


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
