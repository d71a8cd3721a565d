"""Decoding, source resolution and format readers on real files: every format, and the bad corpus."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tasks.data.encoding import EncodingFault, decode_bytes, looks_binary
from tasks.data.errors import Reject, SourceError
from tasks.data.items import Item
from tasks.data.readers import read_items
from tasks.data.sources import Input, resolve_inputs
from tests.shared_data import SHARED_DATA

BAD = Path(__file__).parent / "data" / "bad"
EMPTY = "is empty (0 bytes): nothing to read; fill it, or take it out of the stage's sources"
SNIPS_PLAY_MUSIC = SHARED_DATA / "snips_nlu" / "train_PlayMusic_full.json"
PIZZA = "\U0001f355"
PIZZA_CESU8 = b"\xed\xa0\xbc\xed\xbd\x95"  # U+1F355 as surrogates D83C DF55, 3 bytes each


def read_all(path: Path | str, fmt: str = "auto") -> list[Item | Reject]:
    return [out for inp in resolve_inputs(str(path), fmt) for out in read_items(inp)]


def items_of(outputs: list[Item | Reject]) -> list[Item]:
    return [o for o in outputs if isinstance(o, Item)]


def rejects_of(outputs: list[Item | Reject]) -> list[Reject]:
    return [o for o in outputs if isinstance(o, Reject)]


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# --- encoding -------------------------------------------------------------------------------


class TestDecodeBytes:
    def test_plain_utf8(self):
        assert decode_bytes("café ☕".encode(), "f.txt") == ("café ☕", [])

    def test_utf8_bom_is_stripped(self):
        assert decode_bytes(b"\xef\xbb\xbfhello", "f.txt") == ("hello", [])

    @pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
    def test_wide_encodings_with_a_bom(self, codec):
        bom = {"utf-16-be": b"\xfe\xff", "utf-32-be": b"\x00\x00\xfe\xff"}.get(codec, b"")
        data = bom + "naïve 🍕\nline two".encode(codec)
        assert decode_bytes(data, "f.txt") == ("naïve 🍕\nline two", [])

    def test_utf16_with_an_odd_byte_count_is_a_fault(self):
        with pytest.raises(EncodingFault) as caught:
            decode_bytes("ab".encode("utf-16") + b"\x00", "f.txt")
        assert caught.value.byte_offset == 6
        assert "utf-16-le BOM" in caught.value.detail

    def test_cesu8_pair_is_repaired_with_its_file_offset(self):
        data = b"pizza " + PIZZA_CESU8 + b"!"
        text, repairs = decode_bytes(data, "f.jsonl", where_prefix="line 4 ", offset=100)
        assert text == f"pizza {PIZZA}!"
        assert len(text) == 8  # one code point, not two surrogates
        assert [(r.where, r.reason, r.action) for r in repairs] == [
            ("line 4 byte 106", "cesu8_repaired", "repaired")
        ]
        assert repairs[0].record == PIZZA_CESU8.hex(" ")

    def test_cesu8_after_a_utf8_bom_counts_the_bom(self):
        _, repairs = decode_bytes(b"\xef\xbb\xbfa" + PIZZA_CESU8, "f.txt")
        assert [r.where for r in repairs] == ["byte 4"]

    def test_latin1_is_a_fault_naming_file_and_byte(self):
        with pytest.raises(EncodingFault) as caught:
            decode_bytes("café au lait".encode("latin-1"), "data/menu.txt")
        fault = caught.value
        assert isinstance(fault, SourceError)
        assert (fault.source, fault.byte_offset) == ("data/menu.txt", 3)
        message = str(fault)
        assert "data/menu.txt" in message and "byte 3" in message
        assert "convert the file to UTF-8" in message
        assert "e9" in fault.detail  # shows the byte found

    def test_a_lone_high_surrogate_is_not_repaired(self):
        with pytest.raises(EncodingFault) as caught:
            decode_bytes(b"ab" + PIZZA_CESU8[:3] + b"cd", "f.txt")
        assert caught.value.byte_offset == 2
        assert "unpaired" in caught.value.detail

    def test_a_lone_low_surrogate_is_not_repaired(self):
        with pytest.raises(EncodingFault) as caught:
            decode_bytes(b"abc" + PIZZA_CESU8[3:], "f.txt")
        assert caught.value.byte_offset == 3

    def test_cesu8_next_to_latin1_is_not_half_repaired(self):
        with pytest.raises(EncodingFault) as caught:
            decode_bytes(PIZZA_CESU8 + b" caf\xe9", "f.txt")
        assert caught.value.byte_offset == 10

    @pytest.mark.skipif(not SNIPS_PLAY_MUSIC.exists(), reason="shared snips data not present")
    def test_the_real_cesu8_file_is_repaired(self):
        data = SNIPS_PLAY_MUSIC.read_bytes()
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
        text, repairs = decode_bytes(data, str(SNIPS_PLAY_MUSIC))
        assert [(r.where, r.reason, r.action) for r in repairs] == [
            ("byte 150732", "cesu8_repaired", "repaired")
        ]
        assert data[150732:150738] == PIZZA_CESU8
        assert "Pop Punk Perfection " + PIZZA in text
        assert not any("\ud800" <= ch <= "\udfff" for ch in text)

    @pytest.mark.skipif(not SNIPS_PLAY_MUSIC.exists(), reason="shared snips data not present")
    def test_the_real_cesu8_file_reads_as_json(self):
        outputs = read_all(SNIPS_PLAY_MUSIC)
        assert isinstance(outputs[0], Reject) and outputs[0].where == "byte 150732"
        [item] = items_of(outputs)
        texts = [
            chunk["text"] for example in item.value["PlayMusic"] for chunk in example["data"]
        ]
        assert "Pop Punk Perfection " + PIZZA in texts
        assert len(rejects_of(outputs)) == 1


class TestLooksBinary:
    @pytest.mark.parametrize(
        ("head", "binary"),
        [
            (b'{"text": "hi"}\n', False),
            (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", True),
            ("hi".encode("utf-16"), False),  # NULs, but a UTF-16 BOM says it is text
            (b"a" * 8192 + b"\x00", False),  # only the first 8 KiB are sniffed
            (b"", False),
        ],
    )
    def test_nul_bytes_in_the_head(self, head, binary):
        assert looks_binary(head) is binary


# --- resolving ------------------------------------------------------------------------------


class TestResolveInputs:
    @pytest.mark.parametrize(
        ("name", "fmt"),
        [
            ("a.jsonl", "jsonl"),
            ("a.NDJSON", "jsonl"),
            ("a.json", "json"),
            ("a.csv", "csv"),
            ("a.parquet", "parquet"),
            ("a.pq", "parquet"),
            ("a.txt", "text"),
            ("a.md", "text"),
            ("README", "text"),
        ],
    )
    def test_format_from_the_extension(self, tmp_path, name, fmt):
        path = write(tmp_path / name, "x")
        assert resolve_inputs(str(path)) == [Input(str(path), fmt)]

    def test_unknown_extension_says_to_set_format(self, tmp_path):
        path = write(tmp_path / "dump.log", "x")
        with pytest.raises(SourceError, match=r"'\.log'.*set `format:`"):
            resolve_inputs(str(path))

    def test_explicit_format_wins_over_the_extension(self, tmp_path):
        path = write(tmp_path / "dump.log", '{"text": "hi"}\n')
        assert resolve_inputs(str(path), "jsonl") == [Input(str(path), "jsonl")]

    def test_unknown_format_name(self, tmp_path):
        path = write(tmp_path / "a.jsonl", "x")
        with pytest.raises(SourceError, match="unknown format 'yaml'"):
            resolve_inputs(str(path), "yaml")

    def test_missing_file(self, tmp_path):
        with pytest.raises(SourceError, match=r"nope\.jsonl does not exist"):
            resolve_inputs(str(tmp_path / "nope.jsonl"))

    def test_glob_is_sorted_and_filtered(self, tmp_path):
        for name in ["b.jsonl", "c.jsonl", "a.jsonl", "notes.csv"]:
            write(tmp_path / name, "{}\n")
        found = resolve_inputs(str(tmp_path / "*.jsonl"))
        assert [Path(i.uri).name for i in found] == ["a.jsonl", "b.jsonl", "c.jsonl"]
        assert {i.format for i in found} == {"jsonl"}

    def test_glob_mixes_formats_by_extension(self, tmp_path):
        write(tmp_path / "a.jsonl", "{}\n")
        write(tmp_path / "b.csv", "x\n1\n")
        assert [i.format for i in resolve_inputs(str(tmp_path / "*"))] == ["jsonl", "csv"]

    def test_recursive_glob(self, tmp_path):
        write(tmp_path / "top.jsonl", "{}\n")
        write(tmp_path / "sub" / "deep.jsonl", "{}\n")
        names = [Path(i.uri).name for i in resolve_inputs(str(tmp_path / "**" / "*.jsonl"))]
        assert sorted(names) == ["deep.jsonl", "top.jsonl"]
        assert [Path(i.uri).name for i in resolve_inputs(str(tmp_path / "*.jsonl"))] == ["top.jsonl"]

    def test_glob_matching_nothing_names_glob_and_folder(self, tmp_path):
        write(tmp_path / "a.csv", "x\n")
        pattern = str(tmp_path / "*.jsonl")
        with pytest.raises(SourceError) as caught:
            resolve_inputs(pattern)
        assert f"no file matches the glob '{pattern}'" in str(caught.value)
        assert f"searched in {tmp_path}" in str(caught.value)

    def test_glob_in_a_missing_folder_says_so(self, tmp_path):
        with pytest.raises(SourceError, match="that folder does not exist"):
            resolve_inputs(str(tmp_path / "nowhere" / "*.jsonl"))

    def test_relative_glob_searches_the_working_directory(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SourceError, match=f"searched in {tmp_path}"):
            resolve_inputs("*.jsonl")

    def test_save_to_disk_folders(self, tmp_path):
        from datasets import Dataset, DatasetDict

        rows = Dataset.from_list([{"text": "a"}])
        rows.save_to_disk(str(tmp_path / "single"))
        DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "splits"))
        for name in ["single", "splits"]:
            assert resolve_inputs(str(tmp_path / name)) == [Input(str(tmp_path / name), "hf_disk")]

    def test_a_plain_folder_suggests_a_glob(self, tmp_path):
        write(tmp_path / "a.jsonl", "{}\n")
        with pytest.raises(SourceError, match=r"not one written by `datasets.save_to_disk`.*\*\.jsonl"):
            resolve_inputs(str(tmp_path))


# --- readers, good input --------------------------------------------------------------------


class TestJsonl:
    def test_lines_blank_lines_and_crlf(self, tmp_path):
        path = write(tmp_path / "a.jsonl", '{"text": "one"}\r\n\r\n  \n{"text": "two"}\n[1, 2]')
        outputs = read_all(path)
        assert [(o.where, o.value) for o in outputs] == [
            ("line 1", {"text": "one"}),
            ("line 4", {"text": "two"}),
            ("line 5", [1, 2]),
        ]
        assert {o.source for o in outputs} == {str(path)}

    def test_line_separators_inside_strings_do_not_split_a_line(self, tmp_path):
        path = write(tmp_path / "a.jsonl", '{"text": "a\u2028b\x85c"}\n{"text": "d"}\n')
        outputs = read_all(path)
        assert [(o.where, o.value["text"]) for o in outputs] == [
            ("line 1", "a\u2028b\x85c"),
            ("line 2", "d"),
        ]

    def test_utf16_file(self, tmp_path):
        path = write(tmp_path / "a.jsonl", '{"text": "é"}\r\n{"text": "🍕"}\r\n'.encode("utf-16"))
        assert [(o.where, o.value) for o in read_all(path)] == [
            ("line 1", {"text": "é"}),
            ("line 2", {"text": "🍕"}),
        ]

    def test_utf8_bom_keeps_offsets_in_the_file(self, tmp_path):
        path = write(tmp_path / "a.jsonl", b'\xef\xbb\xbf{"a": 1}\n{"b": "\xff"}\n')
        outputs = read_all(path)
        assert outputs[0].value == {"a": 1}
        assert outputs[1].where == "line 2 byte 19"  # 3 (BOM) + 9 (line 1) + 7


class TestJson:
    def test_top_level_array(self, tmp_path):
        path = write(tmp_path / "a.json", '[{"text": "a"}, {"text": "b"}, 3]')
        assert [(o.where, o.value) for o in read_all(path)] == [
            ("[0]", {"text": "a"}),
            ("[1]", {"text": "b"}),
            ("[2]", 3),
        ]

    def test_top_level_object(self, tmp_path):
        path = write(tmp_path / "a.json", '{"PlayMusic": [1, 2]}')
        assert [(o.where, o.value) for o in read_all(path)] == [("", {"PlayMusic": [1, 2]})]

    def test_invalid_json_names_file_line_and_column(self, tmp_path):
        path = write(tmp_path / "a.json", '[\n  {"text": "a"},\n  {"text" "b"}\n]')
        with pytest.raises(SourceError) as caught:
            read_all(path)
        assert str(caught.value) == (
            f"{path} is not valid JSON: Expecting ':' delimiter at line 3, column 11"
        )

    def test_a_scalar_is_not_a_dataset(self, tmp_path):
        path = write(tmp_path / "a.json", '"just a string"')
        with pytest.raises(SourceError, match="holds a single JSON str; expected an array"):
            read_all(path)


class TestCsv:
    def test_rows_with_quoting_and_a_bom(self, tmp_path):
        text = '\ufeffprompt,completion\r\n"hi, there","line one\nline two"\r\nq,a\r\n'
        path = write(tmp_path / "a.csv", text)
        assert [(o.where, o.value) for o in read_all(path)] == [
            ("row 1", {"prompt": "hi, there", "completion": "line one\nline two"}),
            ("row 2", {"prompt": "q", "completion": "a"}),
        ]

    def test_a_field_longer_than_the_csv_module_default(self, tmp_path):
        long_text = "word " * 40_000  # 200 KB, over the module's 128 KiB default limit
        path = write(tmp_path / "a.csv", f'text\n"{long_text}"\n')
        assert read_all(path)[0].value == {"text": long_text}

    def test_duplicate_header_columns(self, tmp_path):
        path = write(tmp_path / "a.csv", "text,text\na,b\n")
        with pytest.raises(SourceError, match=r"repeats column\(s\) \['text'\]"):
            read_all(path)


class TestParquet:
    def test_rows_in_order(self, tmp_path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "a.parquet"
        table = pa.table({"text": ["a", "b", "c"], "n": [1, 2, None]})
        pq.write_table(table, path, row_group_size=2)  # two row groups: order across groups
        assert [(o.where, o.value) for o in read_all(path)] == [
            ("row 1", {"text": "a", "n": 1}),
            ("row 2", {"text": "b", "n": 2}),
            ("row 3", {"text": "c", "n": None}),
        ]

    def test_not_parquet(self, tmp_path):
        path = write(tmp_path / "a.parquet", '{"text": "this is JSON"}\n')
        with pytest.raises(SourceError, match=r"a\.parquet is not a readable Parquet file .*`format:`"):
            read_all(path)

    def test_empty_parquet_file(self, tmp_path):
        path = write(tmp_path / "a.parquet", b"")
        with pytest.raises(SourceError, match=r"a\.parquet is empty"):
            read_all(path)


class TestText:
    def test_whole_file_one_item_with_newlines_normalised(self, tmp_path):
        path = write(tmp_path / "notes.txt", "first\r\nsecond\rthird\n")
        [item] = read_all(path)
        assert (item.where, item.value, item.start_line) == ("", "first\nsecond\nthird\n", 1)

    def test_latin1_text_file_is_refused_with_the_offset(self, tmp_path):
        path = write(tmp_path / "notes.txt", "ok\nnaïve".encode("latin-1"))
        with pytest.raises(EncodingFault, match=r"notes\.txt: not valid UTF-8 at byte 5 .*convert"):
            read_all(path)


class TestHfDisk:
    def test_dataset(self, tmp_path):
        from datasets import Dataset

        Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
        assert [(o.where, o.value) for o in read_all(tmp_path / "ds")] == [
            ("[0]", {"text": "a"}),
            ("[1]", {"text": "b"}),
        ]

    def test_dataset_dict_splits_in_saved_order(self, tmp_path):
        from datasets import Dataset, DatasetDict

        DatasetDict(
            {
                "train": Dataset.from_list([{"text": "t0"}, {"text": "t1"}]),
                "test": Dataset.from_list([{"text": "e0"}]),
            }
        ).save_to_disk(str(tmp_path / "dd"))
        assert [(o.where, o.value["text"]) for o in read_all(tmp_path / "dd")] == [
            ("train[0]", "t0"),
            ("train[1]", "t1"),
            ("test[0]", "e0"),
        ]

    def test_hf_disk_needs_a_folder(self, tmp_path):
        with pytest.raises(SourceError, match="is not a folder"):
            list(read_items(Input(str(tmp_path / "missing"), "hf_disk")))


# --- the bad corpus -------------------------------------------------------------------------


class TestBadCorpus:
    def test_every_file_is_documented(self):
        readme = (BAD / "README.md").read_text()
        names = sorted(p.name for p in BAD.iterdir() if p.name not in {"README.md", ".gitattributes"})
        assert len(names) >= 12
        assert [n for n in names if f"`{n}`" not in readme] == []

    def test_malformed_line_drops_only_that_line(self):
        outputs = read_all(BAD / "malformed_line.jsonl")
        assert [o.where for o in items_of(outputs)] == ["line 1", "line 3"]
        [reject] = rejects_of(outputs)
        assert (reject.where, reject.reason, reject.action) == ("line 2", "malformed_json", "dropped")
        assert reject.detail == "line 2 is not valid JSON: Expecting ',' delimiter at column 37"
        assert reject.record == '{"text": "missing the closing brace"'
        assert outputs.index(reject) == 1  # in file order

    def test_latin1_line_is_an_encoding_reject_with_the_file_offset(self):
        path = BAD / "latin1.jsonl"
        outputs = read_all(path)
        assert [o.value["text"] for o in items_of(outputs)] == ["plain ascii", "more ascii"]
        [reject] = rejects_of(outputs)
        assert (reject.where, reject.reason) == ("line 2 byte 37", "encoding")
        assert path.read_bytes()[37:38] == b"\xe9"
        assert "convert the file to UTF-8" in reject.detail and "e9" in reject.detail
        assert reject.record == b'{"text": "caf\xe9"}'
        assert json.loads(json.dumps(reject.to_json()))["record"] == '{"text": "caf\\xe9"}'

    def test_cesu8_line_is_repaired_and_recorded(self):
        outputs = read_all(BAD / "cesu8.jsonl")
        assert [type(o).__name__ for o in outputs] == ["Item", "Reject", "Item"]
        repair = outputs[1]
        assert (repair.where, repair.reason, repair.action) == (
            "line 2 byte 34",
            "cesu8_repaired",
            "repaired",
        )
        assert outputs[2].where == "line 2"
        assert outputs[2].value == {"text": f"pizza {PIZZA}"}

    def test_a_nul_byte_costs_its_line_not_the_file(self):
        outputs = read_all(BAD / "nul_line.jsonl")
        assert [o.value["text"] for o in items_of(outputs)] == ["one", "three"]
        [reject] = rejects_of(outputs)
        assert (reject.where, reject.reason) == ("line 2 byte 27", "nul_byte")
        assert (BAD / "nul_line.jsonl").read_bytes()[27:28] == b"\x00"
        assert "the file's other lines are read" in reject.detail

    @pytest.mark.parametrize("name", ["gzipped.jsonl.gz", "zstd.jsonl.zst"])
    def test_compressed_files_are_read_as_what_they_hold(self, name):
        outputs = read_all(BAD / name)
        assert [(o.where, o.value["text"]) for o in outputs] == [("line 1", "packed one"), ("line 2", "packed two")]

    def test_a_gzip_file_under_a_plain_name_is_read_too(self, tmp_path):
        plain = write(tmp_path / "data.jsonl", (BAD / "gzipped.jsonl.gz").read_bytes())
        assert [o.value["text"] for o in read_all(plain)] == ["packed one", "packed two"]

    def test_lone_surrogate_line_is_dropped(self):
        outputs = read_all(BAD / "lone_surrogate.jsonl")
        assert [o.where for o in items_of(outputs)] == ["line 1"]
        [reject] = rejects_of(outputs)
        assert (reject.where, reject.reason, reject.action) == ("line 2 byte 33", "encoding", "dropped")
        assert "unpaired" in reject.detail

    @pytest.mark.parametrize(
        ("name", "fmt", "message"),
        [
            ("empty.jsonl", "auto", f"empty.jsonl {EMPTY}"),
            ("empty.jsonl", "json", f"empty.jsonl {EMPTY}"),
            ("empty.jsonl", "csv", f"empty.jsonl {EMPTY}"),
            ("empty.jsonl", "text", f"empty.jsonl {EMPTY}"),
            ("array.jsonl", "auto", "array.jsonl holds one JSON array of 2 element(s), not JSON Lines (one value per "
             "line): set `format: json` on this source"),
            ("damaged.jsonl.gz", "auto", "damaged.jsonl.gz is a damaged gzip file (Compressed file ended before the "
             "end-of-stream marker was reached): download or compress it again"),
            ("whitespace.jsonl", "auto", "whitespace.jsonl holds only whitespace"),
            ("whitespace.jsonl", "json", "whitespace.jsonl holds only whitespace"),
            ("whitespace.jsonl", "csv", "whitespace.jsonl holds only whitespace"),
            ("whitespace.jsonl", "text", "whitespace.jsonl holds only whitespace"),
            (
                "binary.jsonl",
                "auto",
                "binary.jsonl looks binary (NUL bytes), not jsonl: is the path right?",
            ),
            (
                "binary.jsonl",
                "csv",
                "binary.jsonl looks binary (NUL bytes), not csv: is the path right?",
            ),
            (
                "binary.jsonl",
                "text",
                "binary.jsonl looks binary (NUL bytes), not text: is the path right?",
            ),
        ],
    )
    def test_unusable_files_are_source_errors(self, name, fmt, message):
        path = BAD / name
        with pytest.raises(SourceError) as caught:
            read_all(path, fmt)
        assert str(caught.value) == f"{path.parent}{os.sep}{message}"

    def test_latin1_whole_file_formats_are_faults(self):
        with pytest.raises(EncodingFault) as caught:
            read_all(BAD / "latin1.jsonl", "text")
        assert caught.value.byte_offset == 37
        assert "latin1.jsonl" in str(caught.value) and "byte 37" in str(caught.value)

    def test_jsonl_under_a_json_name_suggests_the_format(self):
        with pytest.raises(SourceError) as caught:
            read_all(BAD / "jsonl_named.json")
        message = str(caught.value)
        assert "jsonl_named.json is not valid JSON: Extra data at line 2, column 1" in message
        assert "set `format: jsonl`" in message

    def test_ragged_csv_rows_are_rejected(self):
        outputs = read_all(BAD / "ragged.csv")
        assert [(o.where, o.value) for o in items_of(outputs)] == [
            ("row 1", {"prompt": "hello", "completion": "world"})
        ]
        rejects = rejects_of(outputs)
        assert [(r.where, r.reason) for r in rejects] == [
            ("row 2", "malformed_csv"),
            ("row 3", "malformed_csv"),
        ]
        assert rejects[0].detail.startswith("row 2 (ending on line 3) has 3 fields, the header has 2")
        assert rejects[0].record == {"prompt": "extra", "completion": "field", "<extra>": ["here"]}
        assert rejects[1].detail.startswith("row 3 (ending on line 4) has 1 fields")

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("missing_field.jsonl", {"txt": "the field is misspelled"}),
            ("wrong_type.jsonl", {"text": 5}),
            ("no_assistant.jsonl", {"messages": [{"role": "user", "content": "hi"}]}),
        ],
    )
    def test_record_level_problems_pass_the_reader(self, name, value):
        outputs = read_all(BAD / name)
        assert rejects_of(outputs) == []
        assert outputs[-1].value == value
