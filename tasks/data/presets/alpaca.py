"""The `alpaca` preset (sft): instruction (+ input) -> output, optionally exploded over a list of instances."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tasks.data.items import Item
from tasks.data.presets.base import Output, Preset, PresetOptions, _field, _Miss, _type_name


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
