"""Chat encoding with a real tiny BPE tokenizer: only assistant replies and their end marker train."""

from __future__ import annotations

import pytest

from tasks.core.chat import IGNORE_INDEX, Encoded, assistant_spans, encode_chat, encode_text, generation_prompt, render
from tasks.core.modeling import CHAT_TEMPLATE

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
Q1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "The answer is 4."}
Q2 = {"role": "user", "content": "Give it as JSON."}
A2 = {"role": "assistant", "content": '{"answer": 4}'}
THINK = {"role": "assistant", "content": "<think>\n2+2=4, so 4.\n</think>\n\nThe answer is 4."}
ACCENTS = {"role": "assistant", "content": "Café crème, naïve – déjà vu ☕"}

CONVERSATIONS = {
    "single": [Q1, A1],
    "single_system": [SYSTEM, Q1, A1],
    "multi": [Q1, A1, Q2, A2],
    "multi_system": [SYSTEM, Q1, A1, Q2, A2],
    "thinking": [SYSTEM, Q1, THINK],
    "thinking_multi": [Q1, THINK, Q2, A2],
    "non_ascii": [Q1, ACCENTS],
}


def trainable_runs(enc: Encoded) -> list[list[int]]:
    """Contiguous runs of trained token ids."""
    runs: list[list[int]] = []
    previous_trained = False
    for token_id, label in zip(enc.input_ids, enc.labels):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token_id
            if not previous_trained:
                runs.append([])
            runs[-1].append(token_id)
        previous_trained = trained
    return runs


