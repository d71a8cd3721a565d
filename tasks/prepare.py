"""`prepare` stage: from each stage's raw records to tokenized, split, packed Parquet.

Per stage, in order:
  clean        Unicode normalisation, control characters, optional PII scrubbing (changes logged)
  dedupe       exact (normalised hash) and near (MinHash LSH) duplicates dropped
  split        train/eval by content hash, so adding records never moves old ones
  decontaminate training records sharing a long n-gram with any stage's eval split or a listed
               benchmark file are dropped
  encode       the model's chat template; loss on every token (`pretrain`) or on assistant replies
               and their end-of-turn marker only (`sft`); length limits applied as configured
  mix          source weights, then a replay share of earlier stages' training rows
  pack         best-fit-decreasing rows of `packing.row_length` tokens (position ids reset per record)

Everything dropped or changed goes to `data/prepared/<stage>/rejects.jsonl` (ingest's rejects are
copied in first), and the counts per reason to `metrics/data.json`.

    python -m tasks.prepare [--params params.yaml]
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core import paths
from tasks.core.chat import Encoded, encode_chats, encode_texts
from tasks.core.cli import run_stage_cli
from tasks.core.config import DataStageSpec, Params, PrepareConfig, load_params
from tasks.core.records import canonical_json, read_jsonl, split_of, write_json, write_jsonl
from tasks.data.errors import Reject

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One raw record on its way through prepare: content, where it came from, and its hash."""

    content: dict  # {"text"} or {"messages"}
    origin: dict  # {"source": index | "synthetic", "uri"?, "where"}
    digest: str = ""
    canonical: str = ""  # canonical JSON of content: hashed for the split, stored as record_json

    @functools.cached_property
    def plain_text(self) -> str:
        """What dedupe and decontamination compare; read after cleaning, which is final by then."""
        from tasks.data.clean import record_text

        return record_text(self.content)

    @property
    def uri(self) -> str:
        return str(self.origin.get("uri", "synthetic"))

    @property
    def where(self) -> str:
        return str(self.origin.get("where", ""))


@dataclass
class StageData:
    """A stage between the phases of prepare, with everything it lost on the way."""

    stage: str
    spec: DataStageSpec
    train: list[Record] = field(default_factory=list)
    eval: list[Record] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # "dropped.<reason>", "changed.<reason>", ...

    def reject(self, record: Record, reason: str, detail: str, action: str = "dropped") -> None:
        self.rejects.append(Reject(record.uri, record.where, reason, detail, record.content, action))  # type: ignore[arg-type]
        self.counts[f"{action}.{reason}"] += 1


@dataclass(frozen=True)
class PreparedStage:
    stage: str
    n_train: int
    n_eval: int
    n_rejected: int
    n_replayed: int = 0
    packing_efficiency: float | None = None


# --- clean, dedupe, split -----------------------------------------------------------------------


def clean_and_split(stage: str, spec: DataStageSpec, raw: list[dict], cfg: PrepareConfig, seed: int) -> StageData:
    """Clean every record, drop duplicates, and split the rest by content hash."""
    from tasks.data.clean import clean_record
    from tasks.data.dedupe import find_duplicates

    data = StageData(stage, spec)
    kept: list[Record] = []
    for obj in raw:
        origin = obj.get("origin") or {}
        record = Record({k: v for k, v in obj.items() if k != "origin"}, origin)
        cleaned, reasons = clean_record(record.content, cfg.clean)
        if cleaned != record.content:
            data.reject(record, ",".join(reasons), "cleaned; the record kept is in the training data", "changed")
            record.content = cleaned
        elif reasons:  # reported but left as is (e.g. U+FFFD: the original character is unknowable)
            data.counts.update(f"flagged.{r}" for r in reasons)
        kept.append(record)
    duplicates = find_duplicates([r.plain_text for r in kept], cfg.dedupe, seed)
    for index, record in enumerate(kept):
        if index in duplicates:
            reason, original = duplicates[index]
            data.reject(record, reason, f"duplicate of {kept[original].uri} {kept[original].where}")
            continue
        record.canonical = canonical_json(record.content)
        record.digest = hashlib.sha256(record.canonical.encode("utf-8")).hexdigest()  # = content_hash
        (data.eval if split_of(record.digest, cfg.eval_fraction) == "eval" else data.train).append(record)
    return data


