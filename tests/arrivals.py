"""Random traffic for an engine: rows of random prompts and settings, arriving, being
withdrawn and finishing at random, and a word-level toy tokenizer to serve them with."""

from __future__ import annotations

import random

from persona.engine import TransformersEngine, Work
from persona.personas import Sampling


def word_tokenizer(vocab: int):
    """Words w0..w{vocab-1}, one id each; w0 pads, w1 ends the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="w0", eos_token="w1")


def random_works(
    chance: random.Random, count: int, ids: tuple[int, int], longest: int, opening: list[int] | None = None
) -> list[Work]:
    """``count`` rows of 1-30 token ids in ``ids`` (4 in 10 beginning with ``opening`` when
    given), greedy or seeded, with or without a repetition penalty, up to ``longest`` tokens."""
    works = []
    for _ in range(count):
        start = opening if opening is not None and chance.random() < 0.4 else []
        prompt = start + [chance.randint(*ids) for _ in range(chance.randint(1, 30))]
        sampling = Sampling(
            temperature=chance.choice([0.0, 0.9]), top_k=20, max_new_tokens=chance.randint(1, longest),
            seed=chance.randint(0, 10**6), repetition_penalty=chance.choice([1.0, 1.3]),
        )  # fmt: skip
        works.append(Work(prompt, sampling))
    return works


def serve_at_random(engine: TransformersEngine, works: list[Work], chance: random.Random) -> dict[int, str]:
    """Feed ``works`` to ``engine`` a few at a time at random steps, withdrawing some now and
    then, until every row is answered or gone; return the replies by index."""
    waiting, replies, turn = list(enumerate(works)), {}, 0
    while waiting or engine.active:
        if waiting and (not engine.active or chance.random() < 0.4):
            for _ in range(chance.randint(1, 5)):
                if waiting:
                    engine.add(waiting[0][1], waiting.pop(0)[0])
        if turn % 17 == 16:
            engine.remove(lambda tag, turn=turn: tag % 9 == turn % 9)  # withdrawn
        replies.update({tag: completion.text for tag, completion in engine.step()})
        turn += 1
    return replies
