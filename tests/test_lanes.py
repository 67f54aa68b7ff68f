"""A static cache's lanes: rows leave and join a running batch in the same buffers (so a
GPU's captured graphs survive), and every row's logits stay Hugging Face's throughout."""

from __future__ import annotations

import pytest
import torch

from persona.decode_lanes import SHRINK_AFTER_STEPS, lane_count, prompt_shape
from persona.llama_decoder import LlamaDecoder
from tests.arrivals import random_works, serve_at_random, word_tokenizer
from tests.checked_batch import CheckedBatch, prompt


@pytest.mark.parametrize(("rows", "lanes"), [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16), (17, 24), (128, 128)])
def test_a_static_cache_has_lanes_for_a_bucket_of_batch_sizes(rows, lanes):
    assert lane_count(rows) == lanes


@pytest.mark.parametrize(
    ("rows", "width", "shape"),
    [(1, 1, (1, 16)), (3, 17, (4, 32)), (128, 64, (128, 64)), (4, 2048, (4, 2048)), (128, 65, None), (5, 2048, None)],
)
def test_prompts_are_read_in_a_few_shapes(rows, width, shape):
    assert prompt_shape(rows, width) == shape


@pytest.fixture(scope="module")
def lane_model():
    """The tiny Llama's shape with a vocabulary of 256 (the made-up prompts' ids are below
    253): what the lanes are made of is the same, and the check of every row against Hugging
    Face at every step costs a fraction of what 49,152 logits a position cost."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def test_a_new_batch_reuses_a_layout_with_room_for_it(lane_model):
    """A batch starting after another reuses its buffers (a GPU keeps its graphs) when the
    lanes match and the slots suffice without being twice what it needs. Prompts are read
    padded to 32 slots here, more than the 20 before the last one: the padding that
    would fall before slot 0 is parked in the last slot, which the decode reaches last."""
    batch = CheckedBatch(lane_model)
    batch.start([prompt(1, 20), prompt(2, 7)], room=108)  # 2 lanes, 128 slots
    layout = batch.buffers()
    batch.step(107)  # through slot 127
    batch.start([prompt(3, 5), prompt(4, 2)], room=40)  # needs 64 slots of the 128
    batch.step(3)
    assert batch.buffers() == layout and batch.decoder.layouts == 1
    batch.start([prompt(5, 3)], room=40)  # one row would leave a lane of two idle: laid out anew
    assert batch.decoder.valid.shape == (1, 64) and batch.decoder.layouts == 2
    batch.start([prompt(6, 4), prompt(7, 4)], room=300)
    assert batch.decoder.valid.shape == (2, 320) and batch.decoder.layouts == 3
    batch.step(2)
    batch.start([prompt(8 + i, 4) for i in range(12)], room=8)  # 16 lanes
    batch.start([prompt(20 + i, 4) for i in range(9)], room=8)  # 9 rows in 16 lanes: reused
    assert batch.decoder.valid.shape == (16, 64) and batch.decoder.layouts == 4
    batch.step()
    batch.start([prompt(30 + i, 4) for i in range(8)], room=8)  # half the lanes would idle
    assert batch.decoder.valid.shape == (8, 64) and batch.decoder.layouts == 5


@torch.inference_mode()
def test_rows_leave_and_join_in_the_same_buffers_while_lanes_and_slots_last(lane_model):
    batch = CheckedBatch(lane_model)
    batch.start([prompt(i, 3 + i) for i in range(4)], room=12)
    assert batch.decoder.valid.shape == (4, 64)
    layout = batch.buffers()
    batch.step(2)
    batch.leave(1)  # three rows in four lanes: one idles
    batch.step()
    assert batch.decoder.lanes == [0, 2, 3]
    # A prompt longer than the batch's history: the running rows' slots move right, in place.
    batch.join([prompt(9, 12)], room=6)
    assert batch.decoder.lanes == [0, 2, 3, 1]
    batch.step(2)
    batch.leave(2)
    batch.step()
    batch.join([prompt(10, 2)], room=4)  # into the lane just freed
    assert batch.decoder.lanes == [0, 2, 1, 3]
    batch.step(2)
    assert batch.buffers() == layout and batch.decoder.layouts == 1


@torch.inference_mode()
def test_a_batch_outgrows_its_lanes_and_its_slots_and_shrinks_once_long_idle(lane_model):
    batch = CheckedBatch(lane_model)
    batch.start([prompt(i, 4) for i in range(3)], room=80)
    assert batch.decoder.valid.shape == (4, 128)
    batch.step()
    batch.join([prompt(5, 3), prompt(6, 4)], room=80)  # five rows: eight lanes
    assert batch.decoder.valid.shape == (8, 128) and batch.decoder.layouts == 2
    batch.step(2)
    batch.leave(0, 1, 2, 3)  # one row left in eight lanes: they idle a while first
    batch.step(SHRINK_AFTER_STEPS - 1)
    assert batch.decoder.valid.shape == (8, 128)
    length = batch.decoder.length
    batch.step()
    assert batch.decoder.valid.shape == (1, 128) and batch.decoder.layouts == 3
    assert batch.decoder.length == length  # its slot 0 was nobody's: dropped (then one step on)
    batch.join([prompt(7, 5)], room=200)  # a reply longer than the cache: more slots
    assert batch.decoder.valid.shape == (2, 320) and batch.decoder.layouts == 4
    batch.step(3)


@torch.inference_mode()
def test_a_cache_out_of_slots_doubles_them(lane_model):
    """Rows that keep joining with long replies lay the cache out anew a few times, not
    every few joins: each new layout (a GPU captures its graphs again) has twice the slots.
    A server's backlog (`persona bench serve`'s mix) now takes 4 layouts instead of 5."""
    batch = CheckedBatch(lane_model)
    batch.start([prompt(1, 4)], room=300)
    assert batch.decoder.valid.shape == (1, 320)
    batch.step()
    batch.join([prompt(2, 4)], room=320)  # needs 325 slots
    assert batch.decoder.valid.shape == (2, 640) and batch.decoder.layouts == 2
    batch.step(2)


def test_slots_no_row_uses_any_more_are_dropped_in_place(lane_model):
    batch = CheckedBatch(lane_model)
    batch.start([prompt(i, 3) for i in range(5)], room=4)  # eight lanes, 64 slots
    batch.join([prompt(5 + i, 2) for i in range(3)], room=55)
    batch.step()
    batch.leave(0, 1, 2)
    batch.join([prompt(9 + i, 2) for i in range(3)], room=5)
    batch.step()
    batch.leave(0, 1)  # the first batch's rows are gone: slot 0 is nobody's
    layout = batch.buffers()
    length = batch.decoder.length
    batch.join([prompt(12, 2)], room=60)  # needs 65 slots from slot 0, 64 from slot 1
    assert batch.decoder.length == length - 1  # every row moved one slot left
    assert batch.buffers() == layout and batch.decoder.layouts == 1
    batch.step(3)


@torch.inference_mode()
def test_any_run_of_joins_leaves_and_steps_keeps_every_row_right(lane_model):
    """A busy spell then a quiet one, at random: rows leave when their room is spent or at
    random (stopped, withdrawn), one to three join with prompts of 1-20 tokens and replies
    of up to 40; every row checked at every step, while layouts grow and then shrink."""
    import random

    chance = random.Random(8)
    batch = CheckedBatch(lane_model)
    batch.start([prompt(0, 5)], room=40)
    seeds = iter(range(1, 1000))
    widest = 0
    for turn in range(130):
        done = [i for i, left in enumerate(batch.room) if left == 0]
        if len(batch.rows) > 1 and chance.random() < 0.2:
            done += chance.sample(range(len(batch.rows)), chance.randint(1, len(batch.rows) - 1))
        busy = turn < 40
        if len(set(done)) == len(batch.rows) or (busy and chance.random() < 0.6):
            joining = [prompt(next(seeds), chance.randint(1, 20)) for _ in range(chance.randint(1, 3))]
            batch.join(joining, room=chance.randint(2, 40) if busy else 90)
        batch.leave(*set(done))
        batch.step()
        widest = max(widest, batch.decoder.valid.shape[0])
    assert widest >= 8 and batch.decoder.valid.shape[0] < widest  # grew while busy, shrank after


@pytest.mark.parametrize(("join_every", "reads"), [(1, 4), (4, 3)])
def test_the_engine_serves_rows_that_come_and_go_from_lanes(tiny_llama, join_every, reads):
    """The engine over a static cache (as on a GPU, lookahead included): rows joining a
    running batch and leaving it at their own lengths each get the reply they get alone.
    Where a prompt read costs several steps (``join_every``), rows that arrive a step or
    two apart wait and are read together."""
    from persona.engine import TransformersEngine, Work
    from persona.personas import Sampling

    plain = TransformersEngine(tiny_llama, mode="fused")
    served = TransformersEngine(tiny_llama, mode="fused", lookahead=True)
    served.decoder = LlamaDecoder(tiny_llama.model, static=True, join_every=join_every)
    works = {
        tag: Work(prompt(seed, length), Sampling(temperature=0.0, max_new_tokens=tokens, repetition_penalty=penalty))
        for tag, seed, length, tokens, penalty in [
            ("a", 1, 6, 9, 1.0), ("b", 2, 3, 3, 1.3), ("c", 3, 11, 14, 1.0),
            ("d", 4, 2, 5, 1.0), ("e", 5, 15, 4, 1.1), ("f", 6, 4, 8, 1.0),
        ]
    }  # fmt: skip
    arrivals = {0: "abc", 2: "d", 4: "e", 7: "f"}  # step -> rows added before it
    replies = {}
    for turn in range(60):
        for tag in arrivals.get(turn, ""):
            served.add(works[tag], tag)
        replies.update({tag: completion.text for tag, completion in served.step()})
    assert served.active == 0
    assert replies == {tag: plain.generate([work])[0].text for tag, work in works.items()}
    assert served.decoder.layouts == 1  # every row that joined took a free lane
    assert served.decoder.reads == reads


@pytest.fixture(scope="module")
def word_model():
    """A toy Llama over a word-level vocabulary whose pad token is an ordinary word (w0),
    with peaked logits, so greedy and seeded choices are stable against float rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from persona.models import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25)
    return LoadedModel(
        model=model, tokenizer=word_tokenizer(512), device="cpu", name="words", has_chat_template=False,
        stop_token_ids=[1],
    )  # fmt: skip


@pytest.mark.parametrize("lanes", [False, True], ids=["growing-cache", "lanes"])
def test_rows_that_come_and_go_each_get_the_reply_they_get_alone(word_model, lanes):
    """Random arrivals of greedy and seeded rows, with and without a repetition penalty,
    some withdrawn mid-way: every reply is exactly the row's reply alone (a row's padding
    beside longer prompts must not count as tokens it has seen)."""
    import random

    from persona.engine import TransformersEngine

    chance = random.Random(1)
    alone = TransformersEngine(word_model, mode="fused")
    served = TransformersEngine(word_model, mode="fused", lookahead=lanes)
    if lanes:
        served.decoder = LlamaDecoder(word_model.model, static=True)
    works = random_works(chance, 36, ids=(2, 511), longest=40)
    replies = serve_at_random(served, works, chance)
    assert len(replies) > 25
    assert replies == {tag: alone.generate([works[tag]])[0].text for tag in replies}
