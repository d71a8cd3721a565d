"""What can go wrong with input data, in two kinds.

A `SourceError` stops the `ingest` step: the whole input is unusable (missing, empty, binary,
unreachable). A `Reject` drops or changes one record and is written to the stage's rejects file
with its reason, so nothing disappears without a trace.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Literal

MAX_REJECT_RECORD_CHARS = 2000  # keep the rejects file readable when a "record" is a whole binary blob


class SourceError(ValueError):
    """An input cannot be read at all; the message names it and says what to do."""


@dataclass(frozen=True)
class Reject:
    """One record dropped (or changed) on the way in, and why."""

    source: str  # file path or URI
    where: str  # "line 12", "[3]", "PlayMusic[40]", "byte 1234": enough to find it
    reason: str  # short stable key, counted in the data report: "malformed_json", "missing_field", ...
    detail: str  # the sentence a person reads
    record: Any = None  # the offending item (a string cut to MAX_REJECT_RECORD_CHARS if large)
    action: Literal["dropped", "repaired", "changed"] = "dropped"

    def to_json(self) -> dict[str, Any]:
        # A shallow copy of the fields: the body is serialised straight away, and asdict's deep
        # copy of every rejected record was most of the cost of writing thousands of rejects.
        body = asdict(self) if is_dataclass(self.record) else {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(body["record"], (str, bytes)) and len(body["record"]) > MAX_REJECT_RECORD_CHARS:
            body["record"] = body["record"][:MAX_REJECT_RECORD_CHARS] + "…"
        if isinstance(body["record"], bytes):
            body["record"] = body["record"].decode("utf-8", errors="backslashreplace")
        return body
