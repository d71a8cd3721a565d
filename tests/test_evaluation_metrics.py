"""The generation scores of `evaluate` (tasks/evaluation/{answers,structured,text}.py), on hand-made
cases with known values and on the real data sets mapped by the project's own presets: every
reference must score perfectly against itself, and each kind of damage must cost what it should.

Real data lives in ../shared/data (tests/shared_data.py); those tests skip where it is absent.
"""

from __future__ import annotations

import glob
import itertools
import json
import random
import re
from functools import cache
from pathlib import Path

import pytest

from tasks.data.items import Item
from tasks.data.presets import build_preset
from tasks.evaluation.answers import (
    THINK_PATTERN,
    answers_match,
    extract_answer,
    normalize_number,
    think_well_formed,
)
from tasks.evaluation.structured import (
    SlotCounts,
    intent_and_slots,
    intent_matches,
    looks_like_sql,
    normalize_sql,
    parses_as_json,
    prf,
    slot_counts,
    sql_exact_match,
)
from tasks.evaluation.text import lcs_length, length_stats, rouge_l, rouge_tokens
from tests.shared_data import SHARED_DATA

GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"
SNIPS = SHARED_DATA / "snips_nlu"
ADVISING = SHARED_DATA / "text2sql_advising" / "advising.json"


def needs(path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"real data set not found at {path}")


def preset_pairs(name: str, items: list[Item]) -> list[tuple[Item, str, str]]:
    """(item, user prompt, assistant reply) of every record the preset makes; no rejects allowed."""
    preset = build_preset(name, "sft", {}, {})
    out = []
    for item in items:
        for record in preset.records(item):
            assert isinstance(record, tuple), f"{name} rejected {item.source} {item.where}: {record}"
            messages = record[1]["messages"]
            out.append((item, messages[-2]["content"], messages[-1]["content"]))
    return out


@cache
def gsm8k_rows() -> tuple[tuple[dict, str], ...]:
    """(raw row, the gsm8k preset's assistant reply) per line of the real train set."""
    with open(GSM8K, encoding="utf-8") as handle:
        items = [Item(str(GSM8K), f"line {n}", json.loads(line)) for n, line in enumerate(handle, 1) if line.strip()]
    return tuple((item.value, reply) for item, _, reply in preset_pairs("gsm8k", items))


@cache
def snips_targets() -> tuple[tuple[dict, str], ...]:
    """(raw utterance, the snips preset's JSON target) for the 700 real validation utterances."""
    pairs = []
    for path in sorted(glob.glob(str(SNIPS / "validate_*.json"))):
        value = json.loads(Path(path).read_text(encoding="utf-8"))
        (_, utterances), = value.items()  # one file per intent
        records = preset_pairs("snips", [Item(path, "", value)])
        assert len(records) == len(utterances)
        pairs += [(u, reply) for u, (_, _, reply) in zip(utterances, records)]
    return tuple(pairs)


@cache
def advising_targets() -> tuple[str, ...]:
    """The text2sql preset's SQL target for every real advising question it keeps."""
    groups = json.loads(ADVISING.read_text(encoding="utf-8"))
    items = [Item(str(ADVISING), f"[{i}]", g) for i, g in enumerate(groups)]
    return tuple(reply for _, _, reply in preset_pairs("text2sql", items))


# --- answers -------------------------------------------------------------------------------------