def benchmark_texts(path: str) -> list[str]:
    """Every string in a benchmark file, whatever its shape: decontamination needs text, not records."""
    from tasks.data.readers import read_items
    from tasks.data.sources import resolve_inputs

    def strings(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return []

    texts = []
    for inp in resolve_inputs(path):
        for item in read_items(inp):
            if not isinstance(item, Reject):
                texts.append("\n".join(strings(item.value)))
    return texts


def decontaminate(stages: list[StageData], cfg: PrepareConfig) -> None:
    """Drop training records sharing an n-gram with any stage's eval split or a benchmark file."""
    from tasks.data.decontaminate import NgramIndex

    dcfg = cfg.decontaminate
    if not dcfg.enabled:
        return
    held_out = [r.plain_text for data in stages for r in data.eval]
    for path in dcfg.benchmark_files:
        held_out += benchmark_texts(path)
    index = NgramIndex.build(held_out, dcfg.ngram)
    for data in stages:
        hits = index.first_hits([r.plain_text for r in data.train])
        for i, record in enumerate(data.train):
            if i in hits:
                data.reject(record, "contaminated", f"shares the {dcfg.ngram}-gram {hits[i]!r} with held-out text")
        data.train = [r for i, r in enumerate(data.train) if i not in hits]


# --- encode ---------------------------------------------------------------------------------------


def _encode(tokenizer, kind: str, records: list[Record]) -> list[Encoded]:
    if kind == "pretrain":
        return encode_texts(tokenizer, [r.content["text"] for r in records])
    return encode_chats(tokenizer, [r.content["messages"] for r in records])


def _fit(enc: Encoded, kind: str, cfg: PrepareConfig) -> tuple[list[Encoded], str | None]:
    """Apply the length policy: the pieces to keep, or the reject reason."""
    n, limit = len(enc.input_ids), cfg.max_length
    if n <= limit:
        return [enc], None
    policy = cfg.pretrain_overflow if kind == "pretrain" else cfg.chat_overflow
    if policy == "drop":
        return [], "too_long"
    if policy == "truncate":
        cut = Encoded(enc.input_ids[:limit], enc.labels[:limit])
        return ([cut], "truncated") if cut.n_trainable else ([], "too_long")
    pieces = -(-n // limit)  # equal-size pieces: a long document never leaves a stub at its end
    bounds = [i * n // pieces for i in range(pieces + 1)]
    return [Encoded(enc.input_ids[a:b], enc.labels[a:b]) for a, b in zip(bounds, bounds[1:])], "split"


def _row(record: Record, enc: Encoded, split: str, stage: str, part: int | None, text: str) -> dict:
    messages = record.content.get("messages") or []
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return {
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "n_tokens": len(enc.input_ids),
        "n_trainable": enc.n_trainable,
        "trainable_share": enc.n_trainable / max(len(enc.input_ids), 1),
        "content_hash": record.digest if part is None else f"{record.digest}:{part}",
        "split": split,
        "record_json": record.canonical or canonical_json(record.content),
        "source_stage": stage,
        "text": text,
        "roles": ",".join(m["role"] for m in messages),
        "last_reply": replies[-1] if replies else "",
        "origin": f"{record.uri} {record.where}".strip(),
    }


def encode_split(data: StageData, split: str, tokenizer, cfg: PrepareConfig) -> tuple[list[dict], list[str]]:
    """Rows of one split after the length policy, and each row's source (for mixture weights);
    drops go to the stage's rejects."""
    records = data.train if split == "train" else data.eval
    kind = data.spec.kind
    rows: list[dict] = []
    sources: list[str] = []
    for record, enc in zip(records, _encode(tokenizer, kind, records)):
        pieces, note = _fit(enc, kind, cfg)
        if note in ("too_long", "truncated"):
            action = "dropped" if note == "too_long" else "changed"
            data.reject(record, note, f"{len(enc.input_ids)} tokens, over prepare.max_length={cfg.max_length}", action)
        elif note == "split":
            data.counts["split_into_rows"] += 1
        pieces = [p for p in pieces if len(p.input_ids) >= cfg.min_tokens]
        if not pieces and note != "too_long":
            data.reject(record, "too_short", f"{len(enc.input_ids)} tokens, under prepare.min_tokens={cfg.min_tokens}")
            continue
        whole = len(pieces) == 1 and note is None
        for part, piece in enumerate(pieces):
            text = enc.text if whole else tokenizer.decode(piece.input_ids)
            rows.append(_row(record, piece, split, data.stage, None if whole else part, text))
            sources.append(str(record.origin.get("source", "")))
    return rows, sources


# --- mix: weights and replay --------------------------------------------------------------------


def weighted_rows(rows: list[dict], sources: list[str], weights: dict[str, float], stage: str, seed: int) -> tuple[list[dict], Counter]:
    """Apply each source's mixture weight to its training rows: w=2.5 keeps every row twice plus half
    of them once more; copies get their own content_hash suffix (`~k`) so duplicates stay detectable."""
    by_source: dict[str, list[dict]] = {}
    for row, source in zip(rows, sources):
        by_source.setdefault(source, []).append(row)
    out, counts = [], Counter()
    for source, group in by_source.items():
        weight = weights.get(source, 1.0)
        whole, frac = int(weight), weight - int(weight)
        rng = random.Random(f"{seed}:weight:{stage}:{source}")
        picked = sorted(rng.sample(range(len(group)), round(len(group) * frac))) if frac else []
        copies = [group] * whole + [[group[i] for i in picked]]
        for k, chunk in enumerate(c for c in copies if c):
            out += [r if k == 0 else r | {"content_hash": f"{r['content_hash']}~{k}"} for r in chunk]
        if change := sum(map(len, copies)) - len(group):
            counts["weight_added" if change > 0 else "weight_dropped"] += abs(change)
    return out, counts


def replay_rows(stage: str, own: list[dict], earlier: list[list[dict]], share: float, seed: int) -> list[dict]:
    """Rows sampled from earlier stages' training data so that `share` of the mix is replay."""
    pool = [row for rows in earlier for row in rows]
    wanted = round(len(own) * share / (1 - share)) if share else 0
    if not pool or not wanted:
        return []
    rng = random.Random(f"{seed}:replay:{stage}")
    return rng.sample(pool, min(wanted, len(pool)))


# --- write ----------------------------------------------------------------------------------------


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


def _column(values: list, type_):
    """One Arrow column; integer lists go through numpy (`pa.array` on Python lists of lists is
    about four times slower, and these columns are most of the bytes)."""
    import itertools

    import numpy as np
    import pyarrow as pa

    if pa.types.is_list(type_) and pa.types.is_integer(type_.value_type):
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(values), dtype=type_.value_type.to_pandas_dtype(),
                           count=int(offsets[-1]))
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), type=type_)
    return pa.array(values, type=type_)


