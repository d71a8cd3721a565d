"""The `template` preset (sft): prompt, reply, and optionally a system message and reasoning, each
built from a record's fields by a template, for data sets no fixed preset fits.

Templates are Jinja (the language chat templates are written in), run in Jinja's sandbox with
undefined names as errors: `{{ question }}`, `{{ choices[2] }}`, `{{ meta.db_id }}`,
`{{ options | join(", ") }}`, `{% if hint %}...{% endif %}`. A record the templates cannot fill (a
missing field, a template error on its values) is a reject naming the template and the field;
a template that does not compile is a configuration error before anything is read.

`reasoning`, when set, becomes the reply's think block: `<think>\\n{reasoning}\\n</think>\\n{reply}`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from pydantic import field_validator

from tasks.data.items import Item
from tasks.data.presets.base import Output, Preset, PresetOptions


@functools.cache
def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


@functools.cache
def compiled(source: str):
    """The template, compiled once per text; `jinja2.TemplateSyntaxError` if it does not compile."""
    return _environment().from_string(source)


class TemplateOptions(PresetOptions):
    prompt: str  # the user message
    reply: str  # the assistant reply (after the think block, when `reasoning` is set)
    system: str | None = None  # a system message before the prompt
    reasoning: str | None = None  # the think block's content

    @field_validator("prompt", "reply", "system", "reasoning")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        from jinja2 import TemplateSyntaxError

        if value is None:
            return value
        if not value.strip():
            raise ValueError("is empty: give a template, e.g. '{{ question }}'")
        try:
            compiled(value)
        except TemplateSyntaxError as err:
            raise ValueError(f"is not a valid template: {err.message} (line {err.lineno})") from None
        return value


class TemplatePreset(Preset):
    """A chat built from a record's fields by Jinja templates (see the module docstring)."""

    name, kind, Options = "template", "sft", TemplateOptions
    default_fields: dict[str, str] = {}
    options: TemplateOptions

    def _map(self, item: Item) -> Iterator[Output]:
        if not isinstance(item.value, dict):
            detail = f"expected an object whose fields the templates read, found {type(item.value).__name__}"
            yield self._reject(item, item.where, "wrong_type", detail, item.value)
            return
        parts: dict[str, str] = {}
        for part in ("system", "prompt", "reasoning", "reply"):
            source = getattr(self.options, part)
            if source is None:
                continue
            text = self._render(part, source, item.value)
            if isinstance(text, tuple):
                yield self._reject(item, item.where, *text, item.value)
                return
            parts[part] = text.strip()
        reply = parts["reply"]
        if parts.get("reasoning") is not None:
            reply = f"<think>\n{parts['reasoning']}\n</think>\n{reply}"
        messages = ([{"role": "system", "content": parts["system"]}] if parts.get("system") else [])
        messages += [{"role": "user", "content": parts["prompt"]}, {"role": "assistant", "content": reply}]
        yield item.where, {"messages": messages}

    @staticmethod
    def _render(part: str, source: str, value: dict[str, Any]) -> str | tuple[str, str]:
        """The filled template, or (reason, detail) for the reject."""
        from jinja2 import TemplateError, UndefinedError

        try:
            return compiled(source).render(**value)
        except UndefinedError as err:
            found = ", ".join(sorted(map(str, value))) or "none"
            return "missing_field", f"options.{part}: {err.message} (found fields: {found})"
        except (TemplateError, TypeError, ValueError) as err:
            return "template_error", f"options.{part}: {type(err).__name__}: {err}"