class TestExtractAnswer:
    @pytest.mark.parametrize(
        "text, answer",
        [
            # the cases tasks/evaluate.py's extract_answer was tested on: the same behaviour
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
            ("<think>maybe the answer is 5? No: 3+4=7, and 10 is wrong.</think>\nSo there are 7 in total.", "7"),
            ("<think>The answer is 99.</think>\n#### 42", "42"),
            ("<think>only 1, 2 and 3 here</think>\nI am not sure.", None),
            ("The answer is 6, not 8.\n#### 9", "6"),
            ("The answer is -5.", "-5"),
            ("#### -1,234", "-1234"),
            ("The temperature ends at -8", "-8"),
            ("The answer is -0.5", "-0.5"),
            ("#### nothing after the marker", None),
            # \boxed{}: the last box, before every other rule
            (r"so $\boxed{72}$", "72"),
            (r"First \boxed{3}, then corrected: \boxed{4}. The answer is 5.\n#### 6", "4"),
            (r"\boxed{1,000}", "1000"),
            (r"\boxed{\$1,000.00}", "1000"),
            (r"\boxed{50\%}", "50"),
            (r"\boxed{-3}", "-3"),
            (r"\boxed{\frac{1}{2}}", "0.5"),
            (r"\boxed{-\dfrac{3}{4}}", "-0.75"),
            (r"\boxed{\frac{1}{3}}", "1/3"),  # not an exact decimal: kept as the reduced fraction
            (r"\boxed{\frac{2}{6}}", "1/3"),
            (r"\boxed{18 \text{ dollars}}", "18"),
            (r"\boxed{x = 5}", "5"),
            (r"\boxed{\text{none}} but 9 were left", "9"),  # a box with no number: the next rule
            (r"cut off \boxed{12", "12"),  # unclosed box: the last number
            ("<think>\\boxed{1}</think>\nThe answer is 2.", "2"),
            # answer is: decorations, units, an equation after the number
            ("The answer is: **$1,000.00**.", "1000"),
            ("The answer is 50%.", "50"),
            ("The answer is -$5.", "-5"),
            ("The answer is 3/4.", "0.75"),
            ("The answer is 15 gallons * 8 pints / gallon = 120 pints.\n#### 120", "120"),
            ("The answer is 12 apples. 3 + 4 = 7 is a different sum.", "12"),
            ("Our answer is below.\n#### 8", "8"),
            # numbers: trailing period, subtraction vs sign, long integers exact, no exponent
            ("It costs $1,000.00.", "1000"),
            ("10 - 3", "3"),
            ("#### 123456789012345678901234567890123", "123456789012345678901234567890123"),
            ("The answer is 0.0000001", "0.0000001"),
            ("Natalia sold 48/2 = <<48/2=24>>24 clips", "24"),  # GSM8K calculator notes ignored
        ],
    )
    def test_cases(self, text, answer):
        assert extract_answer(text) == answer

    @pytest.mark.parametrize(
        "text, number",
        [("1,234", "1234"), ("-0", "0"), ("2.50", "2.5"), ("$7", "7"), ("3/6", "0.5"), ("-10/4", "-2.5"),
         ("1/7", "1/7"), ("1/0", None), (".5", "0.5")],
    )
    def test_normalize_number(self, text, number):
        assert normalize_number(text) == number

    @needs(GSM8K)
    def test_every_gsm8k_answer_raw_through_the_preset_and_boxed(self):
        rows = gsm8k_rows()
        wrong = []
        for row, reply in rows:
            steps, _, final = row["answer"].rpartition("#### ")
            expected = str(int(final.strip().replace(",", "")))  # GSM8K's finals are integers
            boxed = f"{steps.strip()}\nSo the total is $\\boxed{{{final.strip()}}}$, found in 2 steps."
            got = (extract_answer(row["answer"]), extract_answer(reply), extract_answer(boxed))
            if got != (expected,) * 3:
                wrong.append((row["answer"][-80:], expected, got))
        assert len(rows) == 7473 and not wrong, (
            f"{len(wrong)} of {len(rows)} GSM8K records checked (raw, gsm8k preset reply, boxed) "
            f"disagree with their '#### N' line; first: {wrong[:3]}"
        )