class TestEncodeChat:
    @pytest.mark.parametrize("name", list(CONVERSATIONS))
    def test_trains_exactly_the_replies(self, unit_tokenizer, name):
        messages = CONVERSATIONS[name]
        enc = encode_chat(unit_tokenizer, messages)
        replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert [unit_tokenizer.decode(run) for run in trainable_runs(enc)] == replies
        assert len(enc.labels) == len(enc.input_ids)

    @pytest.mark.parametrize("name", list(CONVERSATIONS))
    def test_ids_are_the_rendered_conversation(self, unit_tokenizer, name):
        messages = CONVERSATIONS[name]
        enc = encode_chat(unit_tokenizer, messages)
        assert unit_tokenizer.decode(enc.input_ids) == render(unit_tokenizer, messages)

    def test_untrained_parts(self, unit_tokenizer):
        enc = encode_chat(unit_tokenizer, [SYSTEM, Q1, A1])
        ignored = unit_tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])
        assert ignored == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n\n"
        )
        im_end = unit_tokenizer.convert_tokens_to_ids("<|im_end|>")
        last_trained = max(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
        assert enc.input_ids[last_trained] == im_end
        assert enc.labels[last_trained + 1 :] == [IGNORE_INDEX]  # the newline after the marker

    def test_think_markers_are_single_tokens(self, unit_tokenizer):
        enc = encode_chat(unit_tokenizer, [Q1, THINK])
        trained = [t for t in enc.labels if t != IGNORE_INDEX]
        for marker in ("<think>", "</think>"):
            assert unit_tokenizer.convert_tokens_to_ids(marker) in trained

    def test_n_trainable(self, unit_tokenizer):
        enc = encode_chat(unit_tokenizer, [Q1, A1, Q2, A2])
        assert enc.n_trainable == sum(len(run) for run in trainable_runs(enc))
        assert 0 < enc.n_trainable < len(enc.input_ids)

    def test_no_assistant_trains_nothing(self, unit_tokenizer):
        enc = encode_chat(unit_tokenizer, [SYSTEM, Q1])
        assert enc.n_trainable == 0 and len(enc.input_ids) > 0

    def test_deterministic(self, unit_tokenizer):
        assert encode_chat(unit_tokenizer, [Q1, THINK]) == encode_chat(unit_tokenizer, [Q1, THINK])


def test_assistant_spans_are_character_spans(unit_tokenizer):
    text, spans = assistant_spans(unit_tokenizer, [Q1, A1, Q2, A2])
    assert [text[s:e] for s, e in spans] == ["The answer is 4.<|im_end|>", '{"answer": 4}<|im_end|>']


class TestEncodeText:
    def test_every_token_trained_and_ends_with_endoftext(self, unit_tokenizer):
        enc = encode_text(unit_tokenizer, "The quick brown fox jumps over the lazy dog.")
        end = unit_tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert enc.labels == enc.input_ids
        assert enc.input_ids[-1] == end
        assert end not in enc.input_ids[:-1]
        assert enc.n_trainable == len(enc.input_ids)
        assert unit_tokenizer.decode(enc.input_ids) == "The quick brown fox jumps over the lazy dog.<|endoftext|>"

    def test_empty_text_is_just_the_marker(self, unit_tokenizer):
        end = unit_tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert encode_text(unit_tokenizer, "") == Encoded([end], [end])


class TestGenerationPrompt:
    @pytest.mark.parametrize("name", list(CONVERSATIONS))
    def test_prompt_for_last_reply(self, unit_tokenizer, name):
        messages = CONVERSATIONS[name]
        prompt = generation_prompt(unit_tokenizer, messages)
        last_reply = messages[-1]["content"] + "<|im_end|>\n"
        assert prompt.endswith("<|im_start|>assistant\n")
        assert prompt + last_reply == render(unit_tokenizer, messages)

    def test_exact_text(self, unit_tokenizer):
        assert generation_prompt(unit_tokenizer, [Q1, A1]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"

    @pytest.mark.parametrize(
        "kwargs, tail",
        [
            ({}, "<|im_start|>assistant\n"),
            ({"enable_thinking": True}, "<|im_start|>assistant\n"),
            ({"enable_thinking": False}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        ],
    )
    def test_enable_thinking(self, unit_tokenizer, kwargs, tail):
        text = unit_tokenizer.apply_chat_template([Q1], tokenize=False, add_generation_prompt=True, **kwargs)
        assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + tail


def test_tokenizer_round_trips(unit_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    unit_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == unit_tokenizer.chat_template == CHAT_TEMPLATE
    assert len(reloaded) == len(unit_tokenizer)
    assert (reloaded.eos_token, reloaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for name in CONVERSATIONS:
        assert encode_chat(reloaded, CONVERSATIONS[name]) == encode_chat(unit_tokenizer, CONVERSATIONS[name])
    text = "Tom has 3 apples.<think>x</think>"
    assert encode_text(reloaded, text) == encode_text(unit_tokenizer, text)


class TestFastPaths:
    """The compiled template and the Rust-tokenizer span lookups give what the plain paths give."""

    @pytest.mark.parametrize("name", list(CONVERSATIONS))
    def test_renderer_matches_apply_chat_template(self, unit_tokenizer, name):
        from tasks.core.chat import ChatRenderer

        renderer = ChatRenderer(unit_tokenizer)
        assert renderer._template is not None  # the direct path is the one in use
        messages = CONVERSATIONS[name]
        for n in range(1, len(messages) + 1):
            for gen in (False, True):
                assert renderer(messages[:n], gen) == render(unit_tokenizer, messages[:n], gen)

    def test_backend_and_offset_lookups_give_the_same_labels(self, unit_tokenizer):
        from tasks.core.chat import _first_token_in_encoding, _first_token_in_offsets, _labels_for_spans

        messages = [Q1, {"role": "assistant", "content": "Caf\u00e9 \U0001F355 costs 4 \u20ac."}, Q2, A2]
        text, spans = assistant_spans(unit_tokenizer, messages)
        enc = unit_tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        via_backend = _labels_for_spans(enc.ids, _first_token_in_encoding(enc, len(text), len(enc.ids)), spans)
        via_offsets = _labels_for_spans(enc.ids, _first_token_in_offsets(enc.offsets), spans)
        assert via_backend == via_offsets == encode_chat(unit_tokenizer, messages).labels
        trained = [t for t in via_backend if t != IGNORE_INDEX]
        assert unit_tokenizer.decode(trained) == messages[1]["content"] + "<|im_end|>" + A2["content"] + "<|im_end|>"

    def test_a_template_the_direct_path_gets_wrong_falls_back(self, unit_tokenizer):
        from tasks.core.chat import ChatRenderer

        class Wrong(ChatRenderer):
            def _direct(self, messages, generation_prompt):
                return "not what apply_chat_template renders"

        renderer = Wrong(unit_tokenizer)
        assert renderer._template is None  # the probe disagreed: every call takes the slow path
        messages = CONVERSATIONS[list(CONVERSATIONS)[0]]
        assert renderer(messages) == render(unit_tokenizer, messages)


MORE_CONVERSATIONS = {
    "whitespace": [{"role": "user", "content": "  padded \n"}, {"role": "assistant", "content": "\n\nreply  \n"}],
    "markup_in_content": [Q1, {"role": "assistant", "content": "<|im_end|>\n<|im_start|>user\nfake"}, Q2, A2],
    "empty_system": [{"role": "system", "content": ""}, Q1, A1],
    "assistant_runs": [Q1, A1, A2, Q2, THINK],
    "placeholder_lookalike": [{"role": "user", "content": "{{ 1 }} {% raw %}"}, {"role": "assistant", "content": "\ue0001\ue001"}],
}


class TestSingleRenderSpans:
    """Spans from one render per record (the template's skeleton filled in) are the prefix method's."""

    @staticmethod
    def prefix_method(renderer, messages):
        text = renderer(messages)
        return text, renderer.prefix_spans(messages, text)

    @pytest.mark.parametrize("name", list(CONVERSATIONS) + list(MORE_CONVERSATIONS))
    def test_same_spans_as_prefix_renders(self, unit_tokenizer, name):
        from tasks.core.chat import ChatRenderer

        renderer = ChatRenderer(unit_tokenizer)
        assert renderer.single_render  # ChatML copies contents verbatim
        messages = {**CONVERSATIONS, **MORE_CONVERSATIONS}[name]
        assert renderer.spans(messages) == self.prefix_method(renderer, messages)

    def test_one_render_per_record(self, unit_tokenizer, monkeypatch):
        from tasks.core.chat import ChatRenderer

        renderer = ChatRenderer(unit_tokenizer)
        renderer.spans([Q1, A1, Q2, A2])  # learns the skeleton of this role sequence
        calls = []
        monkeypatch.setattr(renderer, "_direct", lambda m, g: calls.append(len(m)) or ChatRenderer._direct(renderer, m, g))
        renderer.spans([Q1, A1, {"role": "user", "content": "Other?"}, {"role": "assistant", "content": "Yes."}])
        assert calls == [4]

    @staticmethod
    def renderer_for(unit_tokenizer, template: str):
        import copy

        from tasks.core.chat import ChatRenderer

        tok = copy.deepcopy(unit_tokenizer)
        tok.chat_template = template
        return ChatRenderer(tok)

    def test_a_template_that_reformats_a_last_reply_never_takes_the_fast_path(self, unit_tokenizer):
        # The final message is trimmed, the others are not: a record's full render can equal its
        # skeleton while a prefix render (where an earlier reply is last) does not. The probes see it.
        template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if loop.last %}{{ m['content'] | trim }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        renderer = self.renderer_for(unit_tokenizer, template)
        assert not renderer.single_render
        padded = [Q1, {"role": "assistant", "content": "padded "}, Q2, A2]
        with pytest.raises(ValueError, match="prefix-consistently"):  # the reply is trimmed when it is last
            self.prefix_method(renderer, padded)
        forced = self.renderer_for(unit_tokenizer, template)
        forced.single_render = True  # what skipping the probes would do: spans, where there are none
        assert len(forced.spans(padded)[1]) == 2
        for messages in [[Q1, A1, Q2, A2], padded, [Q1, A1]]:
            try:
                expected = self.prefix_method(renderer, messages)
            except ValueError as exc:  # not prefix-consistent: both ways must say so
                with pytest.raises(ValueError, match=str(exc)):
                    renderer.spans(messages)
            else:
                assert renderer.spans(messages) == expected

    def test_a_record_whose_render_is_not_its_skeleton_takes_the_prefix_method(self, unit_tokenizer, monkeypatch):
        # Content-dependent markup no probe triggers: the fast path stays on, and the record's own
        # render (compared with its filled-in skeleton) sends it to the prefix method.
        template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "{% if m['content'] == 'magic' %} (sic){% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        renderer = self.renderer_for(unit_tokenizer, template)
        assert renderer.single_render
        magic = [{"role": "user", "content": "magic"}, {"role": "assistant", "content": "magic"}]
        expected = {"magic": self.prefix_method(renderer, magic), "plain": self.prefix_method(renderer, [Q1, A1])}
        fell_back = []
        original = renderer.prefix_spans
        monkeypatch.setattr(renderer, "prefix_spans", lambda m, t: fell_back.append(m) or original(m, t))
        text, spans = renderer.spans(magic)
        assert (text, spans) == expected["magic"] and fell_back == [magic]
        assert [text[a:b] for a, b in spans] == ["magic (sic)<|im_end|>"]
        assert renderer.spans([Q1, A1]) == expected["plain"] and fell_back == [magic]

    def test_messages_with_other_keys_take_the_prefix_method(self, unit_tokenizer, monkeypatch):
        from tasks.core.chat import ChatRenderer

        renderer = ChatRenderer(unit_tokenizer)
        named = [Q1, A1 | {"name": "bot"}]
        expected = self.prefix_method(renderer, named)
        fell_back = []
        original = renderer.prefix_spans
        monkeypatch.setattr(renderer, "prefix_spans", lambda m, t: fell_back.append(m) or original(m, t))
        assert renderer.spans(named) == expected and fell_back == [named]


class TestTokenBatch:
    """Batched tokenization into flat arrays gives each text's encode_chat / encode_text."""

    def test_chats(self, unit_tokenizer):
        from tasks.core.chat import ChatRenderer, render_chats, tokenize_rendered

        conversations = list(CONVERSATIONS.values()) + [[SYSTEM, Q1]]  # the last trains nothing
        batch = tokenize_rendered(unit_tokenizer, render_chats(ChatRenderer(unit_tokenizer), conversations))
        assert len(batch) == len(conversations) and batch.offsets[-1] == len(batch.input_ids) == len(batch.labels)
        for i, messages in enumerate(conversations):
            assert batch.encoded(i) == encode_chat(unit_tokenizer, messages)
            assert batch.encoded(i).text == render(unit_tokenizer, messages)

    def test_texts_end_with_the_marker(self, unit_tokenizer):
        from tasks.core.chat import tokenize_texts

        texts = ["The quick brown fox.", "", "Tom has 3 apples.<think>x</think>"]
        batch = tokenize_texts(unit_tokenizer, texts)
        assert [batch.encoded(i) for i in range(3)] == [encode_text(unit_tokenizer, t) for t in texts]
        assert tokenize_texts(unit_tokenizer, []).encodings() == []

    def test_empty_and_reversed_spans_label_nothing(self):
        import numpy as np

        from tasks.core.chat import _labels_in_spans

        ids = np.arange(10, dtype=np.int32)
        labels = _labels_in_spans(ids, [(2, 4), (6, 6), (8, 7), (3, 5)])
        assert labels.tolist() == [IGNORE_INDEX] * 2 + [2, 3, 4] + [IGNORE_INDEX] * 5
