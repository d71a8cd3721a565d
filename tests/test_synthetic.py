"""The synthetic curriculum (the embedded default data): deterministic, unique, well-formed and right."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from tasks.core.config import ConfigError
from tasks.core.records import check_record, content_hash
from tasks.data.synthetic import INTENTS, WORLD, arithmetic_facts, generate_stage_records, number_word

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"embedding": "pretrain", "syntax": "sft", "thinking": "sft", "instructions": "sft"}
N = 300


@pytest.fixture(scope="module")
def curriculum() -> dict[str, list[dict]]:
    return {stage: generate_stage_records(stage, kind, N, seed=7) for stage, kind in KINDS.items()}


def user_turns(record):
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def assistant_turns(record):
    return [m["content"] for m in record["messages"] if m["role"] == "assistant"]


@pytest.fixture
def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


class TestCurriculum:
    @pytest.mark.parametrize("stage", KINDS)
    def test_same_seed_same_records_other_seed_different(self, stage, curriculum):
        again = generate_stage_records(stage, KINDS[stage], N, seed=7)
        other = generate_stage_records(stage, KINDS[stage], N, seed=8)
        assert again == curriculum[stage]
        assert len({content_hash(r) for r in other} & {content_hash(r) for r in again}) < N // 2

    @pytest.mark.parametrize("stage", KINDS)
    def test_count_unique_and_valid(self, stage, curriculum):
        records = curriculum[stage]
        assert len(records) == N
        assert len({content_hash(r) for r in records}) == N
        for i, rec in enumerate(records):
            assert check_record(rec, KINDS[stage], f"record {i}") == rec  # already normalised

    @pytest.mark.parametrize("stage", KINDS)
    def test_records_are_short(self, stage, curriculum):
        # A cheap stand-in for "well under 200 BPE tokens": whitespace words across all turns.
        for rec in curriculum[stage]:
            text = rec.get("text") or " ".join(m["content"] for m in rec["messages"])
            assert 4 <= len(text.split()) <= 160, text

    def test_full_sizes_from_params_yaml(self, raw_params, caplog):
        with caplog.at_level(logging.WARNING, logger="tasks.data.synthetic"):
            for stage, spec in raw_params["stages"].items():
                records = generate_stage_records(stage, KINDS[stage], spec["data"]["n_records"], raw_params["seed"])
                assert len({content_hash(r) for r in records}) == spec["data"]["n_records"]
        assert not caplog.records  # no stage ran out of unique records

    def test_number_words(self):
        assert [number_word(n) for n in (0, 7, 13, 20, 42, 99)] == [
            "zero", "seven", "thirteen", "twenty", "forty-two", "ninety-nine"]
        with pytest.raises(ValueError):
            number_word(100)

    def test_unknown_stage_and_wrong_kind_are_config_errors(self):
        with pytest.raises(ConfigError, match=r"no synthetic data for stage 'poetry'.*stages.poetry.data.source"):
            generate_stage_records("poetry", "sft", 5, 0)
        with pytest.raises(ConfigError, match=r"stages.syntax.kind is 'pretrain'"):
            generate_stage_records("syntax", "pretrain", 5, 0)


class TestEmbedding:
    def test_arithmetic_is_right_and_present(self, curriculum):
        n_equations = 0
        for rec in curriculum["embedding"]:
            for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", rec["text"]):
                n_equations += 1
                assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c), rec["text"]
        assert n_equations > N // 10

    def test_words_match_digits(self, curriculum):
        pattern = re.compile(r"(\w[\w-]*) (plus|minus) ([\w-]+) is ([\w-]+)\. (\d+) [+-] (\d+) = (\d+)\.")
        matches = [m for rec in curriculum["embedding"] for m in pattern.finditer(rec["text"])]
        assert matches
        for m in matches:
            a, b, c = (int(m.group(i)) for i in (5, 6, 7))
            assert (m.group(1).lower(), m.group(3), m.group(4)) == (number_word(a), number_word(b), number_word(c))

    def test_world_facts_are_consistent(self, curriculum):
        for rec in curriculum["embedding"]:
            for thing, name, colour in re.findall(r"The (\w+) of (\w+) is (\w+)\.", rec["text"]):
                assert WORLD[name]["colours"][thing] == colour
            for name, town in re.findall(r"(\w+) lives in (\w+)\.", rec["text"]):
                assert WORLD[name]["town"] == town

    def test_copy_drills_say_the_same_sequence_twice(self, curriculum):
        drills = [m for rec in curriculum["embedding"]
                  for m in re.finditer(r"reads out: ([^.]+)\. (?:He|She) says it again: ([^.]+)\.", rec["text"])]
        assert len(drills) > N // 10
        assert all(m.group(1) == m.group(2) and len(m.group(1).split()) >= 3 for m in drills)

    def test_quote_drills_write_the_words_they_said_as_json_strings(self, curriculum):
        """` Monday` and `"Monday` are different tokens: each drill pairs the two forms of a word."""
        drills = [m for rec in curriculum["embedding"]
                  for m in re.finditer(r"writes down ([^.]+)\. As JSON: (\[[^\]]*\])", rec["text"])]
        assert len(drills) > N // 10
        assert all(json.loads(m.group(2)) == m.group(1).split() for m in drills)
        quoted = {word for m in drills for word in json.loads(m.group(2))}
        assert {"Monday", "jazz", "eggs", "Nora", "kitchen"} <= quoted  # slot values the syntax stage copies

    def test_retold_counts_repeat_what_was_said(self, curriculum):
        """A retold count is the count stated before it: copying it is the only way to predict it."""
        retold = [m for rec in curriculum["embedding"] for m in re.finditer(
            r"(\w+) has (\d) (\w+) and (\w+) has (\d) (\w+)\. So (\w+) has (\d) (\w+) and (\w+) has (\d) (\w+)\.", rec["text"])]
        changed = [m for rec in curriculum["embedding"] for m in re.finditer(
            r"(\w+) has (\d+) (\w+)\. \w+ (buys|gives) (\d) (?:more|to \w+)\. (\w+) had (\d+) and (?:bought|gave) (\d):", rec["text"])]
        assert len(retold) > N // 10 and len(changed) > N // 10
        assert all(m.groups()[:6] == m.groups()[6:] for m in retold)
        assert all((m[1], m[2], m[5]) == (m[6], m[7], m[8]) for m in changed)

    def test_json_and_key_value_text_present(self, curriculum):
        texts = [rec["text"] for rec in curriculum["embedding"]]
        assert any('{"name": ' in t for t in texts)
        assert any('"intent": ' in t for t in texts)
        assert any(re.search(r"^name: \w+\ntown: \w+\npet: \w+$", t, re.M) for t in texts)


class TestSyntax:
    def test_reply_is_json_with_intent_and_slots_from_the_request(self, curriculum):
        seen_intents = set()
        for rec in curriculum["syntax"]:
            assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
            request = rec["messages"][0]["content"]
            assert request.startswith("Extract JSON: ")
            reply = json.loads(rec["messages"][1]["content"])
            assert list(reply) == ["intent", "slots"]
            order, _ = INTENTS[reply["intent"]]
            assert 1 <= len(reply["slots"]) <= 3
            assert list(reply["slots"]) == [k for k in order if k in reply["slots"]]  # fixed key order
            for value in reply["slots"].values():
                assert str(value) in request
            seen_intents.add(reply["intent"])
        assert seen_intents == set(INTENTS)


FACTS = set(arithmetic_facts())


def equations(text: str) -> set[tuple[int, str, int, int]]:
    return {(int(a), op, int(b), int(c)) for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", text)}


def solve(question: str) -> int:
    """Recompute a thinking question's answer from its words alone."""
    counts = [int(n) for n in re.findall(r"has (\d+) ", question)]
    if "together" in question:
        return counts[0] + counts[1]
    if "How many more" in question:
        return counts[0] - counts[1]
    have = counts[0]
    for verb, n in re.findall(r"(buys|finds|gets|gives|loses) (\d+)", question):
        have += int(n) if verb in ("buys", "finds", "gets") else -int(n)
    return have