class TestAnswersMatch:
    @pytest.mark.parametrize(
        "pred, ref, match",
        [
            ("The answer is 1,000.", "<think>x</think>\nThe answer is 1000.", True),
            (r"\boxed{1000}", "#### 1,000", True),
            ("<think>the answer is 1000</think>\nThe answer is 999.", "#### 1000", False),
            ("The answer is 0.5", r"\boxed{\frac{1}{2}}", True),
            ("I do not know.", "#### 5", False),
            ("no number", "no number either", False),  # no reference answer: never a match
        ],
    )
    def test_cases(self, pred, ref, match):
        assert answers_match(pred, ref) is match

    @needs(GSM8K)
    def test_preset_replies_match_the_raw_answers(self):
        rows = gsm8k_rows()
        assert all(answers_match(reply, row["answer"]) for row, reply in rows), f"checked {len(rows)}"
        shifted = sum(answers_match(reply, row["answer"]) for (row, _), (_, reply) in itertools.pairwise(rows))
        assert shifted < len(rows) * 0.05  # another question's answer rarely matches


THINK_CASES = [
    ("<think>\n2 plus 1 is 3\n</think>\nThe answer is 3.", True),
    ("<think></think>3", True),  # an empty thought is still one balanced block
    ("<think>a</think>3\n", True),
    ("<think>a", False),  # never closed
    ("<think>a</think>", False),  # nothing after
    ("<think>a</think> \n ", False),  # only whitespace after
    ("<think>a<think>b</think></think>3", False),  # nested
    ("<think>a</think>3</think>", False),  # a stray closing tag
    ("<think>a</think><think>b</think>3", False),  # two blocks
    ("<think>a</think>3<think>b</think>4", False),  # a second block after the answer
    ("The answer is 3.<think>a</think>", False),  # the block must come first
    ("a</think>3", False),  # no opening tag
    ("3", False),
    ("", False),
]


class TestThinkWellFormed:
    @pytest.mark.parametrize("reply, ok", [*THINK_CASES, ("\n <think>a</think>3", True), ("\n<think>a", False)])
    def test_truth_table(self, reply, ok):
        assert think_well_formed(reply) is ok

    def test_same_rule_as_the_validate_contract(self):
        from tasks import validate  # lazily: it imports prefect

        assert THINK_PATTERN == validate.THINK_PATTERN
        for reply, _ in THINK_CASES:
            assert think_well_formed(reply) is bool(re.search(validate.THINK_PATTERN, reply)), reply
        # the one difference: validate holds our own data to no leading whitespace
        assert think_well_formed(" <think>a</think>3") and not re.search(validate.THINK_PATTERN, " <think>a</think>3")

    @needs(GSM8K)
    def test_every_gsm8k_preset_reply_is_well_formed(self):
        rows = gsm8k_rows()
        assert all(think_well_formed(reply) for _, reply in rows), f"checked {len(rows)}"
        assert not any(think_well_formed(row["answer"]) for row, _ in rows)


# --- structured ----------------------------------------------------------------------------------


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
        ('```json\n{"a": 1}\n```', False),  # a fence is a format error: the stage teaches bare JSON
        ("[" * 100_000, False),  # too deep for the parser is invalid, not a crash
    ],
)
def test_parses_as_json(text, valid):
    assert parses_as_json(text) is valid


def snips_slot_pairs(utterance: dict) -> set[tuple[str, str]]:
    """The slots of a raw SNIPS utterance, read from its tagged chunks (not from the preset's JSON)."""
    return {(c["entity"].lower(), " ".join(c["text"].split()).lower()) for c in utterance["data"] if "entity" in c}


