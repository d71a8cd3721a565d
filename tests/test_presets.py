"""Presets: real public data sets map to valid stage records with zero unexplained losses, tiny
hand-made sets of the same shape (other field names, other values) prove each preset is general,
bad items become Rejects with stable reasons, and bad configuration fails with what is accepted.

Real data lives in ../shared/data (see its README); those tests are skipped where it is absent.
It is loaded here with plain `json` so these tests do not depend on the format readers.
"""

from __future__ import annotations

import glob
import json
import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tasks.core.records import check_record
from tasks.data.errors import Reject
from tasks.data.items import Item
from tasks.data.presets import PRESET_NAMES, Preset, PresetError, build_preset
from tests.shared_data import SHARED_DATA

DATA = SHARED_DATA
real_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data sets not found at {DATA}")


# --- helpers -------------------------------------------------------------------------------------


def run(preset: Preset, items: list[Item]) -> tuple[list[tuple[str, dict]], list[Reject]]:
    """All records and rejects of the items; every record must pass the pipeline's own check."""
    records, rejects = [], []
    for item in items:
        for out in preset.records(item):
            if isinstance(out, Reject):
                assert out.source == item.source and out.reason and out.detail
                rejects.append(out)
            else:
                where, record = out
                assert check_record(record, preset.kind, where) == record
                records.append(out)
    return records, rejects


def mapped(name: str | None, kind: str, values: list[Any], fields: dict | None = None, **options: Any):
    """Records and rejects of hand-made values, each wrapped as the item at "[i]"."""
    preset = build_preset(name, kind, fields or {}, options)
    return run(preset, [Item("hand.json", f"[{i}]", v) for i, v in enumerate(values)])


def one_reject(name: str, kind: str, value: Any, fields: dict | None = None, **options: Any) -> Reject:
    records, rejects = mapped(name, kind, [value], fields, **options)
    assert records == [] and len(rejects) == 1, (records, rejects)
    return rejects[0]


def chat(user: str, assistant: str, system: str | None = None) -> dict:
    head = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": [*head, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


@cache
def jsonl_items(rel: str) -> tuple[Item, ...]:
    path = DATA / rel
    with open(path, encoding="utf-8") as handle:
        return tuple(Item(str(path), f"line {n}", json.loads(line)) for n, line in enumerate(handle, 1) if line.strip())


@cache
def array_items(rel: str) -> tuple[Item, ...]:
    path = DATA / rel
    return tuple(Item(str(path), f"[{i}]", v) for i, v in enumerate(json.loads(path.read_text(encoding="utf-8"))))


@cache
def text_item(rel: str) -> Item:
    return Item(str(DATA / rel), "", (DATA / rel).read_text(encoding="utf-8"))


def read_cesu8_json(path: str) -> Any:
    """SNIPS PlayMusic holds an emoji as CESU-8 (surrogate halves encoded separately): decode the
    halves, then let UTF-16 pair them into the real character."""
    raw = Path(path).read_bytes().decode("utf-8", "surrogatepass")
    return json.loads(raw.encode("utf-16", "surrogatepass").decode("utf-16"))


# --- configuration -------------------------------------------------------------------------------


