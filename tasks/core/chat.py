"""Turning records into token ids and loss labels with the model's own chat template.

Assistant spans are defined by rendering growing prefixes of the conversation, so the masking works
with any template that renders a conversation as a prefix-extension of its first turns (ChatML,
Qwen, Llama 3...), not only templates that carry `{% generation %}` markers.

Rendering every prefix costs two or three template renders a record. Most templates only copy
each message's content into fixed markup, and for those one render is enough: `ChatRenderer`
renders each role sequence once with placeholder contents (a skeleton), and takes a record's
prefixes from its skeleton when the record's own render equals its skeleton filled in. Whether a
template qualifies is learnt from probes at start-up; one that trims, strips or reformats any
probe content in any prefix never takes that path.

Templates that rewrite history (Qwen3 drops the reasoning of every reply before the last user
message and writes a think block into the last reply) are not prefix-consistent: a conversation
cannot be one row with every reply trained. `ChatRenderer.rows` then makes one row per reply
(`per_turn`), or one for the last (`last_turn`), each the conversation as the template renders it
when that reply is the one generated. Whatever the policy, every trained span is checked: it starts
where the render really has the reply, and holds the reply's text and reasoning. A template that
moves or drops them raises `ChatTemplateError`; no mask is ever shifted or emptied in silence.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.core.records import plain_message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# Texts per tokenizer call: big enough for the Rust tokenizer to use every core, small enough to
# keep offsets for one batch in memory.
ENCODE_BATCH = 2048

Span = tuple[int, int]  # [start, end) characters of one assistant reply in the rendered text
Rendered = tuple[str, list[Span]]  # one row's text and its trained spans
PREFIX_INCONSISTENT = "the chat template does not render conversations prefix-consistently"
# `prepare.multi_turn`: how a conversation becomes rows. `auto` resolves to one of the first two.
MULTI_TURN_POLICIES = ("single_render", "per_turn", "last_turn")

# What each kind of template misbehaviour is, and what to do about it. No regex metacharacters in
# them: tests match one error's text against another's.
_HISTORY_REWRITTEN = (
    PREFIX_INCONSISTENT + ": a reply reads differently once later turns follow it, as when a template"
    " drops the reasoning of earlier replies, as Qwen3's does"
)
_PROMPT_MISPLACED = (
    "the chat template's generation prompt is not a prefix of its render of the conversation through"
    " the reply, so the reply does not start where the prompt ends; templates that open <think> in the"
    " generation prompt and strip reasoning from replies do this. At character {at} the prompt has"
    " {prompt} where the render has {render}"
)
_CONTENT_DROPPED = (
    "the chat template drops or rewrites the {part} of a trained reply: {content} is not in the text"
    " it would be trained on"
)
_FIX_TEMPLATE = (
    "give the base model's tokenizer a training chat template, the chat_template of its"
    " tokenizer_config.json or chat_template.jinja, that renders every reply, reasoning included,"
    " right after the generation prompt"
)
_FIX_HISTORY = (
    "Fix: set prepare.multi_turn in params.yaml to auto or per_turn, which encodes each reply as the"
    " template renders it when that reply is generated, or " + _FIX_TEMPLATE
)
_FIX_PROMPT = (
    "Fix: " + _FIX_TEMPLATE + "; no prepare.multi_turn policy helps, as every one trains on the reply"
    " from where the generation prompt ends"
)
_FIX_CONTENT = (
    "Fix: " + _FIX_TEMPLATE + "; where a template drops reasoning only from replies before the last"
    " user message, prepare.multi_turn: per_turn, what auto picks for it, trains each reply before it is dropped"
)


class ChatTemplateError(ValueError):
    """The chat template does not render a trained reply where, or as, the record has it: no mask
    would be right, so the record is refused instead of trained on shifted or missing text."""

    def __init__(self, problem: str, fix: str, reply: int | None = None, where: str = "") -> None:
        self.problem, self.fix, self.reply, self.where = problem, fix, reply, where
        place = [f"record {where}"] if where else []
        place += [f"assistant reply {reply}"] if reply is not None else []
        super().__init__(problem + (f"; in {', '.join(place)}" if place else "") + ". " + fix)

    def at(self, where: str) -> ChatTemplateError:
        """The same error, naming the record it happened in."""
        return ChatTemplateError(self.problem, self.fix, self.reply, where)


def _snippet(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit // 2] + "..." + text[-limit // 2 :])


def _reply_parts(message: dict) -> list[tuple[str, str]]:
    """What of a reply its trained text must hold: its answer, and the reasoning of its think block
    (or `reasoning_content`), ends trimmed as templates trim them."""
    content = message.get("content")
    if not isinstance(content, str):
        return []
    reasoning = message.get("reasoning_content")
    parts = [("reasoning", reasoning.strip())] if isinstance(reasoning, str) else []
    if "</think>" not in content:
        return parts + [("text", content.strip())]
    # Split as Qwen3's template and its kin do: reasoning before the first </think>, answer after the last.
    return parts + [("reasoning", content.split("</think>")[0].split("<think>")[-1].strip()),
                    ("answer", content.split("</think>")[-1].strip())]


def _checked_span(text: str, prompt: str, end: int, message: dict, reply: int) -> Span:
    """The span of a reply between its generation prompt and `end`, after checking that the render
    starts with that prompt and that the span holds the reply's text and reasoning."""
    if not text.startswith(prompt):
        at = next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
        window = slice(max(at - 24, 0), at + 24)
        raise ChatTemplateError(_PROMPT_MISPLACED.format(at=at, prompt=repr(prompt[window]), render=repr(text[window])),
                                _FIX_PROMPT, reply)
    trained = text[len(prompt) : end]
    for part, content in _reply_parts(message):
        if content and content not in trained:
            raise ChatTemplateError(_CONTENT_DROPPED.format(part=part, content=_snippet(content)), _FIX_CONTENT, reply)
    return len(prompt), end


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
# Contents that templates commonly trim, strip, split or branch on, in first, middle and last
# turns: a template must copy all of them verbatim into every prefix to get single renders.
_SHAPE_PROBES = [
    _PROBE,
    [{"role": "user", "content": " Hi there \n"}, {"role": "assistant", "content": "\n<think>\nsum\n</think>\n\n4 \n"}],
    [{"role": "system", "content": "\n Be brief. "}, {"role": "user", "content": "\t{{ 2+2 }}"},
     {"role": "assistant", "content": "  four\n\n"}],
    [{"role": "user", "content": "Q1 "}, {"role": "assistant", "content": "<think>a</think>\n\n A1 "},
     {"role": "user", "content": " <|im_end|>\n Q2"}, {"role": "assistant", "content": "</think> A2\n"},
     {"role": "user", "content": "\nQ3\n"}, {"role": "assistant", "content": " A3"}],
]
# Conversations `auto` tells templates apart by: one that renders any of them other than
# prefix-consistently (replies where the prefix method puts them, text and reasoning kept) gets
# per_turn. Reasoning in earlier and later turns, with and without a system prompt.
_CONSISTENCY_PROBES = [
    _PROBE,
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello."},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}],
]
_SLOT = re.compile("\ue000(\\d+)\ue001")  # a placeholder content: private-use characters around the message index


