"""Text cleaning: Unicode form, control characters, PII placeholders that leave arithmetic alone."""

from __future__ import annotations

import json

import pytest

from tasks.core.config import CleanConfig
from tasks.data import clean
from tasks.data.clean import clean_record, clean_text, record_text
from tests.shared_data import SHARED_DATA

GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"
PII = CleanConfig(scrub_pii=True)


class TestUnicodeAndControl:
    def test_nfc_composes_combining_marks(self):
        assert clean_text("cafe\u0301", CleanConfig()) == ("café", ["unicode_normalized"])

    def test_nfkc_folds_compatibility_characters(self):
        assert clean_text("ﬁne ２４", CleanConfig(unicode_form="NFKC")) == ("fine 24", ["unicode_normalized"])

    def test_nfc_keeps_compatibility_characters(self):
        assert clean_text("ﬁne ２４", CleanConfig()) == ("ﬁne ２４", [])

    def test_form_none_leaves_text(self):
        assert clean_text("cafe\u0301", CleanConfig(unicode_form="none")) == ("cafe\u0301", [])

    @pytest.mark.parametrize("text", ["plain ascii, tabs\tand\nnewlines", "already NFC: café, Straße, 東京", ""])
    def test_clean_text_is_unchanged(self, text):
        assert clean_text(text, CleanConfig()) == (text, [])

    def test_control_characters_removed_and_newlines_unified(self):
        text = "a\x00b\x07c\r\nd\re\tf\x1b[0m\x7f\x85g\n"
        assert clean_text(text, CleanConfig()) == ("abc\nd\ne\tf[0mg\n", ["control_chars_removed"])

    def test_control_characters_kept_when_disabled(self):
        text = "a\x00b\r\n"
        assert clean_text(text, CleanConfig(remove_control_chars=False)) == (text, [])

    def test_control_removed_before_normalising(self):
        # a NUL between a letter and its accent must not keep them from composing
        assert clean_text("e\x00\u0301", CleanConfig()) == ("é", ["unicode_normalized", "control_chars_removed"])

    def test_replacement_character_is_kept_but_reported(self):
        assert clean_text("bad byte: \ufffd here", CleanConfig()) == ("bad byte: \ufffd here", ["replacement_char"])


