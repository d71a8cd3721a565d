"""Per-part LoRA ranks (`train.lora.expert_r`): the expert adapters get their own rank with the
update scale alpha / r kept, the preflight shows what each part costs, and the adapter saves and
loads back at those ranks (the next stage continues it)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tasks.core.adapters import new_adapter
from tasks.core.config import LoraConfig, PretrainConfig, TinyModelConfig
from tasks.core.preflight import run_preflight

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TINY = TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       pretrain=PretrainConfig(max_steps=1, batch_size=1, learning_rate=1e-3))


def tiny_model(unit_tokenizer):
    from tasks.core.modeling import build_tiny_model

    return build_tiny_model(TINY, unit_tokenizer, seed=0)


def expected_counts(attention_r: int, expert_r: int) -> dict[str, int]:
    """r x (in + out) per attention projection; per expert, r x (in + out) for each fused stack."""
    h, heads, kv, hd, inter = 32, 2, 1, 16, 24
    attention = attention_r * ((h + heads * hd) * 2 + (h + kv * hd) * 2)
    experts = expert_r * 4 * ((h + 2 * inter) + (inter + h))  # gate_up: h -> 2 inter; down: inter -> h
    return {"attention": attention * 2, "experts": experts * 2}


def expert_wrappers(model) -> list:
    from peft.tuners.lora.layer import ParamWrapper

    return [m for m in model.modules() if isinstance(m, ParamWrapper)]


@pytest.mark.parametrize("expert_r", [None, 16, 2])
def test_experts_take_their_own_rank_with_the_update_scale_kept(unit_tokenizer, expert_r):
    lora = LoraConfig(r=8, alpha=16, target_parameters=EXPERTS, expert_r=expert_r)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        model = new_adapter(tiny_model(unit_tokenizer), lora)
    assert not [w for w in shown if "did not match" in str(w.message)]  # peft's false alarm is not shown
    report = run_preflight(model, "none", expects_experts=True, batch_size=1, seq_len=8)
    assert report.trainable_by_part == expected_counts(8, expert_r or 8)
    assert report.adapter_bytes_by_part == {part: 4 * n for part, n in report.trainable_by_part.items()}  # fp32
    assert sum(report.adapter_bytes_by_part.values()) == report.adapter_bytes
    assert "experts" in report.summary() and "MiB" in report.summary()
    wrappers = expert_wrappers(model)
    assert len(wrappers) == 4  # two stacks in each of two layers
    assert {w.r["default"] for w in wrappers} == {expert_r or 8}
    assert [w.scaling["default"] for w in wrappers] == pytest.approx([2.0] * 4)  # alpha / r = 16 / 8 everywhere


def test_an_adapter_with_its_own_expert_rank_loads_back_for_the_next_stage(unit_tokenizer, tmp_path):
    from peft import PeftModel

    model = new_adapter(tiny_model(unit_tokenizer), LoraConfig(r=8, alpha=16, target_parameters=EXPERTS, expert_r=2))
    for wrapper in expert_wrappers(model):  # B starts at zero: give it values to compare
        torch.nn.init.normal_(wrapper.lora_B["default"].weight)
    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    loaded = PeftModel.from_pretrained(tiny_model(unit_tokenizer), str(tmp_path / "adapter"), is_trainable=True)
    assert {w.r["default"] for w in expert_wrappers(loaded)} == {2}
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    again = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[n], again[n]) and again[n].requires_grad for n in saved)


@pytest.mark.parametrize("upcast", [False, True])
def test_a_4bit_base_is_frozen_and_upcast_only_when_asked(tmp_path, unit_tokenizer, upcast):
    """train.upcast_frozen: peft's fp32 cast of the frozen 16-bit weights (embeddings, LM head,
    norms, router) is opt-in; 4-bit weights are never touched."""
    from tasks.core.adapters import prepare_quantized
    from tasks.core.modeling import BaseInfo, load_base_model

    tiny_model(unit_tokenizer).save_pretrained(tmp_path, safe_serialization=True)
    unit_tokenizer.save_pretrained(tmp_path)
    model = load_base_model(BaseInfo(kind="tiny", name_or_path=str(tmp_path)), "nf4")
    for name, param in model.named_parameters():  # as a GPU load holds them
        if param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
    four_bit = {n: p.dtype for n, p in model.named_parameters() if p.dtype == torch.uint8}
    model = prepare_quantized(model, upcast)
    assert four_bit and {n: p.dtype for n, p in model.named_parameters() if n in four_bit} == four_bit
    assert not any(p.requires_grad for p in model.parameters())
    sixteen = {p.dtype for n, p in model.named_parameters() if n not in four_bit}
    assert sixteen == ({torch.float32} if upcast else {torch.bfloat16})