@dataclass(frozen=True)
class _Skeleton:
    """One render of a role sequence: literal text around slots, each holding one message's content."""

    literals: tuple[str, ...]  # one more than slots
    slots: tuple[int, ...]  # message index of each slot, in order

    @classmethod
    def parse(cls, rendered: str) -> _Skeleton:
        parts = _SLOT.split(rendered)
        return cls(tuple(parts[0::2]), tuple(int(index) for index in parts[1::2]))

    def fill(self, contents: list[str]) -> str:
        out = [self.literals[0]]
        for slot, literal in zip(self.slots, self.literals[1:]):
            out += (contents[slot], literal)
        return "".join(out)

    def length(self, contents: list[str]) -> int:
        return sum(map(len, self.literals)) + sum(len(contents[slot]) for slot in self.slots)


@dataclass(frozen=True)
class _Shape:
    """Skeletons of one role sequence: the whole conversation, and per assistant reply the
    generation prompt before it and the render through it (None when the reply is the last message)."""

    full: _Skeleton
    replies: tuple[tuple[_Skeleton, _Skeleton | None], ...]

    def spans(self, text: str, contents: list[str]) -> list[Span]:
        """The prefix method's spans, with each prefix render taken from its skeleton."""
        spans = []
        for reply, (prompt, through) in enumerate(self.replies, 1):
            upto = text if through is None else through.fill(contents)
            end = len(upto.rstrip())
            if not text.startswith(upto[:end]):
                raise ChatTemplateError(_HISTORY_REWRITTEN, _FIX_HISTORY, reply)
            spans.append((prompt.length(contents), end))
        return spans

    def checks_out(self, roles: tuple[str, ...]) -> bool:
        """Whether, for every content, each reply's span starts where the full render has its
        generation prompt and holds the reply's whole content: `_checked_span`'s checks, done once
        for the role sequence on the skeletons (contents are copied verbatim, so a placeholder
        standing where the prompt ends or inside the span stands there for any content)."""
        markers = [f"\ue000{i}\ue001" for i in range(len(roles))]
        text = self.full.fill(markers)
        indices = [i for i, role in enumerate(roles) if role == "assistant"]
        for i, (prompt, through) in zip(indices, self.replies, strict=True):
            start = prompt.fill(markers)
            upto = text if through is None else through.fill(markers)
            at = upto.find(markers[i])
            if not text.startswith(start) or at < len(start) or at + len(markers[i]) > len(upto.rstrip()):
                return False
        return True


