"""A request whose deadline passes while its long prompt is read stops being read then.

A prompt of thousands of tokens is read in chunks (``PROMPT_CHUNK_TOKENS``; by the
fused and int8 engines on a CPU only), and its deadline is looked at between them: read in one go, it held its worker (and everyone
queued behind it) for seconds after its caller had stopped waiting.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from persona import constants as keys
from persona.contract import ErrorKind, GenerationRequest, Message
from persona.engine import TransformersEngine, Work
from persona.engine_modes import llamacpp_available
from persona.personas import Sampling

LONG_CONTEXT_TOKENS = 8192
# How long after its deadline a request whose prompt is being read may be answered: one
# chunk's read, a few tenths of a second here, with room for a machine whose two cores are
# shared by several test runs (up to 3 s seen). Read whole, the prompt took 10 to 21 s.
AFTER_DEADLINE_S = 4.0

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python (the `fast` extra) is not installed")


@pytest.fixture(scope="module")
def long_context_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A small random Llama with the bundled tokenizer that holds 8,192 positions: reading
    a prompt that long takes it 10 s or more on two cores, a chunk of it a few tenths."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LONG_CONTEXT_TOKENS,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("long-context-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def long_conversation(persona: str, deadline: float) -> GenerationRequest:
    """A chat of a dozen turns of 7,000 characters: more than the model's context holds, so
    its prompt is cut to about 8,000 tokens."""
    words = " ".join(f"the {i} quick foxes jumped over {i * 7} lazy dogs." for i in range(900))[:7000]
    turns = [Message(role="user" if i % 2 == 0 else "assistant", content=words) for i in range(11)]
    return GenerationRequest(persona=persona, messages=[*turns, Message(role="user", content="And then?")], deadline=deadline)


@pytest.mark.parametrize("engine", ["eager", "fused", "int8", pytest.param("llamacpp", marks=needs_llamacpp)])
def test_a_request_whose_deadline_passes_while_its_long_prompt_is_read_stops_then(
    engine, settings, redis_client, client, write_persona, long_context_llama_dir
):
    """Its caller hears "timeout" one chunk's read after the deadline, not once the whole
    prompt is read, and the worker goes on to the next request."""
    from persona.pool import ModelPool
    from persona.worker import Worker

    settings.worker.engine, settings.worker.gguf_type = engine, "f16"
    write_persona("reader", base=str(long_context_llama_dir))
    worker = Worker(settings, redis_client, ModelPool(settings, "cpu"), worker_id=f"w-{engine}")
    worker.preload(["reader"])
    deadline_s = 1.0
    late = client.submit(long_conversation("reader", deadline=time.time() + deadline_s))
    started = time.monotonic()
    while not redis_client.exists(keys.reply_key(late.id)) and time.monotonic() - started < 60:
        worker.turn(block_ms=0)
    took = time.monotonic() - started
    reply = client.wait(late, timeout=1)
    assert not reply.ok and reply.error.kind is ErrorKind.timeout and "deadline" in reply.error.message
    assert took < deadline_s + AFTER_DEADLINE_S, f"its prompt was read to its end: answered after {took:.1f} s"
    after = client.submit(GenerationRequest(persona="reader", messages=[Message(role="user", content="hello")]))
    worker.step(block_ms=1000)
    assert client.wait(after, timeout=5).ok


@pytest.mark.parametrize("mode", ["eager", "fused", "int8", pytest.param("llamacpp", marks=needs_llamacpp)])
def test_a_read_stopped_at_a_deadline_keeps_nothing_and_the_row_beside_it_is_read_again(
    mode, long_context_llama_dir, model_cache_dir, tmp_path, one_torch_thread
):
    """A long row and a short one are read together; the long one's deadline passes after
    the first chunk: it comes back "deadline", and the short one, read again, gets the
    reply it gets alone (nothing of the stopped read stayed in the cache)."""
    from persona.models import load_model

    loaded = load_model(str(long_context_llama_dir), cache_dir=model_cache_dir)
    engine = TransformersEngine(loaded, mode=mode, cache_dir=tmp_path, threads=1, gguf_type="f16")
    sampling = Sampling(temperature=0.0, max_new_tokens=4)
    short = Work(list(range(50, 70)), sampling)
    [alone] = engine.generate([short])
    engine.add(Work(list(range(1000, 3000)), sampling, deadline=time.time() + 0.05), "late")  # a chunk takes longer
    engine.add(short, "in time")
    finished = []
    while engine.active:
        finished += engine.step()
    outcomes = dict(finished)
    assert outcomes["late"].finish_reason == "deadline"
    assert outcomes["in time"].text == alone.text and outcomes["in time"].finish_reason == alone.finish_reason


def test_a_long_prompt_read_in_chunks_predicts_as_if_read_whole(long_context_llama_dir, model_cache_dir):
    """The eager decoder reads 700 tokens in two chunks, beside a short left-padded row,
    and the next-token logits are those of one pass over each prompt."""
    from persona.models import load_model

    loaded = load_model(str(long_context_llama_dir), cache_dir=model_cache_dir)
    engine = TransformersEngine(loaded, mode="eager")
    long, short = list(range(1000, 1700)), list(range(50, 70))
    decoder = engine.decoder
    width = len(long)
    ids = torch.tensor([long, [0] * (width - len(short)) + short])
    mask = (torch.arange(width) >= torch.tensor([[0], [width - len(short)]])).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        read = decoder.start(ids, mask, positions, room=1)
        whole = [loaded.model(torch.tensor([p])).logits[0, -1] for p in (long, short)]
    for got, expected in zip(read, whole, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_long_prompt_read_in_chunks_by_the_fused_decoder_predicts_as_if_read_whole(long_context_llama_dir, model_cache_dir):
    """On a CPU the fused decoder reads 1,100 tokens in three chunks, beside a short
    left-padded row joining a running one: every row's next-token logits, and the step
    after, are those of Hugging Face's pass over each whole sequence."""
    from persona.llama_decoder import LlamaDecoder
    from persona.models import load_model

    loaded = load_model(str(long_context_llama_dir), cache_dir=model_cache_dir)
    decoder = LlamaDecoder(loaded.model)
    assert decoder.reads_in_chunks
    running, long, short = list(range(200, 230)), list(range(1000, 2100)), list(range(50, 70))
    width = len(long)
    ids = torch.tensor([long, [0] * (width - len(short)) + short])
    mask = (torch.arange(width) >= torch.tensor([[0], [width - len(short)]])).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        decoder.start(torch.tensor([running]), torch.ones(1, len(running), dtype=torch.long), torch.arange(len(running))[None], 2)
        read = decoder.join(ids, mask, positions, room=2)
        following = torch.tensor([7, 8, 9])
        stepped = decoder.step(following, torch.tensor([len(p) for p in (running, long, short)]))
        # Hugging Face's last two positions over each sequence and its next token: the read's
        # logits, then the step's
        whole = [
            loaded.model(torch.tensor([p + [t]]), logits_to_keep=2).logits[0]
            for p, t in zip((running, long, short), following.tolist(), strict=True)
        ]
    for got, expected in zip(read, whole[1:], strict=True):
        torch.testing.assert_close(got, expected[0], atol=1e-4, rtol=1e-4)
    for got, expected in zip(stepped, whole, strict=True):
        torch.testing.assert_close(got, expected[1], atol=1e-4, rtol=1e-4)


