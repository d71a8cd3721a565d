"""Record I/O shared by the steps: JSONL read/write, stage-record validation, content hashes.

A stage's records are `{"text": ...}` (kind `pretrain`) or `{"messages": [...]}` (kind `sft`).
Errors name the file, the 1-based line and the field, so a user can fix their source file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from json.encoder import encode_basestring as _encode_string
from pathlib import Path
from typing import Any, Literal

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A JSONL file or one of its records is malformed; the message says where and why.

    `reason` is a short stable key ("missing_field", "wrong_type", ...) that the data report counts.
    """

    def __init__(self, message: str, reason: str = "invalid_record") -> None:
        super().__init__(message)
        self.reason = reason


def _numbered_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; blank lines are skipped, not counted as records."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path} line {lineno}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise RecordError(
                    f"{path} line {lineno}: expected a JSON object ({{...}}), found {type(obj).__name__}"
                )
            yield lineno, obj


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """The objects of a JSONL file one at a time (a step that keeps only what it makes of them)."""
    return (obj for _, obj in _numbered_objects(Path(path)))


def read_jsonl(path: str | Path) -> list[dict]:
    """All objects in a JSONL file; RecordError on the first bad line."""
    return list(iter_jsonl(path))


def _fail(where: str, field: str, problem: str, reason: str) -> RecordError:
    return RecordError(f"{where}, field {field}: {problem}", reason)


def check_record(rec: dict, kind: Literal["pretrain", "sft"], where: str) -> dict:
    """The record reduced to its training content, or RecordError naming `where` and the field."""
    if kind == "pretrain":
        text = rec.get("text")
        if text is None:
            raise _fail(where, "text", f'missing: pretrain records are {{"text": "..."}}, found keys {sorted(rec)}', "missing_field")
        if not isinstance(text, str):
            raise _fail(where, "text", f"expected a string, found {type(text).__name__}", "wrong_type")
        if not text.strip():
            raise _fail(where, "text", "empty: give the raw text to train on", "empty_text")
        return {"text": text}
    if kind != "sft":
        raise ValueError(f"unknown record kind {kind!r}: expected pretrain or sft")

    messages = rec.get("messages")
    if messages is None:
        raise _fail(
            where, "messages",
            f'missing: sft records are {{"messages": [{{"role": ..., "content": ...}}, ...]}}, found keys {sorted(rec)}',
            "missing_field",
        )
    if not isinstance(messages, list) or not messages:
        raise _fail(where, "messages", "expected a non-empty list of {role, content} objects", "wrong_type")
    clean = []
    for i, msg in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _fail(where, field, f"expected an object with role and content, found {type(msg).__name__}", "wrong_type")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise _fail(where, f"{field}.role", f"expected one of {'/'.join(ROLES)}, found {role!r}", "bad_role")
        if not isinstance(content, str):
            found = "nothing" if content is None else type(content).__name__
            raise _fail(where, f"{field}.content", f"expected a string, found {found}", "wrong_type")
        if role != "system" and not content.strip():
            raise _fail(where, f"{field}.content", f"empty {role} message", "empty_text")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in clean):
        raise _fail(where, "messages", "no user message: a conversation needs at least one", "no_user_turn")
    _check_turn_order(clean, where)
    last = len(clean) - 1
    if clean[last]["role"] != "assistant":
        raise _fail(
            where, f"messages[{last}].role",
            f"the last message must be the assistant reply to train on, found {clean[last]['role']!r}",
            "no_assistant_turn",
        )
    return {"messages": clean}


def _check_turn_order(messages: list[dict], where: str) -> None:
    """An optional system message first, then user and assistant turns in turn (what `validate`
    checks on every row): a break is a RecordError at the turn that breaks it, here, where the
    file and line are known, not a failed stage later."""
    expected = "user"
    for i, m in enumerate(messages):
        if i == 0 and m["role"] == "system":
            continue
        if m["role"] != expected:
            previous = messages[i - 1]["role"] if i else "the start"
            raise _fail(where, f"messages[{i}].role",
                        f"{m['role']!r} after {previous!r}: turns must alternate user/assistant after an optional "
                        "first system message; merge the consecutive turns, or drop the record", "bad_turn_order")
        expected = "assistant" if expected == "user" else "user"


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """One canonical JSON object per line, so the same records always give the same bytes (and DVC hash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        for rec in records:
            handle.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a crash mid-write never leaves a half file for the next stage


def canonical_json(record: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: equal content, equal string."""
    return _canonical_stage_record(record) or json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _canonical_stage_record(record: Any) -> str | None:
    """`canonical_json` of a stage record ({"text"} or {"messages": [{role, content}...]}) spelt out
    with the string encoder `json.dumps(ensure_ascii=False)` itself uses, without its per-call
    set-up; None for any other shape."""
    if type(record) is not dict or len(record) != 1:
        return None
    text = record.get("text")
    if type(text) is str:
        return '{"text":' + _encode_string(text) + "}"
    messages = record.get("messages")
    if type(messages) is not list:
        return None
    parts = []
    for message in messages:
        plain = plain_message(message)
        if plain is None:
            return None
        role, content = plain
        parts.append('{"content":' + _encode_string(content) + ',"role":' + _encode_string(role) + "}")
    return '{"messages":[' + ",".join(parts) + "]}"


def plain_message(message: Any) -> tuple[str, str] | None:
    """(role, content) when `message` is exactly {role, content} with string values, else None:
    the one shape the fast paths (canonical JSON here, chat skeletons) handle."""
    if type(message) is not dict or len(message) != 2:
        return None
    role, content = message.get("role"), message.get("content")
    if type(role) is not str or type(content) is not str:
        return None
    return role, content


def content_hash(record: Any) -> str:
    """sha256 hex of the canonical JSON: equal content, equal hash, whatever the key order."""
    return hashlib.sha256(canonical_json(record).encode("utf-8")).hexdigest()


def write_json(path: str | Path, payload: Any) -> None:
    """A report or metrics file: sorted keys and a fixed layout, so identical content hashes the
    same for DVC."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def split_of(digest: str, eval_fraction: float) -> str:
    """Deterministic split from the content hash: the same record always lands in the same split
    (`prepare` splits by it, and `base` pretrains the tiny model on the train side only)."""
    return "eval" if int(digest[:12], 16) / 16**12 < eval_fraction else "train"
