"""Presets: how one parsed input item becomes stage records, for the common shapes of public data.

A source in `params.yaml` names a preset and, where its data differs from the usual shape, the
field names and preset options:

    sources:
      - {path: data/sources/gsm8k.jsonl, preset: gsm8k}
      - {path: data/sources/seed_tasks.jsonl, preset: alpaca, options: {explode: instances}}
      - {path: data/sources/chats.jsonl, preset: messages, fields: {messages: turns, role: speaker}}

`build_preset` checks the configuration once and raises `PresetError` for a bad one. After that a
preset never raises for bad data: `Preset.records(item)` yields `(where, record)` for what it can
map and a `Reject` (with a stable reason key) for what it cannot, so nothing vanishes unexplained.
Every record it yields has passed `check_record` for the preset's kind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from itertools import pairwise
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.core.records import ROLES, RecordError, check_record
from tasks.data.errors import Reject
from tasks.data.items import Item

Kind = Literal["pretrain", "sft"]
Output = tuple[str, dict] | Reject

# Role names seen in public chat sets; `role_map` options are merged over this.
DEFAULT_ROLE_MAP: dict[str, str] = {
    "system": "system",
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}


class PresetError(ValueError):
    """A source's preset configuration is wrong; the message says what is accepted."""


# --- helpers shared by the presets ------------------------------------------------------------


_TYPE_WORDS = {"str": "string", "dict": "object", "list": "list", "int": "integer", "float": "number", "bool": "boolean"}


def _type_word(cls: type) -> str:
    """JSON's words for Python types: the person reading a reject wrote JSON, not Python."""
    return _TYPE_WORDS.get(cls.__name__, cls.__name__)


def _type_name(value: Any) -> str:
    return "nothing" if value is None else _type_word(type(value))


def _sub_where(base: str, sub: str) -> str:
    """Address of a part inside an item: "[3]" + "sentences[2]" -> "[3].sentences[2]"."""
    if not base:
        return sub
    return base + sub if sub.startswith("[") else f"{base}.{sub}"


class _Miss:
    """Why a field could not be read: becomes a Reject once the caller knows where and what record."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail

    def reject(self, item: Item, where: str, record: Any) -> Reject:
        return Reject(source=item.source, where=where, reason=self.reason, detail=self.detail, record=record)


def _field(obj: Any, key: str, expected: type | tuple[type, ...], *, config_key: str, optional: bool = False) -> Any:
    """obj[key] if it has the expected type; a `_Miss` naming the field (and the override) if not.

    With optional=True a missing or null field gives None instead of a miss.
    """
    if not isinstance(obj, dict):
        return _Miss("wrong_type", f"expected an object with field {key!r}, found {_type_name(obj)}")
    value = obj.get(key)
    if value is None:
        if optional:
            return None
        hint = f"; if it has another name, set fields: {{{config_key}: <name>}}" if config_key else ""
        found = ", ".join(map(str, obj)) or "none"
        return _Miss("missing_field", f"field {key!r} is missing (found fields: {found}){hint}")
    if not isinstance(value, expected):
        want = " or ".join(_type_word(t) for t in (expected if isinstance(expected, tuple) else (expected,)))
        return _Miss("wrong_type", f"field {key!r} should be a {want}, found {_type_name(value)}")
    return value


def _fill_template(template: str, placeholder: str, value: str) -> str:
    """str.replace, not str.format: a template may hold literal braces (JSON examples)."""
    return template.replace("{" + placeholder + "}", value)


def _exchange(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _finish_chat(item: Item, where: str, messages: list[dict], raw: Any) -> Output:
    """Cut after the last assistant turn (nothing to learn after it) and name what makes a chat unusable."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        detail = "the conversation has no assistant reply to train on"
        return Reject(item.source, where, "no_assistant_turn", detail, raw)
    messages = messages[: last + 1]
    if not any(m["role"] == "user" for m in messages):
        detail = "the conversation has no user turn before its last assistant reply"
        return Reject(item.source, where, "no_user_turn", detail, raw)
    for i, m in enumerate(messages):
        if m["role"] != "system" and not m["content"].strip():
            return Reject(item.source, where, "empty_text", f"turn {i} ({m['role']}) has empty content", raw)
    return where, {"messages": messages}