class TestSnipsSlots:
    def test_shape_normalisation_and_lists(self):
        text = '{"intent": "BookFlight", "slots": {"City": ["Oslo", " KÖLN "], "day": "Monday", "n": 2, "x": null}}'
        assert intent_and_slots(text) == ("bookflight", {("city", "oslo"), ("city", "köln"), ("day", "monday"), ("n", "2")})
        assert intent_and_slots('{"slots": {}}') == (None, set())
        for not_snips in ('{"name": "Ada"}', '{"intent": "X", "slots": ["a"]}', "[1]", "oops", ""):
            assert intent_and_slots(not_snips) is None

    def test_counts_add_up(self):
        assert SlotCounts(1, 2, 3) + SlotCounts(10, 20, 30) == SlotCounts(11, 22, 33)
        assert sum([SlotCounts(1, 0, 0), SlotCounts(0, 1, 1)], SlotCounts()) == SlotCounts(1, 1, 1)

    @pytest.mark.parametrize(
        "counts, expected",
        [
            (SlotCounts(0, 0, 0), (1.0, 1.0, 1.0)),  # nothing to find, nothing claimed
            (SlotCounts(0, 0, 4), (0.0, 0.0, 0.0)),  # claimed nothing, missed 4
            (SlotCounts(0, 3, 0), (0.0, 0.0, 0.0)),  # nothing to find, claimed 3
            (SlotCounts(3, 1, 2), (0.75, 0.6, 2 * 0.75 * 0.6 / 1.35)),
            (SlotCounts(2, 0, 0), (1.0, 1.0, 1.0)),
        ],
    )
    def test_prf(self, counts, expected):
        got = prf(counts)
        assert list(got) == ["precision", "recall", "f1"]
        assert tuple(got.values()) == pytest.approx(expected)

    def test_hand_made_counts(self):
        ref = '{"intent": "BookFlight", "slots": {"city": ["Oslo", "Köln"], "day": "Monday"}}'
        assert slot_counts('{"intent": "BookFlight", "slots": {"city": "oslo", "day": "Tuesday"}}', ref) == SlotCounts(1, 1, 2)
        assert slot_counts('{"intent": "X", "slots": {"town": "Oslo"}}', ref) == SlotCounts(0, 1, 3)
        with pytest.raises(ValueError, match="reference is not a SNIPS target"):
            slot_counts(ref, '{"name": "Ada"}')

    @needs(SNIPS)
    def test_real_references_score_perfectly_against_themselves(self):
        targets = snips_targets()
        total = sum((slot_counts(ref, ref) for _, ref in targets), SlotCounts())
        expected = sum(len(snips_slot_pairs(u)) for u, _ in targets)
        assert len(targets) == 700 and total == SlotCounts(tp=expected, fp=0, fn=0) and expected > 1000
        assert prf(total) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
        assert all(intent_matches(ref, ref) for _, ref in targets)
        assert all(intent_and_slots(ref)[1] == snips_slot_pairs(u) for u, ref in targets)
        # case and spacing of a reply do not matter
        shouted = [json.dumps({k: (v.upper() if isinstance(v, str) else {n: f"  {s} " if isinstance(s, str) else s
                                                                          for n, s in v.items()})
                               for k, v in json.loads(ref).items()}) for _, ref in targets]
        assert sum((slot_counts(s, ref) for s, (_, ref) in zip(shouted, targets)), SlotCounts()) == total
        assert all(intent_matches(s, ref) for s, (_, ref) in zip(shouted, targets))

    @needs(SNIPS)
    def test_dropping_a_slot_lowers_recall_only(self):
        targets, dropped, counts = snips_targets(), 0, SlotCounts()
        for _, ref in targets:
            value = json.loads(ref)
            single = [name for name, v in value["slots"].items() if isinstance(v, str)]
            if single:
                del value["slots"][single[0]]
                dropped += 1
            counts += slot_counts(json.dumps(value), ref)
        reference = sum((slot_counts(ref, ref) for _, ref in targets), SlotCounts())
        assert dropped > 600 and counts == SlotCounts(tp=reference.tp - dropped, fp=0, fn=dropped)
        scores = prf(counts)
        assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(1 - dropped / reference.tp)
        assert scores["recall"] < 1.0 and scores["f1"] < 1.0

    @needs(SNIPS)
    def test_a_wrong_intent_counts_against_intent_accuracy_not_slots(self):
        targets = snips_targets()
        intents = sorted({json.loads(ref)["intent"] for _, ref in targets})
        assert len(intents) == 7
        for _, ref in targets:
            value = json.loads(ref)
            value["intent"] = intents[(intents.index(value["intent"]) + 1) % len(intents)]
            wrong = json.dumps(value)
            assert not intent_matches(wrong, ref)
            assert slot_counts(wrong, ref) == slot_counts(ref, ref)

    @needs(SNIPS)
    @pytest.mark.parametrize("garbage", ["I cannot help with that.", "", '{"intent": "PlayMusic"}', "[]", "```json\n{}\n```"])
    def test_garbage_scores_zero_with_every_reference_slot_missed(self, garbage):
        targets = snips_targets()
        counts = sum((slot_counts(garbage, ref) for _, ref in targets), SlotCounts())
        assert counts == SlotCounts(tp=0, fp=0, fn=sum(len(snips_slot_pairs(u)) for u, _ in targets))
        assert prf(counts) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        assert not any(intent_matches(garbage, ref) for _, ref in targets)


