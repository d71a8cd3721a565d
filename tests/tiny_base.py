"""A tiny Qwen3-MoE base saved the way `base` saves one, for tests that load it through
`load_base_model` (fp32 or NF4) without running the pipeline."""

from __future__ import annotations

from pathlib import Path

from tasks.core.config import TinyModelConfig
from tasks.core.modeling import BaseInfo, build_tiny_model, train_tokenizer


def save_tiny_base(out: Path, **config) -> BaseInfo:
    """Two layers, hidden 64, a 300-token BPE vocabulary; `config` overrides TinyModelConfig fields."""
    tok = train_tokenizer(["Mara has 3 red apples. 2 + 5 = 7."] * 20, vocab_size=300)
    settings = {"hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16, "num_experts": 4, "moe_intermediate_size": 64,
                "pretrain": {"max_steps": 1, "batch_size": 1, "learning_rate": 1e-3}, **config}
    build_tiny_model(TinyModelConfig(**settings), tok, seed=0).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return BaseInfo(kind="tiny", name_or_path=str(out))