class TestThinking:
    def test_answer_line_is_exact_and_arithmetic_right(self, curriculum):
        shapes = set()
        for rec in curriculum["thinking"]:
            (question,), (reply,) = user_turns(rec), assistant_turns(rec)
            head, sep, final = reply.rpartition("\n</think>\n")
            assert sep and head.startswith("<think>\n"), reply
            answer = int(re.fullmatch(r"The answer is (\d+)\.", final).group(1))
            assert answer == solve(question), rec
            steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", head)
            for a, op, b, c in steps:
                assert (int(a), op, int(b), int(c)) in FACTS, rec  # one-digit facts only, all right
            assert int(steps[-1][3]) == answer
            if "together" not in question and "How many more" not in question:
                shapes.add(len(steps))
        assert {1, 2} <= shapes  # one- and two-step problems both present

    def test_every_step_is_a_fact_the_base_pretrains_on(self, raw_params):
        """The stage teaches using arithmetic, not arithmetic: at the default sizes, each equation
        a thinking reply writes is stated in the embedding corpus (the tiny base's pretraining)."""
        seed, sizes = raw_params["seed"], {s: spec["data"]["n_records"] for s, spec in raw_params["stages"].items()}
        corpus = set().union(*(equations(r["text"]) for r in generate_stage_records("embedding", "pretrain", sizes["embedding"], seed)))
        used = set().union(*(equations(assistant_turns(r)[0]) for r in generate_stage_records("thinking", "sft", sizes["thinking"], seed)))
        assert FACTS == {(a, op, b, a + b if op == "+" else a - b) for a, op, b, _ in FACTS}  # 200 true facts
        assert len(FACTS) == 200
        assert used <= FACTS <= corpus

    def test_example_format(self):
        rec = generate_stage_records("thinking", "sft", 40, seed=1234)
        replies = [assistant_turns(r)[0] for r in rec]
        assert any(re.fullmatch(r"<think>\n\w+ has \d \w+\.\n(?:\w+ .+: \d+ [+-] \d+ = \d+\.\n){1,2}</think>\nThe answer is \d+\.", r)
                   for r in replies)

    def test_steps_restate_the_question_word_for_word(self):
        """What a step copies, it copies verbatim: the base's induction heads complete `Tom has`
        with the count that followed it in the question."""
        records = generate_stage_records("thinking", "sft", 60, seed=1234)
        for record in records:
            question, reply = record["messages"][0]["content"], assistant_turns(record)[0]
            steps = reply.removeprefix("<think>\n").split("\n</think>")[0].split("\n")
            restated = [step.split(":")[0].removesuffix(".") for step in steps if not step.startswith(("Together", "Difference"))]
            assert restated and all(part + "." in question for part in restated), record


