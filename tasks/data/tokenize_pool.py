"""Tokenizing records in background threads, so the Rust tokenizer (which runs without the GIL)
overlaps the Python work of `prepare`: cleaning the next stage, building the previous one's rows.

Jobs run earliest stage first, so a stage's rows can be built as soon as its own batches are done.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.core.chat import (
    ENCODE_BATCH,
    ChatRenderer,
    ChatTemplateError,
    Rendered,
    TokenBatch,
    tokenize_rendered,
    tokenize_texts,
)

if TYPE_CHECKING:
    from tasks.data.rows import Record

# Where a record's tokens are: its batch, its index in the batch, and the [start, end) of its tokens
# in the batch's arrays.
Located = tuple[TokenBatch, int, int, int]


@dataclass(frozen=True)
class EncodedRecords:
    """A stage's records as tokens: each record's rows, and the multi-turn policy chats were
    encoded with (`prepare.multi_turn` resolved; None when the stage has no chats)."""

    rows: dict[int, list[Located]]  # record id -> where its rows' tokens are, in `row_ends` order
    multi_turn: str | None = None


def render_records(renderer: ChatRenderer, records: list[Record], policy: str) -> tuple[list[Rendered], list[int] | None]:
    """Every row of each chat record under `policy`, and how many rows each record gave (None:
    one each, as single_render gives); a template error names the record it happened in."""
    rendered: list[Rendered] = []
    counts: list[int] = []
    i = 0
    try:
        if policy == "single_render":  # the hot path: one row per record, nothing to count
            spans = renderer.spans
            for i, record in enumerate(records):
                rendered.append(spans(record.content["messages"]))
            return rendered, None
        for i, record in enumerate(records):
            rows = renderer.rows(record.content["messages"], policy)
            rendered += rows
            counts.append(len(rows))
    except ChatTemplateError as exc:
        raise exc.at(f"{records[i].uri} {records[i].where}".strip()) from None
    return rendered, counts


class StageFirstPool:
    """Worker threads running queued jobs earliest stage first, not first come, first served.

    A stage's records are queued in two waves: those nothing can drop any more, then the few that
    waited for decontamination. Running an earlier stage's second wave before later stages' first
    lets its rows be built and written while those tokenize, instead of all at the end.

    Two workers by default: while one turns a finished batch into arrays (Python, GIL), the
    other's batch keeps the Rust tokenizer's threads busy.
    """

    def __init__(self, name: str, workers: int = 2) -> None:
        self._queue: list = []  # heap of (stage, arrival, future, fn, args)
        self._ready = threading.Condition()
        self._closed = False
        self._arrivals = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, stage: int, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("submit after shutdown")
            heapq.heappush(self._queue, (stage, next(self._arrivals), future, fn, args))
            self._ready.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                _, _, future, fn, args = heapq.heappop(self._queue)
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - raised again by whoever waits on it
                    future.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel what has not started, let the running job finish, stop the thread."""
        with self._ready:
            self._closed = True
            for _, _, future, _, _ in self._queue:
                future.cancel()
            self._queue.clear()
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()


class Encoder:
    """Tokenizes records in a background thread.

    Chat templates are rendered in the caller's thread (Python); the pool tokenizes, which the
    Rust tokenizer does without the GIL, so tokenizing one batch overlaps rendering the next and
    whatever the caller does meanwhile (cleaning the next stage, building the previous one's rows).

    Chats become rows under `multi_turn` (`prepare.multi_turn`), resolved against the template at
    the first chat: `auto` probes whether it is prefix-consistent.
    """

    def __init__(self, tokenizer, pool: StageFirstPool, multi_turn: str = "auto") -> None:
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer)
        self.pool = pool
        self.requested_multi_turn = multi_turn
        self._multi_turn: str | None = None
        # per stage: batches of (tokens, their records, rows per record; None: one each)
        self._jobs: dict[str, list[tuple[Future, list[Record], list[int] | None]]] = {}
        self._stage_order: dict[str, int] = {}
        self._policies: dict[str, str] = {}  # stage -> the policy its chats were encoded with

    @property
    def multi_turn(self) -> str:
        """The multi-turn policy chats are encoded with (the template is probed once, on first use)."""
        if self._multi_turn is None:
            self._multi_turn = self.renderer.multi_turn(self.requested_multi_turn)
        return self._multi_turn

    def start(self, stage: str, kind: str, records: list[Record]) -> None:
        """Queue `records` of `stage`, one batch per ENCODE_BATCH records; stages rank in the
        order they are first started."""
        rank = self._stage_order.setdefault(stage, len(self._stage_order))
        jobs = self._jobs.setdefault(stage, [])
        policy = None if kind == "pretrain" else self._policies.setdefault(stage, self.multi_turn)
        for lo in range(0, len(records), ENCODE_BATCH):
            chunk = records[lo : lo + ENCODE_BATCH]
            if policy is None:
                texts = [r.content["text"] for r in chunk]
                jobs.append((self.pool.submit(rank, tokenize_texts, self.tokenizer, texts), chunk, None))
            else:
                rendered, counts = render_records(self.renderer, chunk, policy)
                jobs.append((self.pool.submit(rank, tokenize_rendered, self.tokenizer, rendered), chunk, counts))

    def finish(self, stage: str) -> EncodedRecords:
        """Where the rows of every record queued for `stage` are (waits for them)."""
        located: dict[int, list[Located]] = {}
        for future, records, counts in self._jobs.pop(stage, []):
            batch = future.result()
            bounds = batch.offsets.tolist()
            places = [(batch, i, bounds[i], bounds[i + 1]) for i in range(len(batch))]
            if counts is None:  # one row per record
                located.update((id(record), [place]) for record, place in zip(records, places, strict=True))
                continue
            rows = iter(places)
            located.update((id(record), list(itertools.islice(rows, n))) for record, n in zip(records, counts, strict=True))
        return EncodedRecords(located, self._policies.pop(stage, None))


def encode_records(tokenizer, kind: str, records: list[Record], multi_turn: str = "auto") -> EncodedRecords:
    """Encoder.start and Encoder.finish in one go, for a caller with nothing to overlap."""
    pool = StageFirstPool("prepare-tokenize")
    try:
        encoder = Encoder(tokenizer, pool, multi_turn)
        encoder.start("", kind, records)
        return encoder.finish("")
    finally:
        pool.shutdown()