def _roles(messages: list[dict]) -> tuple[str, ...] | None:
    """The role sequence, or None unless every message is exactly {role, content} with string values:
    anything else a template could read is not in a skeleton."""
    roles = []
    for message in messages:
        plain = plain_message(message)
        if plain is None:
            return None
        roles.append(plain[0])
    return tuple(roles)


class ChatRenderer:
    """The tokenizer's chat template, compiled once and called directly.

    `apply_chat_template` re-normalises every message on each call, which is most of the cost when
    a whole data set is rendered prefix by prefix; jinja's own `render` then rebuilds its globals
    for every call. The direct path is used only if it renders a probe conversation exactly as
    `apply_chat_template` does; otherwise every call goes through it.

    `spans` finds assistant spans from one render per record when the probes show the template
    copies contents verbatim (`single_render`), and by prefix renders otherwise. `rows` turns a
    conversation into rows under a `prepare.multi_turn` policy, `multi_turn` resolves `auto`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._template: Any = None
        self._kwargs: dict[str, Any] = {}
        self._globals: dict[str, Any] = {}
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._template = _compile_jinja_template(tokenizer.get_chat_template())
            self._kwargs = dict(tokenizer.special_tokens_map)
            self._globals = dict(self._template.globals)
        except Exception:  # noqa: BLE001 - any failure just means the slow, always-right path
            self._template = None
        if self._template is not None and not self._agrees():
            self._template = None
        self._shapes: dict[tuple[str, ...], _Shape | None] = {}
        self.single_render = self._copies_contents_verbatim()

    def _agrees(self) -> bool:
        try:
            return all(
                self._direct(_PROBE[:n], gen) == render(self.tokenizer, _PROBE[:n], gen)
                for n in (2, 3, 5) for gen in (False, True)
            )
        except Exception:  # noqa: BLE001
            return False

    def _direct(self, messages: list[dict], generation_prompt: bool) -> str:
        # What Template.render does, with the flattened globals built once instead of per call.
        template = self._template
        env = template.environment
        variables = {**self._globals, **self._kwargs, "messages": messages, "add_generation_prompt": generation_prompt}
        context = env.context_class(env, variables, template.name, template.blocks, globals=self._globals)
        try:
            return env.concat(template.root_render_func(context))
        except Exception:  # noqa: BLE001 - let jinja raise (or render) it its own way
            return template.render(messages=messages, add_generation_prompt=generation_prompt, **self._kwargs)

    def __call__(self, messages: list[dict], generation_prompt: bool = False) -> str:
        if self._template is None:
            return render(self.tokenizer, messages, generation_prompt)
        return self._direct(messages, generation_prompt)

    # --- assistant spans ---------------------------------------------------------------------

    def _skeleton(self, roles: tuple[str, ...], generation_prompt: bool) -> _Skeleton | None:
        placeholders = [{"role": role, "content": f"\ue000{i}\ue001"} for i, role in enumerate(roles)]
        try:
            return _Skeleton.parse(self(placeholders, generation_prompt))
        except Exception:  # noqa: BLE001 - a sequence the template refuses: prefix renders will say why
            return None

    def _shape(self, roles: tuple[str, ...]) -> _Shape | None:
        if roles not in self._shapes:
            self._shapes[roles] = self._build_shape(roles)
        return self._shapes[roles]

    def _build_shape(self, roles: tuple[str, ...]) -> _Shape | None:
        """Skeletons of every render the prefix method would make for this role sequence, or None
        if the template refuses one of them."""
        full = self._skeleton(roles, False)
        if full is None:
            return None
        last = len(roles) - 1
        replies = []
        for i, role in enumerate(roles):
            if role != "assistant":
                continue
            prompt = self._skeleton(roles[:i], True)
            through = None if i == last else self._skeleton(roles[: i + 1], False)
            if prompt is None or (through is None and i != last):
                return None
            replies.append((prompt, through))
        shape = _Shape(full, tuple(replies))
        return shape if shape.checks_out(roles) else None  # the prefix method checks each record and says what is wrong

    def _copies_contents_verbatim(self) -> bool:
        """True if every prefix of every probe, with and without the generation prompt, is its skeleton filled in."""
        for probe in _SHAPE_PROBES:
            roles, contents = _roles(probe), [m["content"] for m in probe]
            for n in range(1, len(probe) + 1):
                for gen in (False, True):
                    skeleton = self._skeleton(roles[:n], gen)
                    try:
                        if skeleton is None or skeleton.fill(contents[:n]) != self(probe[:n], gen):
                            return False
                    except Exception:  # noqa: BLE001
                        return False
        return True

    def spans(self, messages: list[dict]) -> tuple[str, list[Span]]:
        """The rendered conversation and the character spans of each assistant reply.

        A span runs from the end of the generation prompt to the end-of-turn marker; the whitespace
        the template puts after that marker is not trained on. Raises `ChatTemplateError` unless
        every span starts where the render has its reply and holds the reply's text and reasoning.
        """
        text = self(messages)
        roles = _roles(messages) if self.single_render else None
        shape = self._shape(roles) if roles is not None else None
        if shape is not None:
            contents = [m["content"] for m in messages]
            if shape.full.fill(contents) == text:
                return text, shape.spans(text, contents)
        return text, self.prefix_spans(messages, text)

    def prefix_spans(self, messages: list[dict], text: str) -> list[Span]:
        """Spans from renders of each reply's prefixes: right for any prefix-consistent template."""
        last = len(messages) - 1
        spans = []
        for reply, i in enumerate(_reply_indices(messages), 1):
            prompt = self(messages[:i], generation_prompt=True)
            through = text if i == last else self(messages[: i + 1])
            end = len(through.rstrip())
            if text.startswith(prompt) and not text.startswith(through[:end]):
                raise ChatTemplateError(_HISTORY_REWRITTEN, _FIX_HISTORY, reply)
            spans.append(_checked_span(text, prompt, end, messages[i], reply))
        return spans

    # --- rows under a multi-turn policy ----------------------------------------------------------

    @functools.cached_property
    def _probe_error(self) -> ChatTemplateError | None:
        """What the prefix method found wrong on the first probe conversation it failed on."""
        for probe in _CONSISTENCY_PROBES:
            try:
                self.prefix_spans(probe, self(probe))
            except ChatTemplateError as exc:
                return exc
            except Exception:  # noqa: BLE001, S112 - a probe the template refuses (no system role...) tells nothing
                continue
        return None

    @property
    def prefix_consistent(self) -> bool:
        """Whether the probe conversations render prefix-consistently, every reply's text and
        reasoning where the prefix method puts its span: what the `single_render` policy needs."""
        return self._probe_error is None

    def multi_turn(self, requested: str) -> str:
        """The policy `prepare.multi_turn: requested` means for this template: `auto` is
        single_render where the template is prefix-consistent, per_turn where it rewrites history."""
        if requested == "auto":
            return "single_render" if self.prefix_consistent else "per_turn"
        if requested not in MULTI_TURN_POLICIES:
            raise ValueError(f"prepare.multi_turn: expected auto or one of {', '.join(MULTI_TURN_POLICIES)}, found {requested!r}")
        found = self._probe_error
        if requested == "single_render" and found is not None:
            raise ChatTemplateError(f"prepare.multi_turn is single_render, but on a probe conversation {found.problem}", found.fix)
        return requested

    def turn_row(self, messages: list[dict], i: int, reply: int) -> Rendered:
        """Reply `i` (the `reply`-th) as the model sees it when generating it: the conversation
        through it, rendered with the reply last, trained on that reply only. The text before the
        span is the template's generation-prompt render of the history."""
        text = self(messages[: i + 1])
        prompt = self(messages[:i], generation_prompt=True)
        return text, [_checked_span(text, prompt, len(text.rstrip()), messages[i], reply)]

    def rows(self, messages: list[dict], policy: str) -> list[Rendered]:
        """The rows of one conversation under a resolved policy (see `row_ends` for what each holds).

        single_render: one row, every reply trained (`spans`). per_turn: a row per reply
        (`turn_row`). last_turn: the last reply's row only.
        """
        if policy == "single_render":
            return [self.spans(messages)]
        replies = list(enumerate(_reply_indices(messages), 1))
        if policy == "last_turn":
            replies = replies[-1:]
        elif policy != "per_turn":
            raise ValueError(f"unknown multi-turn policy {policy!r}: expected one of {', '.join(MULTI_TURN_POLICIES)}")
        return [self.turn_row(messages, i, reply) for reply, i in replies]


