"""The Qwen3-shaped stand-in (tasks/tools/standin.py): written by the command's `main` with the
hub offline, it loads through the Auto classes without remote code, keeps every flagship config
field but the sizes, stores bf16 safetensors only, and trains.

    pytest tests/test_standin.py
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.tools import standin

PROJECT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen3"
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/qwen3")
# what the default shape changes, and to what: all else is the flagship's
CHANGED = {"hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 48, "num_hidden_layers": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, offline):
    """Written once by the command's own `main` (in this process: torch is imported once)."""
    out = tmp_path_factory.mktemp("standin") / "qwen3-standin"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert standin.main([str(out)]) == 0
    assert "46,007,424 parameters" in printed.getvalue() and "model.safetensors" in printed.getvalue(), (
        printed.getvalue()
    )
    return out


@pytest.fixture(scope="module")
def tokenizer(folder, offline):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


@pytest.fixture(scope="module")
def model(folder, offline):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, dtype=torch.float32)


def config_value(config, key: str):
    """A flagship config.json field as transformers 5 holds it (renamed or nested in two cases)."""
    if key == "rope_theta":
        return config.rope_parameters["rope_theta"]
    if key == "torch_dtype":
        return str(config.dtype).removeprefix("torch.")
    return getattr(config, key)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"Qwen3 fixtures not found at {FIXTURES}")
def test_flagship_copy_is_the_fixture():
    assert standin.FLAGSHIP_CONFIG == json.loads((FIXTURES / "qwen3_30b_a3b_base_config.json").read_text())


def test_writes_safetensors_weights_only(folder):
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_config_is_the_flagships_but_the_sizes(folder, offline):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    differ = {
        key: config_value(config, key)
        for key, value in standin.FLAGSHIP_CONFIG.items()
        if config_value(config, key) != value
    }
    assert differ == CHANGED
    assert set(differ) <= set(standin.SIZE_FIELDS)
    assert (config.num_experts, config.num_experts_per_tok, config.head_dim) == (128, 8, 128)


def test_generation_config_is_base_models(folder):
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["bos_token_id"], generation["pad_token_id"]) == (
        151643,
        151643,
        151643,
    )


def test_loads_with_the_flagships_tensor_layout(model):
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.get_input_embeddings().weight.shape == (151936, 128)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()  # untied
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (32 * 128, 128)
    assert layer.self_attn.k_proj.weight.shape == (4 * 128, 128)
    # fused experts: (experts, 2 * width, hidden) and (experts, hidden, width); router (experts, hidden)
    assert layer.mlp.experts.gate_up_proj.shape == (128, 96, 128)
    assert layer.mlp.experts.down_proj.shape == (128, 128, 48)
    assert layer.mlp.gate.weight.shape == (128, 128)
    assert sum(p.numel() for p in model.parameters()) == 46_007_424


def test_weights_are_stored_in_bf16(folder, offline):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {"BF16"}


def test_tokenizer_beside_it(tokenizer):
    assert (len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token) == (
        151669,
        151643,
        151643,
        None,
    )


def test_forward_backward_and_a_few_steps_train(model, tokenizer):
    import torch

    batch = tokenizer(
        ["Tom has 3 apples and buys 4 more.", "<think>\n\n</think>\n\n7<|endoftext|>"],
        return_tensors="pt",
        padding=True,
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 128 experts make many tiny matmuls: on a busy CPU one thread was twice as fast
    try:
        for _ in range(3):
            out = model(**batch, labels=labels, output_router_logits=True)
            out.loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert len(grads) == len(list(model.parameters())) and all(torch.isfinite(g).all() for g in grads)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
    finally:
        torch.set_num_threads(threads)
    assert math.isfinite(out.aux_loss.item())
    assert abs(losses[0] - math.log(151936)) < 0.3  # random init: close to uniform over the vocabulary
    assert losses[2] < losses[0] - 0.5, losses


def test_runs_as_a_module_without_heavy_imports():
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tasks.tools.standin", "--help"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0 and "OUT_DIR" in run.stdout.upper(), run.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "transformers", "tokenizers"}


def test_refuses_a_non_empty_folder_and_too_few_experts(tmp_path, capsys):
    (tmp_path / "old.bin").write_bytes(b"")
    assert standin.main([str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert standin.main([str(tmp_path / "new"), "--experts", "4"]) == 2
    assert "at least that many" in capsys.readouterr().err
