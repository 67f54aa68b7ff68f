"""Prompts: the persona's voice, the conversation trimmed to fit, and turns that end cleanly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persona.contract import GenerationRequest, Message
from persona.engine import TransformersEngine, Work
from persona.models import load_model
from persona.personas import Persona, Sampling
from persona.prompting import (
    _chat_messages,
    _chat_text,
    _content_is_verbatim,
    _conversation,
    _render_chat,
    _shape_of,
    build_prompt,
    build_prompts,
)


@pytest.fixture(scope="module")
def chat_model(tiny_llama_dir, tmp_path_factory):
    return load_model(str(tiny_llama_dir), cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def plain_model(tiny_gpt2_dir, tmp_path_factory):
    return load_model(str(tiny_gpt2_dir), cache_dir=tmp_path_factory.mktemp("cache"))


PERSONA = Persona(
    name="sage",
    prompt={"system": "You are Sage.", "examples": [{"user": "Hi?", "assistant": "Breathe first."}]},
)


def conversation(*texts: str) -> GenerationRequest:
    roles = ["user", "assistant"]
    return GenerationRequest(
        persona="sage", messages=[Message(role=roles[i % 2], content=t) for i, t in enumerate(texts)]
    )


def test_chat_model_gets_system_examples_and_turns(chat_model):
    prompt = build_prompt(PERSONA, conversation("How are you?"), chat_model, Sampling())
    text = chat_model.tokenizer.decode(prompt.token_ids)
    assert text.index("You are Sage.") < text.index("Breathe first.") < text.index("How are you?")
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_plain_model_gets_a_transcript_and_stops_at_the_next_speaker(plain_model):
    prompt = build_prompt(PERSONA, conversation("How are you?"), plain_model, Sampling())
    text = plain_model.tokenizer.decode(prompt.token_ids)
    assert text.endswith("User: How are you?\nSage:")
    assert "\nUser:" in prompt.stop and "\nSage:" in prompt.stop


def test_long_history_drops_oldest_turns_and_keeps_the_newest(chat_model):
    chat_model_small = chat_model
    old = ["an old turn " * 40] * 9
    request = conversation(*old, "the newest question")
    sampling = Sampling(max_new_tokens=8)
    full = build_prompt(PERSONA.model_copy(update={"prompt": PERSONA.prompt.model_copy(update={"max_history_turns": 64})}),
                        request, chat_model_small, sampling)
    assert len(full.token_ids) <= chat_model_small.context_tokens - 8
    text = chat_model_small.tokenizer.decode(full.token_ids)
    assert "the newest question" in text
    assert text.count("an old turn an old turn") < 9 * 39  # some old turns were dropped


def test_a_newest_message_longer_than_the_context_is_cut_from_its_start(chat_model):
    request = conversation("word " * 2000 + "the very end")
    prompt = build_prompt(PERSONA, request, chat_model, Sampling(max_new_tokens=8))
    assert len(prompt.token_ids) <= chat_model.context_tokens - 8
    assert "the very end" in chat_model.tokenizer.decode(prompt.token_ids)


def test_reply_ends_before_a_stop_string(plain_model):
    engine = TransformersEngine(plain_model)
    ids = plain_model.tokenizer.encode("Patience is")
    greedy = Sampling(temperature=0.0, max_new_tokens=20, repetition_penalty=1.0)
    [free] = engine.generate([Work(ids, greedy)])
    assert len(free.text) > 6
    stop = free.text[3:6]
    [stopped] = engine.generate([Work(ids, greedy, stop=[stop])])
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and free.text.startswith(stopped.text)


def test_post_request_on_a_prompt_only_persona_asks_for_a_post(chat_model):
    request = GenerationRequest(persona="sage", mode="complete", prefix="Patience")
    prompt = build_prompt(PERSONA, request, chat_model, Sampling())
    text = chat_model.tokenizer.decode(prompt.token_ids)
    assert PERSONA.prompt.post_instruction in text and text.endswith("Patience")


def test_prompts_built_together_equal_prompts_built_one_by_one(chat_model, plain_model):
    """The worker's batched path: one tokenizer call, the same ids; long ones still trimmed."""
    roomy = PERSONA.model_copy(update={"prompt": PERSONA.prompt.model_copy(update={"max_history_turns": 64})})
    items = [
        (PERSONA, conversation("How are you?"), Sampling()),
        (PERSONA, conversation("Hello", "Hi.", "What is patience?"), Sampling(stop=["END"])),
        (roomy, conversation(*(["an old turn " * 40] * 9), "the newest question"), Sampling(max_new_tokens=8)),
        (PERSONA, GenerationRequest(persona="sage", mode="complete", prefix="Once"), Sampling()),
    ]
    for model in (chat_model, plain_model):
        together = build_prompts(items, model)
        one_by_one = [build_prompt(p, r, model, s) for p, r, s in items]
        assert [p.token_ids for p in together] == [p.token_ids for p in one_by_one]
        assert [p.stop for p in together] == [p.stop for p in one_by_one]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=20), min_size=1, max_size=6), st.booleans())
def test_spliced_chat_text_equals_the_rendered_template(chat_model, contents, with_system):
    persona = PERSONA if with_system else Persona(name="plain")
    turns = [Message(role=("user", "assistant")[n % 2], content=c) for n, c in enumerate(contents)]
    tokenizer = chat_model.tokenizer
    assert _content_is_verbatim(tokenizer)  # the bundled template is spliced
    assert _chat_text(tokenizer, persona, turns) == _render_chat(tokenizer, _chat_messages(persona, turns))


_ADDED = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.text(max_size=20) | st.sampled_from([f"a{t}b" for t in _ADDED] + [" 12", "\n\nx ", "naïve 🙂"]),
             min_size=1, max_size=6),
    st.booleans(),
)
def test_spliced_prompt_ids_equal_the_whole_text_tokenized(chat_model, contents, with_system):
    """Ids are spliced per conversation shape, and come out as tokenizing the whole rendered
    text would give them, whatever the contents (an added token's text in one included)."""
    persona = PERSONA if with_system else Persona(name="plain", prompt={"max_history_turns": 64})
    request = conversation(*contents)
    tokenizer = chat_model.tokenizer
    text = _render_chat(tokenizer, _chat_messages(persona, _conversation(persona, request)))
    whole = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert build_prompts([(persona, request, Sampling())], chat_model)[0].token_ids == whole


def test_the_bundled_template_has_its_ids_spliced(chat_model):
    """Only the segments holding contents are encoded (the ids around them are kept per shape)."""
    turns = _conversation(PERSONA, conversation("Hello", "Hi.", "What is patience?"))
    shape = _shape_of(chat_model.tokenizer, PERSONA, turns)
    assert shape is not None and shape.encoder is not None
    assert shape.segments(turns) == ["user\nHello", "assistant\nHi.", "user\nWhat is patience?"]
    assert shape.segments([Message(role="user", content="a<|im_end|>b")] + turns[1:]) is None  # the text path


def test_a_template_that_changes_contents_is_rendered_whole(chat_model):
    import copy

    tokenizer = copy.deepcopy(chat_model.tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "(message['content'] | trim)")
    assert not _content_is_verbatim(tokenizer)
    turns = [Message(role="user", content="  padded  ")]
    text = _chat_text(tokenizer, PERSONA, turns)
    assert text == _render_chat(tokenizer, _chat_messages(PERSONA, turns)) and "\npadded<|im_end|>" in text
