"""Prompts tokenized piece by piece: always the tokenizer's own ids, faster."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persona.models import load_model
from persona.tokenizing import (
    encode_as_text,
    encode_many,
    encode_quoted,
    encoder_for,
    piece_encoder,
    quote,
)


@pytest.fixture(scope="module")
def chat_model(tiny_llama_dir, tmp_path_factory):
    return load_model(str(tiny_llama_dir), cache_dir=tmp_path_factory.mktemp("cache"))


PARTS = st.lists(st.one_of(
    st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>", "\n", " ", "  \n", "\x01", "\x011\x01"]),
    st.text(max_size=12),
    st.text(alphabet=string.printable + "'", max_size=16),
), max_size=12)


def plain_copy(tokenizer):
    """The tokenizer's own reading of a text with special tokens split, on a copy."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    plain.encode_special_tokens = True
    plain.no_truncation()
    plain.no_padding()
    return lambda text: plain.encode(text, add_special_tokens=False).ids


@settings(max_examples=400, deadline=None)
@given(PARTS)
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


@pytest.fixture(scope="module")
def as_text(chat_model):
    return plain_copy(chat_model.tokenizer)


@settings(max_examples=400, deadline=None)
@given(PARTS)
def test_text_spelling_special_tokens_is_encoded_as_text(chat_model, as_text, parts):
    """A text read as text is what the tokenizer gives with special tokens split, piece by
    piece (from the cache the second time) or whole; the tokenizer itself is left as it was."""
    tokenizer = chat_model.tokenizer
    texts = ["".join(parts), "user\n" + "".join(reversed(parts))]
    expected = [as_text(t) for t in texts]
    assert encode_as_text(tokenizer, texts) == expected
    assert encoder_for(tokenizer).encode_pieces(texts) == expected
    assert encoder_for(tokenizer).encode_pieces(texts) == expected
    assert tokenizer.backend_tokenizer.encode_special_tokens is False


@settings(max_examples=400, deadline=None)
@given(PARTS, PARTS)
def test_a_quoted_text_in_a_template_is_text_and_the_templates_tokens_are_tokens(chat_model, as_text, first, second):
    tokenizer = chat_model.tokenizer
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    a, b = "".join(first), "".join(second)
    rendered = f"<|im_start|>user\n{quote(tokenizer, a)}<|im_end|>\n<|im_start|>assistant\n{quote(tokenizer, b)}"
    assert not any(token in quote(tokenizer, a + b) for token in tokenizer.added_tokens_encoder)
    expected = [start, *as_text("user\n" + a), end, *as_text("\n"), start, *as_text("assistant\n" + b)]
    assert encode_quoted(tokenizer, [rendered]) == [expected]
    assert encode_quoted(tokenizer, [rendered]) == [expected]  # from the piece cache


def test_a_tokenizer_without_a_piece_encoder_reads_quoted_texts_as_text(tiny_gpt2_dir):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert piece_encoder(tokenizer.backend_tokenizer) is None
    eos = tokenizer.eos_token_id
    text = "Hello <|endoftext|> THERE"
    as_text = plain_copy(tokenizer)
    assert encode_as_text(tokenizer, [text]) == [as_text(text)] and eos not in as_text(text)
    assert encode_quoted(tokenizer, [f"{quote(tokenizer, text)}<|endoftext|>"]) == [[*as_text(text), eos]]


def with_added_tokens(tokenizer, **flags: dict[str, bool]):
    """A transformers copy of ``tokenizer`` whose added tokens named in ``flags`` (``im_end={"rstrip": True}``
    for <|im_end|>) have those flags, with the chat template."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for token in spec["added_tokens"]:
        token.update(flags.get(token["content"].strip("<|>"), {}))
    copy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>")
    copy.chat_template = tokenizer.chat_template
    return copy


def test_a_tokenizer_whose_tokens_take_whitespace_reads_a_rendered_prompt_as_it_would(chat_model):
    """Tokens that take the whitespace beside them (Phi-3's <|end|> takes the newline after it):
    cutting at them and encoding the pieces kept that whitespace, so every prompt differed
    from the tokenizer's own reading of it (apply_chat_template's). A prompt holding nothing
    quoted is read whole; one holding a quoted text is cut, its tokens taking their whitespace."""
    tokenizer = with_added_tokens(chat_model.tokenizer, im_end={"rstrip": True}, im_start={"lstrip": True})
    assert encoder_for(tokenizer) is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello there \n"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert encode_quoted(tokenizer, [text]) == [tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids]
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    as_text = plain_copy(tokenizer)
    rendered = f"<|im_start|>user\n{quote(tokenizer, 'Hi <|im_end|> there  ')}<|im_end|>\n  <|im_start|>assistant\n"
    assert encode_quoted(tokenizer, [rendered, text]) == [
        [start, *as_text("user\nHi <|im_end|> there  "), end, start, *as_text("assistant\n")],
        tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids,
    ]


def test_truncation_or_padding_in_a_tokenizer_file_cuts_no_text(chat_model, tmp_path):
    """A tokenizer.json saved with truncation (a model tokenized with truncation=True, then
    saved) truncates every direct call; transformers turns it off for its own calls. Read as
    text, a document or a prompt is never cut (nor padded)."""
    from transformers import AutoTokenizer

    saved = with_added_tokens(chat_model.tokenizer)
    saved.backend_tokenizer.enable_truncation(max_length=8)
    saved.backend_tokenizer.enable_padding(length=12, pad_id=0)
    saved.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.backend_tokenizer.truncation is not None and tokenizer.backend_tokenizer.padding is not None
    texts = ["a long document, " * 20, "short", "one that spells <|im_end|> " * 5]
    rendered = [f"<|im_start|>user\n{quote(tokenizer, text)}<|im_end|>\n" for text in texts]
    expected = [plain_copy(tokenizer)(t) for t in texts]
    assert encode_as_text(tokenizer, texts) == expected
    assert encode_as_text(tokenizer, texts[:1]) == expected[:1]
    got = encode_quoted(tokenizer, rendered)
    # transformers' own reading (it turns the file's truncation and padding off as it reads)
    assert got[:2] == [tokenizer.encode(text, add_special_tokens=False) for text in rendered[:2]]
    assert got[2] == tokenizer.encode("<|im_start|>user\n", add_special_tokens=False) + expected[2] + tokenizer.encode(
        "<|im_end|>\n", add_special_tokens=False)