class TestBuildPreset:
    def test_names_and_defaults_per_kind(self):
        assert PRESET_NAMES == ("text", "messages", "sharegpt", "alpaca", "oasst", "gsm8k", "snips", "text2sql", "template")
        assert build_preset(None, "pretrain", {}, {}).name == "text"
        assert build_preset(None, "sft", {}, {}).name == "messages"

    @pytest.mark.parametrize(
        "name, kind, fields, options, message",
        [
            ("chatml", "sft", {}, {}, "unknown preset 'chatml': expected one of text, messages, sharegpt, alpaca, oasst, gsm8k, snips, text2sql, template"),
            ("gsm8k", "pretrain", {}, {}, "preset 'gsm8k' makes sft records, but this is a pretrain stage: use one of text"),
            ("text", "sft", {}, {}, "preset 'text' makes pretrain records, but this is a sft stage: use one of messages, sharegpt, alpaca"),
            ("alpaca", "sft", {"prompt": "q"}, {}, "preset 'alpaca' has no field 'prompt': its fields are instruction (default 'instruction'), input (default 'input'), output"),
            ("gsm8k", "sft", {"answer": ""}, {}, "preset 'gsm8k': fields answer must name a field"),
            ("oasst", "sft", {}, {"drop": True}, "preset 'oasst': unknown option 'drop'. Its options are role_map (dict[str, str], default {}), drop_synthetic (bool, default False)"),
            ("oasst", "sft", {}, {"drop_synthetic": "maybe"}, "preset 'oasst': option drop_synthetic: Input should be a valid boolean"),
            ("text", "pretrain", {}, {"split": "words"}, "option split: Input should be 'paragraphs', 'lines', 'none' or 'pattern' (got 'words')"),
            ("text", "pretrain", {}, {"split": "pattern"}, "preset 'text': options: set pattern (a regex) exactly when split is 'pattern'"),
            ("text", "pretrain", {}, {"split": "pattern", "pattern": "(="}, "option pattern: not a valid regular expression"),
            ("text", "pretrain", {}, {"split": "lines", "max_chars": 80}, "max_chars applies only to split 'paragraphs'"),
            ("text", "pretrain", {}, {"max_chars": 0}, "option max_chars: Input should be greater than 0 (got 0)"),
            ("gsm8k", "sft", {}, {"answer_template": "It is {n}."}, "option answer_template: must contain {answer}"),
            ("snips", "sft", {}, {"prompt": "Parse this"}, "option prompt: must contain {text}"),
            ("text2sql", "sft", {}, {"skip_splits": "exclude"}, "option skip_splits: Input should be a valid list (got 'exclude')"),
            ("sharegpt", "sft", {}, {"role_map": {"agent": "bot"}}, "roles must map to one of system/user/assistant, found {'agent': 'bot'}"),
        ],
    )
    def test_bad_configuration_says_what_is_accepted(self, name, kind, fields, options, message):
        with pytest.raises(PresetError) as err:
            build_preset(name, kind, fields, options)
        assert message in str(err.value)
        assert isinstance(err.value, ValueError)

    def test_option_message_lists_the_options(self):
        with pytest.raises(PresetError, match=r"Its options are split \(one of paragraphs\|lines\|none\|pattern, default 'paragraphs'\), max_chars \(int, default 4000\), pattern"):
            build_preset("text", "pretrain", {}, {"splitting": "lines"})


# --- text ----------------------------------------------------------------------------------------


class TestText:
    @real_data
    def test_tinyshakespeare_paragraphs_grouped_into_documents(self):
        item = text_item("tinyshakespeare/input.txt")
        records, rejects = run(build_preset("text", "pretrain", {}, {}), [item])
        assert rejects == [] and len(records) == 299
        assert records[0][0] == "line 1"
        assert records[0][1]["text"].startswith("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.")
        assert max(len(r["text"]) for _, r in records) <= 4000
        # Documents cover every non-blank line exactly once, in order.
        assert "\n".join(r["text"] for _, r in records).split() == item.value.split()

    @real_data
    def test_tinyshakespeare_lines(self):
        records, rejects = run(build_preset("text", "pretrain", {}, {"split": "lines"}), [text_item("tinyshakespeare/input.txt")])
        assert rejects == [] and len(records) == 32777
        assert records[:3] == [
            ("line 1", {"text": "First Citizen:"}),
            ("line 2", {"text": "Before we proceed any further, hear me speak."}),
            ("line 4", {"text": "All:"}),
        ]

    @real_data
    def test_wikitext_one_document_per_article(self):
        preset = build_preset("text", "pretrain", {}, {"split": "pattern", "pattern": r"^ = [^=].* = $"})
        records, rejects = run(preset, [text_item("wikitext2/valid.txt")])
        assert rejects == [] and len(records) == 60  # the README's 60 articles
        assert [w for w, _ in records[:3]] == ["line 2", "line 48", "line 79"]
        first = records[0][1]["text"]
        assert first.startswith(" = Homarus gammarus = \n \n Homarus gammarus , known as the European lobster")
        assert " = = Description = = " in first  # section headings stay inside their article
        assert all(r["text"].startswith(" = ") and not r["text"].startswith(" = = ") for _, r in records)

    def test_paragraph_grouping_respects_max_chars(self):
        text = "\n\nA:\nHi.\n\nB:\nHello.\n\n\nC:\nA rather longer speech here.\nD:\nOk.\n"
        preset = build_preset("text", "pretrain", {}, {"max_chars": 20})
        records, _ = run(preset, [Item("play.txt", "", text, start_line=10)])
        assert records == [
            ("line 12", {"text": "A:\nHi.\n\nB:\nHello."}),
            ("line 19", {"text": "C:\nA rather longer speech here.\nD:\nOk."}),  # longer than 20, kept whole
        ]

    def test_split_none_and_dict_rows_with_field_override(self):
        assert mapped("text", "pretrain", ["One.\n\nTwo."], split="none")[0] == [("line 1", {"text": "One.\n\nTwo."})]
        records, rejects = mapped(None, "pretrain", [{"body": "A row.", "id": 1}, {"body": "  "}, {"text": "x"}, {"body": 7}], {"text": "body"})
        assert records == [("[0]", {"text": "A row."})]
        assert [(r.where, r.reason) for r in rejects] == [("[1]", "empty_text"), ("[2]", "missing_field"), ("[3]", "wrong_type")]
        assert rejects[1].detail == "field 'body' is missing (found fields: text); if it has another name, set fields: {text: <name>}"
        assert rejects[2].detail == "field 'body' should be a string, found integer"

    def test_blank_file_is_one_reject(self):
        reject = one_reject("text", "pretrain", " \n\n ")
        assert (reject.where, reject.reason) == ("line 1", "empty_text")