class TestInstructions:
    def test_roles_alternate_and_end_with_assistant(self, curriculum):
        for rec in curriculum["instructions"]:
            roles = [m["role"] for m in rec["messages"]]
            assert roles in (["user", "assistant"], ["user", "assistant"] * 2)

    def test_some_multi_turn(self, curriculum):
        share = sum(len(r["messages"]) == 4 for r in curriculum["instructions"]) / N
        assert 0.2 <= share <= 0.45

    def test_answers_are_exact(self, curriculum):
        checked = uppercased = 0
        for rec in curriculum["instructions"]:
            user, reply = rec["messages"][0]["content"], rec["messages"][1]["content"]
            if m := re.fullmatch(r"Reverse these words: (.+)", user):
                assert reply == " ".join(reversed(m.group(1).split()))
            elif m := re.fullmatch(r"Count the words in: (.+)", user):
                assert reply == f"There are {len(m.group(1).split())} words."
            elif m := re.fullmatch(r"Repeat the word (\w+) (\w+) times\.", user):
                times = [number_word(n) for n in range(10)].index(m.group(2))
                assert reply == " ".join([m.group(1)] * times)
            elif m := re.search(r"What colour is the (\w+) of (\w+)\?", user):
                thing, name = m.groups()
                assert reply == f"The {thing} of {name} is {WORLD[name]['colours'][thing]}."
            elif m := re.search(r"Where does (\w+) live\?", user):
                assert reply == f"{m.group(1)} lives in {WORLD[m.group(1)]['town']}."
            else:
                assert re.fullmatch(r"Say ([a-z ]+) to (\w+)\.", user)
                continue
            checked += 1
            if len(rec["messages"]) == 4 and rec["messages"][2]["content"] == "Now in uppercase.":
                assert rec["messages"][3]["content"] == reply.upper()
                uppercased += 1
        assert checked > N // 2
        assert uppercased > 0  # the follow-up turn was checked, not skipped