def rows_table(rows: list[dict], schema):
    import pyarrow as pa

    return pa.Table.from_arrays([_column([r[f.name] for r in rows], f.type) for f in schema], schema=schema)


def write_rows(rows: list[dict], schema, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(rows_table(rows, schema), tmp, compression="zstd")
    tmp.replace(path)


def write_split(rows: list[dict], path: Path) -> None:
    write_rows(rows, prepared_schema(), path)


def _ingest_rejects(stage: str) -> list[dict]:
    path = paths.raw_rejects(stage)
    return [r | {"step": "ingest"} for r in read_jsonl(path)] if path.exists() else []


def _ingest_report(stage: str) -> dict:
    path = paths.raw_report(stage)
    return json.loads(path.read_text()) if path.exists() else {}


def stage_report(data: StageData, train: list[dict], eval_rows: list[dict], replayed: int, packing: dict | None) -> dict:
    """The stage's line in metrics/data.json: what came in, what was lost and why, what goes on."""
    ingest = _ingest_report(data.stage)
    ingest_counts: Counter = Counter()
    for source in ingest.get("sources", []):
        ingest_counts.update({f"dropped.{k}": v for k, v in source.get("dropped", {}).items()})
        ingest_counts.update({f"repaired.{k}": v for k, v in source.get("repaired", {}).items()})
    own = [r for r in train if r["source_stage"] == data.stage]
    return {
        "ingested_records": ingest.get("records"),
        "sources": [{k: s[k] for k in ("path", "preset", "records")} for s in ingest.get("sources", [])],
        "ingest": dict(sorted(ingest_counts.items())),
        "prepare": dict(sorted(data.counts.items())),
        "train_rows": len(train),
        "train_rows_replayed": replayed,
        "eval_rows": len(eval_rows),
        "train_tokens": sum(r["n_tokens"] for r in own),
        "train_trainable_tokens": sum(r["n_trainable"] for r in own),
        "eval_tokens": sum(r["n_tokens"] for r in eval_rows),
        "packing": packing,
    }


# --- the step -------------------------------------------------------------------------------------


def prepare_all(params: Params) -> list[PreparedStage]:
    from tasks.core.modeling import BaseInfo, load_tokenizer
    from tasks.data.packing import build_packed_rows

    cfg = params.prepare
    tokenizer = load_tokenizer(BaseInfo.load())
    started = time.perf_counter()
    stages = [
        clean_and_split(stage, spec, read_jsonl(paths.raw_file(stage)), cfg, params.seed)
        for stage, spec in params.data.stages.items()
    ]
    decontaminate(stages, cfg)
    results, report, own_train = [], {}, []
    log.info("prepare: cleaned, deduplicated, split and decontaminated %d stages in %.1f s",
             len(stages), time.perf_counter() - started)
    for data in stages:
        stage_started = time.perf_counter()
        train, sources = encode_split(data, "train", tokenizer, cfg)
        eval_rows, _ = encode_split(data, "eval", tokenizer, cfg)
        encoded = time.perf_counter()
        weights = {str(i): s.weight for i, s in enumerate(data.spec.sources)}
        train, weight_counts = weighted_rows(train, sources, weights, data.stage, params.seed)
        data.counts.update(weight_counts)
        replayed = replay_rows(data.stage, train, own_train, data.spec.replay_share, params.seed)
        own_train.append(train)
        train = train + replayed
        packing = None
        if cfg.packing.enabled:
            packed, stats = build_packed_rows(train, cfg.packing.row_length or cfg.max_length, tokenizer.pad_token_id or 0)
            write_rows(packed, packed_schema(), paths.packed_file(data.stage))
            packing = stats.to_json()
        write_split(train, paths.prepared_file(data.stage, "train"))
        write_split(eval_rows, paths.prepared_file(data.stage, "eval"))
        rejects = _ingest_rejects(data.stage) + [r.to_json() | {"step": "prepare"} for r in data.rejects]
        write_jsonl(paths.prepared_rejects(data.stage), rejects)
        report[data.stage] = stage_report(data, train, eval_rows, len(replayed), packing)
        log.info("prepare: %s: encoded %d rows in %.1f s, mixed, packed and wrote them in %.1f s", data.stage,
                 len(train) + len(eval_rows), encoded - stage_started, time.perf_counter() - encoded)
        results.append(PreparedStage(data.stage, len(train) - len(replayed), len(eval_rows), len(rejects),
                                     len(replayed), packing and packing["efficiency"]))
    write_json(paths.DATA_REPORT, report)
    log.info("prepare: %d stages in %.1f s", len(stages), time.perf_counter() - started)
    return results


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(params: Params) -> list[PreparedStage]:
    """Clean, dedupe, decontaminate, tokenize, split, mix and pack every stage's data."""
    return prepare_all(params)


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        return [
            f"prepare: {r.stage}: {r.n_train} train (+{r.n_replayed} replayed), {r.n_eval} eval, "
            f"{r.n_rejected} rejected or changed"
            + (f", packed {r.packing_efficiency:.1%} full" if r.packing_efficiency is not None else "")
            for r in prepare_all(load_params(args.params))
        ]

    return run_stage_cli("prepare", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
