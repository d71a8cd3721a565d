"""`prepare` stage: from each stage's raw records to tokenized, split, packed Parquet.

Per stage, in order:
  clean        Unicode normalisation, control characters, optional PII scrubbing (changes logged)
  dedupe       exact (normalised hash) and near (MinHash LSH) duplicates dropped
  split        train/eval by content hash, so adding records never moves old ones
  decontaminate training records sharing a long n-gram with any stage's eval split or a listed
               benchmark file are dropped
  encode       the model's chat template; loss on every token (`pretrain`) or on assistant replies
               and their end-of-turn marker only (`sft`); a conversation is one row, or one per
               reply where the template rewrites history (`prepare.multi_turn`); every trained
               span is checked against its reply; length limits applied as configured
  mix          source weights, then earlier stages' training rows replayed: a share of the stage's
               trained tokens or of its rows (`prepare.replay_unit`)
  pack         best-fit-decreasing rows of `packing.row_length` tokens (position ids reset per record)

Everything dropped or changed goes to `data/prepared/<stage>/rejects.jsonl` (ingest's rejects are
copied in first), and the counts per reason to `metrics/data.json`.

Records are tokenized in a background thread as soon as nothing can drop them any more (the Rust
tokenizer runs without the GIL, so it overlaps cleaning, dedupe and building rows here), rows are
kept as columns, and Parquet is written by another thread. None of that changes the outputs.

    python -m tasks.prepare [--params params.yaml]
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.core import paths
from tasks.core.chat import IGNORE_INDEX, ChatTemplateError, Encoded, row_ends
from tasks.core.cli import exit_now, run_stage_cli
from tasks.core.config import Params, PrepareConfig, StageSpec, load_params
from tasks.core.heap import release_free_memory
from tasks.core.records import (
    canonical_json,
    iter_jsonl,
    read_jsonl,
    split_of,
    write_json,
    write_jsonl,
)
from tasks.data.clean import PII_REASONS
from tasks.data.control_tokens import CONTROL_TOKEN, ControlTokens
from tasks.data.control_tokens import describe as describe_control
from tasks.data.errors import MAX_REJECT_RECORD_CHARS, Reject
from tasks.data.rows import ROW_LISTS, Record, Rows, concat_arrays, packed_schema, packed_table, prepared_schema, write_rows, write_table  # noqa: F401 - re-exported
from tasks.data.tokenize_pool import EncodedRecords, Encoder, Located, StageFirstPool, encode_records

if TYPE_CHECKING:
    from tasks.data.decontaminate import NgramIndex

log = logging.getLogger(__name__)


@dataclass
class StageData:
    """A stage between the phases of prepare, with everything it lost on the way."""

    stage: str
    spec: StageSpec
    train: list[Record] = field(default_factory=list)
    eval: list[Record] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # "dropped.<reason>", "changed.<reason>", ...

    def reject(self, record: Record, reason: str, detail: str, action: str = "dropped", shown: Any = None) -> None:
        """`shown`: what the entry holds instead of the record's content (a part of a huge one)."""
        stored = record.content if shown is None else shown
        self.rejects.append(Reject(record.uri, record.where, reason, detail, stored, action))  # type: ignore[arg-type]
        self.counts[f"{action}.{reason}"] += 1


@dataclass(frozen=True)
class PreparedStage:
    stage: str
    n_train: int
    n_eval: int
    n_rejected: int
    n_replayed: int = 0
    packing_efficiency: float | None = None
    replayed_token_share: float = 0.0  # of the trained tokens in the stage's training rows


# --- clean, dedupe, split -----------------------------------------------------------------------