def outside_quotes(sql: str, change) -> str:
    """`change` applied to the parts of an advising query outside its "..." literals."""
    return '"'.join(change(part) if i % 2 == 0 else part for i, part in enumerate(sql.split('"')))


class TestSql:
    @pytest.mark.parametrize(
        "sql, normal",
        [
            ("SELECT  a\n FROM t WHERE b = 'X' ;", "select a from t where b = 'X'"),
            ("select COUNT( * ) from T;;", "select count ( * ) from t"),
            ("SELECT count(*) FROM t", "select count ( * ) from t"),
            ('SELECT x FROM t WHERE n LIKE "%James O\'shea%"', 'select x from t where n like "%James O\'shea%"'),
            ("SELECT a FROM t WHERE b >= 2 AND c <> 'It''s'", "select a from t where b >= 2 and c <> 'It' 's'"),
            ("SELECT 'unclosed  Lit", "select 'unclosed  Lit"),
            ("", ""),
        ],
    )
    def test_normalize_sql(self, sql, normal):
        assert normalize_sql(sql) == normal

    @pytest.mark.parametrize(
        "pred, ref, match",
        [
            ("select a from t where b = 'X'", "SELECT a FROM t WHERE b = 'X' ;", True),
            ("select a from t where b = 'x'", "SELECT a FROM t WHERE b = 'X' ;", False),  # literal case counts
            ("select a from t where b = 'X '", "SELECT a FROM t WHERE b = 'X'", False),  # so does its spacing
            ("SELECT a FROM t WHERE b = 3", "SELECT a FROM t WHERE b = 30", False),
            ("SELECT a, b FROM t", "SELECT b, a FROM t", False),  # a string match, not execution
        ],
    )
    def test_exact_match(self, pred, ref, match):
        assert sql_exact_match(pred, ref) is match

    def test_looks_like_sql(self):
        assert looks_like_sql("  select 1") and looks_like_sql("WITH x AS (SELECT 1) SELECT * FROM x")
        assert looks_like_sql("(SELECT 1) UNION (SELECT 2)")
        assert not looks_like_sql('{"intent": "PlayMusic", "slots": {}}') and not looks_like_sql("selection of 3")

    @needs(ADVISING)
    def test_real_targets_match_through_whitespace_and_case_changes(self):
        targets = advising_targets()
        assert len(targets) == 3431 and all(looks_like_sql(t) for t in targets)
        spaced = [outside_quotes(t, lambda p: re.sub(r" ?([(),]) ?", r"\1", p).replace(" ", " \n\t ")).removesuffix(";")
                  for t in targets]
        cased = [outside_quotes(t, str.lower) for t in targets]
        assert sum(a != b for a, b in zip(spaced, targets)) == len(targets) == sum(a != b for a, b in zip(cased, targets))
        assert all(sql_exact_match(s, t) and sql_exact_match(c, t) for s, c, t in zip(spaced, cased, targets))

    @needs(ADVISING)
    def test_real_targets_miss_when_a_literal_changes(self):
        targets, quoted, numbered = advising_targets(), 0, 0
        for target in targets:
            parts = target.split('"')
            if len(parts) > 2:  # a "..." literal: change its case, or its text where case does nothing
                literal = parts[1]
                parts[1] = literal.swapcase() if literal.swapcase() != literal else literal + "1"
                assert not sql_exact_match('"'.join(parts), target), target
                quoted += 1
            number = re.search(r"(?<=[=<>] )\d+(?= )", target)
            if number:
                changed = target[: number.start()] + str(int(number.group()) + 1) + target[number.end():]
                assert not sql_exact_match(changed, target), target
                numbered += 1
        assert (quoted, numbered) == (3372, 2733), (quoted, numbered, len(targets))  # literals, `= N` numbers


