"""bench/base_skills.py: its overrides reach nested pretraining keys, and its prompts are answerable."""

from __future__ import annotations

import random
import re

import pytest

from bench.base_skills import PROMPTS_PER_SKILL, skill_prompts, tiny_config


def test_overrides_reach_model_pretrain_and_copy_warmup_keys():
    tiny = tiny_config(["hidden_size=64", "max_steps=7", "copy_warmup.steps=11", "copy_warmup.max_span=6"])
    assert tiny.hidden_size == 64
    assert tiny.pretrain.max_steps == 7
    assert (tiny.pretrain.copy_warmup.steps, tiny.pretrain.copy_warmup.max_span) == (11, 6)


@pytest.mark.parametrize("item", ["no_such_key=1", "copy_warmup.no_such_key=1", "copy_warmup=1"])
def test_an_unknown_key_is_refused(item):
    with pytest.raises(SystemExit, match=re.escape(f"--set {item}: no such key")):
        tiny_config([item])


def test_retell_asks_for_one_of_the_two_counts_it_told():
    prompts = skill_prompts(random.Random(0))
    assert {len(pairs) for pairs in prompts.values()} == {PROMPTS_PER_SKILL}
    for prompt, expected in prompts["retell"]:
        asked = prompt.rsplit(" So ", 1)[1].removesuffix(" has")
        assert f"{asked} has{expected}." in prompt


def test_slots_cuts_the_json_just_before_a_value_the_request_says():
    for prompt, expected in skill_prompts(random.Random(0))["slots"]:
        request = prompt.split(" asks: ", 1)[1].split(" As JSON: ", 1)[0]
        assert expected in request
        assert re.search(r'"\w+": "?$', prompt)
