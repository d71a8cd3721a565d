"""Turning records into token ids and loss labels with the model's own chat template.

Assistant spans are found by rendering growing prefixes of the conversation, so the masking works
with any template that renders a conversation as a prefix-extension of its first turns (ChatML,
Qwen, Llama 3...), not only templates that carry `{% generation %}` markers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# Texts per tokenizer call: big enough for the Rust tokenizer to use every core, small enough to
# keep offsets for one batch in memory.
ENCODE_BATCH = 2048


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token is not trained on
    text: str = field(default="", compare=False, repr=False)  # what was tokenized, when known

    @property
    def n_trainable(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


_PROBE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\n2+2=4\n</think>\nThe answer is 4."},
    {"role": "user", "content": "And {{ 3+3 }}?"},
    {"role": "assistant", "content": "6"},
]


class ChatRenderer:
    """The tokenizer's chat template, compiled once and called directly.

    `apply_chat_template` re-normalises every message on each call, which is most of the cost when
    a whole data set is rendered prefix by prefix. The direct path is used only if it renders a
    probe conversation exactly as `apply_chat_template` does; otherwise every call goes through it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._template: Any = None
        self._kwargs: dict[str, Any] = {}
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._template = _compile_jinja_template(tokenizer.get_chat_template())
            self._kwargs = dict(tokenizer.special_tokens_map)
        except Exception:  # noqa: BLE001 - any failure just means the slow, always-right path
            self._template = None
        if self._template is not None and not self._agrees():
            self._template = None

    def _agrees(self) -> bool:
        try:
            return all(
                self._direct(_PROBE[:n], gen) == render(self.tokenizer, _PROBE[:n], gen)
                for n in (2, 3, 5) for gen in (False, True)
            )
        except Exception:  # noqa: BLE001
            return False

    def _direct(self, messages: list[dict], generation_prompt: bool) -> str:
        return self._template.render(messages=messages, add_generation_prompt=generation_prompt, **self._kwargs)

    def __call__(self, messages: list[dict], generation_prompt: bool = False) -> str:
        if self._template is None:
            return render(self.tokenizer, messages, generation_prompt)
        return self._direct(messages, generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase | ChatRenderer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply.

    A span runs from the end of the generation prompt to the end-of-turn marker; the whitespace
    the template puts after that marker is not trained on.
    """
    renderer = tokenizer if isinstance(tokenizer, ChatRenderer) else ChatRenderer(tokenizer)
    text = renderer(messages)
    last = len(messages) - 1
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(renderer(messages[:i], generation_prompt=True))
        through = text if i == last else renderer(messages[: i + 1])
        end = len(through.rstrip())
        if not text.startswith(through[:end]):
            raise ValueError("the chat template does not render conversations prefix-consistently")
        spans.append((start, end))
    return text, spans


def _labels_for_spans(ids: list[int], first_token_at: Any, spans: list[tuple[int, int]]) -> list[int]:
    """Token ids for the tokens that start inside an assistant span, IGNORE_INDEX elsewhere.

    `first_token_at(pos)` is the index of the first token starting at or after character `pos`;
    spans are few, so a couple of lookups per reply replace a pass over every token's offsets.
    """
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        lo, hi = first_token_at(start), first_token_at(end)
        labels[lo:hi] = ids[lo:hi]
    return labels


def _first_token_in_encoding(encoding: Any, n_chars: int, n_tokens: int) -> Any:
    """first_token_at for a Rust `tokenizers.Encoding`, without materialising all its offsets."""
    def first_token_at(pos: int) -> int:
        if pos >= n_chars:
            return n_tokens
        token = encoding.char_to_token(pos)
        if token is None:  # a character no token covers: scan the offsets
            return next((i for i, (s, _) in enumerate(encoding.offsets) if s >= pos), n_tokens)
        return token if encoding.token_to_chars(token)[0] >= pos else token + 1

    return first_token_at


def _first_token_in_offsets(offsets: list[tuple[int, int]]) -> Any:
    import bisect

    starts = [s for s, _ in offsets]
    return lambda pos: bisect.bisect_left(starts, pos)


def encode_chats(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]) -> list[Encoded]:
    """Token ids of each conversation; labels only on assistant replies and their end marker.

    Rendering is per conversation, tokenization is batched and goes straight to the Rust
    tokenizer when there is one (the transformers wrapper converts every token's offsets to
    Python objects, which costs more than the tokenization itself).
    """
    renderer = ChatRenderer(tokenizer)
    rendered = [assistant_spans(renderer, messages) for messages in conversations]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    out: list[Encoded] = []
    for lo in range(0, len(rendered), ENCODE_BATCH):
        chunk = rendered[lo : lo + ENCODE_BATCH]
        texts = [text for text, _ in chunk]
        if backend is not None:
            for (text, spans), enc in zip(chunk, backend.encode_batch(texts, add_special_tokens=False)):
                ids = enc.ids
                first = _first_token_in_encoding(enc, len(text), len(ids))
                out.append(Encoded(ids, _labels_for_spans(ids, first, spans), text))
        else:
            enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            for (text, spans), ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
                ids = list(ids)
                out.append(Encoded(ids, _labels_for_spans(ids, _first_token_in_offsets(offsets), spans), text))
    return out


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids per text, in batches, through the Rust tokenizer when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    out: list[list[int]] = []
    for lo in range(0, len(texts), ENCODE_BATCH):
        batch = texts[lo : lo + ENCODE_BATCH]
        if backend is not None:
            out += [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
        else:
            out += tokenizer(batch, add_special_tokens=False)["input_ids"]
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
    for text, ids in zip(texts, _token_ids(tokenizer, texts)):
        ids = list(ids) + tail
        out.append(Encoded(ids, list(ids), text))
    return out


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> Encoded:
    return encode_texts(tokenizer, [text])[0]


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """The prompt for the last assistant reply: everything before it plus the assistant header."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render(tokenizer, messages[:last], generation_prompt=True)
