"""The base model: the tiny embedded Qwen3-MoE and its tokenizer, or a user's model, and loading.

The tiny model is the flagship's architecture family (`Qwen3MoeForCausalLM`, fused experts) at a
size a CPU trains in minutes, so every code path the flagship takes runs in tests.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tasks.core import paths
from tasks.core.config import ModelConfig, TinyModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BASE_INFO_FILE = "base.json"
END_OF_TEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Qwen-style ChatML. With enable_thinking=false the generation prompt carries an empty think
# block, as Qwen3's own template does, so one model serves both modes.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class BaseInfo:
    """What the `base` stage resolved; every later step loads the model through this."""

    kind: str  # "tiny" (built here) or "external" (a local path or hub id)
    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False
    num_parameters: int | None = None
    # model.add_tokens: appended to the tokenizer at every load, in this order, so ids are stable
    added_tokens: list[str] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / BASE_INFO_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path = paths.BASE_DIR) -> BaseInfo:
        file = directory / BASE_INFO_FILE
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: run the `base` stage first (dvc repro base)")
        return cls(**json.loads(file.read_text()))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Byte-level BPE trained on the corpus, wrapped so `AutoTokenizer` reloads it."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [END_OF_TEXT, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Think markers are ordinary added tokens (not special) so decoding keeps them, as in Qwen3.
    tok.add_tokens([THINK_OPEN, THINK_CLOSE])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_intermediate_size * 2,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config)


def resolve_external(cfg: ModelConfig) -> BaseInfo:
    """Record a user's model without loading or downloading it."""
    name = cfg.name_or_path or ""
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"model.name_or_path {name!r} is a folder without config.json")
        name = str(local.resolve())
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"model.name_or_path {name!r} is neither an existing folder nor a hub id (owner/name)"
        )
    return BaseInfo(
        kind="external", name_or_path=name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )


def load_tokenizer(info: BaseInfo) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        info.name_or_path, revision=info.revision, trust_remote_code=info.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if info.added_tokens:
        tok.add_tokens(list(info.added_tokens))  # tokens already in the vocabulary are skipped
    return tok


def new_token_count(info: BaseInfo) -> int:
    """How many of `model.add_tokens` the base's own tokenizer lacked (0: nothing to learn)."""
    if not info.added_tokens:
        return 0
    plain = load_tokenizer(BaseInfo(**(asdict(info) | {"added_tokens": []})))
    return len(load_tokenizer(info)) - len(plain)


def fit_embeddings_to_tokenizer(model: PreTrainedModel, info: BaseInfo) -> None:
    """Grow the embeddings (and LM head) to the tokenizer when `model.add_tokens` added tokens;
    new rows start at the mean of the old ones, so the new tokens start as an average token."""
    if not info.added_tokens:
        return
    size = len(load_tokenizer(info))
    if model.get_input_embeddings().weight.shape[0] < size:
        model.resize_token_embeddings(size, mean_resizing=True)


def load_base_model(info: BaseInfo, quantization: str = "none") -> PreTrainedModel:
    """Load the base for training or evaluation: safetensors only, remote code only if asked."""
    import torch
    from transformers import AutoModelForCausalLM

    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "revision": info.revision,
        "trust_remote_code": info.trust_remote_code,
        "use_safetensors": True,
        "dtype": torch.bfloat16 if on_gpu else torch.float32,
    }
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
        # a 4-bit model cannot move after loading: under several processes each loads onto its own GPU
        local_rank = os.environ.get("LOCAL_RANK")
        kwargs["device_map"] = ({"": int(local_rank)} if local_rank else "auto") if on_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(info.name_or_path, **kwargs)
    fit_embeddings_to_tokenizer(model, info)
    if quantization == "nf4":
        from tasks.core.quantize import quantize_fused_experts

        quantize_fused_experts(model)  # load_in_4bit reaches nn.Linear only, not fused experts
    elif not on_gpu:
        model.to("cpu")
    return model
