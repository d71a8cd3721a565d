"""Scores for `thinking` replies: the final answer of a worked solution, and whether the reply
has the shape the stage teaches (one `<think>` block, then an answer).

Answers are compared as normalised numbers, so `1,000`, `$1000.00` and `\\boxed{1000}` agree.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction

# A plain number: thousands commas only in groups of three (so "1,2,3" is three numbers).
_UNSIGNED = r"(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)"
# Signed (a minus right after a word or digit is subtraction, not a sign), an optional `$`, and an
# optional `/denominator`. A trailing period or `%` is left out by construction.
_NUMBER = re.compile(rf"(?:(?<![\w.-])-)?\$?{_UNSIGNED}(?:/{_UNSIGNED})?")
# `answer is` then the number straight after it (markdown bold, a colon or `$` allowed between).
_ANSWER_IS = re.compile(r"answer is[\s:*_]*(?=-?\$?\.?\d)", re.IGNORECASE)
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")  # GSM8K's `<<48/2=24>>`, as the gsm8k preset drops them
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"(-?)\s*\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_LATEX_NOISE = re.compile(r"\\[$%!,;: ]|\{,\}|\\text\s*\{[^{}]*\}|\\mathrm\s*\{[^{}]*\}")
_SENTENCE_END = re.compile(r"\n|\.(?=\s|$)")

# The data contract of `thinking` replies, the same rule as `tasks.validate.THINK_PATTERN` (a test
# keeps them equal; not imported, since tasks.validate pulls prefect in at import time).
_NO_TAG = r"(?:(?!</?think>)[\s\S])"  # a character that does not start a think tag
THINK_PATTERN = rf"^<think>{_NO_TAG}*</think>\s*(?!</?think>)\S{_NO_TAG}*$"


def normalize_number(text: str) -> str | None:
    """`text` (one match of `_NUMBER`) as a canonical string, or None if it is not a number.

    Decimal, not float, so long integers stay exact: no commas, `$` or spaces, no trailing zeros
    (`3.0` -> `3`, `2.50` -> `2.5`), no exponent. A fraction becomes its decimal when that is exact
    (`1/2` -> `0.5`), else stays a reduced fraction (`2/6` -> `1/3`)."""
    cleaned = re.sub(r"[\s$,]", "", text)
    numerator, _, denominator = cleaned.partition("/")
    try:
        value = Decimal(numerator)
        if denominator:
            return _fraction_text(Fraction(value) / Fraction(Decimal(denominator)))
    except (InvalidOperation, ZeroDivisionError):
        return None
    return _decimal_text(value)


def _decimal_text(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    with localcontext() as ctx:
        ctx.prec = max(28, len(value.as_tuple().digits))  # normalize() rounds to the precision
        return format(value.normalize(), "f")


def _fraction_text(value: Fraction) -> str:
    """Exact decimal when the reduced denominator has only the factors 2 and 5, else `p/q`."""
    rest = value.denominator
    for factor in (2, 5):
        while rest % factor == 0:
            rest //= factor
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as ctx:
        ctx.prec = len(str(value.numerator)) + len(str(value.denominator)) * 4  # enough to be exact
        return _decimal_text(Decimal(value.numerator) / Decimal(value.denominator))


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces matched), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None  # unclosed: the reply was cut off inside the box


def _boxed_answer(content: str) -> str | None:
    """The number in a box: `\\frac{a}{b}` as a fraction, else the first number after the last
    `=` (so `x = 5` gives 5), with LaTeX escapes and `\\text{units}` removed."""
    content = _FRAC.sub(lambda m: f"{m.group(1)}{m.group(2)}/{m.group(3)}", content)
    content = _LATEX_NOISE.sub("", content).rsplit("=", 1)[-1]
    found = _NUMBER.search(content)
    return normalize_number(found.group(0)) if found else None


def _stated_answer(text: str) -> str | None:
    """The number right after the first `answer is`; when that sentence goes on into an equation
    (GSM8K: "the answer is 15 gallons * 8 pints / gallon = 120 pints"), the first number after
    its last `=`."""
    for match in _ANSWER_IS.finditer(text):
        sentence = _SENTENCE_END.split(text[match.end():], maxsplit=1)[0]
        found = _NUMBER.match(sentence)
        if found is None:  # not reached while the lookahead matches `_NUMBER`; fail soft if they drift
            continue
        if "=" in sentence[found.end():]:
            found = _NUMBER.search(sentence.rsplit("=", 1)[-1]) or found
        return normalize_number(found.group(0))
    return None


def _marked_answer(text: str) -> str | None:
    """The first number after the last `####` (GSM8K's final-answer line)."""
    if "####" not in text:
        return None
    found = _NUMBER.search(text.rsplit("####", 1)[-1])
    return normalize_number(found.group(0)) if found else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def final_reply(text: str) -> str:
    """The answer part of a reply: the text after its last `</think>`, else the whole reply. Qwen3
    writes a think block before every answer, an empty one when it does not think, so JSON, SQL and
    ROUGE are read from here, as the final answer is."""
    return text.split("</think>")[-1]


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution as a normalised number (see `normalize_number`), or
    None when there is none.

    Only the text after the last `</think>` counts (the thoughts may try wrong answers), with
    GSM8K calculator notes `<<...>>` removed. The first rule that finds a number wins:
    1. the last `\\boxed{...}` (`\\frac{a}{b}`, `\\$`, `\\%`, `\\text{..}` understood);
    2. the first `answer is N` (case-insensitive; `the answer is: **$1,000.00**` works);
    3. the first number after the last `#### `;
    4. the last number in the text.
    `answer is` outranks `####` because a reply that states its answer and then rambles on (small
    models do) would otherwise be scored on the ramble."""
    tail = _CALCULATOR_NOTE.sub("", final_reply(text))
    boxed = _last_boxed(tail)
    for answer in (
        _boxed_answer(boxed) if boxed is not None else None,
        _stated_answer(tail),
        _marked_answer(tail),
    ):
        if answer is not None:
            return answer
    return _last_number(tail)


def answers_match(pred: str, ref: str) -> bool:
    """Both texts have a final answer and it is the same number (a reference without one never
    matches, so a broken reference shows up as a miss, not as a free point)."""
    answer = extract_answer(ref)
    return answer is not None and extract_answer(pred) == answer


def think_well_formed(text: str) -> bool:
    """The reply is the shape `thinking` teaches: after optional leading whitespace, exactly one
    `<think>` ... `</think>` block (its content may be empty, but holds no other think tag, so
    nested or unclosed blocks fail), then a non-empty answer with no further think tag.

    This is `tasks.validate`'s data contract (`THINK_PATTERN`) except for the leading whitespace:
    the training data is ours to write exactly, while generated text may start with a newline
    the chat template left before the reply."""
    return re.search(THINK_PATTERN, text.lstrip()) is not None