# --- messages / sharegpt -------------------------------------------------------------------------


class TestMessages:
    def test_openai_style_and_trailing_user_turn_cut(self):
        conv = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye?"},
        ]
        records, rejects = mapped("messages", "sft", [{"messages": conv}, conv])  # a bare list is the turns
        assert records == [("[0]", chat("Hi", "Hello", system="Be brief.")), ("[1]", chat("Hi", "Hello", system="Be brief."))]
        # the cut is on record, as a change: the record is kept without it
        assert [(r.where, r.reason, r.action) for r in rejects] == [("[0]", "trailing_turns_cut", "changed"),
                                                                    ("[1]", "trailing_turns_cut", "changed")]
        assert rejects[0].detail.startswith("1 turn(s) after the last assistant reply cut (user)")

    def test_turns_that_are_plain_strings_say_there_is_no_reply(self):
        reject = one_reject("messages", "sft", {"turns": ["What is 2+2?", "And 3+3?"]}, {"messages": "turns"})
        assert reject.reason == "no_assistant_turn"
        assert reject.detail.startswith("field 'turns' holds 2 plain string(s), not {role, content} turns")
        assert "benchmark_files" in reject.detail

    @pytest.mark.parametrize("roles, at, message", [
        (["user", "user", "assistant"], 1, "'user' after 'user'"),
        (["user", "assistant", "assistant"], 2, "'assistant' after 'assistant'"),
        (["user", "system", "assistant"], 1, "'system' after 'user'"),
        (["assistant", "user", "assistant"], 0, "'assistant' after 'the start'"),
    ])
    def test_turns_out_of_order_are_rejected_where_they_break(self, roles, at, message):
        conv = [{"role": role, "content": f"turn {i}"} for i, role in enumerate(roles)]
        records, [reject] = mapped("messages", "sft", [{"messages": conv}])
        assert records == [] and reject.reason == "bad_turn_order"
        assert f"messages[{at}].role" in reject.detail and message in reject.detail

    def test_sharegpt_defaults_and_default_role_names(self):
        row = {"id": "x", "conversations": [
            {"from": "system", "value": ""}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
            {"from": "Human", "value": "and 3+3?"}, {"from": "chatgpt", "value": "6"},
        ]}
        records, rejects = mapped("sharegpt", "sft", [row])
        assert rejects == []
        assert [m["role"] for m in records[0][1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]

    def test_field_overrides_and_role_map(self):
        row = {"dialog": [{"speaker": "customer", "text": "My order?"}, {"speaker": "agent", "text": "Shipped."}]}
        fields = {"messages": "dialog", "role": "speaker", "content": "text"}
        records, _ = mapped("messages", "sft", [row], fields, role_map={"customer": "user", "agent": "assistant"})
        assert records == [("[0]", chat("My order?", "Shipped."))]

    @pytest.mark.parametrize(
        "value, reason, detail",
        [
            ({"turns": []}, "missing_field", "field 'messages' is missing (found fields: turns); if it has another name, set fields: {messages: <name>}"),
            ({"messages": "hi"}, "wrong_type", "field 'messages' should be a list, found string"),
            ({"messages": [{"role": "user"}]}, "missing_field", "turn 0: field 'content' is missing"),
            ({"messages": [{"role": "user", "content": ["a"]}]}, "wrong_type", "turn 0: field 'content' should be a string, found list"),
            ({"messages": [{"role": "customer", "content": "a"}]}, "unknown_role", "turn 0: role 'customer' in field 'role' is not one of"),
            ({"messages": [{"role": "user", "content": "a"}]}, "no_assistant_turn", "the conversation has no assistant reply to train on"),
            ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "no_user_turn", "no user turn"),
            ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}, "empty_text", "turn 0 (user) has empty content"),
        ],
    )
    def test_bad_chats_are_rejects(self, value, reason, detail):
        reject = one_reject("messages", "sft", value)
        assert (reject.where, reject.reason, reject.record) == ("[0]", reason, value)
        assert detail in reject.detail


