"""Every engine path answers batches with per-row settings; the fast ones agree with eager."""

from __future__ import annotations

import pytest

from persona.engine import TransformersEngine, Work
from persona.engine_modes import llamacpp_available, pick_engine_mode
from persona.models import LoadedModel, load_model
from persona.personas import Sampling


def _batch() -> list[Work]:
    return [
        Work([5, 17, 42, 99], Sampling(temperature=0.0, max_new_tokens=3)),
        Work([11, 12], Sampling(temperature=0.0, max_new_tokens=7, repetition_penalty=1.3)),
        Work([8, 9, 10, 11, 12, 13], Sampling(temperature=0.9, top_k=5, max_new_tokens=5, seed=3)),
        Work([21], Sampling(temperature=1.0, top_k=0, top_p=0.5, max_new_tokens=4, seed=4)),
    ]


def test_fused_engine_gives_the_same_text_as_eager(tiny_llama):
    eager = TransformersEngine(tiny_llama, mode="eager").generate(_batch())
    fused = TransformersEngine(tiny_llama, mode="fused").generate(_batch())
    assert [c.text for c in fused] == [c.text for c in eager]
    assert [c.new_tokens for c in fused] == [c.new_tokens for c in eager]


def test_int8_engine_answers_every_row_within_its_budget(tiny_llama):
    engine = TransformersEngine(tiny_llama, mode="int8")
    assert engine.mode == "int8"
    completions = engine.generate(_batch())
    assert len(completions) == 4
    assert all(1 <= c.new_tokens <= w.sampling.max_new_tokens for c, w in zip(completions, _batch()))


def test_auto_picks_llamacpp_where_it_can_else_int8_for_wide_llamas_fused_for_narrow_eager_for_others(
    tiny_llama, tiny_gpt2_dir, tmp_path
):
    from transformers import LlamaConfig, LlamaForCausalLM

    assert pick_engine_mode("auto", tiny_llama) == ("llamacpp" if llamacpp_available() else "fused")

    def llama(hidden: int) -> LoadedModel:
        """A Llama whose 64-token vocabulary is smaller than its tokenizer's: no GGUF for it."""
        config = LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
        return LoadedModel(
            LlamaForCausalLM(config), tokenizer=tiny_llama.tokenizer, device="cpu", name="odd", has_chat_template=False
        )

    assert pick_engine_mode("auto", llama(512)) == "int8"
    assert pick_engine_mode("auto", llama(32)) == "fused"
    gpt2 = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    assert pick_engine_mode("auto", gpt2) == ("llamacpp" if llamacpp_available() else "eager")
    assert pick_engine_mode("fused", gpt2) == "eager"
    with pytest.raises(ValueError, match="unknown engine mode"):
        pick_engine_mode("turbo", gpt2)


def test_without_llamacpp_auto_says_once_how_to_add_it(tiny_llama, monkeypatch, caplog):
    """An install without the fast extra (a wheel, `persona[all]`) got the slower torch engine
    under `auto` with nothing said; the one hint, for an explicit llamacpp, read
    `pip install '.[fast]'`, which means nothing outside a checkout."""
    import sys

    from persona import engine_modes

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # importing it fails, as on an install without it
    engine_modes._say_fast_missing.cache_clear()
    with caplog.at_level("WARNING", logger="persona.engine_modes"):
        assert [pick_engine_mode("auto", tiny_llama) for _ in range(3)] == ["fused"] * 3
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith("llama.cpp would decode faster here, but llama-cpp-python (the fast extra) is not installed")
    assert said.endswith("pip install 'persona[fast]', or in a checkout pip install -e '.[fast]'")
    caplog.clear()
    assert pick_engine_mode("llamacpp", tiny_llama) == "fused"
    assert "pip install 'persona[fast]'" in caplog.text
    engine_modes._say_fast_missing.cache_clear()  # the next test's process-wide "once" starts afresh