def _reply_indices(messages: list[dict]) -> list[int]:
    return [i for i, message in enumerate(messages) if message["role"] == "assistant"]


def row_ends(messages: list[dict], policy: str) -> list[int]:
    """How many of the conversation's messages each of its rows under `policy` holds, in the order
    `ChatRenderer.rows` gives them (a row trains on the last reply it holds, or on all of them
    under single_render)."""
    if policy == "single_render":
        return [len(messages)]
    ends = [i + 1 for i in _reply_indices(messages)]
    return ends[-1:] if policy == "last_turn" else ends


def assistant_spans(tokenizer: PreTrainedTokenizerBase | ChatRenderer, messages: list[dict]) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of each assistant reply (see `ChatRenderer.spans`)."""
    renderer = tokenizer if isinstance(tokenizer, ChatRenderer) else ChatRenderer(tokenizer)
    return renderer.spans(messages)


def _labels_for_spans(ids: list[int], first_token_at: Any, spans: list[tuple[int, int]]) -> list[int]:
    """Token ids for the tokens that start inside an assistant span, IGNORE_INDEX elsewhere
    (one text; `tokenize_rendered` does the same for a batch).

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


def render_chats(renderer: ChatRenderer, conversations: list[list[dict]]) -> list[tuple[str, list[Span]]]:
    """Each conversation's rendered text and assistant spans: the Python half of `encode_chats`."""
    return [renderer.spans(messages) for messages in conversations]


