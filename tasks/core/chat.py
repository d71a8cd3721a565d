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


# Texts per tokenizer call: big enough for the Rust tokenizer to use every core, small enough to
# keep offsets for one batch in memory.
ENCODE_BATCH = 2048


def _labels_inside(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token ids where a token starts inside an assistant span, IGNORE_INDEX elsewhere (vectorised)."""
    import numpy as np

    ids_arr = np.asarray(ids, dtype=np.int64)
    starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
    inside = np.zeros(len(ids_arr), dtype=bool)
    for s, e in spans:
        inside |= (starts >= s) & (starts < e)
    return np.where(inside, ids_arr, IGNORE_INDEX).tolist()


def encode_chats(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]) -> list[Encoded]:
    """Token ids of each conversation; labels only on assistant replies and their end marker.

    Rendering is per conversation, tokenization is batched: that is where the time goes.
    """
    rendered = [assistant_spans(tokenizer, messages) for messages in conversations]
    out: list[Encoded] = []
    for lo in range(0, len(rendered), ENCODE_BATCH):
        chunk = rendered[lo : lo + ENCODE_BATCH]
        enc = tokenizer([text for text, _ in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for (_, spans), ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            out.append(Encoded(list(ids), _labels_inside(ids, offsets, spans)))
    return out


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> Encoded:
    return encode_chats(tokenizer, [messages])[0]


def end_of_text_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id that closes a raw-text document: `<|endoftext|>` when the vocabulary has it, else eos."""
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(end, int) and end != getattr(tokenizer, "unk_token_id", None):
        return end
    return tokenizer.eos_token_id


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[Encoded]:
    """Raw text for continued pretraining: every token, and the end-of-text marker, is trained on."""
    end = end_of_text_id(tokenizer)
    tail = [] if end is None else [end]
    out: list[Encoded] = []
    for lo in range(0, len(texts), ENCODE_BATCH):
        for ids in tokenizer(texts[lo : lo + ENCODE_BATCH], add_special_tokens=False)["input_ids"]:
            ids = list(ids) + tail
            out.append(Encoded(ids, list(ids)))
    return out


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> Encoded:
    return encode_texts(tokenizer, [text])[0]


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """The prompt for the last assistant reply: everything before it plus the assistant header."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render(tokenizer, messages[:last], generation_prompt=True)
