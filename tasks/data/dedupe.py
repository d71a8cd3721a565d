"""Find exact and near-duplicate records in a stage, keeping the first occurrence of each.

Exact: records whose normalised text (casefolded, punctuation to spaces, whitespace collapsed) is
equal. Near: MinHash over word shingles with datasketch's `MinHashLSH` to find candidates, each
confirmed by its estimated Jaccard similarity against a record already kept.

Speed is the point of most of the code below. Signatures are computed for the whole stage at
once with numpy, using datasketch's own permutations and its "affine32" scheme, so they are the
values `MinHash.bulk(..., hashfunc=int)` would give over the same shingle hashes (a test checks
this) at a fraction of the cost. Only records that share an LSH band with another record can have
a near-duplicate, so only those go through the LSH index; the rest are kept without a query.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from hashlib import blake2b

import numpy as np

from tasks.core.config import DedupeConfig
from tasks.data.decontaminate import (
    BATCH_CHARS,
    fmix64,
    size_batches,
    hash_word_lists,
    rolling_ngram_hashes,
    window_mask,
)

_MUL = np.uint64(0x9E3779B97F4A7C15)  # same polynomial base as decontaminate's rolling n-grams
_LSH_RECALL = 0.95  # wanted chance that a pair exactly at the threshold becomes an LSH candidate
_CHUNK_SHINGLES = 1 << 14  # shingles per signature batch: 16k x 64 perms x 4 B = 4 MB, stays in cache
# MurmurHash3's 32-bit finalizer, as datasketch's affine32 scheme applies it to every input hash.
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


# --- normalisation --------------------------------------------------------------------------------


def _ascii_table() -> bytes:
    """bytes.translate table: ASCII lowercased, punctuation (Unicode category P) and odd spaces to ' ';
    bytes from 0x80 up (the pieces of UTF-8 characters) kept."""
    table = bytearray(range(256))
    for c in range(128):
        ch = chr(c)
        if ch.isupper():
            table[c] = ord(ch.lower())
        elif unicodedata.category(ch).startswith("P") or ch.isspace():
            table[c] = 0x20  # \x1c-\x1f are whitespace to str.split but not to bytes.split
    return bytes(table)


class _PunctuationToSpace(dict):
    """str.translate table filled on demand: only the characters a corpus uses are ever looked up."""

    def __missing__(self, code: int) -> int:
        value = self[code] = 0x20 if unicodedata.category(chr(code)).startswith("P") else code
        return value


_ASCII = _ascii_table()
_PUNCTUATION = _PunctuationToSpace()


def _normalized_words(text: str) -> list[bytes]:
    """The words of the normalised text as UTF-8 bytes, through C-level translate and split.

    Other than ASCII text is casefolded and cut at its ASCII separators the same way; only the
    pieces holding a non-ASCII character get the per-character Unicode table, which gives the
    same words because ASCII separators split them either way.
    """
    if text.isascii():
        return text.encode("ascii").translate(_ASCII).split()
    folded = text.casefold()
    try:
        pieces = folded.encode("utf-8").translate(_ASCII).split()
    except UnicodeEncodeError:  # a lone surrogate: UTF-8 cannot hold it
        return [w.encode("utf-8") for w in folded.translate(_PUNCTUATION).split()]
    out: list[bytes] = []
    for piece in pieces:
        if piece.isascii():
            out.append(piece)
        else:
            out += [w.encode("utf-8") for w in piece.decode("utf-8").translate(_PUNCTUATION).split()]
    return out


def normalized_text(text: str) -> str:
    """Casefolded, punctuation replaced by spaces, whitespace collapsed: what 'the same text' means.

    Symbols (`$`, `+`, `=`) are kept: in maths "2+3" and "2*3" are different records.
    """
    return b" ".join(_normalized_words(text)).decode("utf-8")


def normalized_key(text: str) -> str:
    """Hex blake2b-128 of the normalised text: a stable, compact key for exact duplicates."""
    return blake2b(b" ".join(_normalized_words(text)), digest_size=16).hexdigest()


# --- exact ----------------------------------------------------------------------------------------


def _first_seen(keys: dict[bytes, int], word_lists: Sequence[list[bytes]], start: int) -> dict[int, tuple[str, int]]:
    """Exact duplicates among texts `start`, `start + 1`, ... given the keys of every text seen
    before them (updated in place): a 16-byte blake2b key per distinct text, not the text itself."""
    found = {}
    for index, words in enumerate(word_lists, start):
        kept = keys.setdefault(blake2b(b" ".join(words), digest_size=16).digest(), index)
        if kept != index:
            found[index] = ("exact_duplicate", kept)
    return found


# --- near: shingles and signatures ----------------------------------------------------------------


def shingle_hashes(word_lists: Sequence[list[bytes]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """uint32 hashes of every k-word shingle of every text, and offsets (len n+1) into them.

    A text shorter than k words is one shingle (its whole word sequence), and an empty text one
    fixed shingle, so every text has at least one and a signature.
    """
    hashes, offsets = hash_word_lists(word_lists)
    lengths = np.diff(offsets)
    counts = np.where(lengths >= k, lengths - k + 1, 1)
    out_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(counts, out=out_offsets[1:])
    out = np.zeros(int(out_offsets[-1]), dtype=np.uint64)
    long_doc = lengths >= k
    out[np.repeat(long_doc, counts)] = rolling_ngram_hashes(hashes, k)[window_mask(offsets, k)]
    for length in range(1, k):  # short texts, grouped by length so each group is one numpy pass
        docs = np.flatnonzero(lengths == length)
        if len(docs):
            acc = hashes[offsets[docs]].copy()
            for j in range(1, length):
                acc = acc * _MUL + hashes[offsets[docs] + j]
            out[out_offsets[docs]] = fmix64(acc)
    return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32), out_offsets


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2 = _FMIX32
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s1)


def minhash_signatures(shingles: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """(n_texts, num_perm) uint32 MinHash signatures, equal to datasketch's affine32 `MinHash`.

    Each text's signature is the column-wise minimum of `a * fmix32(h) + b` (mod 2**32) over its
    shingle hashes h; `np.minimum.reduceat` takes all texts of a batch in one call.
    """
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    mixed = _fmix32(shingles)
    signatures = np.empty((len(offsets) - 1, num_perm), dtype=np.uint32)
    first = 0
    while first < len(offsets) - 1:
        # as many whole texts as fit the batch; a text longer than a batch alone, in pieces
        last = int(np.searchsorted(offsets, offsets[first] + _CHUNK_SHINGLES, side="right")) - 1
        if last <= first:
            signatures[first] = _long_text_signature(mixed[offsets[first] : offsets[first + 1]], a, b)
            first += 1
            continue
        lo, hi = int(offsets[first]), int(offsets[last])
        permuted = np.multiply.outer(a, mixed[lo:hi])  # (num_perm, shingles): reduceat is fast along rows
        permuted += b[:, None]
        signatures[first:last] = np.minimum.reduceat(permuted, offsets[first:last] - lo, axis=1).T
        first = last
    return signatures


def _long_text_signature(mixed: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One text's signature, its shingles taken a batch at a time: a document of millions of words
    would otherwise permute into a (num_perm, shingles) array of gigabytes."""
    signature = np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint32)
    for lo in range(0, len(mixed), _CHUNK_SHINGLES):
        permuted = np.multiply.outer(a, mixed[lo : lo + _CHUNK_SHINGLES])
        permuted += b[:, None]
        np.minimum(signature, permuted.min(axis=1), out=signature)
    return signature