# --- text ----------------------------------------------------------------------------------------


class TestRougeL:
    def test_tokens(self):
        assert rouge_tokens("Hello, World! It's 3.5 km.") == ["hello", "world", "it", "s", "3", "5", "km"]

    @pytest.mark.parametrize(
        "a, b, length", [("ABCBDAB", "BDCABA", 4), ("", "abc", 0), ("abc", "abc", 3), ("abc", "xyz", 0), ("axbyc", "abc", 3)]
    )
    def test_lcs_length(self, a, b, length):
        assert lcs_length(list(a), list(b)) == length == lcs_length(list(b), list(a))

    @pytest.mark.parametrize(
        "pred, ref, score",
        [
            ("The cat sat on the mat.", "the cat sat on the mat", 1.0),  # case and punctuation ignored
            ("completely different words", "nothing shared here", 0.0),
            ("", "the reference", 0.0),
            ("some prediction", "", 0.0),
            ("...", "!!!", 0.0),  # no word tokens on either side
            ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS "the cat on the mat"
            ("police killed the gunman", "police kill the gunman", 0.75),  # Lin (2004)'s example: LCS 3 of 4
            ("a b c d", "a c", 2 / 3),  # P = 2/4, R = 2/2, F = 2PR/(P+R)
            ("a c", "a b c d", 2 / 3),  # symmetric with beta = 1
            ("d c b a", "a b c d", 0.25),  # order matters: LCS 1
        ],
    )
    def test_known_values(self, pred, ref, score):
        assert rouge_l(pred, ref) == pytest.approx(score)


class TestLengthStats:
    def test_small_list(self):
        stats = length_stats(["a b c", "hello", "one two three four"])
        assert stats == pytest.approx({
            "count": 3.0,
            "words_mean": 8 / 3, "words_median": 3.0, "words_p90": 3.8, "words_max": 4.0,  # p90: 3 + 0.8 * (4 - 3)
            "chars_mean": 28 / 3, "chars_median": 5.0, "chars_p90": 15.4, "chars_max": 18.0,
        })

    def test_empty_list_is_zeros(self):
        stats = length_stats([])
        assert stats["count"] == 0.0 and set(stats.values()) == {0.0} and len(stats) == 9

    def test_percentiles_agree_with_numpy(self):
        import numpy as np

        rng = random.Random(0)
        for n in (1, 2, 7, 50):
            texts = [" ".join("w" * rng.randint(1, 5) for _ in range(rng.randint(0, 40))) for _ in range(n)]
            words = [len(t.split()) for t in texts]
            stats = length_stats(texts)
            assert stats["words_p90"] == pytest.approx(float(np.percentile(words, 90)))
            assert stats["words_median"] == pytest.approx(float(np.median(words)))
            assert stats["chars_mean"] == pytest.approx(float(np.mean([len(t) for t in texts])))


