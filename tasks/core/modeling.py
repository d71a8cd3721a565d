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
from tasks.core.config import ConfigError, ModelConfig, TinyModelConfig

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
    from transformers import Qwen3MoeForCausalLM

    config = tiny_config(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config)


def tiny_config(cfg: TinyModelConfig, vocab_size: int, pad_token_id: int | None = None, eos_token_id: int | None = None):
    """The tiny base's Qwen3-MoE config (what `tasks.plan` builds on the meta device before `base` ran)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
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
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def resolve_external(cfg: ModelConfig) -> BaseInfo:
    """Record a user's model without loading or downloading it."""
    name = cfg.name_or_path or ""
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(
                f"model.name_or_path {name!r} is a folder without config.json: point it at the folder "
                f"save_pretrained wrote (the one holding config.json), or at a hub id (owner/name)"
            )
        name = str(local.resolve())
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"model.name_or_path {name!r} is neither an existing folder nor a hub id (owner/name)"
        )
    return BaseInfo(
        kind="external", name_or_path=name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )


class ModelFolderError(ConfigError):
    """`model.name_or_path` names a local folder that cannot be the base: each problem says what is
    missing or wrong and what to do."""


# Weight files transformers can load; only safetensors are loaded here (a pickle runs code when read).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Where a chat template lives besides tokenizer_config.json's chat_template (transformers 5 saves it here).
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _read_json(file: Path, problems: list[str]) -> dict | None:
    """The file's JSON object, or None (a problem is recorded when the file exists but is not one)."""
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        problems.append(f"{file.name} is not valid JSON ({error}): rewrite it, e.g. with save_pretrained")
        return None
    if not isinstance(value, dict):
        problems.append(f"{file.name} holds a JSON {type(value).__name__}, not an object: rewrite it, e.g. with save_pretrained")
        return None
    return value


def _config_problems(folder: Path, config: dict | None, tokenizer_config: dict | None,
                     trust_remote_code: bool) -> list[str]:
    """What keeps transformers from building the model from config.json with its own code."""
    if config is None:
        if (folder / "config.json").is_file():
            return []  # there but unreadable: _read_json said so
        nested = sorted(str(p.parent.relative_to(folder)) for p in folder.glob("*/config.json"))
        hint = f" ({', '.join(nested)} has one: point model.name_or_path there?)" if nested else ""
        return [(f"no config.json, the model's architecture and sizes{hint}: point model.name_or_path at the folder "
                 "save_pretrained wrote, the one holding config.json")]
    if trust_remote_code:
        return []  # the folder's own code may define anything; transformers will say if it cannot
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    problems = []
    model_type = config.get("model_type")
    code = _auto_map_names(config)
    if not model_type:
        problems.append("config.json has no model_type, so transformers cannot tell which architecture to build: "
                        "add the model_type of the architecture the weights are for (e.g. qwen3_moe)")
    elif model_type not in CONFIG_MAPPING_NAMES:
        import transformers

        ships = f" (its auto_map names the folder's code: {code})" if code else ""
        problems.append(
            f"config.json's model_type {model_type!r} is not one transformers {transformers.__version__} knows"
            f"{ships}, so the model's code would have "
            f"to come from the folder (trust_remote_code), and model.trust_remote_code is false: upgrade transformers "
            f"if a newer release has {model_type}, or set model.trust_remote_code: true in params.yaml if you have "
            f"read and trust the folder's code"
        )
    if code and model_type in CONFIG_MAPPING_NAMES:
        problems.append(
            f"config.json has an auto_map ({code}): the folder ships its own model code, which runs only with "
            f"trust_remote_code, and model.trust_remote_code is false, so transformers would build its own "
            f"{model_type} instead, which may not be the model these weights are for. Set model.trust_remote_code: "
            f"true in params.yaml if you have read and trust that code, or remove auto_map from config.json if the "
            f"model is transformers' own {model_type}"
        )
    tokenizer_code = _auto_map_names(tokenizer_config or {})
    if tokenizer_code:
        problems.append(
            f"tokenizer_config.json has an auto_map ({tokenizer_code}): the tokenizer's code is the folder's, which "
            f"runs only with trust_remote_code, and model.trust_remote_code is false. Set model.trust_remote_code: "
            f"true in params.yaml if you have read and trust that code, or remove auto_map from tokenizer_config.json "
            f"if its tokenizer_class is one transformers has"
        )
    return problems