def clean_records(stage: str, spec: StageSpec, raw: Iterable[dict], cfg: PrepareConfig,
                  control: ControlTokens | None = None) -> tuple[StageData, list[Record]]:
    """Every record cleaned (changes logged) and hashed, in input order, before dedupe; one holding
    the text of one of `control`'s special tokens is rejected or stripped (`prepare.control_tokens`)."""
    from tasks.data.clean import final_content, record_chars, record_text

    data = StageData(stage, spec)
    kept: list[Record] = []
    for obj in raw:
        origin = obj.get("origin") or {}
        record = Record({k: v for k, v in obj.items() if k != "origin"}, origin)
        if (size := record_chars(record.content)) > cfg.max_record_chars:
            reject_too_large(data, record, size, cfg)
            continue
        cleaned, reasons = final_content(record.content, cfg.clean)
        if cleaned != record.content:
            scrubbed = sorted(r for r in reasons if r in PII_REASONS)
            if scrubbed:  # the original must not reach a file: the entry shows the scrubbed record
                record.content = cleaned
                detail = (f"scrubbed ({', '.join(scrubbed)}); the record below is the scrubbed one, as kept in the "
                          f"training data; the original is at {record.uri} {record.where}")
            else:
                detail = "cleaned; the record below is the original, the cleaned one is in the training data"
            data.reject(record, ",".join(reasons), detail, "changed")
            record.content = cleaned
        elif reasons:  # reported but left as is (e.g. U+FFFD: the original character is unknowable)
            data.counts.update(f"flagged.{r}" for r in reasons)
        record.plain_text = record_text(record.content)  # type: ignore[misc] - fills the cached property
        # = content_hash(record.content), the hash tasks/data/split.py decides the split by
        record.digest = hashlib.sha256(canonical_json(record.content).encode("utf-8")).hexdigest()
        if control is not None and (hits := control.found(record.content)):
            if cfg.control_tokens == "reject":
                data.reject(record, CONTROL_TOKEN, describe_control(hits, "reject"))
                continue
            data.reject(record, CONTROL_TOKEN, describe_control(hits, "strip"), "changed")
            # The digest stays the cleaned record's: `base` decided its split on that (split.py).
            record.content = control.stripped(record.content)
            record.plain_text = record_text(record.content)  # type: ignore[misc]
        kept.append(record)
    return data, kept


def reject_too_large(data: StageData, record: Record, size: int, cfg: PrepareConfig) -> None:
    """A `too_large` reject: its entry holds the record's first characters (scrubbed when
    `clean.scrub_pii` is on), not a copy of the whole record; the origin says where the rest is."""
    from tasks.data.clean import record_text, scrub_value

    head = record_text(record.content)[:MAX_REJECT_RECORD_CHARS]
    detail = (f"{size:,} characters, over prepare.max_record_chars={cfg.max_record_chars:,}: cut the document "
              f"into smaller records (the text preset's `split: paragraphs` with `max_chars`) or raise the limit; "
              f"the entry shows its first {len(head):,} characters, the whole record is at {record.uri} {record.where}")
    data.reject(record, "too_large", detail, shown=scrub_value(head) if cfg.clean.scrub_pii else head)


def dedupe_and_split(data: StageData, records: list[Record], cfg: PrepareConfig, seed: int) -> None:
    """Drop duplicates (first occurrence kept) and split the rest by content hash."""
    from tasks.data.dedupe import find_duplicates

    duplicates = find_duplicates([r.plain_text for r in records], cfg.dedupe, seed)
    for index, record in enumerate(records):
        if index in duplicates:
            reason, original = duplicates[index]
            data.reject(record, reason, f"duplicate of {records[original].uri} {records[original].where}")
            continue
        (data.eval if split_of(record.digest, cfg.eval_fraction) == "eval" else data.train).append(record)


def clean_and_split(stage: str, spec: StageSpec, raw: list[dict], cfg: PrepareConfig, seed: int) -> StageData:
    """Clean every record, drop duplicates, and split the rest by content hash."""
    data, records = clean_records(stage, spec, raw, cfg)
    dedupe_and_split(data, records, cfg, seed)
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


def benchmark_set_texts(cfg: PrepareConfig) -> list[str]:
    return [text for path in cfg.decontaminate.benchmark_files for text in benchmark_texts(path)]


def decontaminate(stages: list[StageData], cfg: PrepareConfig, benchmarks: list[str] | None = None,
                  suspects: list[set[int]] | None = None) -> None:
    """Drop training records sharing an n-gram with any stage's eval split or a benchmark file.

    `benchmarks`: the benchmark files' texts, when already read. `suspects`: per stage, the ids of
    the only training records that can be contaminated (see `contamination_screen`); None: all.
    """
    from tasks.data.decontaminate import NgramIndex

    dcfg = cfg.decontaminate
    if not dcfg.enabled:
        return
    held_out = [r.plain_text for data in stages for r in data.eval]
    held_out += benchmark_set_texts(cfg) if benchmarks is None else benchmarks
    index = NgramIndex.build(held_out, dcfg.ngram)
    for i, data in enumerate(stages):
        checked = [j for j, r in enumerate(data.train) if suspects is None or id(r) in suspects[i]]
        found = index.first_hits([data.train[j].plain_text for j in checked])
        hits = {checked[k]: ngram for k, ngram in found.items()}
        for j, record in enumerate(data.train):
            if j in hits:
                data.reject(record, "contaminated", f"shares the {dcfg.ngram}-gram {hits[j]!r} with held-out text")
        data.train = [r for j, r in enumerate(data.train) if j not in hits]