@pytest.mark.parametrize(("mode", "lookahead"), [("fused", False), ("int8", False), ("fused", True)])
def test_a_row_added_while_a_batch_decodes_joins_it_and_leaves_when_done(tiny_llama, mode, lookahead):
    """Continuous batching: a short request joins a long one at the next step, finishes
    first, and at full precision every text is what it is alone (int8 scales the
    activations per batch, so its texts may differ with the company a row keeps)."""
    engine = TransformersEngine(tiny_llama, mode=mode, lookahead=lookahead)
    long = Work([100, 200, 300, 400, 500, 600, 700, 800], Sampling(temperature=0.9, max_new_tokens=12, seed=1))
    short = Work([11, 12], Sampling(temperature=0.0, max_new_tokens=3, repetition_penalty=1.2))
    later = Work([21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], Sampling(temperature=1.0, top_k=9, max_new_tokens=4, seed=2))
    alone = {tag: engine.generate([w])[0] for tag, w in (("long", long), ("short", short), ("later", later))}

    engine.add(long, "long")
    finished = []
    for _ in range(3):
        finished += engine.step()
    engine.add(short, "short")  # a shorter prompt than the running row's cache
    finished += engine.step()
    engine.add(later, "later")  # a longer one
    while engine.active:
        finished += engine.step()
    assert [tag for tag, _ in finished] == ["short", "later", "long"]
    assert [c.new_tokens for _, c in finished] == [3, 4, 12]
    if mode == "fused":
        for tag, completion in finished:
            assert completion.text == alone[tag].text, tag


def test_an_eager_engine_queues_new_rows_until_its_batch_is_done(tiny_llama):
    engine = TransformersEngine(tiny_llama, mode="eager")
    engine.add(Work([5, 17], Sampling(temperature=0.0, max_new_tokens=4)), "first")
    engine.step()
    engine.add(Work([11, 12], Sampling(temperature=0.0, max_new_tokens=1)), "second")
    order = []
    while engine.active:
        order += [tag for tag, _ in engine.step()]
    assert order == ["first", "second"]


def test_generate_refuses_an_engine_that_is_serving_rows(tiny_llama):
    engine = TransformersEngine(tiny_llama, mode="fused")
    engine.add(Work([5], Sampling(temperature=0.0, max_new_tokens=2)), "busy")
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate([Work([6], Sampling(temperature=0.0, max_new_tokens=1))])
    assert engine.abandon() == ["busy"] and engine.active == 0


def test_rows_whose_prompts_cannot_be_read_are_handed_back_to_be_answered(tiny_llama):
    """A prompt read that fails (here: longer than the model's positions) raises from the
    step, and ``abandon`` still names every row the engine held, the ones being admitted
    included, so the worker answers each with the error instead of leaving it unanswered."""
    engine = TransformersEngine(tiny_llama, mode="fused")
    too_long = Work([7] * 600, Sampling(temperature=0.0, max_new_tokens=2))  # the tiny model has 512 positions
    fine = Work([5, 6], Sampling(temperature=0.0, max_new_tokens=4))
    engine.add(too_long, "too long")
    engine.add(fine, "beside it")
    with pytest.raises(IndexError):
        engine.step()
    assert sorted(engine.abandon()) == ["beside it", "too long"]

    engine.add(fine, "running")
    engine.step()
    engine.add(too_long, "joining")
    with pytest.raises(IndexError):
        engine.step()
    assert sorted(engine.abandon()) == ["joining", "running"]
    assert engine.generate([fine])[0].new_tokens == 4  # and the engine serves on


@pytest.mark.parametrize("mode", ["eager", "llamacpp"])
def test_a_reply_ends_at_the_models_last_position(tiny_gpt2_dir, tmp_path, mode):
    """Asked for more tokens than the model has positions left (the tiny GPT-2 has 256), a
    row stops at the last one with finish reason "length". Before, transformers raised
    and llama.cpp aborted the whole worker process."""
    if mode == "llamacpp" and not llamacpp_available():
        pytest.skip("llama-cpp-python is not installed")
    gpt2 = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    engine = TransformersEngine(gpt2, mode=mode, cache_dir=tmp_path)
    assert engine.mode == mode
    engine.stop_ids = set()  # run to the length, whatever it writes
    [reply] = engine.generate([Work([5, 6, 7], Sampling(temperature=0.0, max_new_tokens=400))])
    assert (reply.new_tokens, reply.finish_reason) == (gpt2.context_tokens - 3, "length")


