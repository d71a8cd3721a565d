"""Chat templates that rewrite history or move replies: Qwen3's real template, a reasoning template
that strips every reply's reasoning, and the policies (`prepare.multi_turn`) that encode them.

Every row is pinned by what it trains on: the decode of its label-masked tokens. A template that
would shift a span or drop a reply's text is refused, naming the record and the fix.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from tasks.core import paths
from tasks.core.chat import (
    IGNORE_INDEX,
    ChatRenderer,
    ChatTemplateError,
    render,
    row_ends,
    tokenize_rendered,
)
from tasks.core.config import PrepareConfig, load_params, parse_params
from tasks.core.modeling import CHAT_TEMPLATE
from tasks.core.records import content_hash
from tasks.data.rows import Record
from tests.shared_data import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
QWEN3_TEMPLATE = SHARED_DATA.parent / "fixtures" / "qwen3" / "chat_template.jinja"
SPECS = load_params(ROOT / "params.yaml").stages

# Modelled on QwQ's and DeepSeek-R1's templates: everything up to </think> is dropped from every
# assistant turn, the last included, and the generation prompt opens the think block.
STRIPPING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
# The same stripping with a plain generation prompt: spans start in the right place, the reasoning
# is simply gone from what would be trained.
STRIPPING_PLAIN_PROMPT = STRIPPING_TEMPLATE.replace("assistant\\n<think>\\n", "assistant\\n")
# Verbatim ChatML (so the one-render fast path would take it) whose generation prompt writes a
# think block the rendered replies do not have.
THINKING_PROMPT_CHATML = CHAT_TEMPLATE.replace("{{ '<|im_start|>assistant\\n' }}", "{{ '<|im_start|>assistant\\n<think>\\n' }}")

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
Q1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "The answer is 4."}
Q2 = {"role": "user", "content": "Give it as JSON."}
A2 = {"role": "assistant", "content": '{"answer": 4}'}
THINK1 = {"role": "assistant", "content": "<think>\n2+2=4, so 4.\n</think>\n\nThe answer is 4."}
THINK2 = {"role": "assistant", "content": '<think>\nWrap 4 in an object.\n</think>\n\n{"answer": 4}'}
EMPTY_THINK = "<think>\n\n</think>\n\n"


def with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def qwen3(unit_tokenizer):
    if not QWEN3_TEMPLATE.exists():
        pytest.skip(f"needs {QWEN3_TEMPLATE}")
    # the think markers are tokens of their own, as in Qwen3's vocabulary
    assert [len(unit_tokenizer.encode(m, add_special_tokens=False)) for m in ("<think>", "</think>")] == [1, 1]
    return with_template(unit_tokenizer, QWEN3_TEMPLATE.read_text())


def encode_rows(tokenizer, messages: list[dict], policy: str) -> list[tuple[str, str, str]]:
    """(text, untrained prefix, trained text) of each row, decoded from the tokens and labels."""
    renderer = ChatRenderer(tokenizer)
    batch = tokenize_rendered(tokenizer, renderer.rows(messages, renderer.multi_turn(policy)))
    rows = []
    for enc in batch.encodings():
        first = next((i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX), len(enc.labels))
        trained = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
        rows.append((tokenizer.decode(enc.input_ids), tokenizer.decode(enc.input_ids[:first]), tokenizer.decode(trained)))
    return rows


def trained(tokenizer, messages: list[dict], policy: str = "auto") -> list[str]:
    return [t for _, _, t in encode_rows(tokenizer, messages, policy)]


class TestQwen3Template:
    """Qwen3's template drops earlier replies' reasoning and always writes a think block in the last
    reply: per_turn encodes each reply as the model generates it."""

    def test_auto_picks_per_turn(self, qwen3):
        renderer = ChatRenderer(qwen3)
        assert not renderer.prefix_consistent and renderer.multi_turn("auto") == "per_turn"

    @pytest.mark.parametrize("messages, rows", [
        pytest.param([Q1, A1], [EMPTY_THINK + "The answer is 4.<|im_end|>"], id="single"),
        pytest.param([SYSTEM, Q1, A1], [EMPTY_THINK + "The answer is 4.<|im_end|>"], id="single_system"),
        pytest.param([Q1, THINK1], ["<think>\n2+2=4, so 4.\n</think>\n\nThe answer is 4.<|im_end|>"], id="single_thinking"),
        pytest.param([SYSTEM, Q1, THINK1], ["<think>\n2+2=4, so 4.\n</think>\n\nThe answer is 4.<|im_end|>"],
                     id="single_thinking_system"),
        pytest.param([Q1, A1, Q2, A2], [EMPTY_THINK + "The answer is 4.<|im_end|>", EMPTY_THINK + '{"answer": 4}<|im_end|>'],
                     id="multi"),
        pytest.param([SYSTEM, Q1, THINK1, Q2, THINK2], [
            "<think>\n2+2=4, so 4.\n</think>\n\nThe answer is 4.<|im_end|>",
            '<think>\nWrap 4 in an object.\n</think>\n\n{"answer": 4}<|im_end|>',
        ], id="multi_thinking_system"),
        pytest.param([Q1, THINK1, Q2, A2], [
            "<think>\n2+2=4, so 4.\n</think>\n\nThe answer is 4.<|im_end|>", EMPTY_THINK + '{"answer": 4}<|im_end|>',
        ], id="multi_mixed"),
    ])
    def test_trained_text_per_row(self, qwen3, messages, rows):
        assert trained(qwen3, messages) == trained(qwen3, messages, "per_turn") == rows

    @pytest.mark.parametrize("messages", [[Q1, A1], [SYSTEM, Q1, THINK1], [Q1, THINK1, Q2, A2], [SYSTEM, Q1, THINK1, Q2, THINK2]])
    def test_each_row_is_the_generation_prompt_then_the_reply(self, qwen3, messages):
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        rows = encode_rows(qwen3, messages, "per_turn")
        assert len(rows) == len(replies)
        for i, (text, prompt, reply) in zip(replies, rows):
            assert prompt == render(qwen3, messages[:i], generation_prompt=True)
            assert text == render(qwen3, messages[: i + 1]) == prompt + reply + "\n"

    def test_earlier_reasoning_is_gone_from_later_prompts(self, qwen3):
        (_, first, _), (_, second, _) = encode_rows(qwen3, [Q1, THINK1, Q2, A2], "per_turn")
        assert first == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        assert second == (
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nThe answer is 4.<|im_end|>\n"
            "<|im_start|>user\nGive it as JSON.<|im_end|>\n<|im_start|>assistant\n"
        )

    def test_last_turn_trains_only_the_final_reply(self, qwen3):
        rows = encode_rows(qwen3, [SYSTEM, Q1, THINK1, Q2, THINK2], "last_turn")
        assert [r for _, _, r in rows] == ['<think>\nWrap 4 in an object.\n</think>\n\n{"answer": 4}<|im_end|>']
        assert rows[0][1] == render(qwen3, [SYSTEM, Q1, THINK1, Q2], generation_prompt=True)

    def test_single_render_is_refused_for_multi_turn(self, qwen3):
        renderer = ChatRenderer(qwen3)
        with pytest.raises(ChatTemplateError, match="prepare.multi_turn is single_render, but on a probe conversation the chat template does not render"):
            renderer.multi_turn("single_render")
        with pytest.raises(ChatTemplateError, match="prefix-consistently.*assistant reply 1.*per_turn"):
            renderer.spans([Q1, A1, Q2, A2])
        text, spans = renderer.spans([Q1, A1])  # one reply: nothing to rewrite
        assert [text[a:b] for a, b in spans] == [EMPTY_THINK + "The answer is 4.<|im_end|>"]

    def test_prepare_rows_and_columns(self, qwen3):
        from tasks.prepare import StageData, split_rows

        contents = [{"messages": [SYSTEM, Q1, THINK1, Q2, THINK2]}, {"messages": [Q1, A1]}]
        records = [Record(c, {"source": 0, "uri": "u.jsonl", "where": f"line {i + 1}"}, content_hash(c)) for i, c in enumerate(contents)]
        data = StageData("thinking", SPECS["thinking"], train=records)
        rows = split_rows(data, "train", qwen3, PrepareConfig(max_length=200))
        assert len(rows) == 3 and not data.rejects
        assert rows.content_hash == [f"{records[0].digest}#1", f"{records[0].digest}#2", records[1].digest]
        assert rows.roles == ["system,user,assistant", "system,user,assistant,user,assistant", "user,assistant"]
        assert rows.last_reply == [THINK1["content"], THINK2["content"], A1["content"]]
        # each row's conversation is the one it trains the last reply of: evaluation scores each reply once
        assert [json.loads(r) for r in rows.column("record_json")] == [{"messages": [SYSTEM, Q1, THINK1]}, contents[0], contents[1]]
        assert rows.origin == ["u.jsonl line 1", "u.jsonl line 1", "u.jsonl line 2"]
        decoded = [qwen3.decode(rows.labels[a:b][rows.labels[a:b] != IGNORE_INDEX])
                   for a, b in zip(rows.offsets[:-1], rows.offsets[1:])]
        assert decoded == ["<think>\n2+2=4, so 4.\n</think>\n\nThe answer is 4.<|im_end|>",
                           '<think>\nWrap 4 in an object.\n</think>\n\n{"answer": 4}<|im_end|>',
                           EMPTY_THINK + "The answer is 4.<|im_end|>"]
        assert rows.text[1] == render(qwen3, contents[0]["messages"])


class TestTemplatesThatMoveOrDropReplies:
    """Refused, whatever the policy: no row trains on a shifted span or on text without its reasoning."""

    @pytest.mark.parametrize("policy", ["auto", "per_turn", "last_turn", "single_render"])
    @pytest.mark.parametrize("messages", [[Q1, THINK1], [Q1, A1], [SYSTEM, Q1, THINK1, Q2, A2], [Q1, A1, Q2, A2]],
                             ids=["single_thinking", "single", "multi_thinking", "multi"])
    def test_a_generation_prompt_that_opens_think_is_refused(self, unit_tokenizer, messages, policy):
        tok = with_template(unit_tokenizer, STRIPPING_TEMPLATE)
        renderer = ChatRenderer(tok)
        with pytest.raises(ChatTemplateError) as caught:
            renderer.rows(messages, renderer.multi_turn(policy))
        message = str(caught.value)
        assert "generation prompt is not a prefix of its render" in message
        assert "assistant\\n<think>\\n' where the render has" in message  # the prompt, where the reply should start
        assert "training chat template" in message and "prepare.multi_turn" in message

    def test_the_old_shifted_span_is_gone(self, unit_tokenizer):
        # What the prefix method trained on before spans were checked: the answer minus the
        # generation prompt's extra text, reasoning gone.
        tok = with_template(unit_tokenizer, STRIPPING_TEMPLATE)
        text = render(tok, [Q1, THINK1])
        start = len(render(tok, [Q1], generation_prompt=True))
        assert text[start:].startswith("er is 4.<|im_end|>")
        with pytest.raises(ChatTemplateError):
            ChatRenderer(tok).spans([Q1, THINK1])

    @pytest.mark.parametrize("policy", ["auto", "per_turn", "last_turn"])
    def test_reasoning_dropped_from_the_trained_reply_is_refused(self, unit_tokenizer, policy):
        tok = with_template(unit_tokenizer, STRIPPING_PLAIN_PROMPT)
        renderer = ChatRenderer(tok)
        assert trained(tok, [Q1, A1, Q2, A2], policy)[-1] == '{"answer": 4}<|im_end|>'  # nothing to lose: fine
        with pytest.raises(ChatTemplateError, match=r"drops or rewrites the reasoning of a trained reply: '2\+2=4, so 4.'"):
            renderer.rows([Q1, A1, Q2, THINK1], renderer.multi_turn(policy))

    def test_a_verbatim_template_with_a_thinking_prompt_leaves_the_fast_path(self, unit_tokenizer):
        renderer = ChatRenderer(with_template(unit_tokenizer, THINKING_PROMPT_CHATML))
        assert renderer.single_render  # contents are copied verbatim...
        with pytest.raises(ChatTemplateError, match="generation prompt is not a prefix"):
            renderer.spans([Q1, A1])  # ...but its skeletons do not check out: the prefix method says why

    def test_the_error_names_the_record(self, unit_tokenizer):
        from tasks.data.tokenize_pool import encode_records

        tok = with_template(unit_tokenizer, STRIPPING_TEMPLATE)
        records = [Record({"messages": [Q1, THINK1]}, {"uri": "data/sources/chats.jsonl", "where": "line 7"})]
        with pytest.raises(ChatTemplateError, match="in record data/sources/chats.jsonl line 7, assistant reply 1"):
            encode_records(tok, "sft", records)


class TestAutoOnTheTinyTemplate:
    def test_auto_picks_single_render_with_the_fast_path(self, unit_tokenizer):
        renderer = ChatRenderer(unit_tokenizer)
        assert renderer.prefix_consistent and renderer.single_render
        assert renderer.multi_turn("auto") == "single_render"

    @pytest.mark.parametrize("messages", [[Q1, A1], [SYSTEM, Q1, THINK1, Q2, A2]])
    def test_single_render_trains_every_reply_in_one_row(self, unit_tokenizer, messages):
        expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert trained(unit_tokenizer, messages) == [expected]

    def test_per_turn_on_a_consistent_template(self, unit_tokenizer):
        rows = encode_rows(unit_tokenizer, [SYSTEM, Q1, THINK1, Q2, A2], "per_turn")
        assert [r for _, _, r in rows] == [THINK1["content"] + "<|im_end|>", A2["content"] + "<|im_end|>"]
        assert rows[1][0] == render(unit_tokenizer, [SYSTEM, Q1, THINK1, Q2, A2])

    def test_row_ends(self):
        messages = [SYSTEM, Q1, A1, Q2, A2]
        assert row_ends(messages, "single_render") == [5]
        assert row_ends(messages, "per_turn") == [3, 5]
        assert row_ends(messages, "last_turn") == [5]


class TestNothingToTrain:
    """A row whose mask would be empty goes to the rejects with its reason, never into the data."""

    def stage(self, contents):
        from tasks.prepare import StageData

        records = [Record(c, {"source": 0, "uri": "u.jsonl", "where": f"line {i + 1}"}, content_hash(c)) for i, c in enumerate(contents)]
        return StageData("syntax", SPECS["syntax"], train=records)

    @pytest.mark.parametrize("policy", ["auto", "per_turn", "last_turn", "single_render"])
    def test_no_reply(self, unit_tokenizer, policy):
        from tasks.prepare import split_rows

        data = self.stage([{"messages": [SYSTEM, Q1]}, {"messages": [Q1, A1]}])
        rows = split_rows(data, "train", unit_tokenizer, PrepareConfig(max_length=200, multi_turn=policy))
        assert len(rows) == 1 and rows.last_reply == [A1["content"]]
        assert [(r.reason, r.where) for r in data.rejects] == [("nothing_to_train", "line 1")]
        assert data.counts == {"dropped.nothing_to_train": 1}

    def test_a_reply_the_template_renders_as_nothing(self, unit_tokenizer):
        from tasks.prepare import split_rows

        # no end-of-turn marker after a reply: a blank reply leaves a span of nothing
        tok = with_template(unit_tokenizer, CHAT_TEMPLATE.replace(
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
            "{% if message['role'] != 'assistant' %}{{ '<|im_end|>\\n' }}{% endif %}"))
        data = self.stage([{"messages": [Q1, {"role": "assistant", "content": " "}]}, {"messages": [Q1, A1]}])
        rows = split_rows(data, "train", tok, PrepareConfig(max_length=200))
        assert len(rows) == 1
        assert [(r.reason, r.where) for r in data.rejects] == [("nothing_to_train", "line 1")]
        assert "no token is trained on" in data.rejects[0].detail


class TestPrepareRuns:
    """The whole stage: the policy used is in metrics/data.json, and a refused template stops
    `python -m tasks.prepare` with the message and no traceback."""

    @pytest.fixture
    def project(self, tmp_path, monkeypatch):
        from tasks.ingest import ingest_all

        monkeypatch.chdir(tmp_path)
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        for spec in raw["stages"].values():
            spec["data"]["n_records"] = 12
        source = Path("data/sources/chats.jsonl")
        source.parent.mkdir(parents=True)
        chats = [{"messages": [Q1, THINK1, {"role": "user", "content": f"And {i}+{i}?"},
                               {"role": "assistant", "content": f"<think>\nDouble {i}.\n</think>\n\nIt is {2 * i}."}]}
                 for i in range(12)]
        source.write_text("".join(json.dumps(c) + "\n" for c in chats))
        raw["stages"]["syntax"]["data"]["sources"] = [{"path": str(source)}]
        Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        ingest_all(parse_params(copy.deepcopy(raw)))
        return raw

    def use_tokenizer(self, tokenizer, tmp_path):
        from tasks.core.modeling import BaseInfo

        tokenizer.save_pretrained(tmp_path / "tok")
        BaseInfo(kind="tiny", name_or_path=str(tmp_path / "tok")).save(paths.BASE_DIR)

    def test_the_policy_used_is_reported(self, project, tmp_path, unit_tokenizer, qwen3):
        from tasks.prepare import prepare_all

        self.use_tokenizer(unit_tokenizer, tmp_path)
        prepare_all(parse_params(copy.deepcopy(project)))
        report = json.loads(paths.DATA_REPORT.read_text())
        assert {stage: line["multi_turn"] for stage, line in report.items()} == {
            "embedding": None, "syntax": "single_render", "thinking": "single_render", "instructions": "single_render"}
        one_row_each = report["syntax"]["train_rows"] + report["syntax"]["eval_rows"]
        assert one_row_each > 0

        self.use_tokenizer(qwen3, tmp_path)
        prepare_all(parse_params(copy.deepcopy(project)))
        report = json.loads(paths.DATA_REPORT.read_text())
        assert report["syntax"]["multi_turn"] == report["thinking"]["multi_turn"] == "per_turn"
        assert report["syntax"]["train_rows"] + report["syntax"]["eval_rows"] == 2 * one_row_each  # a row per reply

    def test_a_refused_template_stops_the_stage_with_a_message(self, project, tmp_path, unit_tokenizer, capsys):
        from tasks.prepare import main

        self.use_tokenizer(with_template(unit_tokenizer, STRIPPING_TEMPLATE), tmp_path)
        assert main(["--params", "params.yaml"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("prepare: the chat template's generation prompt is not a prefix")
        assert "record data/sources/chats.jsonl line " in err and "training chat template" in err
        assert "Traceback" not in err