@dataclass(frozen=True)
class TokenBatch:
    """Encodings of a batch of texts as flat int32 arrays, for callers that write columns.

    Text i's tokens are `input_ids[offsets[i]:offsets[i + 1]]`, their labels at the same positions
    of `labels`. No Python object per token is kept, which is most of the cost of a list per text.
    """

    input_ids: Any  # np.ndarray
    labels: Any  # np.ndarray
    offsets: Any  # np.ndarray, len(texts) + 1
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @functools.cached_property
    def n_trained(self) -> list[int]:
        """Trained tokens per text, from one pass over all labels (a check per text costs more)."""
        import numpy as np

        seen = np.concatenate(([0], np.cumsum(self.labels != IGNORE_INDEX)))
        return (seen[self.offsets[1:]] - seen[self.offsets[:-1]]).tolist()

    def encoded(self, i: int) -> Encoded:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return Encoded(self.input_ids[lo:hi].tolist(), self.labels[lo:hi].tolist(), self.texts[i])

    def encodings(self) -> list[Encoded]:
        return [self.encoded(i) for i in range(len(self))]


def _flatten(id_lists: list[list[int]]) -> tuple[Any, Any]:
    """(flat int32 ids, offsets) of per-text id lists."""
    import itertools

    import numpy as np

    offsets = np.zeros(len(id_lists) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists)), out=offsets[1:])
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(offsets[-1]))
    return ids, offsets