def contamination_screen(cleaned: list[tuple[StageData, list[Record]]], cfg: PrepareConfig,
                         benchmarks: list[str]) -> NgramIndex | None:
    """An n-gram index over every record that can end up in an eval split (each whose hash says
    eval, before dedupe) and the benchmarks: a superset of what `decontaminate` will index.

    A training record with no n-gram in it cannot be contaminated, so it can be tokenized before
    every stage is deduplicated; only the few that hit wait for `decontaminate`. None when
    decontamination is off.
    """
    from tasks.data.decontaminate import NgramIndex

    if not cfg.decontaminate.enabled:
        return None
    texts = [r.plain_text for _, records in cleaned for r in records if split_of(r.digest, cfg.eval_fraction) == "eval"]
    return NgramIndex.build(texts + benchmarks, cfg.decontaminate.ngram)


# --- encode ---------------------------------------------------------------------------------------

def _piece_bounds(n: int, trains: Callable[[int, int], bool], kind: str,
                  cfg: PrepareConfig) -> tuple[list[tuple[int, int]], str | None]:
    """The length policy on a record of n tokens: the [start, end) pieces to keep, and the note
    (None, "split", "truncated" or "too_long"). `trains(a, b)`: whether tokens a..b hold a label."""
    limit = cfg.max_length
    if n <= limit:
        return [(0, n)], None
    policy = cfg.pretrain_overflow if kind == "pretrain" else cfg.chat_overflow
    if policy == "drop":
        return [], "too_long"
    if policy == "truncate":
        return ([(0, limit)], "truncated") if trains(0, limit) else ([], "too_long")
    pieces = -(-n // limit)  # equal-size pieces: a long document never leaves a stub at its end
    bounds = [i * n // pieces for i in range(pieces + 1)]
    return list(zip(bounds, bounds[1:])), "split"


def _fit(enc: Encoded, kind: str, cfg: PrepareConfig) -> tuple[list[Encoded], str | None]:
    """Apply the length policy: the pieces to keep, or the reject reason."""
    bounds, note = _piece_bounds(len(enc.input_ids), lambda a, b: Encoded([], enc.labels[a:b]).n_trainable > 0, kind, cfg)
    if note is None:
        return [enc], None
    return [Encoded(enc.input_ids[a:b], enc.labels[a:b]) for a, b in bounds], note


def _decode(tokenizer, ids: np.ndarray) -> str:
    # A numpy array, not a list: `decode` turns it into a list with one `tolist`, where a list is
    # first checked element by element (most of the cost of decoding a long piece).
    return tokenizer.decode(ids)


def _trains(labels: np.ndarray, start: int, a: int, b: int) -> bool:
    return bool((labels[start + a : start + b] != IGNORE_INDEX).any())


def _row_fields(record: Record, split: str, stage: str, upto: int | None = None) -> dict[str, Any]:
    """The columns a record gives each of its rows, apart from tokens, hash and text. `upto`: the
    row holds only the first `upto` messages (a row per reply): its conversation, roles and reply
    are those, so evaluation scores each reply once, from the history it was trained after."""
    messages = record.content.get("messages") or []
    record_json: dict = record.content  # written as its canonical JSON (Rows.column)
    if upto is not None and upto < len(messages):
        messages = messages[:upto]
        record_json = record.content | {"messages": messages}
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return {
        "split": split,
        "record_json": record_json,
        "source_stage": stage,
        "roles": ",".join(m["role"] for m in messages),
        "last_reply": replies[-1] if replies else "",
        "origin": f"{record.uri} {record.where}".strip(),
        "source": str(record.origin.get("source", "")),
    }


def split_rows(data: StageData, split: str, tokenizer, cfg: PrepareConfig,
               encoded: EncodedRecords | None = None) -> Rows:
    """Rows of one split after the length policy; drops go to the stage's rejects.

    `encoded` (from `Encoder.finish`) saves tokenizing again. A chat gives one row, or one per
    reply (`prepare.multi_turn`); a row that trains on nothing is rejected, never written.
    """
    records = data.train if split == "train" else data.eval
    kind = data.spec.kind
    encoded = encode_records(tokenizer, kind, records, cfg.multi_turn) if encoded is None else encoded
    pieces: list[Located] = []
    columns: dict[str, list[Any]] = {name: [] for name in ROW_LISTS}
    chats = kind != "pretrain"
    whole_records = not chats or encoded.multi_turn in (None, "single_render")  # one row per record, all of it
    for record in records:
        places = encoded.rows[id(record)]
        ends: Sequence[int | None] = (None,) if whole_records else row_ends(record.content["messages"], encoded.multi_turn)
        if not places:
            data.reject(record, "nothing_to_train", f"no assistant reply to train on under prepare.multi_turn={encoded.multi_turn}")
        for turn, ((batch, index, start, end), upto) in enumerate(zip(places, ends, strict=True), 1):
            # rows of one record, one per reply: told apart by the reply's number
            digest, reply = (record.digest, "") if len(places) == 1 else (f"{record.digest}#{turn}", f"assistant reply {turn}: ")
            n = end - start
            if chats and not batch.n_trained[index]:
                data.reject(record, "nothing_to_train", f"{reply}no token is trained on: the chat template renders "
                            "no assistant text for it")
                continue
            bounds, note = _piece_bounds(n, functools.partial(_trains, batch.labels, start), kind, cfg)
            if note in ("too_long", "truncated"):
                action = "dropped" if note == "too_long" else "changed"
                data.reject(record, note, f"{reply}{n} tokens, over prepare.max_length={cfg.max_length}", action)
            elif note == "split":
                data.counts["split_into_rows"] += 1
            bounds = [(a, b) for a, b in bounds if b - a >= cfg.min_tokens]
            if not bounds and note != "too_long":
                data.reject(record, "too_short", f"{reply}{n} tokens, under prepare.min_tokens={cfg.min_tokens}")
                continue
            whole = len(bounds) == 1 and note is None
            fields = _row_fields(record, split, data.stage, upto)
            # A document split into rows: each row's record is its own piece. The whole document in
            # every row made a long one cost its length squared (a 5 MB line: tens of GB).
            pieces_own_record = len(bounds) > 1 and not chats
            for part, (a, b) in enumerate(bounds):
                pieces.append((batch, index, start + a, start + b))
                columns["content_hash"].append(digest if whole else f"{digest}:{part}")
                text = batch.texts[index] if whole else _decode(tokenizer, batch.input_ids[start + a : start + b])
                columns["text"].append(text)
                for name, value in fields.items():
                    columns[name].append({"text": text} if pieces_own_record and name == "record_json" else value)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([b - a for _, _, a, b in pieces], out=offsets[1:])
    return Rows(concat_arrays([batch.input_ids[a:b] for batch, _, a, b in pieces]),
                concat_arrays([batch.labels[a:b] for batch, _, a, b in pieces]), offsets, **columns)


def encode_split(data: StageData, split: str, tokenizer, cfg: PrepareConfig) -> tuple[list[dict], list[str]]:
    """`split_rows` as one dict per row, and each row's source (for mixture weights)."""
    rows = split_rows(data, split, tokenizer, cfg)
    return rows.to_dicts(), rows.source


# --- rows -----------------------------------------------------------------------------------------

# The written columns that are one string per row, in `prepared_schema` order.
def weight_plan(sources: list[str], weights: dict[str, float], stage: str, seed: int) -> tuple[list[tuple[int, int]], Counter]:
    """Each source's mixture weight applied to its training rows: w=2.5 keeps every row twice plus
    half of them once more. The (row index, copy number) of each row of the mix, and the counts."""
    by_source: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        by_source.setdefault(source, []).append(index)
    plan: list[tuple[int, int]] = []
    counts: Counter = Counter()
    for source, group in by_source.items():
        weight = weights.get(source, 1.0)
        whole, frac = int(weight), weight - int(weight)
        rng = random.Random(f"{seed}:weight:{stage}:{source}")
        picked = sorted(rng.sample(range(len(group)), round(len(group) * frac))) if frac else []
        copies = [group] * whole + [[group[i] for i in picked]]
        for k, chunk in enumerate(c for c in copies if c):
            plan += [(index, k) for index in chunk]
        if change := sum(map(len, copies)) - len(group):
            counts["weight_added" if change > 0 else "weight_dropped"] += abs(change)
    return plan, counts


def weighted_rows(rows: list[dict], sources: list[str], weights: dict[str, float], stage: str, seed: int) -> tuple[list[dict], Counter]:
    """`weight_plan` on row dicts; copies get their own content_hash suffix (`~k`) so duplicates
    stay detectable."""
    plan, counts = weight_plan(sources, weights, stage, seed)
    return [rows[i] if k == 0 else rows[i] | {"content_hash": f"{rows[i]['content_hash']}~{k}"} for i, k in plan], counts


def weight_rows(rows: Rows, weights: dict[str, float], stage: str, seed: int) -> tuple[Rows, Counter]:
    """`weighted_rows` on columns."""
    plan, counts = weight_plan(rows.source, weights, stage, seed)
    if len(plan) == len(rows) and all(i == j and k == 0 for j, (i, k) in enumerate(plan)):
        return rows, counts  # every weight 1 and the sources already grouped: nothing moves
    mixed = rows.take([i for i, _ in plan])
    return mixed.with_hashes([h if k == 0 else f"{h}~{k}" for h, (_, k) in zip(mixed.content_hash, plan)]), counts


def replay_weights(sizes: Sequence[int], weights: Sequence[float] | None) -> dict[int, float]:
    """Earlier stage (by position) -> its weight in the replay, for the stages that have rows and
    a weight: `weights` (`replay_from`), or 1 each."""
    weights = weights if weights is not None else [1.0] * len(sizes)
    return {i: float(weights[i]) for i, n in enumerate(sizes) if n and weights[i]}


def replay_plan(stage: str, n_own: int, sizes: list[int], share: float, seed: int, balance: str = "row",
                weights: Sequence[float] | None = None) -> list[int]:
    """Positions in the pool of earlier stages' training rows (stage after stage, `sizes` rows each)
    to replay so that `share` of the mix is replay. `row`: drawn from the pooled rows, so each
    earlier stage gives in proportion to its size; `stage`: each earlier stage gives an equal part
    (a large pretraining corpus then no longer crowds out the SFT stages it sits beside); `weights`
    (one per earlier stage, `replay_from`): each gives that part."""
    wanted = round(n_own * share / (1 - share)) if share else 0
    pool_size = sum(sizes)
    if not pool_size or not wanted:
        return []
    if balance == "row" and weights is None:
        rng = random.Random(f"{seed}:replay:{stage}")
        return rng.sample(range(pool_size), min(wanted, pool_size))  # the positions sample(pool, k) takes
    parts = replay_weights(sizes, weights)
    total = sum(parts.values())
    quotas = {i: int(wanted * weight / total) for i, weight in parts.items()}  # exact for equal weights
    left = wanted - sum(quotas.values())
    for k, i in enumerate(quotas):  # what flooring left: a row more to each of the first stages
        quotas[i] += k < left
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    positions = []
    for i, quota in quotas.items():
        rng = random.Random(f"{seed}:replay:{stage}:{i}")
        positions += [starts[i] + j for j in rng.sample(range(sizes[i]), min(quota, sizes[i]))]
    return positions


def token_replay_plan(stage: str, own_tokens: int, earlier: Sequence[np.ndarray], share: float, seed: int,
                      balance: str = "row", weights: Sequence[float] | None = None) -> list[int]:
    """`replay_plan` with the share counted in trainable tokens (`prepare.replay_unit: tokens`):
    `earlier` holds each earlier stage's trainable tokens per row, and rows are taken in a seeded
    order until the replay holds `share` of the mix's trainable tokens (the row that reaches it
    included). Counted in rows, a pretraining stage's replay (every token trained) can hold more of
    an SFT stage's trained tokens than its own replies do, and dilute the lesson it is there to keep."""
    wanted = own_tokens * share / (1 - share) if share else 0.0
    starts = np.cumsum([0] + [len(tokens) for tokens in earlier])
    if not wanted or not starts[-1]:
        return []
    if balance == "row" and weights is None:
        groups = [(np.concatenate(list(earlier)), 0, wanted, f"{seed}:replay:{stage}")]
    else:
        parts = replay_weights([len(tokens) for tokens in earlier], weights)
        total = sum(parts.values())
        groups = [(earlier[i], int(starts[i]), wanted * weight / total, f"{seed}:replay:{stage}:{i}")
                  for i, weight in parts.items()]
    positions = []
    for tokens, start, quota, key in groups:
        order = list(range(len(tokens)))
        random.Random(key).shuffle(order)
        reached = int(np.searchsorted(np.cumsum(tokens[order]), quota))  # the first row at or past the quota
        positions += [start + i for i in order[:reached + 1]]
    return positions


def replay_positions(stage: str, own: Rows, earlier: dict[str, Rows], spec: StageSpec, seed: int,
                     cfg: PrepareConfig) -> list[int]:
    """Positions in the earlier stages' training rows (in curriculum order, pooled) to replay into
    `stage`: `replay_share` of its rows or of its trained tokens, as `prepare.replay_unit` says,
    from the stages `replay_from` names (all of them when it names none)."""
    share, named = spec.data.replay_share, spec.data.replay_from
    weights = [named.get(name, 0.0) for name in earlier] if named else None
    if cfg.replay_unit == "tokens":
        return token_replay_plan(stage, int(own.n_trainable.sum()), [rows.n_trainable for rows in earlier.values()],
                                 share, seed, cfg.replay_balance, weights)
    return replay_plan(stage, len(own), [len(rows) for rows in earlier.values()], share, seed, cfg.replay_balance,
                       weights)


def replay_rows(stage: str, own: list[dict], earlier: list[list[dict]], share: float, seed: int,
                balance: str = "row") -> list[dict]:
    """Rows sampled from earlier stages' training data so that `share` of the mix is replay."""
    pool = [row for rows in earlier for row in rows]
    return [pool[i] for i in replay_plan(stage, len(own), [len(rows) for rows in earlier], share, seed, balance)]


def mix_rows(stage: str, prepared: dict[str, Rows], weights: dict[str, float], seed: int) -> Rows:
    """`stages.<stage>.data.mix`: the named stages' training rows, each repeated by its weight (2.5:
    every row twice and a seeded half once more), one after another; the trainer shuffles them.
    A row can be in several of them (a later stage replays an earlier one's), so every repeat of a
    record gets its own `~k` hash: the first keeps the record's."""
    parts = []
    for source, weight in weights.items():
        rows = prepared[source]
        plan, _ = weight_plan([source] * len(rows), {source: weight}, f"{stage}:mix", seed)
        parts.append(rows.take([i for i, _ in plan]))
    mixed = Rows.concat(parts)
    seen: Counter = Counter()
    hashes = []
    for content_hash in mixed.content_hash:
        record = content_hash.split("~", 1)[0]
        hashes.append(f"{record}~{seen[record]}" if seen[record] else record)
        seen[record] += 1
    return mixed.with_hashes(hashes)


# --- write ----------------------------------------------------------------------------------------


def pack_rows(train: Rows, row_length: int):
    """Best-fit-decreasing packed rows of a prepared split, as a table, and their stats."""
    from tasks.data.packing import pack_flat

    columns, stats = pack_flat(train.offsets, train.input_ids, train.labels, train.content_hash, row_length)
    return packed_table(columns), stats


def _ingest_rejects(stage: str, scrub: bool) -> list[dict]:
    """ingest's rejects for the stage, their records scrubbed of PII when `scrub` (prepare.clean.scrub_pii):
    a record ingest could not read is still someone's text."""
    from tasks.data.clean import scrub_value

    path = paths.raw_rejects(stage)
    rejects = [r | {"step": "ingest"} for r in read_jsonl(path)] if path.exists() else []
    return [r | {"record": scrub_value(r.get("record"))} for r in rejects] if scrub else rejects


def _ingest_report(stage: str) -> dict:
    path = paths.raw_report(stage)
    return json.loads(path.read_text()) if path.exists() else {}


def stage_report(data: StageData, train: Rows, eval_rows: Rows, replayed: int, packing: dict | None,
                 multi_turn: str | None = None) -> dict:
    """The stage's line in metrics/data.json: what came in, what was lost and why, what goes on,
    and how its chats became rows (`prepare.multi_turn` as resolved; None for raw text)."""
    ingest = _ingest_report(data.stage)
    ingest_counts: Counter = Counter()
    for source in ingest.get("sources", []):
        ingest_counts.update({f"dropped.{k}": v for k, v in source.get("dropped", {}).items()})
        ingest_counts.update({f"repaired.{k}": v for k, v in source.get("repaired", {}).items()})
    own = np.array([stage == data.stage for stage in train.source_stage], dtype=bool)
    tokens, trainable = train.n_tokens, train.n_trainable  # n_trainable sums over every token: once
    return {
        "ingested_records": ingest.get("records"),
        "sources": [{k: s[k] for k in ("path", "preset", "records")} for s in ingest.get("sources", [])],
        "ingest": dict(sorted(ingest_counts.items())),
        "prepare": dict(sorted(data.counts.items())),
        "train_rows": len(train),
        "train_rows_replayed": replayed,
        "eval_rows": len(eval_rows),
        "train_tokens": int(tokens[own].sum()),
        "train_tokens_replayed": int(tokens[~own].sum()),
        "train_trainable_tokens": int(trainable[own].sum()),
        "train_trainable_tokens_replayed": int(trainable[~own].sum()),
        "eval_tokens": int(eval_rows.n_tokens.sum()),
        "packing": packing,
        "multi_turn": multi_turn,
    }


# --- the step -------------------------------------------------------------------------------------


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the step. Prepare holds hundreds of thousands of
    containers (records, messages, rows) for its whole run, and every full collection walks them
    and everything else the process has loaded (torch and transformers, under a flow): about a
    second of a run here. Reference counting still frees everything; nothing here makes cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def clean_split_and_encode(raw_stages: list[tuple[str, StageSpec, Iterable[dict]]], cfg: PrepareConfig, seed: int,
                           encoder: Encoder,
                           control: ControlTokens | None = None) -> list[StageData]:
    """Clean, dedupe, split and decontaminate every stage (what `clean_and_split` and
    `decontaminate` do), handing each record to `encoder` as soon as nothing can drop it any more.
    `control`: the tokenizer's special-token texts, screened for in content (`clean_records`)."""
    cleaned = [clean_records(stage, spec, raw, cfg, control) for stage, spec, raw in raw_stages]
    benchmarks = benchmark_set_texts(cfg) if cfg.decontaminate.enabled else []
    screen = contamination_screen(cleaned, cfg, benchmarks)
    stages, suspects = [], []
    for data, records in cleaned:
        dedupe_and_split(data, records, cfg, seed)
        hits = screen.first_hits([r.plain_text for r in data.train]) if screen is not None else {}
        suspects.append({id(data.train[i]) for i in hits})
        encoder.start(data.stage, data.spec.kind, data.eval + [r for i, r in enumerate(data.train) if i not in hits])
        stages.append(data)
    decontaminate(stages, cfg, benchmarks, suspects)
    for data, suspected in zip(stages, suspects):
        encoder.start(data.stage, data.spec.kind, [r for r in data.train if id(r) in suspected])
    return stages


def prepare_all(params: Params) -> list[PreparedStage]:
    """Every stage's prepared splits, packed rows, rejects and report line."""
    from tasks.core.modeling import BaseInfo, load_tokenizer

    tokenizer = load_tokenizer(BaseInfo.load())
    started = time.perf_counter()
    tokenizing = StageFirstPool("prepare-tokenize")
    writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-write")
    try:
        with _cyclic_gc_paused():
            encoder = Encoder(tokenizer, tokenizing, params.prepare.multi_turn)
            # read as cleaned: a raw object lives only until its record is made
            raw = [(stage, spec, iter_jsonl(paths.raw_file(stage))) for stage, spec in params.stages.items()]
            stages = clean_split_and_encode(raw, params.prepare, params.seed, encoder, ControlTokens.of(tokenizer))
            log.info("prepare: cleaned, deduplicated, split and decontaminated %d stages in %.1f s",
                     len(stages), time.perf_counter() - started)
            release_free_memory()  # the dedupe and n-gram indexes' pages, before the rows are built
            results = finish_stages(stages, encoder, writing, params.prepare, params.seed)
    finally:
        tokenizing.shutdown()
        writing.shutdown()
    log.info("prepare: %d stages in %.1f s", len(stages), time.perf_counter() - started)
    return results


def finish_stages(stages: list[StageData], encoder: Encoder, writing: Executor, cfg: PrepareConfig,
                  seed: int) -> list[PreparedStage]:
    """Per stage, once its tokens are in: length policy, weights, replay, packing, files, report.

    Parquet files are compressed and written in `writing` (pyarrow releases the GIL) while the next
    stage's rows are built here.
    """
    results, report, writes = [], {}, []
    own_train: dict[str, Rows] = {}  # each earlier stage's training rows, before its replay
    mixed_from = {source for data in stages for source in data.spec.data.mix}
    prepared: dict[str, Rows] = {}  # final training rows of the stages a later `mix` names
    for data in stages:
        stage_started = time.perf_counter()
        encoded = encoder.finish(data.stage)
        train = split_rows(data, "train", encoder.tokenizer, cfg, encoded)
        eval_rows = split_rows(data, "eval", encoder.tokenizer, cfg, encoded)
        # The rows hold what is written from here on: the records and their token batches go now,
        # not at the end of the run (on a 200 MB text file, about a third of prepare's peak).
        multi_turn = encoded.multi_turn
        del encoded
        data.train, data.eval = [], []
        release_free_memory()
        encoded_at = time.perf_counter()
        weights = {str(i): s.weight for i, s in enumerate(data.spec.data.sources)}
        train, weight_counts = weight_rows(train, weights, data.stage, seed)
        data.counts.update(weight_counts)
        replay = replay_positions(data.stage, train, own_train, data.spec, seed, cfg)
        replayed = Rows.take_across(list(own_train.values()), replay) if replay else Rows.empty()
        own_train[data.stage] = train
        train = Rows.concat([train, replayed]) if replay else train
        if data.stage in mixed_from:
            prepared[data.stage] = train
        if data.spec.data.mix:
            train = mix_rows(data.stage, prepared, data.spec.data.mix, seed)
            data.counts["mixed_rows"] = len(train)
        packing = None
        if cfg.packing.enabled:
            row_length = cfg.packing.row_length or cfg.max_length
            packed, stats = pack_rows(train, row_length)
            writes.append(writing.submit(write_table, packed, paths.packed_file(data.stage), row_length))
            packing = stats.to_json()
        writes.append(writing.submit(write_rows, train, prepared_schema(), paths.prepared_file(data.stage, "train")))
        writes.append(writing.submit(write_rows, eval_rows, prepared_schema(), paths.prepared_file(data.stage, "eval")))
        rejects = _ingest_rejects(data.stage, cfg.clean.scrub_pii) + [r.to_json() | {"step": "prepare"} for r in data.rejects]
        write_jsonl(paths.prepared_rejects(data.stage), rejects)
        report[data.stage] = stage_report(data, train, eval_rows, len(replayed), packing, multi_turn)
        log.info("prepare: %s: %d rows encoded in %.1f s, mixed and packed in %.1f s (Parquet written in the background)",
                 data.stage, len(train) + len(eval_rows), encoded_at - stage_started, time.perf_counter() - encoded_at)
        line = report[data.stage]
        trained = line["train_trainable_tokens"] + line["train_trainable_tokens_replayed"]
        results.append(PreparedStage(data.stage, len(train) - len(replayed), len(eval_rows), len(rejects),
                                     len(replayed), packing and packing["efficiency"],
                                     line["train_trainable_tokens_replayed"] / trained if trained else 0.0))
    for write in writes:
        write.result()
    write_json(paths.DATA_REPORT, report)
    return results


def check_benchmarks_are_deps(cfg: PrepareConfig, dvc_file: Path = Path("dvc.yaml")) -> None:
    """Fail before any work when a benchmark file is not a dep of `prepare` in dvc.yaml: editing it
    would not re-run prepare, and contaminated training data would stay. (No dvc.yaml: not run by DVC.)"""
    from tasks.core.config import ConfigError
    from tasks.core.dvc_params import undeclared_files

    if not dvc_file.exists() or not cfg.decontaminate.enabled:
        return
    missing = undeclared_files("prepare", cfg.decontaminate.benchmark_files, dvc_file)
    if missing:
        raise ConfigError(
            f"prepare.decontaminate.benchmark_files: {', '.join(missing)} is not a dependency of `prepare` in "
            f"{dvc_file}, so DVC would not re-run prepare when it changes: put benchmark files under "
            f"{paths.BENCHMARKS_DIR}/ (a dependency), or add the path to stages.prepare.deps")
    for uri in (f for f in cfg.decontaminate.benchmark_files if f.startswith("s3://")):
        log.warning("prepare.decontaminate.benchmark_files: %s is read from S3; DVC does not see it change "
                    "(run `dvc repro --force prepare` after updating it)", uri)


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        params = load_params(args.params)
        check_benchmarks_are_deps(params.prepare)
        return [
            f"prepare: {r.stage}: {r.n_train} train (+{r.n_replayed} replayed"
            + (f", {r.replayed_token_share:.0%} of its trained tokens" if r.n_replayed else "") + f"), {r.n_eval} eval, "
            f"{r.n_rejected} rejected or changed"
            + (f", packed {r.packing_efficiency:.1%} full" if r.packing_efficiency is not None else "")
            for r in prepare_all(params)
        ]

    return run_stage_cli("prepare", __doc__, run, argv, expected=(ChatTemplateError,))


if __name__ == "__main__":
    exit_now(main())