# --- the base class -----------------------------------------------------------------------------


class PresetOptions(BaseModel):
    """Options common to no preset: each preset's model lists its own, and nothing else is accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Preset:
    """Maps items of one data shape to records of one kind; subclasses implement `_map`."""

    name: ClassVar[str]
    kind: ClassVar[Kind]
    default_fields: ClassVar[dict[str, str]]
    Options: ClassVar[type[PresetOptions]] = PresetOptions

    def __init__(self, fields: dict[str, str], options: PresetOptions) -> None:
        self.fields = {**self.default_fields, **fields}
        self.options = options

    def records(self, item: Item) -> Iterator[Output]:
        """(where, record) per record in the item, or a Reject for each part that cannot be mapped."""
        for out in self._map(item):
            if isinstance(out, Reject):
                yield out
                continue
            where, record = out
            try:  # the safety net: a record the pipeline would refuse later is a Reject here
                yield where, check_record(record, self.kind, where)
            except RecordError as exc:
                yield Reject(item.source, where, getattr(exc, "reason", "invalid_record"), str(exc), record)

    def _map(self, item: Item) -> Iterator[Output]:
        raise NotImplementedError

    def _reject(self, item: Item, where: str, reason: str, detail: str, record: Any = None) -> Reject:
        return Reject(source=item.source, where=where, reason=reason, detail=detail, record=record)


# --- text (pretrain) -----------------------------------------------------------------------------


class TextOptions(PresetOptions):
    # How a whole text file is cut into documents: blank-line paragraphs grouped up to max_chars,
    # one document per line, the whole file, or a new document at each line matching `pattern`.
    split: Literal["paragraphs", "lines", "none", "pattern"] = "paragraphs"
    max_chars: int = Field(default=4000, gt=0)
    pattern: str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _pattern_iff_split_pattern(self) -> TextOptions:
        if (self.split == "pattern") != (self.pattern is not None):
            raise ValueError("set pattern (a regex) exactly when split is 'pattern'")
        if "max_chars" in self.model_fields_set and self.split != "paragraphs":
            raise ValueError("max_chars applies only to split 'paragraphs'")
        return self


class TextPreset(Preset):
    """Raw text: a whole text file cut into documents, or the `text` field of a row."""

    name, kind, default_fields, Options = "text", "pretrain", {"text": "text"}, TextOptions
    options: TextOptions

    def _map(self, item: Item) -> Iterator[Output]:
        if isinstance(item.value, str):
            yield from self._split(item)
            return
        text = _field(item.value, self.fields["text"], str, config_key="text")
        if isinstance(text, _Miss):
            yield text.reject(item, item.where, item.value)
        elif not text.strip():
            yield self._reject(item, item.where, "empty_text", f"field {self.fields['text']!r} is empty", item.value)
        else:
            yield item.where, {"text": text}

    def _split(self, item: Item) -> Iterator[Output]:
        text = item.value
        if not text.strip():
            yield self._reject(item, f"line {item.start_line}", "empty_text", "the text is empty or whitespace", text)
            return
        if self.options.split == "none":
            yield f"line {item.start_line}", {"text": text}
            return
        lines = text.splitlines()
        for first, last in self._documents(lines):
            yield f"line {item.start_line + first}", {"text": "\n".join(lines[first : last + 1])}

    def _documents(self, lines: list[str]) -> Iterator[tuple[int, int]]:
        """(first, last) line index of each document; documents never start or end on a blank line."""
        blank = [not line.strip() for line in lines]
        if self.options.split == "lines":
            yield from ((i, i) for i, b in enumerate(blank) if not b)
        elif self.options.split == "pattern":
            starts = re.compile(self.options.pattern or "")
            cuts = [0] + [i for i, line in enumerate(lines) if i and starts.search(line)] + [len(lines)]
            for lo, hi in pairwise(cuts):
                kept = [i for i in range(lo, hi) if not blank[i]]
                if kept:
                    yield kept[0], kept[-1]
        else:
            yield from _group_paragraphs(lines, blank, self.options.max_chars)


def _group_paragraphs(lines: list[str], blank: list[bool], max_chars: int) -> Iterator[tuple[int, int]]:
    """Greedy: add blank-line separated blocks to a document while it stays within max_chars.

    Speaker turns or short paragraphs alone make poor documents; a block longer than max_chars
    stays whole (a paragraph is never cut).
    """
    offset = [0]  # offset[i]: characters before line i when lines are joined with "\n"
    for line in lines:
        offset.append(offset[-1] + len(line) + 1)
    blocks, start = [], None
    for i, b in enumerate([*blank, True]):
        if not b and start is None:
            start = i
        elif b and start is not None:
            blocks.append((start, i - 1))
            start = None
    doc: tuple[int, int] | None = None
    for first, last in blocks:
        if doc is not None and offset[last + 1] - 1 - offset[doc[0]] <= max_chars:
            doc = (doc[0], last)
            continue
        if doc is not None:
            yield doc
        doc = (first, last)
    if doc is not None:
        yield doc


# --- messages / sharegpt (sft) ------------------------------------------------------------------


class RoleMapOptions(PresetOptions):
    # Extra or changed role names, merged over DEFAULT_ROLE_MAP, e.g. {customer: user, agent: assistant}.
    role_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("role_map")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        wrong = {k: v for k, v in value.items() if v not in ROLES}
        if wrong:
            raise ValueError(f"roles must map to one of {'/'.join(ROLES)}, found {wrong}")
        return value


class MessagesOptions(RoleMapOptions):
    pass


def _role_lookup(role_map: dict[str, str]) -> dict[str, str]:
    merged = {**DEFAULT_ROLE_MAP, **role_map}
    return {**{k.lower(): v for k, v in merged.items()}, **merged}


class MessagesPreset(Preset):
    """A chat as a list of {role, content} turns (OpenAI style; ShareGPT with other defaults)."""

    name, kind, Options = "messages", "sft", MessagesOptions
    default_fields = {"messages": "messages", "role": "role", "content": "content"}
    options: MessagesOptions

    def __init__(self, fields: dict[str, str], options: PresetOptions) -> None:
        super().__init__(fields, options)
        self.roles = _role_lookup(self.options.role_map)

    def _map(self, item: Item) -> Iterator[Output]:
        f = self.fields
        # A bare list is the turns themselves (a JSON array of chats, one chat per element).
        turns = item.value
        if not isinstance(turns, list):
            turns = _field(item.value, f["messages"], list, config_key="messages")
        if isinstance(turns, _Miss):
            yield turns.reject(item, item.where, item.value)
            return
        messages = []
        for i, turn in enumerate(turns):
            role = _field(turn, f["role"], str, config_key="role")
            content = _field(turn, f["content"], str, config_key="content")
            miss = role if isinstance(role, _Miss) else content if isinstance(content, _Miss) else None
            if miss:
                yield self._reject(item, item.where, miss.reason, f"turn {i}: {miss.detail}", item.value)
                return
            mapped = self.roles.get(role, self.roles.get(role.lower()))
            if mapped is None:
                known = ", ".join(sorted({**DEFAULT_ROLE_MAP, **self.options.role_map}))
                yield self._reject(
                    item, item.where, "unknown_role",
                    f"turn {i}: role {role!r} in field {f['role']!r} is not one of {known}; "
                    f"add it with options: {{role_map: {{{role}: user|assistant|system}}}}",
                    item.value,
                )
                return
            messages.append({"role": mapped, "content": content})
        yield _finish_chat(item, item.where, messages, item.value)


class ShareGPTPreset(MessagesPreset):
    name = "sharegpt"
    default_fields = {"messages": "conversations", "role": "from", "content": "value"}


# --- alpaca (sft) --------------------------------------------------------------------------------


class AlpacaOptions(PresetOptions):
    # A list field whose elements each give one record, merged over the rest of the item
    # (self-instruct's `instances`: one instruction, several input/output pairs).
    explode: str | None = None


class AlpacaPreset(Preset):
    """Instruction (+ optional input) -> output, with an optional system prompt."""

    name, kind, Options = "alpaca", "sft", AlpacaOptions
    default_fields = {"instruction": "instruction", "input": "input", "output": "output", "system": "system"}
    options: AlpacaOptions

    def _map(self, item: Item) -> Iterator[Output]:
        explode = self.options.explode
        if explode is None:
            yield self._one(item, item.where, item.value)
            return
        parts = _field(item.value, explode, list, config_key="")
        if isinstance(parts, _Miss):
            yield parts.reject(item, item.where, item.value)
            return
        if not parts:
            detail = f"field {explode!r} (options.explode) is an empty list"
            yield self._reject(item, item.where, "empty_list", detail, item.value)
            return
        parent = {k: v for k, v in item.value.items() if k != explode}
        for i, part in enumerate(parts):
            where = f"{item.where}[{i}]"
            if not isinstance(part, dict):
                detail = f"element {i} of field {explode!r} should be an object, found {_type_name(part)}"
                yield self._reject(item, where, "wrong_type", detail, part)
            else:
                yield self._one(item, where, {**parent, **part})

    def _one(self, item: Item, where: str, row: Any) -> Output:
        f = self.fields
        instruction = _field(row, f["instruction"], str, config_key="instruction")
        extra = _field(row, f["input"], str, config_key="input", optional=True)
        output = _field(row, f["output"], str, config_key="output")
        system = _field(row, f["system"], str, config_key="system", optional=True)
        for value in (instruction, extra, output, system):
            if isinstance(value, _Miss):
                return value.reject(item, where, row)
        for key, value in (("instruction", instruction), ("output", output)):
            if not value.strip():
                return self._reject(item, where, "empty_text", f"field {f[key]!r} is empty", row)
        user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
        messages = [{"role": "system", "content": system}] if system and system.strip() else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return where, {"messages": messages}


# --- oasst (sft) ---------------------------------------------------------------------------------


class OasstOptions(RoleMapOptions):
    # Skip machine-written replies; a tree whose first prompt is synthetic is rejected as a whole.
    drop_synthetic: bool = False


class OasstPreset(Preset):
    """An OpenAssistant message tree: the best-ranked path through it as one multi-turn chat."""

    name, kind, Options = "oasst", "sft", OasstOptions
    default_fields = {
        "prompt": "prompt", "text": "text", "role": "role", "rank": "rank",
        "synthetic": "synthetic", "deleted": "deleted", "replies": "replies",
    }
    options: OasstOptions

    def __init__(self, fields: dict[str, str], options: PresetOptions) -> None:
        super().__init__(fields, options)
        self.roles = _role_lookup(self.options.role_map)

    def _map(self, item: Item) -> Iterator[Output]:
        f = self.fields
        prompt = _field(item.value, f["prompt"], dict, config_key="prompt")
        if isinstance(prompt, _Miss):
            yield prompt.reject(item, item.where, item.value)
            return
        if prompt.get(f["deleted"]):
            detail = f"the tree's prompt is marked {f['deleted']!r}"
            yield self._reject(item, item.where, "deleted", detail, item.value)
            return
        if self.options.drop_synthetic and prompt.get(f["synthetic"]):
            detail = f"the tree's prompt is {f['synthetic']!r} and options.drop_synthetic is on"
            yield self._reject(item, item.where, "synthetic", detail, item.value)
            return
        messages, node, depth = [], prompt, 0
        while node is not None:
            turn = self._turn(node, depth)
            if isinstance(turn, _Miss):
                yield turn.reject(item, item.where, item.value)
                return
            messages.append(turn)
            node, depth = self._best_reply(node), depth + 1
            if isinstance(node, _Miss):
                yield node.reject(item, item.where, item.value)
                return
        yield _finish_chat(item, item.where, messages, item.value)

    def _turn(self, node: dict, depth: int) -> dict | _Miss:
        f = self.fields
        text = _field(node, f["text"], str, config_key="text")
        role = _field(node, f["role"], str, config_key="role")
        for value in (text, role):
            if isinstance(value, _Miss):
                return _Miss(value.reason, f"message at depth {depth}: {value.detail}")
        mapped = self.roles.get(role, self.roles.get(role.lower()))
        if mapped is None:
            detail = f"message at depth {depth}: role {role!r} in field {f['role']!r} is unknown; add it to options.role_map"
            return _Miss("unknown_role", detail)
        return {"role": mapped, "content": text}

    def _best_reply(self, node: dict) -> dict | None | _Miss:
        """Lowest rank wins; unranked replies come after ranked ones; ties keep file order."""
        f = self.fields
        replies = _field(node, f["replies"], list, config_key="replies", optional=True) or []
        if isinstance(replies, _Miss):
            return replies
        eligible = [
            r for r in replies
            if isinstance(r, dict) and not r.get(f["deleted"])
            and not (self.options.drop_synthetic and r.get(f["synthetic"]))
        ]

        def order(reply: dict) -> tuple[int, float]:
            rank = reply.get(f["rank"])
            ranked = isinstance(rank, (int, float)) and not isinstance(rank, bool)
            return (0, rank) if ranked else (1, 0)

        return min(eligible, key=order, default=None)  # min keeps the first of equal keys


# --- gsm8k (sft) ---------------------------------------------------------------------------------


class Gsm8kOptions(PresetOptions):
    # The text after the think block; `{answer}` is replaced by the final answer.
    answer_template: str = "The answer is {answer}."

    @field_validator("answer_template")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if "{answer}" not in value:
            raise ValueError("must contain {answer}, where the final answer goes")
        return value


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class Gsm8kPreset(Preset):
    """A worked math answer ending in `#### N`: steps become a think block, N the stated answer."""

    name, kind, Options = "gsm8k", "sft", Gsm8kOptions
    default_fields = {"question": "question", "answer": "answer"}
    options: Gsm8kOptions

    def _map(self, item: Item) -> Iterator[Output]:
        f = self.fields
        question = _field(item.value, f["question"], str, config_key="question")
        answer = _field(item.value, f["answer"], str, config_key="answer")
        for value in (question, answer):
            if isinstance(value, _Miss):
                yield value.reject(item, item.where, item.value)
                return
        steps, marker, final = answer.rpartition("####")
        final = _THOUSANDS_COMMA.sub("", final.strip())
        if not marker or not final:
            detail = f"field {f['answer']!r} has no final '#### N' line"
            yield self._reject(item, item.where, "no_final_answer", detail, item.value)
            return
        if not question.strip():
            yield self._reject(item, item.where, "empty_text", f"field {f['question']!r} is empty", item.value)
            return
        steps = _CALCULATOR_NOTE.sub("", steps).strip()
        reply = f"<think>\n{steps}\n</think>\n" + _fill_template(self.options.answer_template, "answer", final)
        yield item.where, _exchange(question, reply)


# --- snips (sft) ---------------------------------------------------------------------------------


class SnipsOptions(PresetOptions):
    # `{text}` is replaced by the utterance.
    prompt: str = "Extract JSON: {text}"
    # The intent of single-utterance items that do not carry one in field `intent`.
    intent: str | None = None

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain {text}, where the utterance goes")
        return value


class SnipsPreset(Preset):
    """SNIPS-style NLU: an utterance in text/entity chunks -> JSON with its intent and slots."""

    name, kind, Options = "snips", "sft", SnipsOptions
    default_fields = {"data": "data", "text": "text", "entity": "entity", "intent": "intent"}
    options: SnipsOptions

    def _map(self, item: Item) -> Iterator[Output]:
        value, f = item.value, self.fields
        if isinstance(value, dict) and f["data"] in value:  # one utterance
            intent = value.get(f["intent"]) or self.options.intent
            if not isinstance(intent, str):
                yield self._reject(
                    item, item.where, "missing_field",
                    f"the utterance has no intent: field {f['intent']!r} is missing or not a string "
                    "and options.intent is not set",
                    value,
                )
                return
            yield self._utterance(item, item.where, intent, value)
            return
        if not isinstance(value, dict) or not value:
            found = "an empty object" if value == {} else _type_name(value)
            detail = f"expected {{intent: [utterances]}} or an utterance with field {f['data']!r}, found {found}"
            yield self._reject(item, item.where, "missing_field" if value == {} else "wrong_type", detail, value)
            return
        for intent, utterances in value.items():
            if not isinstance(utterances, list):
                detail = f"intent {intent!r} should hold a list of utterances, found {_type_name(utterances)}"
                yield self._reject(item, _sub_where(item.where, intent), "wrong_type", detail, utterances)
                continue
            for i, utterance in enumerate(utterances):
                yield self._utterance(item, _sub_where(item.where, f"{intent}[{i}]"), intent, utterance)

    def _utterance(self, item: Item, where: str, intent: str, utterance: Any) -> Output:
        f = self.fields
        chunks = _field(utterance, f["data"], list, config_key="data")
        if isinstance(chunks, _Miss):
            return chunks.reject(item, where, utterance)
        texts, slots = [], {}
        for i, chunk in enumerate(chunks):
            text = _field(chunk, f["text"], str, config_key="text")
            entity = _field(chunk, f["entity"], str, config_key="entity", optional=True)
            for value in (text, entity):
                if isinstance(value, _Miss):
                    return _Miss(value.reason, f"chunk {i}: {value.detail}").reject(item, where, utterance)
            texts.append(text)
            if entity is not None:
                slot = text.strip()
                before = slots.get(entity)  # a repeated entity (two cities in one request) becomes a list
                if before is None:
                    slots[entity] = slot
                else:
                    slots[entity] = [*before, slot] if isinstance(before, list) else [before, slot]
        text = "".join(texts).strip()
        if not text:
            detail = f"the utterance's {f['text']!r} chunks are empty"
            return self._reject(item, where, "empty_text", detail, utterance)
        target = json.dumps({"intent": intent, "slots": slots}, ensure_ascii=False)
        user = _fill_template(self.options.prompt, "text", text)
        return where, _exchange(user, target)


# --- text2sql (sft) ------------------------------------------------------------------------------


class Text2SqlOptions(PresetOptions):
    # Question splits to leave out (the data set's own `exclude` marks questions it does not vouch for).
    skip_splits: list[str] = Field(default_factory=lambda: ["exclude"])
    # `{question}` is replaced by the filled question.
    prompt: str = "{question}"

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("must contain {question}, where the question goes")
        return value


def _token_pattern(names: list[str]) -> re.Pattern[str]:
    """Whole placeholder tokens only: `number1` must not match inside `number10`."""
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9_])({alternatives})(?![A-Za-z0-9_])")


class Text2SqlPreset(Preset):
    """Text-to-SQL groups (Finegan-Dollak et al. format): paraphrased questions sharing one SQL
    template, with placeholder variables filled per question."""

    name, kind, Options = "text2sql", "sft", Text2SqlOptions
    default_fields = {
        "sentences": "sentences", "text": "text", "variables": "variables", "split": "question-split",
        "sql": "sql", "group_variables": "variables", "name": "name", "example": "example",
    }
    options: Text2SqlOptions

    def _map(self, item: Item) -> Iterator[Output]:
        f, group = self.fields, item.value
        sentences = _field(group, f["sentences"], list, config_key="sentences")
        sql = _field(group, f["sql"], (list, str), config_key="sql")
        for value in (sentences, sql):
            if isinstance(value, _Miss):
                yield value.reject(item, item.where, group)
                return
        sql = sql[0] if isinstance(sql, list) and sql else sql
        if not isinstance(sql, str) or not sql.strip():
            yield self._reject(item, item.where, "missing_field", f"field {f['sql']!r} holds no SQL string", group)
            return
        examples = self._examples(group)
        for j, sentence in enumerate(sentences):
            if isinstance(sentence, dict) and sentence.get(f["split"]) in self.options.skip_splits:
                continue
            yield self._sentence(item, _sub_where(item.where, f"{f['sentences']}[{j}]"), sentence, sql, examples)

    def _examples(self, group: dict) -> dict[str, str]:
        """The group's example value per variable: the fallback when a question leaves one empty."""
        f, out = self.fields, {}
        declared = group.get(f["group_variables"])
        for var in declared if isinstance(declared, list) else []:
            if isinstance(var, dict) and isinstance(var.get(f["name"]), str):
                out[var[f["name"]]] = _scalar_text(var.get(f["example"]))
        return out

    def _sentence(self, item: Item, where: str, sentence: Any, sql: str, examples: dict[str, str]) -> Output:
        f = self.fields
        text = _field(sentence, f["text"], str, config_key="text")
        own = _field(sentence, f["variables"], dict, config_key="variables", optional=True) or {}
        for value in (text, own):
            if isinstance(value, _Miss):
                return value.reject(item, where, sentence)
        names = list(dict.fromkeys([*examples, *own]))
        values = {n: _scalar_text(own.get(n)) or examples.get(n, "") for n in names}
        values = {n: v for n, v in values.items() if v}
        question, query = text, sql.strip()
        if values:
            fill = _token_pattern(list(values))
            question, query = (fill.sub(lambda m: values[m.group(1)], s) for s in (question, query))
        unfilled = [n for n in names if n not in values]
        if unfilled:
            left = _token_pattern(unfilled)
            found = sorted({m.group(1) for s in (question, query) for m in left.finditer(s)})
            if found:
                return self._reject(
                    item, where, "unfilled_variable",
                    f"placeholder {', '.join(found)} has no value in the question's {f['variables']!r} "
                    f"nor an {f['example']!r} in the group's {f['group_variables']!r}",
                    sentence,
                )
        if not question.strip():
            return self._reject(item, where, "empty_text", f"field {f['text']!r} is empty", sentence)
        user = _fill_template(self.options.prompt, "question", question)
        return where, _exchange(user, query)