# --- near: LSH and confirmation -------------------------------------------------------------------


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with the fewest candidates that still catch a pair at the threshold 95% of the time.

    datasketch's default weighs false positives and negatives equally, which at 64 permutations
    and threshold 0.8 lets only about half of the pairs just above the threshold become candidates.
    False positives are cheap here (every candidate is confirmed against its signature), so the
    banding is chosen for recall; it also handles threshold 1.0, where the default has one band.
    """
    if num_perm < 2:
        raise ValueError(f"dedupe.num_perm must be at least 2 for near-duplicate search, got {num_perm}")
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= _LSH_RECALL:
            return bands, rows
    return num_perm, 1


def _band_collisions(signatures: np.ndarray, hashranges: list[tuple[int, int]]) -> np.ndarray:
    """True for each text that shares at least one whole LSH band with another text.

    A text that shares none can neither be a candidate nor have one, so skipping its query is
    exact. Bands are folded to 64-bit keys; a key collision only adds a text to the LSH path.
    """
    shared = np.zeros(len(signatures), dtype=bool)
    for start, end in hashranges:
        key = signatures[:, start].astype(np.uint64)
        for column in range(start + 1, end):
            key = key * _MUL + signatures[:, column]
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        shared |= counts[inverse] > 1
    return shared


def near_duplicates(signatures: np.ndarray, threshold: float, seed: int) -> dict[int, int]:
    """Position of each near-duplicate -> position of the kept text it matches best, in input order."""
    from datasketch import LeanMinHash, MinHashLSH

    num_perm = signatures.shape[1]
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=lsh_params(threshold, num_perm))
    found: dict[int, int] = {}
    for i in np.flatnonzero(_band_collisions(signatures, lsh.hashranges)).tolist():
        sketch = LeanMinHash(seed=seed, hashvalues=signatures[i], scheme="affine32")
        candidates = lsh.query(sketch)  # only kept texts are ever inserted
        if candidates:
            kept = np.sort(np.fromiter(candidates, dtype=np.int64, count=len(candidates)))
            similarity = (signatures[kept] == signatures[i]).sum(axis=1) / num_perm
            best = int(np.argmax(similarity))  # first maximum: the earliest kept text on ties
            if similarity[best] >= threshold:
                found[i] = int(kept[best])
                continue
        lsh.insert(i, sketch, check_duplication=False)
    return found


# --- the step -------------------------------------------------------------------------------------


def find_duplicates(texts: list[str], cfg: DedupeConfig, seed: int,
                    batch_chars: int = BATCH_CHARS) -> dict[int, tuple[str, int]]:
    """Index of each text to drop -> ("exact_duplicate" | "near_duplicate", index of the kept text).

    The first occurrence is kept. Near-duplicates are searched among the texts left after exact
    dedupe and confirmed only against texts already kept, so a chain A ~ B ~ C with A !~ C keeps
    A and C. Deterministic for a given seed (the MinHash permutations depend on it).
    """
    dropped: dict[int, tuple[str, int]] = {}
    keys: dict[bytes, int] = {}
    near = cfg.near_threshold is not None
    survivors: list[int] = []
    signatures = [np.zeros((0, cfg.num_perm), dtype=np.uint32)]
    # Batches of about BATCH_CHARS characters: a text's words exist only while its batch is worked
    # on, so memory is the signatures (4 bytes a permutation a text), not every word of the stage.
    for start, end in size_batches(texts, batch_chars):
        word_lists = [_normalized_words(text) for text in texts[start:end]]
        found = _first_seen(keys, word_lists, start) if cfg.exact else {}
        dropped |= found
        if near:
            kept = [i for i in range(start, end) if i not in found]
            shingles, offsets = shingle_hashes([word_lists[i - start] for i in kept], cfg.shingle_words)
            signatures.append(minhash_signatures(shingles, offsets, cfg.num_perm, seed))
            survivors += kept
    if near:
        for position, kept_at in near_duplicates(np.concatenate(signatures), cfg.near_threshold, seed).items():
            dropped[survivors[position]] = ("near_duplicate", survivors[kept_at])
    return dict(sorted(dropped.items()))
