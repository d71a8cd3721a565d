"""The adapter chain: how a stage's starting model is made from the base and earlier adapters.

Two policies (`train.chain_policy`):
- `continue`: a stage keeps training the previous stage's adapter; the last adapter alone
  carries the whole curriculum.
- `merge`: the previous stages' adapters are merged into a full-precision copy of the base (never
  into 4-bit weights: quantization, if asked, happens after the merge) and the stage trains a new
  adapter on top. Each adapter records the chain it was trained on, in `stage.json`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core import paths

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tasks.core.modeling import BaseInfo

STAGE_INFO_FILE = "stage.json"


def stage_info(stage: str) -> dict:
    file = paths.adapter_dir(stage) / STAGE_INFO_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: run train@{stage} first")
    return json.loads(file.read_text())


def merged_chain_of(stage: str) -> list[str]:
    """Adapters that were merged into the base before `stage`'s adapter was trained."""
    return stage_info(stage).get("merged_chain", [])


def merged_chain_for(init_from: str, policy: str) -> list[str]:
    """Adapters merged into the base before a stage that starts from `init_from` trains."""
    if init_from == "base":
        return []
    chain = merged_chain_of(init_from)
    return chain if policy == "continue" else chain + [init_from]


def base_with_chain(info: BaseInfo, chain: list[str], quantization: str = "none") -> PreTrainedModel:
    """The base with `chain`'s adapters merged in full precision, then quantized if asked."""
    from tasks.core.modeling import BaseInfo as Info
    from tasks.core.modeling import load_base_model

    if not chain:
        return load_base_model(info, quantization)
    model = load_base_model(info, "none")
    for stage in chain:
        model = load_adapter(model, stage).merge_and_unload()
    if quantization == "none":
        return model
    with tempfile.TemporaryDirectory() as tmp:  # reload through the quantizing loader
        model.save_pretrained(tmp, safe_serialization=True)
        merged = Info(kind=info.kind, name_or_path=tmp, trust_remote_code=info.trust_remote_code)
        return load_base_model(merged, quantization)


def load_stage_model(info: BaseInfo, stage: str, quantization: str = "none") -> PreTrainedModel:
    """A finished stage's model for evaluation: its chain merged into the base, its adapter on top."""
    model = base_with_chain(info, merged_chain_of(stage), quantization)
    return load_adapter(model, stage, is_trainable=False)


def load_adapter(model, adapter: str | Path, **kwargs):
    """The adapter in folder `adapter` (a Path; a str names a stage: its folder under models/) on
    `model`, through peft. One trained on NF4 experts (its stage.json says so) nests its expert LoRA
    as peft nests it on 4-bit parameters, so a full-precision model is made to nest the same way."""
    from peft import PeftModel

    from tasks.core.peft_fixes import nest_expert_lora_as_on_4bit

    folder = adapter if isinstance(adapter, Path) else paths.adapter_dir(adapter)
    info = folder / STAGE_INFO_FILE
    if info.exists() and json.loads(info.read_text()).get("quantization") == "nf4":
        nest_expert_lora_as_on_4bit(model)  # no-op on 4-bit experts (they are parametrizations)
    return PeftModel.from_pretrained(model, str(folder), **kwargs)


def chain_description(stage: str) -> str:
    """`base + embedding (merged) + syntax`: what a stage's model is made of, for people."""
    return " + ".join(["base", *(f"{s} (merged)" for s in merged_chain_of(stage)), stage])

