"""llama.cpp serves the bundled GGUF and checkpoints written as GGUF, with our sampling."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from persona.engine import TransformersEngine, Work
from persona.engine_modes import llamacpp_available
from persona.models import load_model
from persona.personas import Sampling
from tests.arrivals import random_works, serve_at_random

pytestmark = pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python (the `fast` extra) is not installed")


def test_the_bundled_gguf_agrees_with_the_dequantised_model(model_cache_dir):
    """llama.cpp on the shipped Q4_1 file and transformers on its dequantised weights
    predict nearly the same next-token distribution."""
    from persona.llamacpp_decoder import LlamaCppDecoder

    loaded = load_model("smollm2", cache_dir=model_cache_dir)
    decoder = LlamaCppDecoder(loaded.gguf_file, threads=1, context_tokens=1024)
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog because").input_ids
    ours = decoder.start(torch.tensor([ids]), torch.ones((1, len(ids)), dtype=torch.long), None, 1)[0]
    with torch.no_grad():
        reference = loaded.model(torch.tensor([ids])).logits[0, -1]
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="sum")
    assert kl < 0.05
    assert reference.argmax().item() in ours.topk(3).indices.tolist()


def test_llamacpp_engine_lets_a_row_join_a_running_batch(tiny_llama, tmp_path):
    """A short request added while a long one decodes finishes first, with the text it
    gets alone; the long one's text is unchanged by its company."""
    engine = TransformersEngine(tiny_llama, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f16")
    assert engine.mode == "llamacpp"
    long = Work([5, 17, 42, 99], Sampling(temperature=0.0, max_new_tokens=12))
    short = Work([11, 12, 13], Sampling(temperature=0.0, max_new_tokens=3))
    [long_alone, short_alone] = [engine.generate([w])[0] for w in (long, short)]

    engine.add(long, "long")
    finished = []
    for _ in range(4):
        finished += engine.step()
    engine.add(short, "short")
    while engine.active:
        finished += [(tag, c) for tag, c in engine.step()]
    assert [tag for tag, _ in finished] == ["short", "long"]
    texts = dict(finished)
    assert texts["short"].text == short_alone.text and texts["long"].text == long_alone.text
    assert texts["long"].new_tokens == long_alone.new_tokens


def test_auto_serves_the_bundled_model_with_llamacpp_on_cpu(model_cache_dir, tmp_path):
    loaded = load_model("smollm2", cache_dir=model_cache_dir)
    engine = TransformersEngine(loaded, mode="auto", cache_dir=tmp_path, threads=1, gguf_type="q4_1")
    assert engine.mode == "llamacpp"
    [reply] = engine.generate([Work(loaded.tokenizer("Hello, my name is").input_ids, Sampling(temperature=0.0, max_new_tokens=5))])
    assert reply.new_tokens >= 1 and reply.text


def test_rows_wait_for_cache_room_instead_of_failing(tiny_llama, tmp_path):
    """With room for two replies in the cache, a third request waits until one leaves,
    then is answered like the others."""
    engine = TransformersEngine(tiny_llama, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f16", kv_tokens=1024)
    rows = [Work([5 + i, 17, 42], Sampling(temperature=1.0, top_k=0, max_new_tokens=200, seed=i)) for i in range(3)]
    rows[0] = Work([5, 17, 42], Sampling(temperature=1.0, top_k=0, max_new_tokens=100, seed=0))
    for i, work in enumerate(rows):
        engine.add(work, i)
    engine.step()
    assert engine.decoder.sequences and len(engine.decoder.sequences) == 2  # the third waits
    finished = []
    while engine.active:
        finished += engine.step()
    assert sorted(tag for tag, _ in finished) == [0, 1, 2]
    # Each ran to its length, or to a stop token its seed drew (sampled at temperature 1 over a
    # random model's vocabulary, which holds one): none was cut short by the wait.
    for (_tag, c), w in zip(sorted(finished, key=lambda f: f[0]), rows):
        assert c.finish_reason in ("length", "stop")
        assert c.new_tokens == w.sampling.max_new_tokens if c.finish_reason == "length" else 0 < c.new_tokens < w.sampling.max_new_tokens


def test_a_prompt_that_begins_like_a_recent_one_reads_only_the_rest(tiny_llama, tmp_path):
    """Two messages to the same persona share its system prompt: the second reads only
    its own message from the cache's kept prefix, and its reply is what a fresh engine
    gives it (the shared cells hold exactly what it would have computed)."""
    system = list(range(100, 160))  # a persona's system prompt and examples: 60 tokens
    first = Work([*system, 7, 8, 9], Sampling(temperature=0.0, max_new_tokens=8))
    second = Work([*system, 21, 22], Sampling(temperature=0.0, max_new_tokens=8))
    fresh = TransformersEngine(tiny_llama, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f32")
    [expected] = fresh.generate([second])
    assert fresh.decoder.reused_tokens == 0

    engine = TransformersEngine(tiny_llama, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f32")
    engine.generate([first])
    [reply] = engine.generate([second])
    assert engine.decoder.reused_tokens == len(system)
    assert reply.text == expected.text and reply.new_tokens == expected.new_tokens
    [again] = engine.generate([second])  # all but its last token kept: one token is read
    assert engine.decoder.reused_tokens == len(system) + len(second.token_ids) - 1
    assert again.text == expected.text


def test_a_seeded_reply_is_the_same_whatever_the_engine_did_before(model_cache_dir, tmp_path):
    """`persona ask sage "Tell me everything about rivers" --max-new-tokens 12 --seed 1` said
    "A river's waters..." first after `persona up`, then "A river's end may not..." on every
    later call: those continued the kept prompt, and llama.cpp's sums differ with where a
    prompt is cut and where its cells sit. A seeded row that starts a batch now starts from
    an empty cache; unseeded rows still read only what follows a kept prefix."""
    loaded = load_model("smollm2", cache_dir=model_cache_dir)
    engine = TransformersEngine(loaded, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="q4_1")
    engine.warm_up()
    system = "You are a sage. You answer in short, calm sentences about nature and the mind. " * 3

    def chat(text: str, seed: int | None, new_tokens: int = 8) -> Work:
        turns = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        ids = loaded.tokenizer(loaded.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)).input_ids
        return Work(ids, Sampling(temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=new_tokens, seed=seed))

    ask = chat("Tell me everything about rivers", seed=1)
    assert len(ask.token_ids) >= 64  # llama.cpp reads 64 tokens or more its other way (tiled)
    replies = [engine.generate([ask])[0].text for _ in range(2)]
    engine.generate([chat("How do I find peace in a busy city?", seed=None, new_tokens=1)])
    assert engine.decoder.reused_tokens > 0  # an unseeded row still continues the kept prompt
    replies.append(engine.generate([ask])[0].text)
    assert replies == [replies[0]] * 3


def test_candidates_of_one_prompt_arriving_together_read_it_once(tiny_llama, tmp_path):
    """Best-of-N: N rows with one prompt in the same step. The first reads it; the others
    share its cells and read only its last token. Each seeded row's text is what it is alone."""
    prompt = list(range(300, 340))
    rows = [Work(prompt, Sampling(temperature=1.0, top_k=20, max_new_tokens=6, seed=s)) for s in range(4)]
    fresh = TransformersEngine(tiny_llama, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f32")
    alone = []
    for work in rows:
        fresh.decoder.forget_prefixes()
        alone += fresh.generate([work])
    engine = TransformersEngine(tiny_llama, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f32")
    together = engine.generate(rows)
    assert engine.decoder.reused_tokens == 3 * (len(prompt) - 1)
    assert [c.text for c in together] == [c.text for c in alone]


def test_kept_prefixes_give_their_room_to_a_row_that_needs_it(tiny_llama, tmp_path):
    engine = TransformersEngine(tiny_llama, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f16", kv_tokens=1024)
    for i in range(4):  # four different prompts kept: 4 x 100 cells of a 512-cell budget
        engine.generate([Work([200 + i] * 100, Sampling(temperature=0.0, max_new_tokens=2))])
    assert len(engine.decoder.prefixes) == 4
    engine.add(Work([5, 17, 42], Sampling(temperature=0.0, max_new_tokens=400)), "long")
    finished = []
    for _ in range(450):  # bounded: a row that never fits would wait forever
        finished += engine.step()
    assert [(tag, c.new_tokens) for tag, c in finished] == [("long", 400)]
    assert len(engine.decoder.prefixes) < 4


def test_the_bundled_model_is_served_from_a_gguf_without_torch_weights(model_cache_dir, tmp_path):
    """Torch never loads the bundled weights for llama.cpp: as shipped (q4_1) the file is
    served as is; the default q8_0 is written once from it by llama.cpp, and every later
    start finds it cached."""
    shipped = load_model("smollm2", cache_dir=model_cache_dir)
    engine = TransformersEngine(shipped, mode="auto", cache_dir=tmp_path, threads=1, gguf_type="q4_1")
    engine.warm_up()
    assert engine.mode == "llamacpp" and engine.decoder.path == shipped.gguf_file
    assert not shipped.weights_loaded

    first = load_model("smollm2", cache_dir=model_cache_dir)
    written = TransformersEngine(first, mode="auto", cache_dir=tmp_path, threads=1, gguf_type="q8_0").decoder.path
    assert written.name.endswith(".q8_0.gguf") and written.parent.parent == tmp_path
    import gguf

    kinds = {t.tensor_type.name for t in gguf.GGUFReader(written).tensors if t.name.endswith("attn_q.weight")}
    assert kinds == {"Q8_0"}
    assert not first.weights_loaded
    later = load_model("smollm2", cache_dir=model_cache_dir)
    assert TransformersEngine(later, mode="auto", cache_dir=tmp_path, threads=1, gguf_type="q8_0").decoder.path == written
    assert not later.weights_loaded  # never loaded: the cached file was found

    shapes = later.parameter_shapes()  # from the config, without the weights
    assert not later.weights_loaded
    assert shapes == {name: tuple(t.shape) for name, t in later.model.state_dict().items()}
    assert later.weights_loaded


def test_a_checkpoint_served_by_llamacpp_lets_go_of_its_torch_weights(tiny_llama, model_cache_dir, tmp_path):
    checkpoint = tmp_path / "full"
    tiny_llama.model.save_pretrained(checkpoint)
    loaded = load_model("smollm2", checkpoint, cache_dir=model_cache_dir)  # loads now: a broken one fails here
    assert loaded.weights_loaded
    engine = TransformersEngine(loaded, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f16")
    assert engine.mode == "llamacpp" and not loaded.weights_loaded
    assert loaded.model is not None and loaded.weights_loaded  # loaded again when asked for


def test_rows_that_come_and_go_each_get_the_reply_they_get_alone(tiny_llama_dir, tmp_path):
    """Random arrivals (some beginning like earlier prompts, so kept prefixes serve them),
    greedy and seeded rows with and without a repetition penalty, some withdrawn mid-way:
    every reply is exactly the row's reply from an engine serving it alone."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Peaked logits (the tiny model's embeddings scaled up): llama.cpp multiplies a batch's
    # rows in other orders than one row's, and a near tie could then go either way.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25)
    model.save_pretrained(tmp_path / "peaked")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "peaked")
    peaked = load_model(str(tmp_path / "peaked"), cache_dir=tmp_path)
    chance = random.Random(3)
    alone = TransformersEngine(peaked, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f16")
    served = TransformersEngine(peaked, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f16")
    opening = [chance.randint(3, 3000) for _ in range(12)]
    works = random_works(chance, 30, ids=(3, 3000), longest=30, opening=opening)
    replies = serve_at_random(served, works, chance)
    assert len(replies) > 20
    assert replies == {tag: alone.generate([works[tag]])[0].text for tag in replies}


class _StopHere(logging.Handler):
    """At llama.cpp's first log line, does what a worker's SIGTERM handler does when the
    signal lands while llama.cpp calls back into Python: ``interrupt`` with the frame it is
    handed, or (a plain Ctrl-C handler) ``raise KeyboardInterrupt``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def emit(self, record):
        from persona.llamacpp_decoder import interrupt

        if record.getMessage().startswith("llama.cpp: "):
            if self.how == "raise":
                raise KeyboardInterrupt
            interrupt(sys._getframe())


@pytest.mark.parametrize("how", ["interrupt", "raise"])
def test_a_stop_while_llama_cpp_loads_stops_the_load(tiny_llama, tmp_path, capfd, how):
    """ctypes printed the KeyboardInterrupt raised inside llama.cpp's log callback as
    "Exception ignored" and dropped it: the worker loaded on, said it was serving, then
    stopped. Now the load itself is interrupted."""
    from persona.llamacpp_decoder import LlamaCppDecoder

    engine = TransformersEngine(tiny_llama, mode="llamacpp", cache_dir=tmp_path, threads=1, gguf_type="f16")
    logger = logging.getLogger("persona.llamacpp_decoder")
    stop, level = _StopHere(how), logger.level
    logger.addHandler(stop)
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(KeyboardInterrupt):
            LlamaCppDecoder(engine.decoder.path, threads=1, context_tokens=256)
    finally:
        logger.removeHandler(stop)
        logger.setLevel(level)
    assert "Exception ignored" not in capfd.readouterr().err
    LlamaCppDecoder(engine.decoder.path, threads=1, context_tokens=256)  # the next load is not refused


def test_interrupt_raises_anywhere_else():
    from persona.llamacpp_decoder import interrupt

    with pytest.raises(KeyboardInterrupt):
        interrupt(sys._getframe())
