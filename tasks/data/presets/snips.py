"""The `snips` preset (sft): an utterance in tagged text chunks -> JSON with its intent and slots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import field_validator

from tasks.data.items import Item
from tasks.data.presets.base import (
    Output, Preset, PresetOptions, _exchange, _field, _fill_template, _Miss, _sub_where, _type_name, require_placeholder,
)


class SnipsOptions(PresetOptions):
    # `{text}` is replaced by the utterance.
    prompt: str = "Extract JSON: {text}"
    # The intent of single-utterance items that do not carry one in field `intent`.
    intent: str | None = None

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        return require_placeholder(value, "{text}", "the utterance")


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
