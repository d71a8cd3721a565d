"""`train.adapter_dtype: bf16`: the trainable weights and their gradients in bf16, the optimizer's
math in fp32 (bitsandbytes' 8-bit AdamW). Not equal to fp32 adapters (updates are rounded to
bf16), so the test is that it trains the same way within bf16's rounding, and that the settings
that would do the math in bf16 are refused."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tasks.core.adapters import cast_trainable, new_adapter
from tasks.core.config import LoraConfig, TrainConfig
from tasks.core.expert_offload import resolve_expert_offload
from tasks.core.modeling import BaseInfo, load_base_model
from tasks.core.routed_lora import route_expert_lora
from tasks.core.trainer import resolve_optimizer
from tiny_base import save_tiny_base

LORA = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"],
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> BaseInfo:
    return save_tiny_base(tmp_path_factory.mktemp("base"), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def trained(info: BaseInfo, adapter_dtype: str, steps: int = 40) -> tuple[list[float], torch.nn.Module]:
    """Losses of `steps` steps on one batch, as train sets the adapter up: routed experts,
    `cast_trainable`, and the optimizer `auto` resolves to on a CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = cast_trainable(new_adapter(load_base_model(info), LORA), adapter_dtype)
    route_expert_lora(model)
    assert resolve_optimizer("auto", on_gpu=False, adapter_dtype=adapter_dtype) == (
        "adamw_8bit" if adapter_dtype == "bf16" else "adamw_torch")
    params = [p for p in model.parameters() if p.requires_grad]
    # the same optimizer on both sides, so the difference is the weights' dtype alone
    optimizer = bnb.optim.AdamW8bit(params, lr=5e-3, min_8bit_size=0)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, model


def test_bf16_adapters_train_as_fp32_ones_do_within_rounding(base):
    fp32, _ = trained(base, "fp32")
    bf16, model = trained(base, "bf16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16 for p in trainable)
    assert any(".experts." in n for n, p in model.named_parameters() if p.requires_grad)
    assert fp32[-1] < 0.85 * fp32[0] and bf16[-1] < 0.85 * bf16[0]  # both learn the batch (5.68 -> 4.6)
    assert bf16[0] == pytest.approx(fp32[0], rel=1e-6)  # LoRA B starts at zero: the same first step
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.03)


def test_the_memory_model_counts_bf16_weights_and_gradients(base):
    from tasks.core.preflight import estimate_terms

    model = cast_trainable(new_adapter(load_base_model(base), LORA), "bf16")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate_terms(model, 2, 32)["adapter"] == trainable * (2 + 2)
    fp32 = new_adapter(load_base_model(base), LORA)
    assert estimate_terms(fp32, 2, 32)["adapter"] == trainable * (4 + 4)
    from tasks.core.preflight import run_preflight

    assert "adapter weights (train.adapter_dtype) bfloat16" in run_preflight(model, "none", True, 2, 32).summary()
    assert "adapter weights (train.adapter_dtype) float32" in run_preflight(fp32, "none", True, 2, 32).summary()


def test_the_optimizer_keeps_fp32_math():
    assert resolve_optimizer("auto", on_gpu=True, adapter_dtype="bf16") == "paged_adamw_8bit"
    assert resolve_optimizer("paged_adamw_32bit", on_gpu=True, adapter_dtype="bf16") == "paged_adamw_32bit"
    for optimizer in ("adamw_torch", "adamw_torch_fused"):
        with pytest.raises(ValidationError, match=f"adapter_dtype bf16 with optimizer {optimizer}"):
            TrainConfig(adapter_dtype="bf16", optimizer=optimizer)
    with pytest.raises(ValidationError, match="offload_expert_adapters on"):
        TrainConfig(adapter_dtype="bf16", offload_expert_adapters="on")
    # auto offloading steps aside for bf16 adapters: their optimizer is bitsandbytes'
    train = TrainConfig(quantization="nf4", adapter_dtype="bf16", lora=LORA)
    assert not resolve_expert_offload(train, LORA, on_gpu=True)