def _auto_map_names(config: dict) -> str:
    """`AutoX -> module.Class, ...` of a config's auto_map ('' when it has none)."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return ""
    return ", ".join(f"{k} -> {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) else str(auto_map)


def _weight_problems(folder: Path) -> list[str]:
    """Safetensors weights present (every shard an index names), not only PyTorch pickles."""
    safetensors = sorted(p.name for p in folder.glob("*.safetensors"))
    problems = []
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = (_read_json(index, problems) or {}).get("weight_map") or {}
        missing = sorted(set(weight_map.values()) - set(safetensors)) if isinstance(weight_map, dict) else []
        if missing:
            problems.append(f"{SAFETENSORS_INDEX} names shards that are not in the folder: {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}: copy or download them all")
    if safetensors:
        return problems
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        shown = ", ".join(pickles[:3]) + (" ..." if len(pickles) > 3 else "")
        return problems + [(
            f"weights only as PyTorch pickles ({shown}), no .safetensors: the pipeline loads safetensors only "
            "(a pickle can run code when it is read). Convert them once with transformers, which reads pickles as "
            "plain tensors: python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{folder}', use_safetensors=False, dtype='auto').save_pretrained('{folder}')\" "
            "(writes model.safetensors next to them)"
        )]
    return problems + [("no weights (*.safetensors): copy the model's model.safetensors (or its shards and "
                        f"{SAFETENSORS_INDEX}) into the folder")]


def _tokenizer_problems(folder: Path, tokenizer_config: dict | None, sft_stages: list[str]) -> list[str]:
    """A tokenizer saved with the model and, when a stage trains on chats, a chat template."""
    problems = []
    if not (folder / "tokenizer.json").is_file() and tokenizer_config is None:
        problems.append("no tokenizer (tokenizer.json or tokenizer_config.json): save the tokenizer the model was "
                        f"trained with into the folder, e.g. AutoTokenizer.from_pretrained(<its source>).save_pretrained('{folder}')")
    template = (tokenizer_config or {}).get("chat_template")
    if sft_stages and not template and not (folder / CHAT_TEMPLATE_FILE).is_file():
        problems.append(
            f"no chat template (chat_template in tokenizer_config.json, or {CHAT_TEMPLATE_FILE}), and the sft "
            f"stage{'s' if len(sft_stages) > 1 else ''} {', '.join(sft_stages)} render{'' if len(sft_stages) > 1 else 's'} "
            f"conversations with it: write the template the model is to answer in to {folder / CHAT_TEMPLATE_FILE} "
            f"(Qwen3's is tasks/tools/qwen3_chat_template.jinja; a Base model's own tokenizer often has one)"
        )
    return problems


def check_model_folder(folder: Path, trust_remote_code: bool, sft_stages: list[str]) -> None:
    """Fail, naming every problem at once, unless the local folder holds a model the pipeline can
    load: config.json of an architecture transformers knows (or remote code allowed), safetensors
    weights, a tokenizer and, for `sft_stages`, a chat template. Reads small files only: no weights."""
    folder = Path(folder).expanduser().resolve()
    problems: list[str] = []
    config = _read_json(folder / "config.json", problems)
    tokenizer_config = _read_json(folder / "tokenizer_config.json", problems)
    problems += _config_problems(folder, config, tokenizer_config, trust_remote_code)
    problems += _weight_problems(folder)
    problems += _tokenizer_problems(folder, tokenizer_config, sft_stages)
    if problems:
        raise ModelFolderError(
            f"model.name_or_path: {folder} is not a model the pipeline can load:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
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
        # transformers 5 swaps layers for kernels fetched from the Hub by default: a download at run
        # time, remote code, and a step that fails on a GPU machine without the `kernels` package
        "use_kernels": False,
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
