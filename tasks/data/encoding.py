"""Bytes to text without guessing: UTF-8 (BOM or not), UTF-16/32 with a BOM, and CESU-8 repaired.

Real corpora arrive with a UTF-8 BOM from Excel, as UTF-16 from Windows tools, or as CESU-8 (an
emoji written as two 3-byte surrogate halves, as Java's "modified UTF-8" and some old exporters do).
Those three are unambiguous and are decoded or repaired; anything else that is not UTF-8 (latin-1,
cp1252, ...) is refused with the file and the byte offset, because guessing a legacy code page
silently corrupts text.
"""

from __future__ import annotations

import re

from tasks.data.errors import Reject, SourceError

UTF8_BOM = b"\xef\xbb\xbf"
# UTF-32 first: its little-endian BOM begins with the UTF-16 little-endian one.
WIDE_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)
BINARY_SNIFF_BYTES = 8192

# A UTF-16 surrogate (U+D800..U+DFFF) written as a 3-byte UTF-8 sequence: invalid UTF-8, but the
# building block of CESU-8. High halves have a second byte A0..AF, low halves B0..BF.
_SURROGATE_UTF8 = re.compile(rb"\xed[\xa0-\xbf][\x80-\xbf]")
_SURROGATE_CHAR = re.compile("[\ud800-\udfff]")


class EncodingFault(SourceError):
    """Bytes that are not text in an encoding we can decode without guessing."""

    def __init__(self, source: str, byte_offset: int, detail: str) -> None:
        self.source = source
        self.byte_offset = byte_offset
        self.detail = detail
        super().__init__(
            f"{source}: not valid UTF-8 at byte {byte_offset} ({detail}); convert the file to UTF-8,"
            f" e.g. `iconv -f latin1 -t utf-8 IN > OUT` if it is latin-1"
        )


def wide_bom(data: bytes) -> str | None:
    """The codec named by a UTF-16/UTF-32 byte-order mark at the start of `data`, if any."""
    for bom, codec in WIDE_BOMS:
        if data.startswith(bom):
            return codec
    return None


def looks_binary(head: bytes) -> bool:
    """True if the first 8 KiB hold a NUL byte: text in UTF-8 never does, UTF-16 text (BOM) may."""
    if wide_bom(head) is not None:
        return False
    return b"\x00" in head[:BINARY_SNIFF_BYTES]


def mostly_binary(head: bytes) -> bool:
    """For line-based text (JSON Lines): NUL bytes in the first 8 KiB, and either the rest is not
    UTF-8 or a tenth of it is NULs. A stray NUL in a line of text costs that line (`readers`), not
    the file."""
    if wide_bom(head) is not None:
        return False
    window = head[:BINARY_SNIFF_BYTES]
    nuls = window.count(b"\x00")
    if not nuls:
        return False
    rest = window.replace(b"\x00", b"")
    try:
        rest.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(rest) - 3:  # not just a character cut at the window's end
            return True
    return nuls * 10 > len(window)


def decode_bytes(
    data: bytes, source: str, where_prefix: str = "", *, offset: int = 0
) -> tuple[str, list[Reject]]:
    """Decode `data` to text, or raise `EncodingFault` naming the first undecodable byte.

    `offset` is where `data` starts in its file, so every byte offset reported (in a fault or in a
    repair's `where`, e.g. "line 3 byte 120" with `where_prefix="line 3 "`) is a file offset.
    Returns the text and one `Reject(action="repaired")` per CESU-8 spot repaired.
    """
    codec = wide_bom(data)
    if codec is not None:
        bom_len = 4 if codec.startswith("utf-32") else 2
        try:
            return data[bom_len:].decode(codec), []
        except UnicodeDecodeError as err:
            raise EncodingFault(
                source, offset + bom_len + err.start, f"{codec} BOM but {err.reason}"
            ) from None
    if data.startswith(UTF8_BOM):
        data, offset = data[len(UTF8_BOM) :], offset + len(UTF8_BOM)
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as err:
        first_error = err
    return _repair_cesu8(data, source, where_prefix, offset, first_error)


def _repair_cesu8(
    data: bytes, source: str, where_prefix: str, offset: int, first_error: UnicodeDecodeError
) -> tuple[str, list[Reject]]:
    """Join surrogate pairs written as two 3-byte sequences; refuse if anything else is wrong."""
    try:
        with_surrogates = data.decode("utf-8", errors="surrogatepass")
    except UnicodeDecodeError as err:
        # Not only a surrogate problem (latin-1, cp1252, truncated): report the byte that is.
        raise _fault(data, source, offset, err.start, err.reason) from None
    pair_starts = _surrogate_pair_starts(data, source, offset)
    text = with_surrogates.encode("utf-16-le", errors="surrogatepass").decode("utf-16-le")
    if _SURROGATE_CHAR.search(text):  # belt and braces: never hand on unpaired surrogates
        raise _fault(data, source, offset, first_error.start, "unpaired UTF-16 surrogate")
    repairs = [
        Reject(
            source=source,
            where=f"{where_prefix}byte {offset + start}",
            reason="cesu8_repaired",
            detail="a UTF-16 surrogate pair written as two 3-byte sequences (CESU-8) was joined "
            "into one character",
            record=data[start : start + 6].hex(" "),
            action="repaired",
        )
        for start in pair_starts
    ]
    return text, repairs


def _surrogate_pair_starts(data: bytes, source: str, offset: int) -> list[int]:
    """Offsets of each high+low surrogate pair; a lone half cannot be repaired and is a fault."""
    starts: list[int] = []
    pending_high: int | None = None
    for match in _SURROGATE_UTF8.finditer(data):
        is_high = match.group()[1] < 0xB0
        if is_high:
            if pending_high is not None:
                break  # two highs in a row: the first is lone
            pending_high = match.start()
        elif pending_high is not None and pending_high + 3 == match.start():
            starts.append(pending_high)
            pending_high = None
        else:
            raise _fault(data, source, offset, match.start(), "unpaired UTF-16 low surrogate")
    if pending_high is not None:
        raise _fault(data, source, offset, pending_high, "unpaired UTF-16 high surrogate")
    return starts


def _fault(data: bytes, source: str, offset: int, start: int, reason: str) -> EncodingFault:
    """An `EncodingFault` that shows the bytes found, so a person can tell latin-1 from damage."""
    found = data[start : start + 4].hex(" ")
    return EncodingFault(source, offset + start, f"{reason}; bytes found: {found}")