# --- alpaca --------------------------------------------------------------------------------------


class TestAlpaca:
    @real_data
    def test_llms_from_scratch_instruction_data(self):
        records, rejects = run(build_preset("alpaca", "sft", {}, {}), list(array_items("llms_from_scratch_instruct/instruction-data.json")))
        assert rejects == [] and len(records) == 1100
        assert records[0] == ("[0]", chat(
            "Evaluate the following phrase by transforming it into the spelling given.\n\nfreind --> friend",
            'The spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".',
        ))
        assert records[2] == ("[2]", chat("Convert 45 kilometers to meters.", "45 kilometers is 45000 meters."))  # empty input

    @real_data
    def test_self_instruct_explodes_instances(self):
        items = list(jsonl_items("self_instruct/seed_tasks.jsonl"))
        records, rejects = run(build_preset("alpaca", "sft", {}, {"explode": "instances"}), items)
        assert rejects == []
        assert len(items) == 175 and len(records) == sum(len(i.value["instances"]) for i in items) == 175
        assert records[1] == ("line 2[0]", chat(
            "What is the relation between the given pairs?\n\nNight : Day :: Right : Left",
            "The relation between the given pairs is that they are opposites.",
        ))

    def test_other_field_names_system_and_explode(self):
        fields = {"instruction": "task", "input": "context", "output": "completion", "system": "persona"}
        rows = [
            {"task": "Add.", "persona": "You are terse.", "cases": [{"context": "1 2", "completion": "3"}, {"completion": "0"}, "bad"]},
            {"task": "Greet.", "cases": []},
        ]
        records, rejects = mapped("alpaca", "sft", rows, fields, explode="cases")
        assert records == [
            ("[0][0]", chat("Add.\n\n1 2", "3", system="You are terse.")),
            ("[0][1]", chat("Add.", "0", system="You are terse.")),
        ]
        assert [(r.where, r.reason, r.detail) for r in rejects] == [
            ("[0][2]", "wrong_type", "element 2 of field 'cases' should be an object, found string"),
            ("[1]", "empty_list", "field 'cases' (options.explode) is an empty list"),
        ]

    @pytest.mark.parametrize(
        "value, reason",
        [
            ({"instruction": "Do it."}, "missing_field"),
            ({"instruction": "  ", "output": "x"}, "empty_text"),
            ({"instruction": "Do it.", "input": 3, "output": "x"}, "wrong_type"),
            (["not", "an", "object"], "wrong_type"),
        ],
    )
    def test_bad_rows_are_rejects(self, value, reason):
        assert one_reject("alpaca", "sft", value).reason == reason

    def test_explode_field_missing_is_a_reject(self):
        reject = one_reject("alpaca", "sft", {"instruction": "x", "output": "y"}, explode="instances")
        assert (reject.reason, reject.detail) == ("missing_field", "field 'instances' is missing (found fields: instruction, output)")


# --- oasst ---------------------------------------------------------------------------------------


