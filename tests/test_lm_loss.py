"""The chunked LM-head loss (tasks/core/lm_loss.py) trains what the plain loss trains: same loss,
same gradients for the adapters, the LM head and the hidden states, padded or packed, on the tiny
base and on the Qwen3-shaped stand-in (its 151,936-token head); and it never projects more than a
chunk of tokens to the vocabulary at once."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from tasks.core.lm_loss import IGNORE_INDEX, causal_lm_of, chunked_causal_lm_loss, chunked_loss
from tasks.core.trainer import PackedCollator, PadCollator
from tasks.data.packing import build_packed_rows

CHUNK = 5  # tokens: a batch here is a few dozen, so every batch takes several chunks


def with_lora(model):
    """The project's LoRA layout: attention projections and the fused experts; the LM head trained too."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False)
    model = get_peft_model(model, config)
    causal_lm_of(model).lm_head.weight.requires_grad_(True)
    return model.train()


def rows_for(vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate((6, 11, 4, 9)):
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]  # a prompt, then a trained reply
        rows.append({"input_ids": ids, "labels": labels, "content_hash": f"h{i}"})
    return rows


def batches(rows: list[dict], pad_id: int) -> dict[str, dict]:
    packed_rows, _ = build_packed_rows(rows, row_length=64, pad_id=0)
    return {"padded": PadCollator(pad_id)(rows), "packed": PackedCollator()(packed_rows)}


def loss_and_grads(model, batch: dict, chunk: int | None, num_items: int | None) -> tuple[float, dict, torch.Tensor]:
    """Loss, every trainable parameter's gradient, and the gradient at the final norm's output."""
    model.zero_grad(set_to_none=True)
    seen: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        seen["hidden"] = output

    hook = causal_lm_of(model).model.norm.register_forward_hook(keep)
    try:
        with chunked_loss(model, chunk):
            kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
            loss = model(**batch, **kwargs).loss
        loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["lm_head"] = causal_lm_of(model).lm_head.weight.grad.detach().clone()  # tied: named embed_tokens above
    return loss.item(), grads, seen["hidden"].grad.detach().clone()


def assert_same_training(model, rows: list[dict], pad_id: int, counts: tuple = (None, 40)) -> None:
    """`counts`: None, the mean; a number, the Trainer's count of trained tokens across accumulated batches."""
    for name, batch in batches(rows, pad_id).items():
        for num_items in counts:
            plain_loss, plain_grads, plain_hidden = loss_and_grads(model, batch, None, num_items)
            loss, grads, hidden = loss_and_grads(model, batch, CHUNK, num_items)
            assert loss == pytest.approx(plain_loss, rel=1e-6), (name, num_items)
            assert grads.keys() == plain_grads.keys()
            assert any("lora_" in n and "experts" in n for n in grads)
            for n in grads:
                torch.testing.assert_close(grads[n], plain_grads[n], rtol=1e-5, atol=1e-7, msg=f"{name}: {n}")
            torch.testing.assert_close(hidden, plain_hidden, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny(unit_tokenizer):
    from tasks.core.config import PretrainConfig, TinyModelConfig
    from tasks.core.modeling import build_tiny_model

    config = TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             pretrain=PretrainConfig(max_steps=1, batch_size=1, learning_rate=1e-3))
    torch.manual_seed(0)
    return with_lora(build_tiny_model(config, unit_tokenizer, seed=0))


@pytest.fixture(scope="module")
def standin_model(tmp_path_factory, offline):
    from transformers import AutoModelForCausalLM

    from tasks.tools import standin

    folder = tmp_path_factory.mktemp("standin") / "qwen3-standin"
    with contextlib.redirect_stdout(io.StringIO()):
        assert standin.main([str(folder)]) == 0
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, dtype=torch.float32)
    assert base.config.vocab_size == 151_936
    return with_lora(base)


def test_tiny_base_trains_the_same_with_the_chunked_loss(tiny, unit_tokenizer):
    assert_same_training(tiny, rows_for(len(unit_tokenizer), seed=0), unit_tokenizer.pad_token_id)


def test_qwen3_standin_trains_the_same_with_the_chunked_loss(standin_model):
    assert_same_training(standin_model, rows_for(151_000, seed=1), pad_id=151_643, counts=(40,))  # the mean: on the tiny base


def test_no_more_than_a_chunk_is_projected_to_the_vocabulary(tiny, unit_tokenizer):
    batch = batches(rows_for(len(unit_tokenizer), seed=2), unit_tokenizer.pad_token_id)["padded"]
    shapes: list[tuple] = []
    hook = causal_lm_of(tiny).lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        with chunked_loss(tiny, CHUNK):
            out = tiny(**batch)
            out.loss.backward()  # the backward pass projects each chunk again, one at a time
        assert out.logits is None
        assert shapes and max(s[0] for s in shapes) <= CHUNK
        shapes.clear()
        tiny.zero_grad(set_to_none=True)
        full = tiny(**batch)  # outside the block: the model's own forward again
        assert tuple(full.logits.shape[:2]) == tuple(batch["input_ids"].shape)
    finally:
        hook.remove()


def test_evaluation_and_generation_keep_the_full_logits(tiny, unit_tokenizer):
    batch = batches(rows_for(len(unit_tokenizer), seed=3), unit_tokenizer.pad_token_id)["padded"]
    tiny.eval()
    try:
        with chunked_loss(tiny, CHUNK), torch.no_grad():
            chunked = tiny(**batch)
        with torch.no_grad():
            plain = tiny(**batch)
    finally:
        tiny.train()
    torch.testing.assert_close(chunked.logits, plain.logits)
    assert chunked.loss.item() == pytest.approx(plain.loss.item())


def test_a_batch_with_nothing_to_train_gives_the_plain_losss_nan_and_no_gradient():
    head = torch.nn.Linear(4, 7, bias=False)
    hidden = torch.randn(1, 6, 4, requires_grad=True)
    labels = torch.full((1, 6), IGNORE_INDEX)
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=2)
    assert torch.isnan(loss)
    plain = torch.nn.functional.cross_entropy(head(hidden)[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
    assert torch.isnan(plain)
