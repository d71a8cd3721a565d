"""The presets by name, and `build_preset`: a source's preset configuration checked once, with
errors that say what is accepted.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from tasks.data.presets.alpaca import AlpacaPreset
from tasks.data.presets.base import Kind, Preset, PresetError, PresetOptions
from tasks.data.presets.chat import MessagesPreset, OasstPreset, ShareGPTPreset
from tasks.data.presets.gsm8k import Gsm8kPreset
from tasks.data.presets.snips import SnipsPreset
from tasks.data.presets.template import TemplatePreset
from tasks.data.presets.text import TextPreset
from tasks.data.presets.text2sql import Text2SqlPreset

_PRESETS: dict[str, type[Preset]] = {
    p.name: p
    for p in (
        TextPreset, MessagesPreset, ShareGPTPreset, AlpacaPreset, OasstPreset, Gsm8kPreset, SnipsPreset, Text2SqlPreset,
        TemplatePreset,
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