class TestOasst:
    @real_data
    def test_en100_trees_follow_the_best_ranked_path(self):
        items = list(jsonl_items("oasst_en100/en_100_tree.jsonl"))
        records, rejects = run(build_preset("oasst", "sft", {}, {}), items)
        assert len(records) == 100
        # 39 best paths end in a prompter turn nobody answered: cut, and on record as a change
        assert Counter((r.reason, r.action) for r in rejects) == {("trailing_turns_cut", "changed"): 39}
        assert Counter(len(r["messages"]) for _, r in records) == {2: 58, 4: 42}
        where, first = records[0]
        assert where == "line 1" and [m["role"] for m in first["messages"]] == ["user", "assistant"]
        assert first["messages"][0]["content"] == "How can I find the best 401k plan for my needs?"
        assert first["messages"][1]["content"].startswith("The first step is to research your options.")  # rank 0, not rank 1

    @real_data
    def test_en100_branching_tree(self):
        # Tree 36 branches at every level; the rank-0 assistant reply's follow-up has no answer, so
        # the chat is cut after that reply rather than switching to a worse-ranked branch.
        _, record = run(build_preset("oasst", "sft", {}, {}), [jsonl_items("oasst_en100/en_100_tree.jsonl")[35]])[0][0]
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["messages"][0]["content"] == "planning travel in hungary"
        assert record["messages"][1]["content"].startswith("I don't have personal experience, but I can provid")

    @real_data
    def test_en100_drop_synthetic(self):
        records, rejects = run(build_preset("oasst", "sft", {}, {"drop_synthetic": True}), list(jsonl_items("oasst_en100/en_100_tree.jsonl")))
        assert len(records) == 95 and Counter(r.reason for r in rejects) == {"synthetic": 5, "trailing_turns_cut": 39}
        assert next(r for r in rejects if r.reason == "synthetic").where == "line 1"

    @staticmethod
    def node(text: str, who: str, *children: dict, **flags: Any) -> dict:
        return {"body": text, "author": who, "children": list(children), **flags}

    def test_other_field_names_rank_order_deleted_and_synthetic(self):
        n = self.node
        tree = {"root": n("Q1", "prompter",
            n("unranked", "assistant"),
            n("second", "assistant", order=1),
            n("deleted best", "assistant", order=0, gone=True),
            n("best", "assistant", n("Q2", "prompter", n("tie a", "assistant", order=0, bot=True), n("tie b", "assistant", order=0),
                                     n("also unranked", "assistant")), order=0),
        )}
        fields = {"prompt": "root", "text": "body", "role": "author", "rank": "order", "deleted": "gone", "synthetic": "bot", "replies": "children"}
        roles = ["user", "assistant", "user", "assistant"]
        records, _ = mapped("oasst", "sft", [tree], fields)
        assert [m["content"] for m in records[0][1]["messages"]] == ["Q1", "best", "Q2", "tie a"]  # ties keep file order
        assert [m["role"] for m in records[0][1]["messages"]] == roles
        records, _ = mapped("oasst", "sft", [tree], fields, drop_synthetic=True)
        assert [m["content"] for m in records[0][1]["messages"]] == ["Q1", "best", "Q2", "tie b"]

    def test_unranked_replies_come_after_ranked_ones(self):
        tree = {"prompt": {"text": "Q", "role": "prompter", "replies": [
            {"text": "no rank", "role": "assistant"}, {"text": "rank 3", "role": "assistant", "rank": 3}]}}
        assert mapped("oasst", "sft", [tree])[0][0][1] == chat("Q", "rank 3")

    @pytest.mark.parametrize(
        "tree, options, reason",
        [
            ({"prompt": {"text": "Q", "role": "prompter", "replies": []}}, {}, "no_assistant_turn"),
            ({"prompt": {"text": "Q", "role": "prompter", "replies": [{"text": "A", "role": "assistant", "deleted": True}]}}, {}, "no_assistant_turn"),
            ({"prompt": {"text": "Q", "role": "prompter", "deleted": True, "replies": []}}, {}, "deleted"),
            ({"prompt": {"text": "Q", "role": "prompter", "synthetic": True, "replies": []}}, {"drop_synthetic": True}, "synthetic"),
            ({"prompt": {"text": "Q", "role": "moderator", "replies": []}}, {}, "unknown_role"),
            ({"prompt": {"role": "prompter", "replies": []}}, {}, "missing_field"),
            ({"tree": {}}, {}, "missing_field"),
            ({"prompt": {"text": "Q", "role": "prompter", "replies": {}}}, {}, "wrong_type"),
        ],
    )
    def test_unusable_trees_are_rejects(self, tree, options, reason):
        reject = one_reject("oasst", "sft", tree, **options)
        assert (reject.reason, reject.record) == (reason, tree)


# --- gsm8k ---------------------------------------------------------------------------------------


