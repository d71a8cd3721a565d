"""The trainer wrapper's pure parts: the router load monitor and history merging after a resume."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.core.trainer import RouterLoadMonitor, merged_history


class FakeRouter(torch.nn.Module):
    """Routes every token to the experts it is told to, like Qwen3MoeTopKRouter's output."""

    def __init__(self, choices: list[list[int]], num_experts: int = 4) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.choices = len(choices[0]), num_experts, torch.tensor(choices)

    def forward(self, hidden):
        return None, None, self.choices


class FakeLayer(torch.nn.Module):
    def __init__(self, router: FakeRouter) -> None:
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.gate = router


def test_balanced_routing_is_one_and_collapsed_routing_is_zero():
    model = torch.nn.ModuleList([FakeLayer(FakeRouter([[0, 1], [2, 3]])), FakeLayer(FakeRouter([[0, 0], [0, 0]]))])
    monitor = RouterLoadMonitor(model)
    for layer in model:
        layer.mlp.gate(torch.zeros(2, 8))
    out = monitor.take()
    assert out["router_entropy.layer0"] == pytest.approx(1.0)
    assert out["router_entropy.layer1"] == pytest.approx(0.0)
    assert out["router_entropy"] == pytest.approx(0.5)
    assert monitor.take() == {}  # counts reset after each read
    monitor.close()
    model[0].mlp.gate(torch.zeros(2, 8))
    assert monitor.take() == {}  # hooks removed


def test_half_the_experts_gives_half_the_normalised_entropy():
    model = torch.nn.ModuleList([FakeLayer(FakeRouter([[0, 1]], num_experts=4))])
    monitor = RouterLoadMonitor(model)
    model[0].mlp.gate(torch.zeros(1, 8))
    assert monitor.take()["router_entropy.layer0"] == pytest.approx(math.log(2) / math.log(4))


def test_merged_history_keeps_steps_from_before_a_resume():
    log_history = [{"step": 5, "loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.0},
                   {"step": 10, "loss": 1.5, "learning_rate": 5e-4}, {"step": 10, "train_runtime": 3.0}]
    live = [{"step": 10, "loss": 1.5, "tokens_per_second": 900.0, "router_entropy": 0.9}]
    assert merged_history(log_history, live) == [
        {"step": 5, "loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.0},
        {"step": 10, "loss": 1.5, "learning_rate": 5e-4, "grad_norm": 0.0, "tokens_per_second": 900.0, "router_entropy": 0.9},
    ]


def small_model(tokenizer):
    from tasks.core.config import PretrainConfig, TinyModelConfig
    from tasks.core.modeling import build_tiny_model

    tiny = TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           pretrain=PretrainConfig(max_steps=1, batch_size=1, learning_rate=1e-3))
    return build_tiny_model(tiny, tokenizer, seed=0)


def test_flops_are_the_stock_trainers_with_the_parameters_counted_once(unit_tokenizer, tmp_path):
    from transformers import Trainer

    from tasks.core.trainer import Schedule, trainer_class, training_arguments

    model = small_model(unit_tokenizer)
    counted, count = [], model.num_parameters
    model.num_parameters = lambda **kw: counted.append(kw) or count(**kw)
    schedule = Schedule(max_steps=1, batch_size=1, learning_rate=1e-3, warmup_ratio=0.0)
    trainer = trainer_class()(model=model, args=training_arguments(schedule, tmp_path))
    inputs = {"input_ids": torch.ones(2, 7, dtype=torch.long)}
    stock = Trainer.floating_point_ops(trainer, inputs)
    assert stock == 6 * 14 * count(exclude_embeddings=True) > 0
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [stock] * 3
    assert counted == [{"exclude_embeddings": True}] * 2  # the stock call, then ours once


class TestPackedBatches:
    """A packed, padding-free batch trains exactly what the same records padded one per row train."""

    @pytest.fixture(scope="class")
    def model_and_rows(self, unit_tokenizer):
        model = small_model(unit_tokenizer).eval()
        g = torch.Generator().manual_seed(0)
        rows = []
        for i, n in enumerate((5, 9, 4, 7)):
            ids = torch.randint(5, len(unit_tokenizer), (n,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": ids, "content_hash": f"h{i}"})
        return model, rows

    def test_same_loss_as_padded_rows(self, model_and_rows, unit_tokenizer):
        from tasks.core.trainer import PackedCollator, PadCollator
        from tasks.data.packing import build_packed_rows

        model, rows = model_and_rows
        padded = PadCollator(unit_tokenizer.pad_token_id)(rows)
        packed_rows, _ = build_packed_rows(rows, row_length=16, pad_id=0)
        assert len(packed_rows) < len(rows)  # records really share rows
        packed = PackedCollator()(packed_rows)
        assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))  # no padding at all
        with torch.no_grad():
            expected = model(**padded).loss
            got = model(**packed).loss
            leaky = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss  # one causal mask over all
            cached = model(**(packed | {"use_cache": True})).loss  # a KV cache disables the per-record mask
        assert got.item() == pytest.approx(expected.item(), abs=1e-5)
        assert abs(leaky.item() - expected.item()) > 1e-4  # the per-record mask is what makes them equal
        assert abs(cached.item() - expected.item()) > 1e-4  # why the collator turns the cache off
