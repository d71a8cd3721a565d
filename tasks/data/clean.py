"""Clean record text before dedupe and tokenization: Unicode form, control characters, optional PII.

`clean_text` returns the new text and the reasons it changed (stable keys counted in the data
report), so every change can be written to the rejects file as `changed`. Most text needs nothing:
ASCII text skips normalisation, and each PII pattern runs only when a cheap test (an `@`, a digit
run, a dotted quad) says it could match.

PII patterns aim at what leaks in scraped and chat data without touching arithmetic: a phone
number needs a `+` country code, a US (NANP) shape with consistent separators (`555-123-4567`,
`(555) 123-4567`), or a national trunk prefix `0` with consistent separators (`030 1234567`,
`06 12 34 56 78`), and 8-15 digits in all (9-13 for the national form), so "48/2 = 24", "1,000",
"2024", "3.14" and dates like "01/12/2023" are left alone.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

from tasks.core.config import CleanConfig

# Reasons, in the order they are reported.
UNICODE_NORMALIZED = "unicode_normalized"
CONTROL_CHARS_REMOVED = "control_chars_removed"
REPLACEMENT_CHAR = "replacement_char"  # U+FFFD found (a decoding loss upstream); kept, only reported
PII_EMAIL = "pii_email"
PII_SECRET = "pii_secret"
PII_IP = "pii_ip"
PII_PHONE = "pii_phone"
PII_REASONS = frozenset({PII_EMAIL, PII_SECRET, PII_IP, PII_PHONE})

_NEWLINES = re.compile(r"\r\n?")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # category Cc except \t and \n (\r is handled first)

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_SECRET_TOKENS = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key id
    r"|(?<![\w-])sk-[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"  # GitHub tokens
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
)
_BEARER = re.compile(r"(\b[Bb]earer\s+)[A-Za-z0-9._~+/=-]{16,}")
_LONG_TOKEN = re.compile(r"(?<![\w+/=-])[A-Za-z0-9+/_=-]{32,}(?![\w+/=-])")
_HEX = re.compile(r"[0-9a-fA-F]+")
_UPPER = re.compile(r"[A-Z]")
_LOWER = re.compile(r"[a-z]")
_LOWER_RUN = re.compile(r"[a-z]{4,}")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:]|\.\w)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_NOT_AFTER_NUMBER = r"(?<![\w+.,/-])"  # not inside a word, number, fraction or date
_NOT_BEFORE_NUMBER = r"(?![\w/-]|[.,]\d)"
_PHONE = re.compile(
    _NOT_AFTER_NUMBER
    + r"(?:"
    + r"\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){1,5}"  # +CC, then groups: +44 20 7946 0958, +1 (555) 123-4567
    # US: (555) 123-4567, and bare 555-123-4567 / 555.123.4567 with an area code starting 2-9 as
    # in NANP. Bare "555 123 4567" is left out: "300 400 5000" is a list of numbers as often.
    + r"|(?:1[ .-])?(?:\(\d{3}\) ?\d{3}[ .-]|[2-9]\d{2}([.-])\d{3}\1)\d{4}"
    + r"|0\d{1,4}([ ./-])\d{2,8}(?:\2\d{2,8}){0,3}"  # national: 030 1234567, 06 12 34 56 78
    + r")"
    + _NOT_BEFORE_NUMBER
)
_DIGIT = re.compile(r"\d")
# Cheap necessary conditions, one fast scan each, so the full patterns run on few texts.
_SECRET_HINT = re.compile(r"AKIA|ASIA|sk-|gh[pousr]_|xox")
_LONG_TOKEN_HINT = re.compile(r"[A-Za-z0-9+/_=-]{32}")
_IPV4_HINT = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]?:[0-9A-Fa-f]*:")
_PHONE_HINT = re.compile(r"\d[\d .()/-]{6,}\d")  # every phone match holds 8+ digits and only these separators


def _is_phone(match: re.Match) -> bool:
    digits = len(_DIGIT.findall(match.group()))
    if match.group().startswith("0"):
        return 9 <= digits <= 13
    return 8 <= digits <= 15


def _looks_random(token: str) -> bool:
    """A 32+ character run that reads like a key, not a word, path, identifier or number.

    Hex needs letters and digits. Base64-like needs upper, lower and digits, character entropy of
    4+ bits, and at most a quarter of its characters in lowercase runs of 4+ letters: English
    pieces (`CamelCaseIdentifier2`, `Some_Article_Title_2023`) are mostly such runs, random
    base64 rarely (95% of random 32-character tokens pass, more of longer ones).
    """
    if _HEX.fullmatch(token):
        return any(c.isdigit() for c in token) and any(c.isalpha() for c in token)
    if not (_DIGIT.search(token) and _UPPER.search(token) and _LOWER.search(token)):
        return False
    if sum(map(len, _LOWER_RUN.findall(token))) > 0.25 * len(token):
        return False
    entropy = -sum(n / len(token) * math.log2(n / len(token)) for n in Counter(token).values())
    return entropy >= 4.0


def _not_loopback_or_unspecified(match: re.Match) -> bool:
    # 127.0.0.1 and 0.0.0.0 identify no one, and code samples are full of them.
    address = ipaddress.IPv4Address(match.group())
    return not (address.is_loopback or address.is_unspecified)


def _is_ipv6(match: re.Match) -> bool:
    # "12:30:45" and "a::b" fit the pattern; an address is valid, has 2+ groups and a digit
    # (so "::1" and "::" are kept, like IPv4 loopback).
    text = match.group()
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return sum(1 for g in text.split(":") if g) >= 2 and any(c.isdigit() for c in text)


def _replace(
    pattern: re.Pattern, text: str, placeholder: str, keep: Callable[[re.Match], bool] | None = None
) -> tuple[str, bool]:
    """Substitute matches (those `keep` accepts) with the placeholder; say whether any was."""
    hit = False

    def sub(match: re.Match) -> str:
        nonlocal hit
        if keep is not None and not keep(match):
            return match.group()
        hit = True
        return placeholder

    return pattern.sub(sub, text), hit


def _scrub_secrets(text: str) -> tuple[str, bool]:
    tokens = bearer = long_tokens = False
    if _SECRET_HINT.search(text):
        text, tokens = _replace(_SECRET_TOKENS, text, "<SECRET>")
    if "earer" in text:
        text, n = _BEARER.subn(r"\1<SECRET>", text)
        bearer = n > 0
    if _LONG_TOKEN_HINT.search(text):
        text, long_tokens = _replace(_LONG_TOKEN, text, "<SECRET>", lambda m: _looks_random(m.group()))
    return text, tokens or bearer or long_tokens


def scrub_pii(text: str) -> tuple[str, list[str]]:
    """Replace e-mail addresses, secrets, IP addresses and phone numbers by placeholders.

    E-mail first (a long local part must not be taken for a secret), and phone numbers last, when
    IP addresses and keys that contain digit groups are already placeholders.
    """
    reasons = []
    if "@" in text:
        text, hit = _replace(_EMAIL, text, "<EMAIL>")
        if hit:
            reasons.append(PII_EMAIL)
    text, hit = _scrub_secrets(text)
    if hit:
        reasons.append(PII_SECRET)
    ip = False
    if _IPV6_HINT.search(text):
        text, ip = _replace(_IPV6, text, "<IP>", _is_ipv6)
    if _IPV4_HINT.search(text):
        text, hit = _replace(_IPV4, text, "<IP>", _not_loopback_or_unspecified)
        ip = ip or hit
    if ip:
        reasons.append(PII_IP)
    if _PHONE_HINT.search(text):
        text, hit = _replace(_PHONE, text, "<PHONE>", _is_phone)
        if hit:
            reasons.append(PII_PHONE)
    return text, reasons


def scrub_value(value: Any) -> Any:
    """`scrub_pii` on every string in a JSON-like value (a rejected record of any shape)."""
    if isinstance(value, str):
        return scrub_pii(value)[0]
    if isinstance(value, dict):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_value(v) for v in value]
    return value


def clean_text(text: str, cfg: CleanConfig) -> tuple[str, list[str]]:
    """Cleaned text and why it changed (empty when it did not).

    Control characters go before normalisation, so a combining mark separated from its base by a
    stray control character is composed with it. "\\r\\n" and "\\r" become "\\n". U+FFFD is kept
    (the original bytes are gone) but reported as `replacement_char`: the one reason that does not
    mean the text changed.
    """
    reasons = []
    if cfg.remove_control_chars:
        cleaned = _NEWLINES.sub("\n", text) if "\r" in text else text
        if _CONTROL.search(cleaned):
            cleaned = _CONTROL.sub("", cleaned)
        if cleaned != text:
            reasons.append(CONTROL_CHARS_REMOVED)
            text = cleaned
    if not text.isascii():  # ASCII is already in every normal form and has no U+FFFD
        if cfg.unicode_form != "none" and not unicodedata.is_normalized(cfg.unicode_form, text):
            text = unicodedata.normalize(cfg.unicode_form, text)
            reasons.insert(0, UNICODE_NORMALIZED)
        if "\ufffd" in text:
            reasons.append(REPLACEMENT_CHAR)
    if cfg.scrub_pii:
        text, pii = scrub_pii(text)
        reasons += pii
    return text, reasons


def may_change(text: str, cfg: CleanConfig) -> bool:
    """False when `clean_text` is sure to return `text` as is with no reasons: ASCII, no control
    characters, no PII scrubbing. On `record_text(record)` it answers for the whole record (the
    newline joining its messages is neither), so most records skip `clean_record`."""
    if cfg.scrub_pii or not text.isascii():
        return True
    return cfg.remove_control_chars and ("\r" in text or _CONTROL.search(text) is not None)


def clean_record(record: dict, cfg: CleanConfig) -> tuple[dict, list[str]]:
    """The record with its `text`, or every message's `content`, cleaned; reasons de-duplicated, sorted.

    The input record is not modified; an unchanged record is returned as is.
    """
    if isinstance(record.get("text"), str):
        text, reasons = clean_text(record["text"], cfg)
        return ({**record, "text": text} if text != record["text"] else record), sorted(set(reasons))
    messages = record.get("messages")
    if not isinstance(messages, list):
        return record, []
    all_reasons: set[str] = set()
    cleaned = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            new, reasons = clean_text(content, cfg)
            all_reasons.update(reasons)
            if new != content:
                message = {**message, "content": new}
        cleaned.append(message)
    changed = any(a is not b for a, b in zip(cleaned, messages, strict=True))
    return ({**record, "messages": cleaned} if changed else record), sorted(all_reasons)


def final_content(record: dict, cfg: CleanConfig) -> tuple[dict, list[str]]:
    """The record as the pipeline keeps it, and why it changed: `clean_record`, skipped when
    `may_change` says cleaning cannot touch it. The train/eval split hashes this content."""
    if not may_change(record_text(record), cfg):
        return record, []
    return clean_record(record, cfg)


def record_chars(record: dict) -> int:
    """`len(record_text(record))` less the newlines between messages, without joining them."""
    if isinstance(record.get("text"), str):
        return len(record["text"])
    messages = record.get("messages") or []
    return sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))


def record_text(record: dict) -> str:
    """The text dedupe and decontamination compare: `text`, or the messages' contents joined by newlines."""
    if isinstance(record.get("text"), str):
        return record["text"]
    messages = record.get("messages") or []
    return "\n".join(m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