class TestGsm8k:
    @real_data
    def test_train_set(self):
        items = list(jsonl_items("gsm8k/train.jsonl"))
        records, rejects = run(build_preset("gsm8k", "sft", {}, {}), items)
        assert rejects == [] and len(records) == 7473
        where, first = records[0]
        assert where == "line 1"
        assert first["messages"][0]["content"].startswith("Natalia sold clips to 48 of her friends in April")
        assert first["messages"][1]["content"] == (
            "<think>\nNatalia sold 48/2 = 24 clips in May.\n"
            "Natalia sold 48+24 = 72 clips altogether in April and May.\n</think>\nThe answer is 72."
        )
        replies = [r["messages"][1]["content"] for _, r in records]
        assert not any("<<" in r or "####" in r for r in replies)
        with_comma = [i for i, item in enumerate(items) if item.value["answer"].endswith("#### 1,200")]
        assert len(with_comma) == 3 and all(replies[i].endswith("</think>\nThe answer is 1200.") for i in with_comma)

    def test_other_field_names_template_and_commas(self):
        row = {"q": "How many?", "solution": "Step <<2*500=1000>>one: 2*500 = 1000.\nStep two.\n#### 1,000,000"}
        records, _ = mapped("gsm8k", "sft", [row], {"question": "q", "answer": "solution"}, answer_template="Final: {answer}")
        assert records[0][1]["messages"][1]["content"] == "<think>\nStep one: 2*500 = 1000.\nStep two.\n</think>\nFinal: 1000000"

    def test_answer_keeps_its_text(self):
        records, _ = mapped("gsm8k", "sft", [{"question": "q?", "answer": "half\n#### -0.5"}])
        assert records[0][1]["messages"][1]["content"] == "<think>\nhalf\n</think>\nThe answer is -0.5."

    @pytest.mark.parametrize(
        "value, reason, detail",
        [
            ({"question": "q?", "answer": "it is 4"}, "no_final_answer", "field 'answer' has no final '#### N' line"),
            ({"question": "q?", "answer": "4\n####  "}, "no_final_answer", "field 'answer' has no final '#### N' line"),
            ({"question": "q?"}, "missing_field", "field 'answer' is missing (found fields: question)"),
            ({"question": "", "answer": "#### 4"}, "empty_text", "field 'question' is empty"),
            ({"question": "q?", "answer": "Three and four.\n#### seven"}, "non_numeric_answer",
             "the final answer 'seven' after '####' is not a number"),
            ({"question": "q?", "answer": "2*3 is <<2*3=6 six.\n#### 6"}, "unbalanced_calculator_note",
             "an unbalanced calculator note ('<<...>>') in field 'answer', near '2*3 is <<2*3=6 six.'"),
        ],
    )
    def test_bad_rows_are_rejects(self, value, reason, detail):
        reject = one_reject("gsm8k", "sft", value)
        assert (reject.reason, reject.record) == (reason, value) and reject.detail.startswith(detail)


# --- snips ---------------------------------------------------------------------------------------


class TestSnips:
    @real_data
    def test_all_intent_files(self):
        paths = sorted(glob.glob(str(DATA / "snips_nlu" / "*.json")))
        items = [Item(p, "", read_cesu8_json(p)) for p in paths]
        records, rejects = run(build_preset("snips", "sft", {}, {}), items)
        assert len(paths) == 14 and rejects == [] and len(records) == 14484  # 13,784 train + 700 validation
        assert all(json.loads(r["messages"][1]["content"])["intent"] == where.split("[")[0] for where, r in records)
        play = next(i for i in items if i.source.endswith("validate_PlayMusic.json"))
        records, _ = run(build_preset("snips", "sft", {}, {}), [play])
        assert records[0] == ("PlayMusic[0]", chat(
            "Extract JSON: can you put on Like A Hurricane by Paul Landers",
            '{"intent": "PlayMusic", "slots": {"album": "Like A Hurricane", "artist": "Paul Landers"}}',
        ))

    def test_repeated_entity_becomes_a_list_and_fields_are_overridable(self):
        value = {"BookFlight": [{"parts": [
            {"t": "fly from "}, {"t": "Oslo ", "slot": "city"}, {"t": "to "}, {"t": "Köln", "slot": "city"}, {"t": " on "},
            {"t": "Monday", "slot": "day"}, {"t": "  "},
        ]}]}
        records, _ = mapped("snips", "sft", [value], {"data": "parts", "text": "t", "entity": "slot"}, prompt="Parse: {text} (JSON)")
        assert records == [("[0].BookFlight[0]", chat(
            "Parse: fly from Oslo to Köln on Monday (JSON)",
            '{"intent": "BookFlight", "slots": {"city": ["Oslo", "Köln"], "day": "Monday"}}',
        ))]

    def test_single_utterances_take_their_intent_from_field_or_option(self):
        rows = [{"data": [{"text": "play "}, {"text": "jazz", "entity": "genre"}], "intent": "PlayMusic"},
                {"data": [{"text": "rain today?"}]}]
        records, _ = mapped("snips", "sft", rows, intent="GetWeather")
        assert [w for w, _ in records] == ["[0]", "[1]"]
        assert [json.loads(r["messages"][1]["content"]) for _, r in records] == [
            {"intent": "PlayMusic", "slots": {"genre": "jazz"}}, {"intent": "GetWeather", "slots": {}},
        ]

    @pytest.mark.parametrize(
        "value, where, reason, detail",
        [
            ({"data": [{"text": "hi"}]}, "[0]", "missing_field", "the utterance has no intent: field 'intent' is missing"),
            ({"Greet": [{"data": [{"entity": "x"}]}]}, "[0].Greet[0]", "missing_field", "chunk 0: field 'text' is missing"),
            ({"Greet": [{"data": [{"text": "  "}]}]}, "[0].Greet[0]", "empty_text", "the utterance's 'text' chunks are empty"),
            ({"Greet": "hello"}, "[0].Greet", "wrong_type", "intent 'Greet' should hold a list of utterances, found string"),
            ({"Greet": [{"text": "hello"}]}, "[0].Greet[0]", "missing_field", "field 'data' is missing (found fields: text)"),
            ("hello", "[0]", "wrong_type", "expected {intent: [utterances]} or an utterance with field 'data', found string"),
        ],
    )
    def test_bad_items_are_rejects(self, value, where, reason, detail):
        reject = one_reject("snips", "sft", value)
        assert (reject.where, reject.reason) == (where, reason) and reject.detail.startswith(detail)


