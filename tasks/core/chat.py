"""Turning records into token ids and loss labels with the model's own chat template.

Assistant spans are found by rendering growing prefixes of the conversation, so the masking works
with any template that renders a conversation as a prefix-extension of its first turns (ChatML,
Qwen, Llama 3...), not only templates that carry `{% generation %}` markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token is not trained on

    @property
    def n_trainable(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply.

    A span runs from the end of the generation prompt to the end-of-turn marker; the whitespace
    the template puts after that marker is not trained on.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]).rstrip())
        if not text.startswith(render(tokenizer, messages[: i + 1]).rstrip()):
            raise ValueError("the chat template does not render conversations prefix-consistently")
        spans.append((start, end))
    return text, spans


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> Encoded:
    """Token ids of the whole conversation; labels only on assistant replies and their end marker."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return Encoded(list(enc["input_ids"]), labels)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> Encoded:
    """Raw text for continued pretraining: every token, and the end-of-text marker, is trained on."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(end, int) and end != getattr(tokenizer, "unk_token_id", None):
        ids = ids + [end]
    elif tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return Encoded(list(ids), list(ids))


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """The prompt for the last assistant reply: everything before it plus the assistant header."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render(tokenizer, messages[:last], generation_prompt=True)