# --- replies after a think block (Qwen3 writes one, empty when not thinking, before every answer) ---

EMPTY_THINK = "<think>\n\n</think>\n\n"
SNIPS_TARGET = '{"intent": "BookRestaurant", "slots": {"party_size_number": "two", "city": "Oslo"}}'
SQL_TARGET = 'SELECT DISTINCT course_id FROM course WHERE department = "EECS" ;'


def stage(**checks):
    """The project's `instructions` stage (an sft stage) with these data-contract checks."""
    import yaml

    from tasks.core.config import StageSpec

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["stages"]["instructions"]
    return StageSpec.model_validate(raw | {"checks": checks})


class TestRepliesAfterThinkBlock:
    @pytest.mark.parametrize(
        "reply, final",
        [
            (EMPTY_THINK + SNIPS_TARGET, "\n\n" + SNIPS_TARGET),
            ("<think>\nbook it\n</think>\n\nyes", "\n\nyes"),
            ("<think>a</think>b</think>c", "c"),  # the last block ends the thoughts
            ("no block", "no block"),
            ("<think>cut off while thinking", "<think>cut off while thinking"),  # as extract_answer reads it
        ],
    )
    def test_final_reply(self, reply, final):
        from tasks.evaluation.answers import final_reply

        assert final_reply(reply) == final

    def test_an_empty_think_block_before_json_is_valid_json(self):
        from tasks.evaluation.scoring import reply_scores

        scores = reply_scores(stage(json_target=True), [EMPTY_THINK + SNIPS_TARGET], [SNIPS_TARGET])
        assert scores["json_valid"] == 1.0 and scores["intent_accuracy"] == 1.0
        assert scores["slot_precision"] == scores["slot_recall"] == scores["slot_f1"] == 1.0

    def test_a_reasoned_json_reply_scores_as_its_json(self):
        from tasks.evaluation.scoring import reply_scores

        reply = '<think>\nThey want a table for two in Oslo.\n</think>\n\n{"intent": "BookRestaurant", "slots": {"city": "oslo"}}'
        scores = reply_scores(stage(json_target=True), [reply, "{not json"], [SNIPS_TARGET, SNIPS_TARGET])
        assert scores["json_valid"] == 0.5 and scores["intent_accuracy"] == 0.5
        assert scores["slot_precision"] == 1.0 and scores["slot_recall"] == 0.25

    def test_sql_after_a_think_block(self):
        from tasks.evaluation.scoring import reply_scores

        scores = reply_scores(stage(json_target=True), [EMPTY_THINK + SQL_TARGET.replace("SELECT DISTINCT", "select  distinct")], [SQL_TARGET])
        assert scores["sql_exact_match"] == 1.0 and scores["json_valid"] == 0.0

    def test_answer_after_a_think_block_matches(self):
        from tasks.evaluation.scoring import reply_scores

        replies = ["<think>\n3 + 4 = 7, or is it 8?\n</think>\n\nThe answer is 7.", EMPTY_THINK + "#### 7", "<think>7</think>"]
        scores = reply_scores(stage(think_block=True), replies, ["<think>\n3+4=7\n</think>\n\nThe answer is 7."] * 3)
        assert scores["exact_match"] == pytest.approx(2 / 3)  # the last has no answer after its thoughts
        assert scores["think_well_formed"] == pytest.approx(2 / 3)

    def test_rouge_reads_the_reply_after_the_block_and_lengths_the_whole_reply(self):
        from tasks.evaluation.scoring import reply_scores

        reference = "Paris is the capital of France."
        scores = reply_scores(stage(), [EMPTY_THINK + reference, "<think>\nFrance\n</think>\n\n" + reference], [reference] * 2)
        assert scores["rouge_l"] == 1.0
        assert scores["reply_words_mean"] == pytest.approx((8 + 9) / 2)  # the tags and thoughts count as words
