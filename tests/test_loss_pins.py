"""Pinned losses: the first steps of the tiny base's pretraining and of a LoRA stage, on CPU at a
fixed seed, give exactly these values (to 1e-4), step by step.

The guard torchtune's recipe tests keep against silent numeric drift: a change to the tiny model,
the tokenizer training, packing, chat masking, collation, the trainer's arguments, the LoRA targets,
or a torch / transformers / peft upgrade that moves the numbers fails here by step, instead of
showing up weeks later as a slightly worse eval. When a change is meant to move them, the failure
prints the new values: paste them into the PINS below in the same change, and say why.

Everything is built from explicit config in this file (not params.yaml), through the same
functions the `base` and `train` stages use (tasks/core/modeling.py, tasks/base.py,
tasks/core/trainer.py, tasks/core/adapters.py).
"""

from __future__ import annotations

import functools

import pytest

from tasks.core.config import LoraConfig, PretrainConfig, TinyModelConfig

SEED = 0
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "What is 2+2? The answer is 4. What is 3+3? The answer is 6.",
    "You are a helpful assistant. Answer in JSON. Keep the keys short.",
    '{"name": "Ada", "age": 36, "tags": ["math", "code"]}',
    "Think step by step, then give the final answer. Check the sum twice.",
    "Tom has 3 apples and buys 4 more, so he has 7 apples. He eats one.",
] * 4
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "The answer is 4."}],
    [{"role": "user", "content": "Answer in JSON: name Ada."}, {"role": "assistant", "content": '{"name": "Ada"}'}],
    [{"role": "user", "content": "Tom has 3 apples and buys 4 more."},
     {"role": "assistant", "content": "<think>\n3 + 4 = 7\n</think>\nHe has 7 apples."}],
    [{"role": "user", "content": "Where does the fox jump?"}, {"role": "assistant", "content": "Over the lazy dog."}],
] * 2
TINY = TinyModelConfig(
    vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=128,
    pretrain=PretrainConfig(max_steps=5, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, max_length=32,
                            chat_markup_share=0.5),
)
# attention and the fused MoE experts, as the stages adapt them by default
LORA = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
ABS = 1e-4

# The pins (CPU, float32; measured with torch 2.13, transformers 5.24, peft 0.21).
VOCAB = 322  # 320 learned + the two think markers
PRETRAIN_LOSSES = [5.7789, 5.7688, 5.4314, 5.2783, 5.1383]
LORA_LOSSES = [5.7538, 5.7913, 5.7506, 5.7350, 5.6849]


@pytest.fixture(autouse=True)
def cpu_and_every_step_logged(monkeypatch):
    """The pins are CPU float32 values: a GPU (bf16) must not change what is measured. The trainer
    logs every 5th step by default; here every step is logged, so every step is pinned."""
    import torch

    from tasks.core import trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "training_arguments", functools.partial(trainer.training_arguments, logging_steps=1))


@pytest.fixture(scope="module")
def tokenizer():
    from tasks.base import with_chat_markup
    from tasks.core.modeling import train_tokenizer

    return train_tokenizer(with_chat_markup(CORPUS, TINY.pretrain.chat_markup_share, SEED), TINY.vocab_size)


def losses(summary) -> list[float]:
    assert [row["step"] for row in summary.history] == list(range(1, len(summary.history) + 1))
    return [round(row["loss"], 4) for row in summary.history]


def test_tokenizer_size_is_pinned(tokenizer):
    assert len(tokenizer) == VOCAB


def test_first_pretraining_steps_of_the_tiny_base(tokenizer, tmp_path):
    """tasks/base.py's recipe: chat markup on a share of the corpus, packed fixed-length rows, the
    tiny Qwen3-MoE from config, full training."""
    from tasks.base import pack_for_pretraining, with_chat_markup
    from tasks.core.chat import encode_text
    from tasks.core.modeling import build_tiny_model
    from tasks.core.trainer import Schedule, run_trainer

    texts = with_chat_markup(CORPUS, TINY.pretrain.chat_markup_share, SEED)
    rows = pack_for_pretraining([encode_text(tokenizer, t).input_ids for t in texts], TINY.pretrain.max_length)
    pre = TINY.pretrain
    schedule = Schedule(max_steps=pre.max_steps, batch_size=pre.batch_size, learning_rate=pre.learning_rate,
                        warmup_ratio=pre.warmup_ratio, seed=SEED)
    summary = run_trainer(build_tiny_model(TINY, tokenizer, SEED), rows, schedule, tokenizer.pad_token_id, tmp_path)
    assert summary.steps == pre.max_steps
    assert losses(summary) == pytest.approx(PRETRAIN_LOSSES, abs=ABS), losses(summary)


def test_first_lora_steps_on_attention_and_experts(tokenizer, tmp_path):
    """tasks/train.py's recipe: a new adapter (attention and fused experts) on the base, trained on
    chat rows whose labels are the assistant replies only, padded per batch."""
    import torch
    from peft import get_peft_model

    from tasks.core.adapters import peft_lora_config
    from tasks.core.chat import encode_chat
    from tasks.core.modeling import build_tiny_model
    from tasks.core.trainer import Schedule, run_trainer

    model = build_tiny_model(TINY, tokenizer, SEED)
    torch.manual_seed(SEED)  # the LoRA A matrices start random
    model = get_peft_model(model, peft_lora_config(LORA, model))
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in (encode_chat(tokenizer, chat) for chat in CHATS)]
    schedule = Schedule(max_steps=5, batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, seed=SEED)
    summary = run_trainer(model, rows, schedule, tokenizer.pad_token_id, tmp_path)
    assert summary.steps == 5
    assert losses(summary) == pytest.approx(LORA_LOSSES, abs=ABS), losses(summary)
