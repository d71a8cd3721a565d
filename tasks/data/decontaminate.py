"""Keep benchmark text out of training: drop a training record that shares a word n-gram with eval text.

The test is the one GPT-3 and most successors use: lowercase `\\w+` words, and a hit is any
n-gram (13 words by default) present in both. Work is done in bulk with numpy: each distinct word
of a batch is hashed once (blake2b, 64 bits), n-gram hashes are rolled over the flat word array,
and membership is a bit filter plus a binary search in a sorted array. Texts shorter than n words have no n-gram
and so can never match (nor be matched); a benchmark made of very short items needs a smaller n.

The word-hashing helpers here are shared with `tasks/data/dedupe.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from hashlib import blake2b
from itertools import chain

import numpy as np

_WORD = re.compile(r"\w+")
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio): the polynomial base for rolling n-grams
_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))


def _ascii_word_table(keep_non_ascii: bool = False) -> bytes:
    """bytes.translate table: ASCII letters lowercased, digits and `_` kept, every other ASCII byte a
    space; bytes from 0x80 up a space too, or kept (the pieces of UTF-8 characters) if asked."""
    table = bytearray(b" " * 256)
    for c in b"abcdefghijklmnopqrstuvwxyz0123456789_":
        table[c] = c
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        table[c] = c + 32
    if keep_non_ascii:
        table[0x80:] = bytes(range(0x80, 0x100))
    return bytes(table)


_ASCII_WORDS = _ascii_word_table()
_UTF8_WORDS = _ascii_word_table(keep_non_ascii=True)


def words(text: str) -> list[str]:
    """Lowercase `\\w+` words: the tokenisation both sides of the contamination test use."""
    return _WORD.findall(text.lower())


def word_tokens(text: str) -> list[bytes]:
    """`words(text)` as UTF-8 bytes, through a translate-and-split fast path.

    For ASCII text `\\w` is exactly [A-Za-z0-9_], so one C-level translate plus split gives the
    same words as the regex at about twice its speed. Other text is cut at its ASCII non-word
    characters the same way, and only the pieces holding a non-ASCII character go through the
    regex: no word spans an ASCII non-word character, so the words are the same.
    """
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_WORDS).split()
    try:
        pieces = text.lower().encode("utf-8").translate(_UTF8_WORDS).split()
    except UnicodeEncodeError:  # a lone surrogate: never part of a word, but UTF-8 cannot hold it
        return [w.encode("utf-8") for w in words(text)]
    out: list[bytes] = []
    for piece in pieces:
        if piece.isascii():
            out.append(piece)
        else:
            out += [w.encode("utf-8") for w in _WORD.findall(piece.decode("utf-8"))]
    return out


class _Vocab(dict):
    """Word -> dense id, assigned on first sight; lets `map` stay in C for the common (seen) case."""

    def __missing__(self, key: bytes) -> int:
        value = self[key] = len(self)
        return value


def _hash_token(token: bytes) -> int:
    return int.from_bytes(blake2b(token, digest_size=8).digest(), "little")


def hash_word_lists(word_lists: Sequence[Sequence[bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint64 hashes of every word of every list, and offsets (len n+1) into them.

    Each distinct word is hashed once (blake2b, so stable across processes, unlike `hash()`);
    occurrences are looked up through a dict, which keeps the per-word cost at one C-level call.
    """
    lengths = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(word_lists))
    offsets = np.zeros(len(word_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    vocab = _Vocab()
    ids = np.fromiter(map(vocab.__getitem__, chain.from_iterable(word_lists)), dtype=np.int64, count=total)
    table = np.fromiter(map(_hash_token, vocab), dtype=np.uint64, count=len(vocab))
    return table[ids], offsets


# Characters of text per batch of the bulk passes here and in dedupe: a batch's words live as one
# bytes object each (~45 B a word), so 4M characters (~800k words) keep its temporaries near 50 MB
# whatever the number or length of the texts.
BATCH_CHARS = 4_000_000


def size_batches(texts: Sequence[str], max_chars: int = BATCH_CHARS) -> Iterator[tuple[int, int]]:
    """Consecutive (start, end) index ranges over `texts`, each holding about `max_chars` characters
    (at least one text, so a text longer than that is a batch of its own)."""
    start, size = 0, 0
    for i, text in enumerate(texts):
        if size and size + len(text) > max_chars:
            yield start, i
            start, size = i, 0
        size += len(text)
    if start < len(texts):
        yield start, len(texts)


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: spreads the rolled polynomial's weak low bits over all 64."""
    shift, m1, m2 = _FMIX64
    h = h ^ (h >> shift)
    h = h * m1
    h = h ^ (h >> shift)
    h = h * m2
    return h ^ (h >> shift)


def rolling_ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of n consecutive words in a flat array (windows may cross documents).

    Position i holds the hash of words i..i+n-1; callers mask the windows that cross a document
    end with `window_mask`. n passes of numpy arithmetic, no Python loop over words.
    """
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    acc = word_hashes[:m].copy()
    for j in range(1, n):
        acc *= _MUL  # wraps mod 2**64, which is the intended arithmetic
        acc += word_hashes[j : m + j]
    return fmix64(acc)


def window_mask(offsets: np.ndarray, n: int) -> np.ndarray:
    """For the windows of n words over the flat array: True where the window lies inside one document.

    Marks +1 at each long-enough document's first window and -1 after its last, then a cumulative
    sum: two passes, no per-position document lookup.
    """
    m = max(int(offsets[-1]) - n + 1, 0)
    starts, ends = offsets[:-1], offsets[1:] - n + 1  # a document's windows start in [start, end)
    long_enough = ends > starts
    marks = np.zeros(m + 1, dtype=np.int32)
    np.add.at(marks, starts[long_enough], 1)
    np.add.at(marks, ends[long_enough], -1)
    return np.cumsum(marks[:m]) > 0


def document_of(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Which document each flat word position belongs to."""
    return np.searchsorted(offsets, positions, side="right") - 1


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    # np.unique takes a hash-table path on numpy 2.x that is ~10x slower than sorting here.
    values = np.sort(values)
    keep = np.ones(len(values), dtype=bool)
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _bit_filter(hashes: np.ndarray) -> tuple[np.uint64, np.ndarray]:
    """A one-hash Bloom filter over the top bits of `hashes`: (shift to the top bits, packed bits)."""
    bits = 1 << max(16, min(28, int(len(hashes) * 16).bit_length()))  # 8 KB .. 32 MB
    shift = np.uint64(64 - (bits.bit_length() - 1))
    packed = np.zeros(bits // 8, dtype=np.uint8)
    keys = hashes >> shift
    np.bitwise_or.at(packed, keys >> np.uint64(3), np.left_shift(1, keys & np.uint64(7)).astype(np.uint8))
    return shift, packed


def _filter_test(packed: np.ndarray, shift: np.uint64, hashes: np.ndarray) -> np.ndarray:
    keys = hashes >> shift
    return (packed[keys >> np.uint64(3)] >> (keys & np.uint64(7)).astype(np.uint8)) & 1 != 0


class NgramIndex:
    """The set of hashed word n-grams of some texts (usually the eval/benchmark side).

    Stored as a sorted, de-duplicated uint64 array: 8 bytes an n-gram and a binary search a
    lookup. Hashes are 64-bit so that a false hit needs a collision among ~2**64 values: with
    10**7 queries against 10**7 stored n-grams the chance of one is about 10**-5.
    """

    def __init__(self, hashes: np.ndarray, n: int) -> None:
        self.hashes = hashes
        self.n = n
        self._filter_shift, self._filter = _bit_filter(hashes)

    @classmethod
    def build(cls, texts: Iterable[str], n: int) -> NgramIndex:
        """Index every n-gram of `texts`; texts shorter than n words contribute nothing."""
        if n < 1:
            raise ValueError(f"n-gram size must be at least 1 word, got {n}")
        texts = list(texts)
        parts = [np.zeros(0, dtype=np.uint64)]
        for start, end in size_batches(texts):
            hashes, offsets = hash_word_lists([word_tokens(text) for text in texts[start:end]])
            parts.append(_sorted_unique(rolling_ngram_hashes(hashes, n)[window_mask(offsets, n)]))
        return cls(_sorted_unique(np.concatenate(parts)), n)

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Boolean membership of each hash.

        A bit filter (about 16 bits an indexed n-gram, so it stays in cache) rejects nearly all
        misses with one gather; only the few that pass pay for a binary search.
        """
        found = np.zeros(len(hashes), dtype=bool)
        if len(self.hashes) == 0 or len(hashes) == 0:
            return found
        maybe = np.flatnonzero(_filter_test(self._filter, self._filter_shift, hashes))
        candidates = hashes[maybe]
        pos = np.searchsorted(self.hashes, candidates)
        np.minimum(pos, len(self.hashes) - 1, out=pos)
        found[maybe] = self.hashes[pos] == candidates
        return found

    def first_hits(self, texts: Sequence[str], max_chars: int = BATCH_CHARS) -> dict[int, str]:
        """Index of each text sharing an n-gram with the index -> its first shared n-gram (as words).

        Works through `texts` in batches of about `max_chars` characters, so memory stays bounded
        however many texts the stage has and however long they are.
        """
        found: dict[int, str] = {}
        for start, end in size_batches(texts, max_chars):
            batch = self._first_hits_batch(texts[start:end])
            found.update((start + i, ngram) for i, ngram in batch.items())
        return found

    def _first_hits_batch(self, texts: Sequence[str]) -> dict[int, str]:
        word_lists = [word_tokens(text) for text in texts]
        hashes, offsets = hash_word_lists(word_lists)
        hit = window_mask(offsets, self.n) & self.contains(rolling_ngram_hashes(hashes, self.n))
        positions = np.flatnonzero(hit)
        # flatnonzero is ascending, so the first position of each document is its first hit
        docs, first = np.unique(document_of(positions, offsets), return_index=True)
        found: dict[int, str] = {}
        for doc, pos in zip(docs.tolist(), positions[first].tolist(), strict=True):
            start = pos - int(offsets[doc])
            found[doc] = b" ".join(word_lists[doc][start : start + self.n]).decode("utf-8")
        return found

    def first_hit(self, text: str) -> str | None:
        """The first n-gram of `text` that is in the index, as space-joined words, or None."""
        return self.first_hits([text]).get(0)


def contaminated(train_texts: Sequence[str], eval_texts: Iterable[str], n: int) -> dict[int, str]:
    """Index of each training text that shares an n-gram with any eval text -> that n-gram."""
    return NgramIndex.build(eval_texts, n).first_hits(train_texts)
