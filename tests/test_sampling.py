"""Sampling: each row draws from its own distribution, a seeded row from its seed alone,
and a batch of seeded rows costs no more work per step than one."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from persona.contract import MAX_SEED, SamplingOverrides
from persona.engine import TransformersEngine, Work
from persona.host_sampling import _HostRows, _sample_host
from persona.personas import Sampling
from persona.sampling import _Rows, _sample

PROBS = [0.5, 0.3, 0.2, 0.0, 0.0, 0.0]


def _draw(rows: int, **settings) -> list[int]:
    """One token for each of ``rows`` rows (seeds 0..rows-1) from the logits of PROBS."""
    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0} | settings
    batch = [Work([1], Sampling(max_new_tokens=1, seed=seed, **settings)) for seed in range(rows)]
    logits = torch.tensor([[math.log(p) if p else -1e9 for p in PROBS]] * rows)
    return _sample(logits, _Rows(batch, list(range(rows)), torch.device("cpu"), 0)).tolist()


def test_sampled_tokens_follow_the_distribution():
    counts = Counter(_draw(4000))
    assert set(counts) == {0, 1, 2}  # never a token of probability 0
    for token, p in enumerate(PROBS[:3]):
        assert counts[token] / 4000 == pytest.approx(p, abs=0.03)


def test_top_k_and_top_p_cut_the_tail():
    assert set(_draw(500, top_k=2)) == {0, 1}
    assert set(_draw(500, top_p=0.6)) == {0, 1}  # 0.5 before the second token, 0.8 before the third
    assert set(_draw(500, top_p=0.4)) == {0}
    assert Counter(_draw(2000, top_k=2))[0] / 2000 == pytest.approx(0.5 / 0.8, abs=0.03)


def test_a_seeded_row_says_the_same_alone_and_beside_any_rows(tiny_llama):
    """Its draws come from its seed: not from the rows beside it, their top-k (which sets
    how many candidates the batch sorts), or when it joined."""
    engine = TransformersEngine(tiny_llama, mode="fused")
    seeded = Work([8, 9, 10], Sampling(temperature=1.0, top_k=5, max_new_tokens=8, seed=11))
    alone = engine.generate([seeded])[0].text
    others = [
        Work([4, 5], Sampling(temperature=1.2, top_k=0, max_new_tokens=12)),  # every candidate sorted
        Work([7], Sampling(temperature=0.7, top_k=40, max_new_tokens=3, seed=12)),
    ]
    assert engine.generate([*others, seeded])[2].text == alone
    engine.add(others[0], "first")
    engine.step()
    engine.add(seeded, "seeded")  # joins a running batch
    finished = {}
    while engine.active:
        finished.update(engine.step())
    assert finished["seeded"].text == alone
    reseeded = Work(seeded.token_ids, seeded.sampling.model_copy(update={"seed": 13}))
    assert engine.generate([reseeded])[0].text != alone, "another seed, another reply"


class _Launches(TorchDispatchMode):
    """Counts the tensor operations run inside it (on a GPU, each is a kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _operations_per_step(engine: TransformersEngine, rows: int) -> int:
    for seed in range(rows):
        engine.add(Work([3, 4, 5], Sampling(temperature=0.9, top_k=20, max_new_tokens=6, seed=seed)), seed)
    engine.step()  # admission: the prompts are read and each row's draws made
    with _Launches() as launches:
        engine.step()
    engine.abandon()
    return launches.count


def test_seeded_rows_cost_no_operation_each_per_step(tiny_llama):
    """Per-row sampling would launch a few kernels for every seeded row at every step: on
    a GPU at 128 rows, more than the decode step itself."""
    engine = TransformersEngine(tiny_llama, mode="fused")
    assert _operations_per_step(engine, 2) == _operations_per_step(engine, 12)


def test_a_seed_out_of_range_is_refused_when_the_request_is_made():
    assert SamplingOverrides(seed=MAX_SEED).seed == MAX_SEED
    for seed in (-1, MAX_SEED + 1, 2**70):
        with pytest.raises(ValidationError, match="seed"):
            SamplingOverrides(seed=seed)
    with pytest.raises(ValidationError, match="seed"):
        Sampling(seed=2**64)



def test_the_tokens_that_end_a_reply_are_never_penalised_for_being_in_the_prompt():
    """The prompt holds the end-of-turn token after every turn before it; penalised as a
    repeat, stopping became half as likely, and replies rambled to their length and ended
    mid-sentence. Here token 5 ends a reply and token 4 is an ordinary word; both are in
    the prompt, token 0 is not."""
    greedy = Sampling(temperature=0.0, repetition_penalty=1.5, max_new_tokens=1)
    prompt = Work([5, 4, 1, 5, 4, 2, 5], greedy)

    def pick(logits: list[float]) -> int:
        rows = _Rows([prompt], [0], torch.device("cpu"), 0, unpenalised={5})
        return _sample(torch.tensor([logits]), rows).item()

    assert pick([2.0, 0.0, 0.0, 0.0, 0.0, 2.2]) == 5  # the end of the reply, as likely as before
    assert pick([2.0, 0.0, 0.0, 0.0, 2.2, 0.0]) == 0  # a repeated word is still penalised


def test_rows_that_leave_and_join_a_batch_draw_alike_as_torch_tensors_and_numpy_arrays():
    """Torch's rows and llama.cpp's numpy rows keep one set of books: after rows leave a
    batch and others join it, each row still has its own request, settings, seen tokens and
    draws, so both kinds draw the same tokens for the same rows."""
    rng = np.random.default_rng(0)

    def works(count: int) -> list[Work]:
        return [Work(rng.integers(0, 200, size=int(rng.integers(0, 6))).tolist(),
                     Sampling(temperature=[0.0, 0.8, 1.4][i % 3], top_k=[0, 8][i % 2], top_p=[1.0, 0.9][i // 2 % 2],
                              repetition_penalty=[1.0, 1.3][i // 3 % 2], max_new_tokens=8, seed=int(rng.integers(0, 2**40))))
                for i in range(count)]  # fmt: skip

    first, joining = works(7), works(4)
    in_torch, on_host = _Rows(first, list(range(7)), torch.device("cpu"), 0, {3}), _HostRows(first, list(range(7)), 0, {3})
    for step in range(6):
        logits = (rng.standard_normal((in_torch.size, 200)) * 3).astype(np.float32)
        tokens = _sample_host(logits, on_host)
        assert tokens.tolist() == _sample(torch.from_numpy(logits), in_torch).tolist()
        in_torch.append(torch.from_numpy(tokens))
        on_host.append(tokens)
        if step == 1:  # rows 1, 4 and 6 finish
            in_torch.select([0, 2, 3, 5], torch.tensor([0, 2, 3, 5]))
            on_host.select([0, 2, 3, 5], np.array([0, 2, 3, 5]))
        if step == 2:  # four rows join, with longer and shorter prompts
            in_torch.merge(_Rows(joining, list(range(7, 11)), torch.device("cpu"), 0, {3}))
            on_host.merge(_HostRows(joining, list(range(7, 11)), 0, {3}))
    kept = [first[i] for i in (0, 2, 3, 5)] + joining
    assert on_host.index == in_torch.index == [0, 2, 3, 5, 7, 8, 9, 10]
    assert [on_host.work[i] for i in on_host.index] == [in_torch.work[i] for i in in_torch.index] == kept
    assert on_host.top_ks == in_torch.top_ks == [w.sampling.top_k for w in kept]
    assert on_host.seen.tolist() == in_torch.seen.tolist()


def test_training_samples_take_a_seed_past_what_torch_takes(tiny_gpt2_dir):
    """`persona eval --seed 18446744073709551616` measured for a minute, then torch.manual_seed
    raised "Overflow when unpacking long long". A sample seed wraps into torch's 64 bits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.sampling import sample_texts

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)

    def draw(seed: int) -> list[str]:
        return sample_texts(model, tokenizer, 2, 6, seed, "cpu", sampling=Sampling(temperature=1.0, top_k=0))

    assert draw(2**64 + 7) == draw(7)