# --- text2sql ------------------------------------------------------------------------------------


class TestText2Sql:
    @real_data
    def test_advising(self):
        items = list(array_items("text2sql_advising/advising.json"))
        records, rejects = run(build_preset("text2sql", "sft", {}, {}), items)
        splits = Counter(s["question-split"] for i in items for s in i.value["sentences"])
        assert rejects == [] and len(records) == 4387 - splits["exclude"] == 3431
        # number0 comes from the question, department0 (empty there) from the group's example.
        assert records[0] == ("[0].sentences[0]", chat(
            "Can undergrads take 550 ?",
            'SELECT DISTINCT COURSEalias0.ADVISORY_REQUIREMENT , COURSEalias0.ENFORCED_REQUIREMENT , COURSEalias0.NAME '
            'FROM COURSE AS COURSEalias0 WHERE COURSEalias0.DEPARTMENT = "EECS" AND COURSEalias0.NUMBER = 550 ;',
        ))
        assert records[4][0] == "[0].sentences[5]"  # sentence 4 is split "exclude"

    @real_data
    def test_advising_all_splits(self):
        records, rejects = run(build_preset("text2sql", "sft", {}, {"skip_splits": []}), list(array_items("text2sql_advising/advising.json")))
        assert rejects == [] and len(records) == 4387

    def test_whole_tokens_other_fields_and_prompt(self):
        group = {
            "queries": ["SELECT * FROM t WHERE a = num1 AND b = num10 AND c = 'city0' ;"],
            "vars": [{"var": "num1", "sample": "7"}, {"var": "num10", "sample": "99"}, {"var": "city0", "sample": "Oslo"}],
            "paraphrases": [
                {"q": "num10 or num1 in city0?", "fill": {"num1": "5", "num10": "", "city0": "Bergen"}, "part": "train"},
                {"q": "skip me", "fill": {}, "part": "bad"},
                {"q": "num1 alone", "fill": {"num1": 3}, "part": "dev"},
            ],
        }
        fields = {"sentences": "paraphrases", "text": "q", "variables": "fill", "split": "part", "sql": "queries",
                  "group_variables": "vars", "name": "var", "example": "sample"}
        records, rejects = mapped("text2sql", "sft", [group], fields, skip_splits=["bad"], prompt="SQL for: {question}")
        assert rejects == []
        assert records == [
            ("[0].paraphrases[0]", chat("SQL for: 99 or 5 in Bergen?", "SELECT * FROM t WHERE a = 5 AND b = 99 AND c = 'Bergen' ;")),
            ("[0].paraphrases[2]", chat("SQL for: 3 alone", "SELECT * FROM t WHERE a = 3 AND b = 99 AND c = 'Oslo' ;")),
        ]

    def test_unfilled_placeholder_is_a_reject(self):
        group = {"sql": ["SELECT x FROM t WHERE d = \"dept0\" AND n = num0 ;"], "variables": [{"name": "num0", "example": "1"}],
                 "sentences": [{"text": "What about num0 ?", "variables": {"dept0": ""}, "question-split": "train"}]}
        reject = one_reject("text2sql", "sft", group)
        assert (reject.where, reject.reason, reject.record) == ("[0].sentences[0]", "unfilled_variable", group["sentences"][0])
        assert reject.detail.startswith("placeholder dept0 has no value in the question's 'variables'")

    @pytest.mark.parametrize(
        "group, where, reason",
        [
            ({"sentences": [{"text": "q"}]}, "[0]", "missing_field"),
            ({"sentences": [{"text": "q"}], "sql": []}, "[0]", "missing_field"),
            ({"sentences": "q", "sql": ["SELECT 1"]}, "[0]", "wrong_type"),
            ({"sentences": [{"variables": {}}], "sql": ["SELECT 1"]}, "[0].sentences[0]", "missing_field"),
            ({"sentences": [{"text": "q", "variables": []}], "sql": ["SELECT 1"]}, "[0].sentences[0]", "wrong_type"),
        ],
    )
    def test_bad_groups_are_rejects(self, group, where, reason):
        reject = one_reject("text2sql", "sft", group)
        assert (reject.where, reject.reason) == (where, reason)