def _labels_in_spans(ids: Any, spans: list[tuple[int, int]]) -> Any:
    """`ids` inside the [start, end) token spans, IGNORE_INDEX elsewhere (`_labels_for_spans`
    for a whole batch at once; spans are a few per text, so one slice copy each)."""
    import numpy as np

    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for lo, hi in spans:
        labels[lo:hi] = ids[lo:hi]
    return labels


def tokenize_rendered(tokenizer: PreTrainedTokenizerBase, rendered: list[tuple[str, list[Span]]]) -> TokenBatch:
    """Token ids and labels of rendered conversations: the tokenizer half of `encode_chats`.

    Tokenization is batched and goes straight to the Rust tokenizer when there is one (the
    transformers wrapper converts every token's offsets to Python objects, which costs more than
    the tokenization itself). The Rust tokenizer releases the GIL, so this can run in a thread
    while the caller renders the next batch.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    id_lists: list[list[int]] = []
    token_spans: list[tuple[int, int]] = []
    base = 0  # where the current text's tokens start in the flat arrays
    for lo in range(0, len(rendered), ENCODE_BATCH):
        chunk = rendered[lo : lo + ENCODE_BATCH]
        texts = [text for text, _ in chunk]
        if backend is not None:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            lookups = [(enc.ids, _first_token_in_encoding(enc, len(text), len(enc))) for text, enc in zip(texts, encodings)]
        else:
            enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            lookups = [(list(ids), _first_token_in_offsets(offsets)) for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]
        for (_, spans), (ids, first_token_at) in zip(chunk, lookups):
            token_spans += [(base + first_token_at(start), base + first_token_at(end)) for start, end in spans]
            id_lists.append(ids)
            base += len(ids)
    ids, offsets = _flatten(id_lists)
    return TokenBatch(ids, _labels_in_spans(ids, token_spans), offsets, [text for text, _ in rendered])


def encode_rendered(tokenizer: PreTrainedTokenizerBase, rendered: list[tuple[str, list[Span]]]) -> list[Encoded]:
    return tokenize_rendered(tokenizer, rendered).encodings()


def encode_chats(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]],
                 renderer: ChatRenderer | None = None) -> list[Encoded]:
    """Token ids of each conversation; labels only on assistant replies and their end marker."""
    return encode_rendered(tokenizer, render_chats(renderer or ChatRenderer(tokenizer), conversations))


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids per text, in batches, through the Rust tokenizer when there is one (without
    tracking offsets, which nothing here reads: a sixth less work on raw text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    out: list[list[int]] = []
    for lo in range(0, len(texts), ENCODE_BATCH):
        batch = texts[lo : lo + ENCODE_BATCH]
        if encode is not None:
            out += [e.ids for e in encode(batch, add_special_tokens=False)]
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


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> TokenBatch:
    """Raw text for continued pretraining: every token, and the end-of-text marker, is trained on."""
    import numpy as np

    ids, offsets = _flatten(_token_ids(tokenizer, texts))
    end = end_of_text_id(tokenizer)
    if end is not None:  # one marker after each text's last token
        ids = np.insert(ids, offsets[1:], end)
        offsets = offsets + np.arange(len(offsets))
    return TokenBatch(ids, ids.copy(), offsets, list(texts))


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[Encoded]:
    return tokenize_texts(tokenizer, texts).encodings()


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> Encoded:
    return encode_texts(tokenizer, [text])[0]


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """The prompt for the last assistant reply: everything before it plus the assistant header."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render(tokenizer, messages[:last], generation_prompt=True)