def test_a_fused_read_stopped_between_chunks_leaves_the_running_rows_as_they_were(long_context_llama_dir, model_cache_dir):
    """A join whose ``stop`` says so after the first chunk returns nothing and keeps
    nothing: the running row's next step is what it is without that join."""
    from persona.llama_decoder import LlamaDecoder
    from persona.models import load_model

    loaded = load_model(str(long_context_llama_dir), cache_dir=model_cache_dir)
    decoder = LlamaDecoder(loaded.model)
    running = list(range(200, 230))
    asked = []
    with torch.inference_mode():
        decoder.start(torch.tensor([running]), torch.ones(1, len(running), dtype=torch.long), torch.arange(len(running))[None], 2)
        long = torch.arange(1000, 2100)[None]
        stopped = decoder.join(long, torch.ones_like(long), torch.arange(long.shape[1])[None], 2, stop=lambda: not asked.append(1))
        stepped = decoder.step(torch.tensor([7]), torch.tensor([len(running)]))
        expected = loaded.model(torch.tensor([running + [7]])).logits[0, -1]
    assert stopped is None and asked == [1]  # asked once, before the second chunk
    torch.testing.assert_close(stepped[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "fused", pytest.param("llamacpp", marks=needs_llamacpp)])
def test_a_row_past_its_deadline_before_it_is_read_is_not_read(mode, tiny_llama, tmp_path):
    """Every decode path, the one that reads a prompt in one pass too: a row whose deadline
    passed while it waited to join comes back "deadline", unread; the row beside it is answered."""
    engine = TransformersEngine(tiny_llama, mode=mode, cache_dir=tmp_path, threads=1, gguf_type="f16")
    sampling = Sampling(temperature=0.0, max_new_tokens=3)
    engine.add(Work([5, 17, 42], sampling, deadline=time.time() - 1), "late")
    engine.add(Work([5, 17, 43], sampling, deadline=time.time() + 60), "in time")
    finished = []
    while engine.active:
        finished += engine.step()
    outcomes = {tag: completion.finish_reason for tag, completion in finished}
    assert outcomes == {"late": "deadline", "in time": "length"}


@pytest.mark.parametrize("mode", ["eager", "fused", pytest.param("llamacpp", marks=needs_llamacpp)])
def test_a_late_row_joining_a_running_batch_leaves_and_the_batch_runs_on(mode, tiny_llama, tmp_path):
    """With every row waiting late, llama.cpp's fitting took the max of nothing: the step raised,
    and the worker failed the whole running batch with that error."""
    engine = TransformersEngine(tiny_llama, mode=mode, cache_dir=tmp_path, threads=1, gguf_type="f16")
    engine.add(Work([5, 17, 42], Sampling(temperature=0.0, max_new_tokens=10)), "running")
    finished = engine.step()  # "running" is read and decodes
    engine.add(Work([5, 17, 43], Sampling(temperature=0.0, max_new_tokens=3), deadline=time.time() - 1), "late")
    while engine.active:
        finished += engine.step()
    assert {tag: completion.finish_reason for tag, completion in finished} == {"late": "deadline", "running": "length"}
