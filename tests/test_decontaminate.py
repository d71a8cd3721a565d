"""Decontamination: a training text sharing a 13-word n-gram with eval text is found, with the n-gram."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tasks.data import decontaminate
from tasks.data.decontaminate import NgramIndex, contaminated, size_batches, word_tokens, words

EVAL = [
    (
        "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
        "for her friends every day with four. She sells the remainder at the farmers' market daily."
    ),
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
]
SHARED_13 = "she eats three for breakfast every morning and bakes muffins for her friends"


def filler(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"t{rng.randrange(10**6)}" for _ in range(n))


class TestTokens:
    def test_words_lowercase_and_split_on_non_word(self):
        assert words("Janet's ducks: 16-eggs_per DAY!") == ["janet", "s", "ducks", "16", "eggs_per", "day"]

    @pytest.mark.parametrize("text", ["Plain ASCII, with: punct-uation_and 123 numbers!", "Ünïcode Straße «café» 東京"])
    def test_fast_path_gives_the_regex_words(self, text):
        assert [w.decode() for w in word_tokens(text)] == words(text)

    def test_mixed_text_gives_the_regex_words(self):
        # Non-ASCII text is cut at ASCII non-word characters first; the regex sees only the pieces
        # holding a non-ASCII character. Dashes, no-break spaces, digits of other scripts, marks...
        rng = random.Random(0)
        pool = [chr(c) for c in range(0x250)] + list("\u00a0\u2003\u2013\u00ab\u0130\u00df\ufb01\u0301\u4e2d\u0660\u00b2\u2164_")
        for _ in range(5000):
            text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 25)))
            assert word_tokens(text) == [w.encode() for w in words(text)], repr(text)
        assert word_tokens("caf\u00e9 \ud800x") == [b"caf\xc3\xa9", b"x"]  # a lone surrogate: the regex path


class TestNgramIndex:
    def test_hit_returns_the_first_shared_ngram(self):
        index = NgramIndex.build(EVAL, 13)
        train = f"{filler(20, 1)} — She EATS three for breakfast, every morning and bakes muffins for her friends!"
        assert index.first_hit(train) == SHARED_13

    def test_twelve_shared_words_are_not_a_hit(self):
        index = NgramIndex.build(EVAL, 13)
        twelve = " ".join(SHARED_13.split()[:12])
        assert index.first_hit(f"{filler(10, 2)} {twelve} {filler(10, 3)}") is None

    def test_texts_shorter_than_n_never_match(self):
        short = "How many bolts in total does it take?"  # 8 words, also inside EVAL[1]
        index = NgramIndex.build([short], 13)
        assert len(index) == 0
        assert index.first_hit(short) is None
        assert NgramIndex.build(EVAL, 13).first_hit(short) is None

    def test_ngrams_do_not_cross_text_boundaries(self):
        # the last 7 words of one eval text + the first 6 of the next are not an n-gram of either
        index = NgramIndex.build(["a b c d e f g h i j k l m", "n o p q r s t u v w x y z"], 13)
        assert index.first_hit("g h i j k l m n o p q r s") is None
        assert index.first_hit("x a b c d e f g h i j k l m") == "a b c d e f g h i j k l m"

    def test_non_ascii_and_ascii_paths_agree(self):
        index = NgramIndex.build(["the cafe owner said the weather in berlin was cold and grey all week long"], 13)
        train = "Ünïcode first: THE CAFE OWNER said the weather in Berlin was cold and grey all week"
        assert index.first_hit(train) == "the cafe owner said the weather in berlin was cold and grey all"

    def test_hashes_are_64_bit_and_unique(self):
        index = NgramIndex.build(EVAL + EVAL, 13)
        assert index.hashes.dtype == np.uint64
        assert len(index) == len(set(index.hashes.tolist())) == (34 - 12) + (22 - 12)

    def test_empty_index_and_empty_input(self):
        assert NgramIndex.build([], 13).first_hits(["anything at all " * 5]) == {}
        assert NgramIndex.build(EVAL, 13).first_hits([]) == {}


class TestContaminated:
    def test_hits_and_misses(self):
        train = [
            filler(40, 10),
            f"copied: {EVAL[1]}",
            "Janet has ducks and eggs but this is a different story about a market.",
            f"{filler(5, 11)} {SHARED_13} {filler(5, 12)}",
        ]
        assert contaminated(train, EVAL, 13) == {
            1: "a robe takes 2 bolts of blue fiber and half that much white",
            3: SHARED_13,
        }

    def test_bulk_matches_one_by_one_across_batches(self):
        rng = random.Random(0)
        eval_texts = [filler(30, 100 + i) for i in range(50)]
        train = []
        for i in range(300):
            text = filler(rng.randrange(5, 40), 1000 + i)
            if i % 7 == 0:  # plant 13 consecutive words of some eval text
                source = eval_texts[rng.randrange(50)].split()
                start = rng.randrange(0, 30 - 13 + 1)
                text += " " + " ".join(source[start : start + 13]) + " " + filler(3, i)
            train.append(text)
        index = NgramIndex.build(eval_texts, 13)
        one_by_one = {i: hit for i, t in enumerate(train) if (hit := index.first_hit(t)) is not None}
        assert set(one_by_one) == set(range(0, 300, 7))
        assert index.first_hits(train, max_chars=2000) == one_by_one == contaminated(train, eval_texts, 13)

    def test_rejects_bad_n(self):
        with pytest.raises(ValueError, match="at least 1 word"):
            NgramIndex.build(EVAL, 0)


class TestWork:
    def test_each_distinct_word_is_hashed_once_per_batch(self, monkeypatch):
        hashed = []
        original = decontaminate._hash_token
        monkeypatch.setattr(decontaminate, "_hash_token", lambda token: hashed.append(token) or original(token))
        train = ["the cat sat on the mat and looked at the other cat for a very long time"] * 500
        contaminated(train, ["the dog sat on the log"] * 100, 13)
        vocabulary = {w for t in train for w in word_tokens(t)} | set(word_tokens("the dog sat on the log"))
        assert len(hashed) == len(set(word_tokens(train[0]))) + len(set(word_tokens("the dog sat on the log")))
        assert set(hashed) == vocabulary

    def test_lookups_are_one_bulk_call_per_batch(self, monkeypatch):
        calls = []
        original = NgramIndex.contains
        monkeypatch.setattr(NgramIndex, "contains", lambda self, h: calls.append(len(h)) or original(self, h))
        train = [filler(20, i) for i in range(5000)]
        NgramIndex.build(EVAL, 13).first_hits(train, max_chars=100_000)
        batches = list(size_batches(train, 100_000))
        assert len(batches) >= 3 and batches[0][0] == 0 and batches[-1][1] == len(train)
        assert all(sum(map(len, train[a:b])) <= 100_000 for a, b in batches)
        # one call a batch, over every 13-word window of it (windows that cross texts are masked later)
        assert calls == [(b - a) * 20 - 12 for a, b in batches]

    def test_a_text_longer_than_a_batch_is_a_batch_of_its_own(self):
        assert list(size_batches(["ab", "x" * 50, "cd", "ef"], max_chars=5)) == [(0, 1), (1, 2), (2, 4)]
        assert list(size_batches([], max_chars=5)) == []
