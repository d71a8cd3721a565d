"""The `gsm8k` preset (sft): a worked math answer -> a think block and the stated final answer."""

from __future__ import annotations

import re
from collections.abc import Iterator

from pydantic import field_validator

from tasks.data.items import Item
from tasks.data.presets.base import Output, Preset, PresetOptions, _exchange, _field, _fill_template, _Miss, require_placeholder


class Gsm8kOptions(PresetOptions):
    # The text after the think block; `{answer}` is replaced by the final answer.
    answer_template: str = "The answer is {answer}."

    @field_validator("answer_template")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        return require_placeholder(value, "{answer}", "the final answer")


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
# What `#### N` may hold: GSM8K's answers are numbers (an integer, a decimal, a fraction).
_NUMBER = re.compile(r"-?\$?\d+(?:\.\d+)?(?:/\d+)?%?")
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
        if not _NUMBER.fullmatch(final):
            detail = (f"the final answer {final[:60]!r} after '####' is not a number; the preset promises "
                      "'The answer is N.' with N a number: fix the record, or map it with the `template` preset")
            yield self._reject(item, item.where, "non_numeric_answer", detail, item.value)
            return
        steps = _CALCULATOR_NOTE.sub("", steps).strip()
        if "<<" in steps or ">>" in steps:
            at = steps.find("<<") if "<<" in steps else steps.find(">>")
            detail = (f"an unbalanced calculator note ('<<...>>') in field {f['answer']!r}, near "
                      f"{steps[max(0, at - 20):at + 30]!r}: it would be left in the think block as is")
            yield self._reject(item, item.where, "unbalanced_calculator_note", detail, item.value)
            return
        reply = f"<think>\n{steps}\n</think>\n" + _fill_template(self.options.answer_template, "answer", final)
        yield item.where, _exchange(question, reply)
