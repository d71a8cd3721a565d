"""A two-stage adapter chain on a tiny random Qwen3-MoE, written in seconds: what `export` and
the serving bundle read (models/base, models/<stage> with stage.json, eval parquet files).

The weights are drawn with std 0.2 (not the usual 0.02) so the next-token distributions are as
peaked as a trained model's: then bf16 rounding and broken merges show KL of a realistic size
(measured: ~3e-3 and >= 0.07), where near-uniform distributions would hide both.
"""

from __future__ import annotations

import json
from pathlib import Path

STAGES = ["s1", "s2"]
WEIGHT_STD = 0.2


def tiny_config():
    from tasks.core.config import PretrainConfig, TinyModelConfig

    return TinyModelConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, pretrain=PretrainConfig(max_steps=1, batch_size=1, learning_rate=1e-3))


def lora_config():
    from peft import LoraConfig

    # init_lora_weights=False: both factors random, so each adapter changes the model (as trained ones do)
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False)


def build_chain(root: Path, tokenizer, texts: list[str], policy: str = "merge") -> None:
    """models/base (tiny, random), adapters s1 and s2 (s2 on top of s1: merged into the base under
    `merge`, continued under `continue`), and data/prepared/<stage>/eval.parquet. Run in `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from peft import get_peft_model

    from tasks.core import paths
    from tasks.core.chain import base_with_chain
    from tasks.core.modeling import BaseInfo, build_tiny_model

    assert Path.cwd() == root, "build_chain writes relative to the project root it builds"
    model = build_tiny_model(tiny_config(), tokenizer, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, WEIGHT_STD)
    model.save_pretrained(paths.BASE_DIR, safe_serialization=True)
    tokenizer.save_pretrained(paths.BASE_DIR)
    info = BaseInfo(kind="tiny", name_or_path=str(paths.BASE_DIR), num_parameters=model.num_parameters())
    info.save(paths.BASE_DIR)

    for i, stage in enumerate(STAGES):
        chain = STAGES[:i] if policy == "merge" else []
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(base_with_chain(info, chain), lora_config())
        out = paths.adapter_dir(stage)
        peft_model.save_pretrained(str(out), safe_serialization=True)
        (out / "stage.json").write_text(json.dumps({
            "stage": stage, "init_from": STAGES[i - 1] if i else "base", "policy": policy,
            "merged_chain": chain, "quantization": "none", "kind": "sft", "processes": 1}))
        rows = [tokenizer(t)["input_ids"] for t in texts[i::2]]
        file = paths.prepared_file(stage, "eval")
        file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"input_ids": rows}), file)


def raw_params(export: dict | None = None) -> dict:
    """params.yaml for the two-stage chain (only what `export` and config validation read)."""
    tiny = tiny_config().model_dump()
    return {
        "seed": 0,
        "stages": {s: {"kind": "sft", "init_from": STAGES[i - 1] if i else "base", "data": {"n_records": 10},
                       "train": {"max_steps": 1, "learning_rate": 1e-3}} for i, s in enumerate(STAGES)},
        "model": {"tiny": tiny},
        "train": {"chain_policy": "merge"},
        "export": export or {},
    }