def test_looking_ahead_changes_no_reply(tiny_llama):
    """Launching each next step before reading this one's tokens (what a GPU engine does)
    gives every row the reply it gets step by step, rows ending early on a stop token and
    rows withdrawn while a step is ahead included."""
    plain = TransformersEngine(tiny_llama, mode="fused", lookahead=False)
    ahead = TransformersEngine(tiny_llama, mode="fused", lookahead=True)
    expected = plain.generate(_batch())
    # A token the second row writes now ends it there, while the others go on.
    stop = tiny_llama.tokenizer.encode(expected[1].text, add_special_tokens=False)[-1]
    plain.stop_ids = ahead.stop_ids = {stop}
    expected = plain.generate(_batch())
    assert expected[1].finish_reason == "stop" and expected[1].new_tokens < _batch()[1].sampling.max_new_tokens
    replies = ahead.generate(_batch())
    assert [(c.text, c.new_tokens, c.finish_reason) for c in replies] == [
        (c.text, c.new_tokens, c.finish_reason) for c in expected
    ]

    ahead.stop_ids = set()
    batch = _batch()
    for i, work in enumerate(batch):
        ahead.add(work, i)
    ahead.step()
    assert ahead._ahead is not None, "the next step was not launched ahead"
    assert ahead.remove(lambda tag: tag in (0, 2)) == 2
    left = {}
    while ahead.active:
        left.update(dict(ahead.step()))
    plain.stop_ids = set()
    alone = plain.generate([batch[1], batch[3]])
    assert [left[1].text, left[3].text] == [c.text for c in alone]


@pytest.mark.parametrize("mode", ["eager", "fused"])
def test_a_top_k_past_any_vocabulary_samples_as_no_top_k_and_fails_no_batch(tiny_llama, mode):
    """The contract bounds top_k below by 0 only: one request with top_k=2**63 failed its
    whole batch ("Overflow when unpacking long long"), the rows beside it included."""
    from persona.contract import SamplingOverrides

    huge = Sampling(temperature=1.0, max_new_tokens=5, seed=7).merged(SamplingOverrides(top_k=2**63))
    engine = TransformersEngine(tiny_llama, mode=mode)
    replies = engine.generate([*_batch(), Work([3, 4, 5], huge)])
    same = engine.generate([Work([3, 4, 5], huge.model_copy(update={"top_k": 0}))])
    assert replies[-1].text == same[0].text and replies[-1].new_tokens == 5
    assert [c.text for c in replies[:-1]] == [c.text for c in engine.generate(_batch())]


def test_a_continuation_keeps_its_leading_space(tiny_gpt2_dir, tmp_path):
    """Every completion was stripped, so `persona generate --prefix "Life is"` printed "Life
    isoften used...": the space the model wrote before its first word was gone. The engine
    now cuts only trailing whitespace (a chat reply is stripped by the worker)."""
    import torch

    gpt2 = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    engine = TransformersEngine(gpt2, mode="eager", cache_dir=tmp_path)
    spaced = 0
    for prompt in ("The quiet", "A garden of", "Life is", "Rain", "Sage said", "It was", "Words and"):
        ids = gpt2.tokenizer(prompt).input_ids
        with torch.no_grad():
            greedy = gpt2.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6,
                                         eos_token_id=gpt2.tokenizer.eos_token_id, pad_token_id=gpt2.tokenizer.eos_token_id)
        expected = gpt2.tokenizer.decode(greedy[0, len(ids):], skip_special_tokens=True).rstrip("\ufffd").rstrip()
        [reply] = engine.generate([Work(ids, Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=6))])
        assert reply.text == expected
        spaced += expected[:1].isspace()
    assert spaced  # some continuation began a new word, and kept its space
