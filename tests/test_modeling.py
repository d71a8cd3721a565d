"""The base model: building the tiny Qwen3-MoE, saving and loading it, and resolving external models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.core.config import ModelConfig, PretrainConfig, TinyModelConfig
from tasks.core.modeling import BASE_INFO_FILE, BaseInfo, build_tiny_model, load_base_model, load_tokenizer, resolve_external

TINY = TinyModelConfig(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    max_position_embeddings=128,
    pretrain=PretrainConfig(max_steps=1, batch_size=1, learning_rate=1e-3),
)


@pytest.fixture(scope="module")
def tiny_model(unit_tokenizer):
    return build_tiny_model(TINY, unit_tokenizer, seed=0)


@pytest.fixture(scope="module")
def saved_base(tiny_model, unit_tokenizer, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base")
    tiny_model.save_pretrained(directory)
    unit_tokenizer.save_pretrained(directory)
    BaseInfo(kind="tiny", name_or_path=str(directory), num_parameters=tiny_model.num_parameters()).save(directory)
    return directory


def external(name: str | None, **kwargs) -> ModelConfig:
    return ModelConfig(name_or_path=name, tiny=TINY, **kwargs)


class TestBuildTinyModel:
    def test_architecture(self, tiny_model, unit_tokenizer):
        from transformers import Qwen3MoeForCausalLM

        assert type(tiny_model) is Qwen3MoeForCausalLM
        config = tiny_model.config
        assert config.vocab_size == len(unit_tokenizer)  # the tokenizer decides, not TINY.vocab_size
        assert (config.hidden_size, config.num_hidden_layers, config.num_experts, config.num_experts_per_tok) == (32, 2, 4, 2)
        assert config.pad_token_id == unit_tokenizer.pad_token_id
        assert config.eos_token_id == unit_tokenizer.eos_token_id
        assert tiny_model.get_input_embeddings().weight.shape == (len(unit_tokenizer), 32)

    def test_experts_are_fused_3d_parameters(self, tiny_model):
        params = dict(tiny_model.named_parameters())
        for layer in range(2):
            gate_up = params[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
            down = params[f"model.layers.{layer}.mlp.experts.down_proj"]
            assert gate_up.ndim == 3 and down.ndim == 3
            assert gate_up.shape == (4, 2 * 32, 32)  # experts, gate+up of moe_intermediate_size, hidden
            assert down.shape == (4, 32, 32)

    def test_seeded(self, tiny_model, unit_tokenizer):
        import torch

        again = build_tiny_model(TINY, unit_tokenizer, seed=0)
        other = build_tiny_model(TINY, unit_tokenizer, seed=1)
        name = "model.layers.0.mlp.experts.gate_up_proj"
        assert torch.equal(dict(again.named_parameters())[name], dict(tiny_model.named_parameters())[name])
        assert not torch.equal(dict(other.named_parameters())[name], dict(tiny_model.named_parameters())[name])


class TestSaveAndLoad:
    def test_writes_safetensors_only(self, saved_base):
        files = {p.name for p in saved_base.iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", BASE_INFO_FILE} <= files
        assert not any(name.endswith(".bin") for name in files)

    def test_base_info_round_trip(self, saved_base, tiny_model):
        info = BaseInfo.load(saved_base)
        assert info == BaseInfo(kind="tiny", name_or_path=str(saved_base), num_parameters=tiny_model.num_parameters())
        assert json.loads((saved_base / BASE_INFO_FILE).read_text())["kind"] == "tiny"

    def test_base_info_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"run the `base` stage first \(dvc repro base\)") as err:
            BaseInfo.load(tmp_path)
        assert str(tmp_path / BASE_INFO_FILE) in str(err.value)

    def test_load_base_model_same_logits(self, saved_base, tiny_model):
        import torch

        loaded = load_base_model(BaseInfo.load(saved_base))
        assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
        assert loaded.use_kernels is False  # transformers' Hub kernels (a download at run time) stay off
        ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
        tiny_model.eval()
        loaded.eval()
        with torch.no_grad():
            expected = tiny_model(ids).logits
            got = loaded(ids).logits
        assert got.shape == (1, 6, tiny_model.config.vocab_size)
        assert torch.equal(got, expected)

    def test_load_tokenizer(self, saved_base, unit_tokenizer):
        tok = load_tokenizer(BaseInfo.load(saved_base))
        text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        assert tok(text)["input_ids"] == unit_tokenizer(text)["input_ids"]
        assert tok.pad_token == "<|endoftext|>"


class TestResolveExternal:
    def test_local_folder(self, tmp_path, monkeypatch):
        (tmp_path / "my-model").mkdir()
        (tmp_path / "my-model" / "config.json").write_text("{}")
        monkeypatch.chdir(tmp_path)
        info = resolve_external(external("./my-model", revision="abc", trust_remote_code=True))
        assert info == BaseInfo(
            kind="external", name_or_path=str(tmp_path.resolve() / "my-model"), revision="abc", trust_remote_code=True
        )
        assert Path(info.name_or_path).is_absolute()

    def test_local_folder_without_config(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"is a folder without config\.json"):
            resolve_external(external(str(tmp_path)))

    def test_hub_id_offline(self, monkeypatch, tmp_path):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.chdir(tmp_path)  # no local folder named Qwen/
        info = resolve_external(external("Qwen/Qwen3-30B-A3B-Base", revision="main"))
        assert info == BaseInfo(kind="external", name_or_path="Qwen/Qwen3-30B-A3B-Base", revision="main")

    @pytest.mark.parametrize("name", ["./does/not/exist", "a/b/c", "/no/such/model", "~/no-such-model-here"])
    def test_neither_folder_nor_hub_id(self, name, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(FileNotFoundError, match=r"is neither an existing folder nor a hub id \(owner/name\)") as err:
            resolve_external(external(name))
        assert repr(name) in str(err.value)
