"""Format readers: one concrete input in, parsed `Item`s (and `Reject`s) out.

A reader knows file formats, not record shapes: whether an item has a `text` field is the preset's
business. What a reader decides:

- The whole input is unusable (missing, empty, only whitespace, binary, undecodable JSON/CSV/text,
  not Parquet): `SourceError`, raised while iterating, naming the input and what to do.
- One JSONL line is broken (bad JSON, bad bytes): a `Reject` for that line; the other lines go on.
- Bytes were repaired (CESU-8 emoji): a `Reject(action="repaired")` before the item that carries the
  repaired text, so the change is on record.

Addresses (`where`), all stable across runs:
- jsonl: "line N", the 1-based physical line (blank lines count but yield nothing).
- json: "[i]", 0-based element of a top-level array; "" for a top-level object.
- csv: "row N", N counting data rows from 1; the row is on physical line N+1 (the header is line 1)
  unless a quoted field spans lines or blank lines were skipped.
- parquet: "row N", N counting rows from 1, like csv.
- text: "" (the whole file is one item, newlines normalised to "\n").
- hf_disk: "[i]" (0-based) for a Dataset, "<split>[i]" for each split of a DatasetDict.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator

from tasks.data.encoding import (
    BINARY_SNIFF_BYTES,
    UTF8_BOM,
    EncodingFault,
    decode_bytes,
    looks_binary,
    mostly_binary,
    wide_bom,
)
from tasks.data.errors import Reject, SourceError
from tasks.data.items import Item
from tasks.data.sources import Input, read_bytes

Parsed = Iterator[Item | Reject]
PARQUET_BATCH_ROWS = 1024
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) is smaller than one long document


def read_items(inp: Input) -> Parsed:
    """Items of one input in file order, with a Reject wherever something was dropped or repaired."""
    readers: dict[str, Callable[[Input], Parsed]] = {
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_csv,
        "parquet": _read_parquet,
        "text": _read_text,
        "hf_disk": _read_hf_disk,
    }
    if inp.format not in readers:
        raise SourceError(f"{inp.uri}: no reader for format {inp.format!r}; use one of {', '.join(readers)}")
    return readers[inp.format](inp)


# --- file-level checks ----------------------------------------------------------------------


def _text_file_bytes(inp: Input, lines: bool = False) -> bytes:
    """The bytes of a text-format input, refused if empty or binary. `lines`: a format read line by
    line, where a NUL byte in one line is that line's reject (`mostly_binary` decides the file)."""
    data = read_bytes(inp)
    if not data:
        raise SourceError(f"{inp.uri} is empty (0 bytes): nothing to read; fill it, or take it out of the stage's sources")
    if (mostly_binary if lines else looks_binary)(data[:BINARY_SNIFF_BYTES]):
        raise SourceError(f"{inp.uri} looks binary (NUL bytes), not {inp.format}: is the path right?")
    return data


def _whole_text(inp: Input, data: bytes | None = None) -> tuple[str, list[Reject]]:
    """The decoded text of a whole-file format; an undecodable file is an `EncodingFault`."""
    text, repairs = decode_bytes(_text_file_bytes(inp) if data is None else data, inp.uri)
    if not text.strip():
        raise SourceError(f"{inp.uri} holds only whitespace")
    return text, repairs


# --- jsonl ----------------------------------------------------------------------------------


def _read_jsonl(inp: Input) -> Parsed:
    data = _text_file_bytes(inp, lines=True)
    if wide_bom(data) is not None:
        # UTF-16/32: a newline is not one byte, so decode the whole file, then split it.
        text, repairs = _whole_text(inp, data)
        yield from repairs
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield _parse_json_line(inp.uri, number, line.rstrip("\r"))
        return
    base = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    body = data[base:]
    if not body.strip():
        raise SourceError(f"{inp.uri} holds only whitespace")
    _refuse_json_array(inp.uri, body)
    offset = base
    for number, raw in enumerate(body.split(b"\n"), start=1):
        if raw.strip():
            yield from _decode_jsonl_line(inp.uri, number, raw.rstrip(b"\r"), offset)
        offset += len(raw) + 1


def _refuse_json_array(uri: str, body: bytes) -> None:
    """A file holding one JSON array (pretty-printed or on one line) is JSON, not JSON Lines: say so,
    rather than reject each line or each element for a missing field."""
    if not body.lstrip().startswith(b"["):
        return
    try:
        value = json.loads(body)
    except ValueError:
        return  # not one array: the lines are read, and each bad one is a reject
    if isinstance(value, list):
        raise SourceError(f"{uri} holds one JSON array of {len(value)} element(s), not JSON Lines (one value per "
                          "line): set `format: json` on this source")