class TestPiiScrubbing:
    @pytest.mark.parametrize("text, expected, reason", [
        ("mail john.doe+news@example.co.uk today", "mail <EMAIL> today", "pii_email"),
        ("Call +1 (555) 123-4567 now", "Call <PHONE> now", "pii_phone"),
        ("Call +44 20 7946 0958.", "Call <PHONE>.", "pii_phone"),
        ("ruf +4915112345678 an", "ruf <PHONE> an", "pii_phone"),
        ("US 555-123-4567, (555) 123-4567 or 1-800-555-1234", "US <PHONE>, <PHONE> or <PHONE>", "pii_phone"),
        ("Paris 06 12 34 56 78, Berlin 030 1234567, München 089/12345678",
         "Paris <PHONE>, Berlin <PHONE>, München <PHONE>", "pii_phone"),
        ("server 192.168.0.1:8080 is down", "server <IP>:8080 is down", "pii_ip"),
        ("ipv6 2001:db8::8a2e:370:7334 and fe80::1.", "ipv6 <IP> and <IP>.", "pii_ip"),
        ("key AKIAIOSFODNN7EXAMPLE leaked", "key <SECRET> leaked", "pii_secret"),
        ("OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz123456", "OPENAI_API_KEY=<SECRET>", "pii_secret"),
        ("token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "token <SECRET>", "pii_secret"),
        ("slack xoxb-123456789012-abcdefABCDEF ok", "slack <SECRET> ok", "pii_secret"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "Authorization: Bearer <SECRET>", "pii_secret"),
        ("aws_secret = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret = <SECRET>", "pii_secret"),
        ("md5 9e107d9d372bb6826bd81d3542a419d6", "md5 <SECRET>", "pii_secret"),
    ])
    def test_positives(self, text, expected, reason):
        assert clean_text(text, PII) == (expected, [reason])

    @pytest.mark.parametrize("text", [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
        "It costs $1,000 and the city has 1,000,000 people.",
        "In 2023 she was 12; in 1999 he was 3.",
        "pi is 3.14, e is 2.718 and 0.5 + 0.25 = 0.75",
        "On 01/12/2023 15 people came; 2019-2020; at 12:30:45",
        "the ratio 3:4:5 and 10-15 minutes",
        "version 1.2.3 and 10.0.0.1.5",
        "numbers 100 200 3000 and 12 34 56 78 90 and 1234567890",
        "5+3=8 and 12 - 4 = 8 and x = -12.5 + 3.2e10",
        "C++ std::vector<int> and a[::2]",
        "run it on 127.0.0.1:8000 or 0.0.0.0",
        "/usr/local/lib/python3.11/site-packages/numpy/core/__init__.py",
        "https://en.wikipedia.org/wiki/Some_Article_Title_About_Things_2023",
        "iPhone12ProMaxCaseWithMagSafeCompatible",
    ])
    def test_negatives_are_untouched(self, text):
        assert clean_text(text, PII) == (text, [])

    def test_off_by_default(self):
        text = "mail me: a@b.org, +1 (555) 123-4567"
        assert clean_text(text, CleanConfig()) == (text, [])

    def test_several_kinds_in_one_text(self):
        text, reasons = clean_text("a@b.org from 8.8.8.8, call 555-123-4567", PII)
        assert text == "<EMAIL> from <IP>, call <PHONE>"
        assert reasons == ["pii_email", "pii_ip", "pii_phone"]

    @pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K copy not present")
    def test_no_gsm8k_record_is_scrubbed(self):
        lines = GSM8K.read_text(encoding="utf-8").splitlines()
        changed = []
        for line in lines:
            record = json.loads(line)
            text = record["question"] + "\n" + record["answer"]
            if clean_text(text, PII)[1]:
                changed.append(text)
        assert len(lines) == 7473 and changed == []

    def test_full_patterns_run_only_where_a_hint_matches(self, monkeypatch):
        # work count, not time: plain maths runs no full pattern beyond the phone one on digit runs
        calls = []
        original = clean._replace
        monkeypatch.setattr(clean, "_replace", lambda pattern, *a: calls.append(pattern) or original(pattern, *a))
        for i in range(200):
            clean_text(f"Tom has {i} apples and buys {i + 3} more, so he has {2 * i + 3}.", PII)
        assert calls == []


class TestRecords:
    def test_text_record(self):
        record = {"text": "hi\x00 a@b.org", "id": 3}
        cleaned, reasons = clean_record(record, PII)
        assert cleaned == {"text": "hi <EMAIL>", "id": 3}
        assert reasons == ["control_chars_removed", "pii_email"]
        assert record == {"text": "hi\x00 a@b.org", "id": 3}  # input untouched

    def test_messages_record_reasons_deduplicated_and_sorted(self):
        record = {"messages": [
            {"role": "user", "content": "mail x@y.com\r\n"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "and z@w.org cafe\u0301"},
        ]}
        cleaned, reasons = clean_record(record, PII)
        assert [m["content"] for m in cleaned["messages"]] == ["mail <EMAIL>\n", "ok", "and <EMAIL> café"]
        assert [m["role"] for m in cleaned["messages"]] == ["user", "assistant", "user"]
        assert reasons == ["control_chars_removed", "pii_email", "unicode_normalized"]
        assert cleaned["messages"][1] is record["messages"][1]
        assert record["messages"][0]["content"] == "mail x@y.com\r\n"

    def test_unchanged_record_is_returned_as_is(self):
        record = {"messages": [{"role": "user", "content": "2 + 2 = 4"}]}
        assert clean_record(record, PII) == (record, [])
        assert clean_record(record, PII)[0] is record

    def test_record_text(self):
        assert record_text({"text": "abc"}) == "abc"
        chat = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
        assert record_text(chat) == "Q?\nA."


class TestMayChange:
    """may_change is a safe shortcut: when it says no, clean_record returns the record as is."""

    @pytest.mark.parametrize("cfg", [CleanConfig(), CleanConfig(remove_control_chars=False), CleanConfig(unicode_form="NFKC")])
    def test_no_means_unchanged_and_unflagged(self, cfg):
        import random

        rng = random.Random(0)
        alphabet = [chr(c) for c in range(128)] + ["\r", "\x85", "é", "e\u0301", "\ufffd", "ﬁ"]
        sure_records = sure_texts = 0
        for _ in range(3000):
            contents = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 3))]
            record = {"messages": [{"role": "user", "content": c} for c in contents]}
            if not clean.may_change(record_text(record), cfg):
                assert clean_record(record, cfg) == (record, [])
                sure_records += 1
            if not clean.may_change(contents[0], cfg):
                assert clean_text(contents[0], cfg) == (contents[0], [])
                sure_texts += 1
        assert sure_records > 100 and sure_texts > 100  # the fast path was exercised, not skipped

    @pytest.mark.parametrize("text, cfg, expected", [
        ("plain ascii\tand\nnewlines", CleanConfig(), False),
        ("a\rb", CleanConfig(), True),
        ("bell\x07", CleanConfig(), True),
        ("bell\x07", CleanConfig(remove_control_chars=False), False),
        ("café", CleanConfig(), True),  # not ASCII: normalisation has to look
        ("plain", PII, True),  # scrubbing has to look
    ])
    def test_answers(self, text, cfg, expected):
        assert clean.may_change(text, cfg) is expected
