"""Prompts tokenized piece by piece: always the tokenizer's own ids, faster."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persona.models import load_model
from persona.tokenizing import encode_many, piece_encoder


@pytest.fixture(scope="module")
def chat_model(tiny_llama_dir, tmp_path_factory):
    return load_model(str(tiny_llama_dir), cache_dir=tmp_path_factory.mktemp("cache"))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(
    st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>", "\n", " ", "  \n"]),
    st.text(max_size=12),
    st.text(alphabet=string.printable + "'", max_size=16),
), max_size=12))
def test_encoding_piece_by_piece_equals_encoding_the_whole_text(chat_model, parts):
    texts = ["".join(parts), "user\n" + "".join(reversed(parts))]
    backend = chat_model.tokenizer.backend_tokenizer
    assert piece_encoder(backend).by_words  # the bundled tokenizer takes the fast path, word by word
    whole = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    assert encode_many(chat_model.tokenizer, texts) == whole
    assert encode_many(chat_model.tokenizer, texts) == whole  # from the piece cache the second time


def test_a_tokenizer_with_a_normalizer_is_encoded_whole(tiny_gpt2_dir):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert piece_encoder(tokenizer.backend_tokenizer) is None
    texts = ["Hello THERE", ""]
    assert encode_many(tokenizer, texts) == [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