def _decode_jsonl_line(source: str, number: int, raw: bytes, offset: int) -> Parsed:
    """Decode one line on its own, so bad bytes cost that line and not the file."""
    if b"\x00" in raw:
        at = offset + raw.index(b"\x00")
        yield Reject(source=source, where=f"line {number} byte {at}", reason="nul_byte",
                     detail=f"line {number} holds a NUL byte at byte {at}: not text (a damaged or binary line); "
                     "the file's other lines are read", record=raw)
        return
    try:
        line, repairs = decode_bytes(raw, source, where_prefix=f"line {number} ", offset=offset)
    except EncodingFault as fault:
        yield Reject(
            source=source,
            where=f"line {number} byte {fault.byte_offset}",
            reason="encoding",
            detail=f"line {number} is not valid UTF-8 at byte {fault.byte_offset} ({fault.detail});"
            " convert the file to UTF-8",
            record=raw,
        )
        return
    yield from repairs
    yield _parse_json_line(source, number, line)


def _parse_json_line(source: str, number: int, line: str) -> Item | Reject:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        return Reject(
            source=source,
            where=f"line {number}",
            reason="malformed_json",
            detail=f"line {number} is not valid JSON: {err.msg} at column {err.colno}",
            record=line,
        )
    return Item(source=source, where=f"line {number}", value=value)


# --- json -----------------------------------------------------------------------------------


def _read_json(inp: Input) -> Parsed:
    text, repairs = _whole_text(inp)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg == "Extra data":  # a second value after the first: JSON Lines under a .json name
            hint = "; if it holds one JSON value per line, set `format: jsonl` on this source"
        raise SourceError(
            f"{inp.uri} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}{hint}"
        ) from None
    yield from repairs
    if isinstance(value, list):
        for index, element in enumerate(value):
            yield Item(source=inp.uri, where=f"[{index}]", value=element)
    elif isinstance(value, dict):
        yield Item(source=inp.uri, where="", value=value)
    else:
        raise SourceError(
            f"{inp.uri} holds a single JSON {type(value).__name__}; expected an array of records or"
            " an object"
        )


# --- csv ------------------------------------------------------------------------------------


def _read_csv(inp: Input) -> Parsed:
    text, repairs = _whole_text(inp)
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = reader.fieldnames or []
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise SourceError(f"{inp.uri}: the header repeats column(s) {duplicated}; rename them")
        yield from repairs
        for number, row in enumerate(reader, start=1):
            yield _csv_row(inp.uri, number, row, len(columns), reader.line_num)
    except csv.Error as err:
        raise SourceError(f"{inp.uri} is not valid CSV near line {reader.line_num}: {err}") from None


def _csv_row(source: str, number: int, row: dict, n_columns: int, line: int) -> Item | Reject:
    """A row as a dict, or a Reject if its field count differs from the header's."""
    extra = row.get(None)  # DictReader files surplus fields under the key None
    missing = [k for k, v in row.items() if k is not None and v is None]
    if extra or missing:
        found = n_columns + len(extra or []) - len(missing)
        return Reject(
            source=source,
            where=f"row {number}",
            reason="malformed_csv",
            detail=f"row {number} (ending on line {line}) has {found} fields, the header has"
            f" {n_columns}: a stray delimiter or an unquoted field?",
            record={k: v for k, v in row.items() if k is not None and v is not None}
            | ({"<extra>": extra} if extra else {}),
        )
    return Item(source=source, where=f"row {number}", value=row)


# --- parquet --------------------------------------------------------------------------------


def _read_parquet(inp: Input) -> Parsed:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_bytes(inp)
    if not data:
        raise SourceError(f"{inp.uri} is empty")
    number = 0
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield Item(source=inp.uri, where=f"row {number}", value=row)
    except (pa.ArrowException, OSError) as err:
        raise SourceError(
            f"{inp.uri} is not a readable Parquet file ({err}): is the path or `format:` right?"
        ) from None


# --- text -----------------------------------------------------------------------------------


def _read_text(inp: Input) -> Parsed:
    text, repairs = _whole_text(inp)
    yield from repairs
    yield Item(source=inp.uri, where="", value=text.replace("\r\n", "\n").replace("\r", "\n"))


# --- save_to_disk folders -------------------------------------------------------------------


def _read_hf_disk(inp: Input) -> Parsed:
    if inp.uri.startswith("s3://"):
        raise SourceError(
            f"{inp.uri}: format hf_disk reads local folders only; download it, or export it to"
            " Parquet/JSONL"
        )
    if not os.path.isdir(inp.uri):
        raise SourceError(f"{inp.uri} is not a folder; format hf_disk needs a `save_to_disk` folder")
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(inp.uri)
    except FileNotFoundError as err:
        raise SourceError(f"{inp.uri} is not a folder written by `datasets.save_to_disk`: {err}") from None
    if isinstance(loaded, DatasetDict):
        for split, dataset in loaded.items():
            for index, row in enumerate(dataset):
                yield Item(source=inp.uri, where=f"{split}[{index}]", value=row)
    else:
        for index, row in enumerate(loaded):
            yield Item(source=inp.uri, where=f"[{index}]", value=row)
