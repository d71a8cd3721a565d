"""What every preset shares: the `Preset` base class, its options model, `PresetError`, and the
helpers that read a field or finish a chat and turn what they cannot use into a `Reject`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from tasks.core.records import RecordError, check_record
from tasks.data.errors import Reject
from tasks.data.items import Item

Kind = Literal["pretrain", "sft"]
Output = tuple[str, dict] | Reject


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


def _finish_chat(item: Item, where: str, messages: list[dict], raw: Any) -> list[Output]:
    """Cut after the last assistant turn (nothing to learn after it: the cut is a `changed` reject,
    so it is on record) and name what makes a chat unusable."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        detail = "the conversation has no assistant reply to train on"
        return [Reject(item.source, where, "no_assistant_turn", detail, raw)]
    cut = messages[last + 1 :]
    messages = messages[: last + 1]
    if not any(m["role"] == "user" for m in messages):
        detail = "the conversation has no user turn before its last assistant reply"
        return [Reject(item.source, where, "no_user_turn", detail, raw)]
    for i, m in enumerate(messages):
        if m["role"] != "system" and not m["content"].strip():
            return [Reject(item.source, where, "empty_text", f"turn {i} ({m['role']}) has empty content", raw)]
    if not cut:
        return [(where, {"messages": messages})]
    detail = (f"{len(cut)} turn(s) after the last assistant reply cut ({', '.join(m['role'] for m in cut)}): "
              "no reply follows them to train on; the rest of the conversation is kept")
    return [Reject(item.source, where, "trailing_turns_cut", detail, raw, "changed"), (where, {"messages": messages})]


# --- the base class -----------------------------------------------------------------------------


def require_placeholder(value: str, placeholder: str, what: str) -> str:
    """An option template must name where the filled value goes."""
    if placeholder not in value:
        raise ValueError(f"must contain {placeholder}, where {what} goes")
    return value


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
                yield Reject(item.source, where, exc.reason, str(exc), record)

    def _map(self, item: Item) -> Iterator[Output]:
        raise NotImplementedError

    def _reject(self, item: Item, where: str, reason: str, detail: str, record: Any = None) -> Reject:
        return Reject(source=item.source, where=where, reason=reason, detail=detail, record=record)