def _scalar_text(value: Any) -> str:
    """A variable's value as text: numbers count, empty strings and other shapes do not."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return ""


# --- registry ------------------------------------------------------------------------------------

_PRESETS: dict[str, type[Preset]] = {
    p.name: p
    for p in (
        TextPreset, MessagesPreset, ShareGPTPreset, AlpacaPreset, OasstPreset, Gsm8kPreset, SnipsPreset, Text2SqlPreset,
    )
}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)
DEFAULT_PRESET: dict[str, str] = {"pretrain": "text", "sft": "messages"}


def _type_text(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + "|".join(map(str, get_args(annotation)))
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _option_problem(error: dict[str, Any]) -> str:
    """One pydantic error as a sentence about the option, with the value that was given."""
    key = ".".join(map(str, error["loc"]))
    if error["type"] == "extra_forbidden":
        return f"unknown option {key!r}"
    message = error["msg"].removeprefix("Value error, ")
    if not key:
        return f"options: {message}"
    return f"option {key}: {message} (got {error['input']!r})"


def _describe_options(model: type[PresetOptions]) -> str:
    """'name (type, default ...)' per option, for error messages that say what is accepted."""
    parts = []
    for key, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        parts.append(f"{key} ({_type_text(info.annotation)}, default {default!r})")
    return ", ".join(parts) or "none"


def build_preset(name: str | None, kind: Kind, fields: dict[str, str], options: dict[str, Any]) -> Preset:
    """The configured preset for a source of a `kind` stage; PresetError says what is accepted."""
    name = DEFAULT_PRESET[kind] if name is None else name
    cls = _PRESETS.get(name)
    if cls is None:
        raise PresetError(f"unknown preset {name!r}: expected one of {', '.join(PRESET_NAMES)}")
    if cls.kind != kind:
        fitting = ", ".join(n for n, p in _PRESETS.items() if p.kind == kind)
        raise PresetError(
            f"preset {name!r} makes {cls.kind} records, but this is a {kind} stage: use one of {fitting}"
        )
    unknown = sorted(set(fields) - set(cls.default_fields))
    if unknown:
        raise PresetError(
            f"preset {name!r} has no field {', '.join(map(repr, unknown))}: its fields are "
            + ", ".join(f"{k} (default {v!r})" for k, v in cls.default_fields.items())
        )
    bad = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if bad:
        raise PresetError(f"preset {name!r}: fields {', '.join(bad)} must name a field (a non-empty string)")
    try:
        parsed = cls.Options.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(_option_problem(e) for e in exc.errors())
        raise PresetError(f"preset {name!r}: {problems}. Its options are {_describe_options(cls.Options)}") from None
    return cls(dict(fields), parsed)
