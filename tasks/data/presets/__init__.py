"""Presets: how one parsed input item becomes stage records, for the common shapes of public data.

A source in `params.yaml` names a preset and, where its data differs from the usual shape, the
field names and preset options:

    sources:
      - {path: data/sources/gsm8k.jsonl, preset: gsm8k}
      - {path: data/sources/seed_tasks.jsonl, preset: alpaca, options: {explode: instances}}
      - {path: data/sources/chats.jsonl, preset: messages, fields: {messages: turns, role: speaker}}

The presets, what each maps, and the module that holds it:

    text      (pretrain) raw text cut into documents (paragraphs, lines, pattern, whole), or a
              row's `text` field -> {text}                                           text.py
    messages  (sft) a list of {role, content} turns -> {messages}, roles through a
              role map, cut after the last assistant turn                            chat.py
    sharegpt  (sft) the same with ShareGPT's names: conversations / from / value     chat.py
    oasst     (sft) an OpenAssistant message tree -> its best-ranked path as one chat chat.py
    alpaca    (sft) instruction (+ input, + system) -> output; options.explode maps
              each element of a list of instances                                    alpaca.py
    gsm8k     (sft) question -> worked answer as a <think> block (<<...>> notes
              dropped) and "The answer is N." from its `#### N` line                gsm8k.py
    snips     (sft) an utterance in tagged text chunks -> {"intent", "slots"} JSON   snips.py
    text2sql  (sft) each question of a group, variables filled into it and the
              group's SQL -> that SQL                                                text2sql.py

`base.py` holds the `Preset` base class and the helpers they share; `registry.py` the presets by
name and `build_preset`.

`build_preset` checks the configuration once and raises `PresetError` for a bad one. After that a
preset never raises for bad data: `Preset.records(item)` yields `(where, record)` for what it can
map and a `Reject` (with a stable reason key) for what it cannot, so nothing vanishes unexplained.
Every record it yields has passed `check_record` for the preset's kind.
"""

from tasks.data.presets.alpaca import AlpacaOptions, AlpacaPreset
from tasks.data.presets.base import Kind, Output, Preset, PresetError, PresetOptions
from tasks.data.presets.chat import (
    DEFAULT_ROLE_MAP, MessagesOptions, MessagesPreset, OasstOptions, OasstPreset, RoleMapOptions, ShareGPTPreset,
)
from tasks.data.presets.gsm8k import Gsm8kOptions, Gsm8kPreset
from tasks.data.presets.registry import DEFAULT_PRESET, PRESET_NAMES, build_preset
from tasks.data.presets.snips import SnipsOptions, SnipsPreset
from tasks.data.presets.text import TextOptions, TextPreset
from tasks.data.presets.text2sql import Text2SqlOptions, Text2SqlPreset

__all__ = [
    "DEFAULT_PRESET", "DEFAULT_ROLE_MAP", "PRESET_NAMES", "AlpacaOptions", "AlpacaPreset", "Gsm8kOptions",
    "Gsm8kPreset", "Kind", "MessagesOptions", "MessagesPreset", "OasstOptions", "OasstPreset", "Output", "Preset",
    "PresetError", "PresetOptions", "RoleMapOptions", "ShareGPTPreset", "SnipsOptions", "SnipsPreset",
    "Text2SqlOptions", "Text2SqlPreset", "TextOptions", "TextPreset", "build_preset",
]
