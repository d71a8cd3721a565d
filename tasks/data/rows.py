"""A prepared split's rows: the record on its way through `prepare`, the rows as columns, and the
Parquet schemas `validate` and `train` read (the contract between those stages).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.core.chat import IGNORE_INDEX

if TYPE_CHECKING:
    from tasks.data.packing import PackedColumns


@dataclass
class Record:
    """One raw record on its way through prepare: content, where it came from, and its hash."""

    content: dict  # {"text"} or {"messages"}
    origin: dict  # {"source": index | "synthetic", "uri"?, "where"}
    digest: str = ""  # sha256 of the content's canonical JSON: what the split is decided by

    @functools.cached_property
    def plain_text(self) -> str:
        """What dedupe and decontamination compare; `clean_records` sets it once cleaning is final."""
        from tasks.data.clean import record_text

        return record_text(self.content)

    @property
    def uri(self) -> str:
        return str(self.origin.get("uri", "synthetic"))

    @property
    def where(self) -> str:
        return str(self.origin.get("where", ""))



STRING_COLUMNS = ("content_hash", "split", "record_json", "source_stage", "text", "roles", "last_reply", "origin")
ROW_LISTS = (*STRING_COLUMNS, "source")


SUM_BLOCK = 1 << 22  # values counted at a time by `segment_sums`: 32 MB of int64 running sums


def segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The sum of `values[offsets[i]:offsets[i + 1]]` for each i, as int64 (0 for an empty segment).

    A running sum over a block of values at a time: one over all of them (or numpy's cast of them
    all to int64, as `reduceat` does) is 8 bytes per token at once."""
    offsets = np.asarray(offsets, dtype=np.int64)
    before = np.zeros(len(offsets), dtype=np.int64)  # the sum of the values before each offset
    done = 0
    for lo in range(0, len(values), SUM_BLOCK):
        running = done + np.cumsum(values[lo : lo + SUM_BLOCK], dtype=np.int64)
        hi = lo + len(running)
        inside = slice(np.searchsorted(offsets, lo, "right"), np.searchsorted(offsets, hi, "right"))
        before[inside] = running[offsets[inside] - lo - 1]
        done = int(running[-1])
    return np.diff(before)


def concat_arrays(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)


