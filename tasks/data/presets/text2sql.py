"""The `text2sql` preset (sft): a group of paraphrased questions sharing one SQL template, with the
placeholder variables filled into each question and its SQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from pydantic import Field, field_validator

from tasks.data.items import Item
from tasks.data.presets.base import Output, Preset, PresetOptions, _exchange, _field, _fill_template, _Miss, _sub_where, require_placeholder


class Text2SqlOptions(PresetOptions):
    # Question splits to leave out (the data set's own `exclude` marks questions it does not vouch for).
    skip_splits: list[str] = Field(default_factory=lambda: ["exclude"])
    # `{question}` is replaced by the filled question.
    prompt: str = "{question}"

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        return require_placeholder(value, "{question}", "the question")


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
