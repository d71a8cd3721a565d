"""Record I/O: JSONL reading with located errors, stage-record validation, canonical writing, hashes."""

from __future__ import annotations

import hashlib

import pytest

from tasks.core.records import (
    RecordError,
    check_record,
    content_hash,
    read_jsonl,
    write_jsonl,
)

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class TestReadJsonl:
    def test_reads_objects_and_skips_blank_lines(self, tmp_path):
        path = write_lines(tmp_path / "a.jsonl", ['{"text": "one"}', "", "   ", '{"text": "two"}'])
        assert read_jsonl(path) == [{"text": "one"}, {"text": "two"}]

    def test_bad_json_names_file_and_line(self, tmp_path):
        path = write_lines(tmp_path / "x.jsonl", ['{"text": "ok"}', "", '{"text": "a" "b"}'])
        with pytest.raises(RecordError) as err:
            read_jsonl(path)
        assert str(err.value).startswith(f"{path} line 3: not valid JSON (Expecting ',' delimiter")

    @pytest.mark.parametrize("line, found", [("[1, 2]", "list"), ('"text"', "str"), ("3", "int")])
    def test_non_object_line(self, tmp_path, line, found):
        path = write_lines(tmp_path / "x.jsonl", ['{"text": "ok"}', line])
        with pytest.raises(RecordError, match=rf"line 2: expected a JSON object .*found {found}$"):
            read_jsonl(path)

    def test_missing_file_is_file_not_found(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            read_jsonl(tmp_path / "nope.jsonl")


class TestCheckRecord:
    def test_pretrain_keeps_only_text(self):
        assert check_record({"text": "Mara lives here.", "id": 7}, "pretrain", "f line 1") == {"text": "Mara lives here."}

    @pytest.mark.parametrize(
        "rec, message",
        [
            ({"body": "x"}, "f line 4, field text: missing: pretrain records are"),
            ({"text": 3}, "f line 4, field text: expected a string, found int"),
            ({"text": "  \n"}, "f line 4, field text: empty"),
        ],
    )
    def test_pretrain_errors(self, rec, message):
        with pytest.raises(RecordError) as err:
            check_record(rec, "pretrain", "f line 4")
        assert str(err.value).startswith(message)

    def test_sft_normalises_messages(self):
        rec = {"messages": [
            {"role": "system", "content": "", "name": "sys"},
            {"role": "user", "content": "Hi", "weight": 1},
            {"role": "assistant", "content": "Hello!"},
        ], "source": "web"}
        assert check_record(rec, "sft", "w") == {"messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]}

    @pytest.mark.parametrize(
        "messages, message",
        [
            (None, "field messages: missing"),
            ([], "field messages: expected a non-empty list"),
            ("hi", "field messages: expected a non-empty list"),
            (["hi"], "field messages[0]: expected an object with role and content, found str"),
            ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
             "field messages[1].role: expected one of system/user/assistant, found 'bot'"),
            ([{"role": "user"}, {"role": "assistant", "content": "b"}],
             "field messages[0].content: expected a string, found nothing"),
            ([{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}],
             "field messages[0].content: expected a string, found list"),
            ([{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}],
             "field messages[0].content: empty user message"),
            ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
             "field messages: no user message"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
             "field messages[2].role: the last message must be the assistant reply to train on, found 'user'"),
        ],
    )
    def test_sft_errors(self, messages, message):
        rec = {} if messages is None else {"messages": messages}
        with pytest.raises(RecordError) as err:
            check_record(rec, "sft", "data/sources/s.jsonl line 3")
        assert str(err.value).startswith(f"data/sources/s.jsonl line 3, {message}")


class TestWriteJsonl:
    def test_canonical_lines_and_round_trip(self, tmp_path):
        path = tmp_path / "deep" / "dir" / "out.jsonl"
        records = [{"text": "café", "b": 1, "a": [1, 2]}, CHAT]
        write_jsonl(path, records)
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines[0] == '{"a": [1, 2], "b": 1, "text": "café"}'
        assert read_jsonl(path) == records
        assert not (path.parent / "out.jsonl.tmp").exists()

    def test_same_records_same_bytes(self, tmp_path):
        write_jsonl(tmp_path / "one.jsonl", [{"y": 1, "x": 2}])
        write_jsonl(tmp_path / "two.jsonl", [{"x": 2, "y": 1}])
        assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes() == b'{"x": 2, "y": 1}\n'


class TestContentHash:
    def test_is_sha256_of_canonical_json(self):
        expected = hashlib.sha256('{"a":"é","b":[1,2]}'.encode()).hexdigest()
        assert content_hash({"b": [1, 2], "a": "é"}) == expected

    def test_key_order_free_content_sensitive(self):
        assert content_hash({"x": 1, "y": 2}) == content_hash({"y": 2, "x": 1})
        assert content_hash({"text": "a"}) != content_hash({"text": "a "})


class TestCanonicalJson:
    """The spelt-out path for stage records gives json.dumps' canonical string exactly."""

    @staticmethod
    def reference(record) -> str:
        import json

        return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    def test_stage_records_and_everything_else(self):
        import random

        from tasks.core.records import canonical_json

        rng = random.Random(0)
        alphabet = [chr(c) for c in range(0x80)] + ['"', "\\", "/", "é", "\u2028", "\ud800", "\U0001F355", "\x7f"]
        records = [CHAT, {"text": ""}, {"messages": []}, {"text": 3}, {"text": "a", "id": 1}, [1], "s", None,
                   {"messages": [{"role": "user", "content": "x", "name": "n"}]}, {"messages": [{"content": 1, "role": "user"}]}]
        for _ in range(2000):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            records += [{"text": s}, {"messages": [{"role": "user", "content": s}, {"content": s[::-1], "role": s[:3]}]}]
        for record in records:
            assert canonical_json(record) == self.reference(record)
