"""The pure scoring helpers of `evaluate`: final-answer extraction and the JSON-validity check."""

from __future__ import annotations

import pytest

from tasks.evaluation.answers import extract_answer
from tasks.evaluation.structured import parses_as_json


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<think>\nTom has 2 apples and buys 2 more: 2+2=4.\n</think>\nThe answer is 4.", "4"),
        ("Some working.\n#### 1,234", "1234"),
        ("the answer is 3.0", "3"),
        ("The answer is 2.50", "2.5"),
        ("The answer is $18.", "18"),
        ("The Answer Is 1,000,000.", "1000000"),
        ("no numbers", None),
        ("", None),
        ("so we get 7 apples", "7"),
        ("3 boxes of 4 make 12.", "12"),
        # numbers inside the think block are ignored; the tail holds the answer
        ("<think>maybe the answer is 5? No: 3+4=7, and 10 is wrong.</think>\nSo there are 7 in total.", "7"),
        ("<think>The answer is 99.</think>\n#### 42", "42"),
        ("<think>only 1, 2 and 3 here</think>\nI am not sure.", None),
        # `answer is` wins over `####` and the last number
        ("The answer is 6, not 8.\n#### 9", "6"),
        # negative numbers
        ("The answer is -5.", "-5"),
        ("#### -1,234", "-1234"),
        ("The temperature ends at -8", "-8"),
        ("The answer is -0.5", "-0.5"),
        ("#### nothing after the marker", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "text, valid",
    [
        ('{"name": "Ada", "age": 36}', True),
        ('  \n[1, 2, {"a": null}]\n ', True),
        ('"just a string"', True),
        ("42", True),
        ('{"name": "Ada", "age": 36', False),
        ("{'name': 'Ada'}", False),
        ('{"a": 1} trailing', False),
        ("", False),
        ("   ", False),
        ("The answer is 4.", False),
    ],
)
def test_parses_as_json(text, valid):
    assert parses_as_json(text) is valid