class TestSafetyNet:
    def test_a_record_check_record_refuses_becomes_a_reject(self):
        class Broken(Preset):
            """A preset that forgets the assistant turn: the base class must catch it, not raise."""

            name, kind, default_fields = "broken", "sft", {}

            def _map(self, item):
                yield item.where, {"messages": [{"role": "user", "content": item.value}]}

        out = list(Broken({}, Preset.Options()).records(Item("x.jsonl", "line 3", "hi")))
        assert len(out) == 1 and isinstance(out[0], Reject)
        assert (out[0].where, out[0].record) == ("line 3", {"messages": [{"role": "user", "content": "hi"}]})
        assert "line 3, field messages[0].role: the last message must be the assistant reply" in out[0].detail


# --- template --------------------------------------------------------------------------------------

# The README's two worked examples ("Bring your own data"), as written there.
MCQ_OPTIONS = {
    "prompt": "{{ question }}\nOptions: {{ options | join(', ') }}",
    "reasoning": "{{ rationale }}",
    "reply": "The answer is {{ correct }}.",
}
SQL_OPTIONS = {
    "system": "You write SQLite queries for the database {{ db_id }}.",
    "prompt": "Schema:\n{% for t in tables %}{{ t.name }}({{ t.columns | join(', ') }})\n{% endfor %}Question: {{ question }}",
    "reply": "{{ query }}",
}


class TestTemplate:
    def test_multiple_choice_with_rationale_becomes_a_think_block(self):
        row = {"question": "Two dozen eggs, half broken: how many whole?", "options": ["A)6", "B)12", "C)18"],
               "rationale": "24 eggs, half is 12.", "correct": "B"}
        records, rejects = mapped("template", "sft", [row], **MCQ_OPTIONS)
        assert rejects == []
        assert records == [("[0]", chat("Two dozen eggs, half broken: how many whole?\nOptions: A)6, B)12, C)18",
                                        "<think>\n24 eggs, half is 12.\n</think>\nThe answer is B."))]

    def test_text_to_sql_with_the_schema_in_the_prompt(self):
        row = {"db_id": "school", "question": "How many students?", "query": "SELECT count(*) FROM student",
               "tables": [{"name": "student", "columns": ["id", "name"]}, {"name": "course", "columns": ["id", "title"]}]}
        records, rejects = mapped("template", "sft", [row], **SQL_OPTIONS)
        assert rejects == []
        assert records[0][1] == chat("Schema:\nstudent(id, name)\ncourse(id, title)\nQuestion: How many students?",
                                     "SELECT count(*) FROM student", system="You write SQLite queries for the database school.")

    def test_a_missing_field_is_a_reject_naming_the_template_and_the_field(self):
        reject = one_reject("template", "sft", {"question": "q", "options": ["a"], "correct": "A"}, **MCQ_OPTIONS)
        assert reject.reason == "missing_field"
        assert reject.detail == "options.reasoning: 'rationale' is undefined (found fields: correct, options, question)"

    def test_a_record_that_is_not_an_object_is_a_reject(self):
        assert one_reject("template", "sft", ["a", "b"], **MCQ_OPTIONS).reason == "wrong_type"

    @pytest.mark.parametrize("options, message", [
        ({"prompt": "{{ question", "reply": "x"}, "option prompt: is not a valid template"),
        ({"prompt": "{{ q }}"}, "option reply: Field required"),
        ({"prompt": "{{ q }}", "reply": " "}, "option reply: is empty"),
    ])
    def test_a_bad_template_is_a_configuration_error(self, options, message):
        with pytest.raises(PresetError, match=re.escape(message)):
            build_preset("template", "sft", {}, options)

    def test_the_sandbox_keeps_templates_to_the_record(self):
        reject = one_reject("template", "sft", {"q": "x"}, prompt="{{ q.__class__.__mro__ }}", reply="ok")
        assert reject.reason == "template_error" and "SecurityError" in reject.detail
