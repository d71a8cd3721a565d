"""Expert adapters in host memory (`train.offload_expert_adapters`, tasks/core/expert_offload.py):
when it applies, what the memory model and the plan count for it, that the factors a routed layer
uses are peft's own, and (on a GPU) that an offloaded step computes what an on-GPU step computes
while the GPU holds none of the expert factors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.core.adapters import new_adapter
from tasks.core.config import ConfigError, LoraConfig, TrainConfig
from tasks.core.expert_offload import (
    expert_adapter_parameters,
    offload_expert_adapters,
    resolve_expert_offload,
)
from tasks.core.modeling import BaseInfo, load_base_model
from tasks.core.routed_lora import delta_factors, route_expert_lora
from tasks.core.trainer import resolve_optimizer
from tiny_base import save_tiny_base

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LORA = LoraConfig(r=4, alpha=8, target_parameters=EXPERTS)


def train_config(**update) -> TrainConfig:
    return TrainConfig(quantization="nf4", lora=LORA).model_copy(update=update)


class TestWhenItApplies:
    def test_auto_offloads_qlora_on_a_gpu_only(self):
        assert resolve_expert_offload(train_config(), LORA, on_gpu=True)
        assert not resolve_expert_offload(train_config(), LORA, on_gpu=False)  # the host holds everything already
        assert not resolve_expert_offload(train_config(quantization="none"), LORA, on_gpu=True)
        assert not resolve_expert_offload(train_config(), LORA.model_copy(update={"target_parameters": []}), on_gpu=True)
        assert not resolve_expert_offload(train_config(offload_expert_adapters="off"), LORA, on_gpu=True)
        assert resolve_expert_offload(train_config(quantization="none", offload_expert_adapters="on"), LORA, on_gpu=True)

    @pytest.mark.parametrize("update", [{"expert_compute": "fold"}, {"optimizer": "paged_adamw_8bit"},
                                        {"launcher": {"kind": "accelerate", "config_file": "x.yaml"}}])
    def test_auto_steps_aside_where_it_cannot_work(self, update):
        train = TrainConfig.model_validate(train_config().model_dump() | update)
        assert not resolve_expert_offload(train, LORA, on_gpu=True)

    @pytest.mark.parametrize(("update", "named"), [
        ({"expert_compute": "fold"}, "expert_compute is fold"),
        ({"optimizer": "paged_adamw_8bit"}, "paged_adamw_8bit steps on the GPU only"),
        ({"launcher": {"kind": "accelerate", "config_file": "x.yaml"}}, "launcher is accelerate"),
    ])
    def test_on_says_why_it_cannot(self, update, named):
        train = TrainConfig.model_validate(train_config(offload_expert_adapters="on").model_dump() | update)
        with pytest.raises(ConfigError, match=named):
            resolve_expert_offload(train, LORA, on_gpu=False)

    def test_the_optimizer_auto_picks_steps_host_memory(self):
        assert resolve_optimizer("auto", on_gpu=True) == "paged_adamw_8bit"
        assert resolve_optimizer("auto", on_gpu=True, offload_expert_adapters=True) == "adamw_torch_fused"
        assert resolve_optimizer("adamw_torch", on_gpu=True, offload_expert_adapters=True) == "adamw_torch"
        assert resolve_optimizer("auto", on_gpu=False, offload_expert_adapters=True) == "adamw_torch"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> BaseInfo:
    return save_tiny_base(tmp_path_factory.mktemp("base"), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def adapted(info: BaseInfo, quantization: str = "nf4"):
    """The base with a routed expert LoRA whose B is not zero (so the update is not trivially nothing)."""
    torch.manual_seed(0)
    model = new_adapter(load_base_model(info, quantization), LORA.model_copy(update={"target_modules": ["q_proj"]}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    route_expert_lora(model)
    return model


def test_the_factors_a_routed_layer_uses_are_peft_s(base):
    from peft.tuners.lora.layer import ParamWrapper

    model = adapted(base)
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4  # two stacks in two layers
    for wrapper in wrappers:
        ours, peft_s = delta_factors(wrapper, "default", torch.device("cpu")), wrapper.get_delta_factors("default")
        assert ours[2] == peft_s[2]
        for mine, theirs in zip(ours[:2], peft_s[:2]):
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
            assert torch.equal(mine, theirs)


def test_the_offloaded_parameters_are_exactly_the_expert_factors(base):
    from tasks.plan import expert_lora_parameters, meta_model

    model = adapted(base)
    offloaded = expert_adapter_parameters(model)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    names = sorted(trainable[id(p)] for p, _home in offloaded)
    assert len(names) == 8 and all(".experts." in n and "lora_" in n for n in names)
    assert not [n for n in trainable.values() if n not in names and ".experts." in n]  # q_proj's stay
    assert sum(p.numel() for p, _ in offloaded) == expert_lora_parameters(meta_model(model.config), LORA)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the factors do move (the GPU test)")
def test_on_a_cpu_nothing_moves(base):
    model = adapted(base)
    assert offload_expert_adapters(model) == 0
    assert all(p.device.type == "cpu" and not p.is_pinned() for p, _ in expert_adapter_parameters(model))


def test_the_memory_model_moves_the_expert_adapter_to_the_host(base):
    from tasks.core.preflight import estimate_terms, host_adapter_bytes, host_trainable, run_preflight

    model = adapted(base)
    experts = host_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < experts < trainable
    on_gpu = estimate_terms(model, 2, 32)
    host = estimate_terms(model, 2, 32, offload_expert_adapters=True)
    assert on_gpu["adapter"] - host["adapter"] == experts * 8  # fp32 weights and gradients leave the GPU
    assert on_gpu["optimizer"] - host["optimizer"] == experts * 8  # and the two fp32 moments
    layers = model.config.num_hidden_layers
    assert host["adapter_in_flight"] == experts // layers * (4 + 4 + 4) and "adapter_in_flight" not in on_gpu
    report = run_preflight(model, "nf4", expects_experts=True, batch_size=2, seq_len=32, offload_expert_adapters=True)
    gib = host_adapter_bytes(experts) / 2**30
    assert f"expert adapters (train.offload_expert_adapters) host ({gib:.2f} GiB of host memory)" in report.summary()
    assert "expert adapters (train.offload_expert_adapters) GPU" in run_preflight(
        model, "nf4", expects_experts=True, batch_size=2, seq_len=32).summary()


def step(model, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> tuple[float, dict[str, torch.Tensor]]:
    """One step; the loss and every trainable parameter's gradient (on the CPU) before the update."""
    optimizer.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return float(loss), grads