@dataclass(frozen=True)
class Rows:
    """A split's rows as columns: tokens flattened into int32 arrays (row i is
    `offsets[i]:offsets[i + 1]`), the rest in lists, so building, weighting, replaying, packing and
    writing millions of tokens creates no Python object per token. `to_dicts` is the row view.
    """

    input_ids: np.ndarray  # int32, every row's tokens one after another
    labels: np.ndarray  # int32, IGNORE_INDEX where the token is not trained on
    offsets: np.ndarray  # int64, len(rows) + 1
    content_hash: list[str]
    split: list[str]
    record_json: list[str | dict]  # a dict: the record's content, as canonical JSON once written (`column`)
    source_stage: list[str]  # the stage the row came from (differs for replayed rows)
    text: list[str]
    roles: list[str]
    last_reply: list[str]
    origin: list[str]
    source: list[str]  # the row's source within its stage, for mixture weights; not written

    @classmethod
    def empty(cls) -> Rows:
        return cls.concat([])

    def __len__(self) -> int:
        return len(self.content_hash)

    @property
    def n_tokens(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_trainable(self) -> np.ndarray:
        """Trained tokens per row. Summed row by row: a running count over all tokens was an int64
        per token (280 MB for a 200 MB text's 35M tokens, on top of the rows)."""
        return segment_sums(self.labels != IGNORE_INDEX, self.offsets)

    def take(self, indices: Sequence[int]) -> Rows:
        """The rows at `indices`, in that order (repeats allowed)."""
        picked = np.asarray(indices, dtype=np.int64)
        lengths = self.n_tokens[picked]
        offsets = np.zeros(len(picked) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.arange(offsets[-1], dtype=np.int64) + np.repeat(self.offsets[:-1][picked] - offsets[:-1], lengths)
        lists = {name: [getattr(self, name)[i] for i in picked.tolist()] for name in ROW_LISTS}
        return Rows(self.input_ids[gather], self.labels[gather], offsets, **lists)

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        offsets = np.zeros(sum(map(len, parts)) + 1, dtype=np.int64)
        np.cumsum(np.concatenate([p.n_tokens for p in parts] or [np.zeros(0, dtype=np.int64)]), out=offsets[1:])
        lists = {name: [value for p in parts for value in getattr(p, name)] for name in ROW_LISTS}
        return Rows(concat_arrays([p.input_ids for p in parts]), concat_arrays([p.labels for p in parts]), offsets, **lists)

    @staticmethod
    def take_across(parts: Sequence[Rows], indices: Sequence[int]) -> Rows:
        """`Rows.concat(parts).take(indices)` without copying the rows that are not taken."""
        picked = np.asarray(indices, dtype=np.int64)
        bounds = np.cumsum([0] + [len(p) for p in parts])
        part = np.searchsorted(bounds, picked, side="right") - 1
        order = np.argsort(part, kind="stable")  # grouped by part, each group in request order
        grouped = Rows.concat([p.take(picked[part == k] - bounds[k]) for k, p in enumerate(parts)])
        return grouped.take(np.argsort(order))

    def slice(self, start: int, stop: int) -> Rows:
        """Rows start..stop-1, the token arrays as views (no copy)."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        lists = {name: getattr(self, name)[start:stop] for name in ROW_LISTS}
        return Rows(self.input_ids[lo:hi], self.labels[lo:hi], self.offsets[start : stop + 1] - lo, **lists)

    def column(self, name: str) -> list[str]:
        """A string column as written. `record_json` holds the record's content (a dict) until then:
        its JSON string kept from cleaning to writing was a second copy of every text in memory."""
        values = getattr(self, name)
        if name != "record_json":
            return values
        from tasks.core.records import canonical_json

        return [v if isinstance(v, str) else canonical_json(v) for v in values]

    def with_hashes(self, content_hash: list[str]) -> Rows:
        return replace(self, content_hash=content_hash)

    def table(self, schema):
        """The rows as an Arrow table of `schema` (`prepare.prepared_schema`)."""
        import pyarrow as pa

        n_tokens, n_trainable = self.n_tokens, self.n_trainable
        offsets = pa.array(self.offsets.astype(np.int32))
        columns = {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(self.input_ids), type=schema.field("input_ids").type),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(self.labels), type=schema.field("labels").type),
            "n_tokens": pa.array(n_tokens, type=pa.int64()),
            "n_trainable": pa.array(n_trainable, type=pa.int64()),
            "trainable_share": pa.array(n_trainable / np.maximum(n_tokens, 1), type=pa.float64()),
        }
        columns |= {name: pa.array(self.column(name), type=pa.string()) for name in STRING_COLUMNS}
        return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)

    def to_dicts(self) -> list[dict]:
        """One dict per row with the written fields; token lists as Python lists."""
        n_tokens, n_trainable = self.n_tokens.tolist(), self.n_trainable.tolist()
        bounds = self.offsets.tolist()
        strings = {name: self.column(name) for name in STRING_COLUMNS}
        rows = []
        for i in range(len(self)):
            lo, hi = bounds[i], bounds[i + 1]
            rows.append({
                "input_ids": self.input_ids[lo:hi].tolist(),
                "labels": self.labels[lo:hi].tolist(),
                "n_tokens": n_tokens[i],
                "n_trainable": n_trainable[i],
                "trainable_share": n_trainable[i] / max(n_tokens[i], 1),
                **{name: strings[name][i] for name in STRING_COLUMNS},
            })
        return rows


# --- mix: weights and replay --------------------------------------------------------------------



def prepared_schema():
    """The Parquet schema of a prepared split: the contract `validate` and `train` read."""
    import pyarrow as pa

    return pa.schema([
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),  # -100 where the token is not trained on
        ("n_tokens", pa.int64()),
        ("n_trainable", pa.int64()),
        ("trainable_share", pa.float64()),
        ("content_hash", pa.string()),
        ("split", pa.string()),
        ("record_json", pa.string()),
        ("source_stage", pa.string()),  # the stage the row came from (differs for replayed rows)
        ("text", pa.string()),  # as trained: the chat template applied
        ("roles", pa.string()),  # "user,assistant,..."; "" for raw text
        ("last_reply", pa.string()),  # the final assistant message; "" for raw text
        ("origin", pa.string()),  # source file or URI and where in it
    ])


def packed_schema():
    import pyarrow as pa

    return pa.schema([
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),  # restart at 0 at each record: attention stays per record
        ("seq_lengths", pa.list_(pa.int32())),
        ("content_hashes", pa.list_(pa.string())),
        ("n_tokens", pa.int64()),
    ])


def _list_column(offsets, values, type_):
    import numpy as np
    import pyarrow as pa

    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)),
                                    pa.array(np.asarray(values, dtype=type_.value_type.to_pandas_dtype())), type=type_)


def packed_table(columns: PackedColumns):
    """The packed rows' table, built from flat columns."""
    import pyarrow as pa

    schema = packed_schema()
    tokens, seqs = columns.token_offsets, columns.seq_offsets
    arrays = [
        _list_column(tokens, columns.input_ids, schema.field("input_ids").type),
        _list_column(tokens, columns.labels, schema.field("labels").type),
        _list_column(tokens, columns.position_ids, schema.field("position_ids").type),
        _list_column(seqs, columns.seq_lengths, schema.field("seq_lengths").type),
        pa.ListArray.from_arrays(pa.array(seqs.astype("int32")), pa.array(columns.content_hashes, type=pa.string())),
        pa.array(columns.n_tokens, type=pa.int64()),
    ]
    return pa.Table.from_arrays(arrays, schema=schema)



ROW_GROUP_ROWS = 16_384  # rows converted to Arrow and written at a time by `write_rows`
ROW_GROUP_TOKENS = 2_000_000  # tokens per row group of a packed table (`write_table`)


def write_rows(rows: Rows, schema, path: Path) -> None:
    """`rows` as a Parquet file of `schema`, converted to Arrow a row group at a time: the whole
    split as one Arrow table was a second copy of every text and token next to the rows."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for start in range(0, max(len(rows), 1), ROW_GROUP_ROWS):
            writer.write_table(rows.slice(start, min(start + ROW_GROUP_ROWS, len(rows))).table(schema))
    tmp.replace(path)


def write_table(table, path: Path, row_tokens: int = 1) -> None:
    """`table` as a Parquet file in row groups of about ROW_GROUP_TOKENS tokens (rows of `row_tokens`):
    the writer holds a whole row group's encoded pages until it closes, and one group of a 200 MB
    text's packed rows was half a GB."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=max(1, ROW_GROUP_TOKENS // max(row_tokens, 1)))
    tmp.replace(path)



def read_rows(stage: str, split: str) -> list[dict]:
    """A prepared split's token rows (`input_ids`, `labels`): what `train` trains on and `evaluate` scores."""
    import pyarrow.parquet as pq

    from tasks.core import paths

    table = pq.read_table(paths.prepared_file(stage, split), columns=["input_ids", "labels"])
    return table.to_pylist()


def read_packed_rows(stage: str) -> list[dict]:
    """The stage's training rows as packed by `prepare` (records end to end, position ids per record)."""
    import pyarrow.parquet as pq

    from tasks.core import paths

    path = paths.packed_file(stage)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train.packing needs prepare.packing.enabled: true")
    return pq.read_table(path, columns=["input_ids", "labels", "position_ids"]).to_pylist()
