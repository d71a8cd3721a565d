"""The pipeline flow's typed parameters: what the Prefect UI's custom-run form shows.

Each field is one `params.yaml` key (named in its description); a field left empty keeps the
file's value. `set` takes any other key by its dotted name. They become the same overrides as
`python -m flows.pipeline --set KEY=VALUE`, validated against the typed config and written into
params.yaml before anything runs, so DVC sees exactly what ran.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# field -> params.yaml key
PARAMS_KEYS: dict[str, str] = {
    "seed": "seed",
    "quantization": "train.quantization",
    "chain_policy": "train.chain_policy",
    "lora_r": "train.lora.r",
    "embedding_max_steps": "stages.embedding.train.max_steps",
    "syntax_max_steps": "stages.syntax.train.max_steps",
    "thinking_max_steps": "stages.thinking.train.max_steps",
    "instructions_max_steps": "stages.instructions.train.max_steps",
    "eval_max_generate": "evaluate.max_generate",
    "export_enabled": "export.enabled",
    "model_name": "register.model_name",
}


def _key(field: str) -> Any:
    return Field(None, description=f"params.yaml `{PARAMS_KEYS[field]}` (empty: keep the file's value)")


class RunParameters(BaseModel):
    """Overrides for one run; empty fields keep params.yaml's values."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = _key("seed")
    quantization: Literal["none", "nf4"] | None = _key("quantization")
    chain_policy: Literal["continue", "merge"] | None = _key("chain_policy")
    lora_r: int | None = _key("lora_r")
    embedding_max_steps: int | None = _key("embedding_max_steps")
    syntax_max_steps: int | None = _key("syntax_max_steps")
    thinking_max_steps: int | None = _key("thinking_max_steps")
    instructions_max_steps: int | None = _key("instructions_max_steps")
    eval_max_generate: int | None = _key("eval_max_generate")
    export_enabled: bool | None = _key("export_enabled")
    model_name: str | None = _key("model_name")
    set: dict[str, Any] = Field(default_factory=dict,
                                description="any other params.yaml key by dotted name, e.g. {\"stages.syntax.train.learning_rate\": 0.001}")

    def overrides(self) -> dict[str, Any]:
        """Dotted params.yaml key -> value, for the fields that were filled in."""
        chosen = {PARAMS_KEYS[name]: value for name, value in self if name != "set" and value is not None}
        clash = sorted(set(chosen) & set(self.set))
        if clash:
            raise ValueError(f"{', '.join(clash)} given both as a field and in `set`")
        return chosen | dict(self.set)
