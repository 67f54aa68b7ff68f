"""Stop strings: a reply ends at the token that completes one, and the reply's tail is
decoded to look for them only after tokens that may complete one."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from persona.contract import SamplingOverrides
from persona.engine import TransformersEngine, Work
from persona.personas import Sampling
from persona.sampling import _Rows
from persona.stop_strings import _hits_stop, _may_complete, _token_pieces

TEXTS = [
    "Patience is a garden.\nUser: and the weeds?\nSage: Pull one a day.",
    "Café crème, s'il vous plaît — déjà vu à Zürich. Naïve façade!",
    "禅の心: 一日一歩。 Mind the gap 🙂🚀 then rest\t\ttabs  and  spaces.",
    "Don't stop ; it's fine . Really ? Yes !  <|endoftext|> after a special token",
]


def _stop_strings(text: str) -> list[str]:
    """Substrings of ``text`` ending at every character: after letters, accents, CJK,
    emoji, punctuation, spaces, tabs and newlines."""
    return sorted({text[max(0, end - length) : end] for end in range(1, len(text) + 1) for length in (1, 2, 5)})


def _sentencepiece_tokenizer():
    """A Llama-2-style tokenizer (SentencePiece BPE: '▁' for spaces, stripped when a
    token is decoded alone), trained here on the texts."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(TEXTS * 4, vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer, unk_token="<unk>", eos_token="<|endoftext|>")


@pytest.fixture(params=["smollm2", "gpt2", "sentencepiece"])
def tokenizer(request, smollm2_tokenizer_dir, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    if request.param == "sentencepiece":
        return _sentencepiece_tokenizer()
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir if request.param == "smollm2" else tiny_gpt2_dir)


def test_the_token_that_completes_a_stop_string_is_always_looked_at(tokenizer):
    """However the string ends (mid-word, on an accent, half an emoji's bytes, a space, a
    special token), the token at which the decoded reply first holds it passes the
    first look, so the reply ends exactly where it did when every token was checked."""
    pieces = _token_pieces(tokenizer)
    checked = 0
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for stop in _stop_strings(text):
            first = next((n for n in range(1, len(ids) + 1) if _hits_stop(tokenizer, ids[:n], [stop])), None)
            if first is None:  # not in the decoded text (an unknown character, a special token)
                continue
            checked += 1
            assert _may_complete(pieces, ids[first - 1], [stop]), (stop, tokenizer.decode(ids[:first]))
    assert checked > 300


def test_a_reply_is_decoded_only_after_tokens_that_may_end_it(tiny_llama, monkeypatch):
    engine = TransformersEngine(tiny_llama, mode="eager")
    engine.stop_ids = set()
    work = Work([5, 17, 42, 99], Sampling(temperature=1.0, top_k=0, max_new_tokens=60, seed=1), stop=["\nUser:"])
    decoded = []
    decode = tiny_llama.tokenizer.decode
    monkeypatch.setattr(tiny_llama.tokenizer, "decode", lambda ids, **kw: decoded.append(ids) or decode(ids, **kw))
    [reply] = engine.generate([work])
    assert reply.new_tokens == 60 and reply.finish_reason == "length"
    # The reply's own text once, and the tail only after the rare token holding ':'.
    assert len(decoded) < 10


def test_an_empty_stop_string_is_refused():
    for bad in ([""], ["ok", ""], ["x" * 201], ["s"] * 17):
        with pytest.raises(ValidationError, match="stop"):
            SamplingOverrides(stop=bad)
        with pytest.raises(ValidationError, match="stop"):
            Sampling(stop=bad)
    assert SamplingOverrides(stop=["\nUser:"]).stop == ["\nUser:"]


def test_a_stop_string_of_emoji_ends_the_reply_where_it_appears(smollm2_tokenizer_dir):
    """The tail looked at was as many tokens as the stop string has characters, plus four;
    an emoji takes up to four tokens, so '🧘🧘🧘' (nine tokens) was never seen while
    decoding and the reply ran to its length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    ids = tokenizer.encode("Calm now 🧘🧘🧘 and then more words follow", add_special_tokens=False)
    first = next(n for n in range(1, len(ids) + 1) if "🧘🧘🧘" in tokenizer.decode(ids[:n]))
    assert _hits_stop(tokenizer, ids[:first], ["🧘🧘🧘"])


def test_a_reply_cut_at_its_length_mid_character_drops_the_half_character(tiny_llama):
    engine = TransformersEngine(tiny_llama, mode="eager")
    engine.stop_ids = set()
    ids = tiny_llama.tokenizer.encode("Be naïve 🧘", add_special_tokens=False)  # the emoji: three tokens
    cut = ids[:-1]  # the emoji's last byte never came
    assert tiny_llama.tokenizer.decode(cut).endswith("\ufffd")
    rows = _Rows([Work([1], Sampling(max_new_tokens=len(cut)))], [0], torch.device("cpu"), 0)
    finished = {}
    for token in cut:
        finished = engine._settle(rows, [token])
    assert finished[0].finish_reason == "length" and finished[0].text == "Be naïve"


def test_a_chat_model_starting_the_next_turn_ends_its_reply(tiny_llama):
    """<|im_start|> is skipped when a reply is decoded, so a model going on to write the
    user's turn showed as 'Be still.user\\nAnd then what?'."""
    vocab = tiny_llama.tokenizer.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|im_start|>"]} <= set(tiny_llama.stop_token_ids)