def offloaded_equals_on_gpu(info: BaseInfo) -> dict[str, float]:
    """Two steps of the same NF4 model, expert factors on the GPU and in host memory: the same
    losses, gradients and updated factors, and the offloaded model's GPU memory holds no factor.
    Returns what it measured (bench/results/gpu_expert_offload.json)."""
    runs = {}
    for offload in (False, True):
        model = adapted(info)
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
        if offload:
            before = torch.cuda.memory_allocated()
            moved = offload_expert_adapters(model)
            assert moved and torch.cuda.memory_allocated() <= before - moved
            assert all(p.device.type == "cpu" and p.is_pinned() for p, _ in expert_adapter_parameters(model))
            model.to("cuda")  # as the Trainer's accelerate prepare does: the factors stay on the host
            assert all(p.device.type == "cpu" for p, _ in expert_adapter_parameters(model))
        # fused, as train.optimizer: auto resolves it when offloading: one kernel per device
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        runs[offload] = [step(model, ids, optimizer) for _ in range(2)]
        runs[offload].append({n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad})
        if offload:  # after the steps, as after training: still on the host, where train leaves them
            assert all(p.device.type == "cpu" and p.is_pinned() for p, _ in expert_adapter_parameters(model))
    worst = 0.0
    for (loss_gpu, grads_gpu), (loss_host, grads_host) in zip(runs[False][:2], runs[True][:2]):
        assert loss_host == pytest.approx(loss_gpu, rel=1e-6)
        assert grads_gpu.keys() == grads_host.keys() and any(".experts." in n for n in grads_gpu)
        for name, grad in grads_gpu.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grads_host[name], grad, rtol=1e-5, atol=1e-7, msg=name)
            worst = max(worst, float((grads_host[name] - grad).abs().max()))
    for name, param in runs[False][2].items():
        torch.testing.assert_close(runs[True][2][name], param, rtol=1e-5, atol=1e-7, msg=name)
    return {"losses_on_gpu": [r[0] for r in runs[False][:2]], "losses_offloaded": [r[0] for r in runs[True][:2]],
            "largest_gradient_difference": worst}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves factors off a GPU")
def test_an_offloaded_step_computes_the_on_gpu_step(base):
    offloaded_equals_on_gpu(base)


def run_on_gpu(out: Path) -> None:
    """For a GPU machine without pytest: `python -c "import test_expert_offload as t; t.run_on_gpu(...)"`."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        result = offloaded_equals_on_gpu(save_tiny_base(Path(folder), num_experts=8, num_experts_per_tok=2,
                                                         moe_intermediate_size=32))
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), **result}, indent=2) + "\n")
