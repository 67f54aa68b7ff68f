"""A swap's candidate is prepared beside decoding: chats are answered meanwhile, only
workers that serve the persona are asked, and a worker that stops abandons its preparation."""

from __future__ import annotations

import threading

import pytest

from persona import swap as swaps
from persona.engine import TransformersEngine
from persona.heartbeat import live_worker_ids
from persona.personas import PersonaRegistry
from tests.fakes.checkpoints import make_checkpoint
from tests.test_swap import chat, persona_keys, wait_until

GATE_TIMEOUT_S = 30.0


class GatedEngines:
    """Real eager engines; a fine-tuned one's warm-up waits until ``release()``: a load
    that takes as long as the test needs (a LoRA merge and GGUF conversion take seconds)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def __call__(self, loaded):
        engine = TransformersEngine(loaded, mode="eager")
        if loaded.fine_tuned:
            warm_up = engine.warm_up

            def gated() -> float:
                self.waiting.set()
                self.gate.wait(GATE_TIMEOUT_S)
                return warm_up()

            engine.warm_up = gated
        return engine

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def tiny(write_persona, tiny_llama_dir, settings):
    write_persona("tiny", base=str(tiny_llama_dir))
    return PersonaRegistry.from_settings(settings).get("tiny")


@pytest.fixture
def gated(settings, tiny_llama_dir, tiny):
    make_checkpoint(settings, tiny_llama_dir, "tiny", seed=1)
    engines = GatedEngines()
    yield engines
    engines.release()  # a failed test leaves no preparation waiting


def swap_in_background(redis_client, persona, target: str) -> tuple[threading.Thread, list[swaps.SwapOutcome]]:
    done: list[swaps.SwapOutcome] = []
    thread = threading.Thread(target=lambda: done.append(swaps.swap_persona(redis_client, persona, target, timeout_s=30)),
                              daemon=True)
    thread.start()
    return thread, done


def test_a_worker_answers_chats_while_it_prepares_a_swap(redis_client, tiny, running_worker, client, gated):
    """Loading and checking the candidate ran between two batches, on the worker's only
    thread: no request was answered until it was done (11 s for the tiny model on
    llama.cpp, tens of seconds for a real checkpoint)."""
    worker = running_worker("w-one", engine_factory=gated)
    assert client.ask(chat(), timeout=30).version == "base"
    swapping, done = swap_in_background(redis_client, tiny, "v1")
    assert gated.waiting.wait(10), "the worker never began preparing v1"

    for _ in range(3):  # the candidate's warm-up is still waiting
        reply = client.ask(chat(), timeout=5)
        assert reply.ok and reply.version == "base", reply.error
    assert worker.info.state == "serving, preparing tiny@v1"
    assert swaps.active_versions(redis_client) == {}

    gated.release()
    swapping.join(timeout=30)
    [outcome] = done
    assert outcome.committed and outcome.votes["w-one"].ready, outcome.problem
    assert client.ask(chat(), timeout=30).version == "v1"
    wait_until(lambda: worker.info.state == "serving" and len(persona_keys(worker)) == 1)


def test_only_workers_that_serve_a_persona_vote_on_its_swap(settings, redis_client, tiny, tiny_llama_dir, write_persona,
                                                             running_worker, client):
    """Every live worker loaded and checked every persona's candidate, served or not: a
    worker serving only `tiny` loaded `other`'s new weights, and a swap waited for it."""
    write_persona("other", base=str(tiny_llama_dir))
    other = PersonaRegistry.from_settings(settings).get("other")
    v1 = make_checkpoint(settings, tiny_llama_dir, "other", seed=1)
    settings.worker.engine = "eager"
    worker = running_worker("w-tiny")
    assert client.ask(chat(), timeout=30).version == "base"  # serves tiny, not other

    outcome = swaps.swap_persona(redis_client, other, "v1", timeout_s=30)
    assert outcome.committed and outcome.proposal.workers == [] and outcome.votes == {}, outcome
    assert persona_keys(worker) == [(str(tiny_llama_dir), "base")]
    # asked for later, it serves the version active then
    assert client.ask(chat("other"), timeout=30).version == "v1"
    assert (str(tiny_llama_dir), str(v1.path)) in persona_keys(worker)

    # and a swap of the persona it now serves waits for its vote
    assert swaps.swap_persona(redis_client, other, "base", timeout_s=30).votes["w-tiny"].ready


def test_a_worker_that_stops_while_preparing_leaves_without_waiting_or_voting(
    redis_client, tiny, running_worker, client, gated, caplog
):
    """The worker could not leave before the candidate was loaded and checked: stopping it
    mid-swap (a deploy, Ctrl-C) waited for the whole load."""
    worker = running_worker("w-one", engine_factory=gated)
    assert client.ask(chat(), timeout=30).version == "base"
    swapping, done = swap_in_background(redis_client, tiny, "v1")
    assert gated.waiting.wait(10), "the worker never began preparing v1"

    caplog.set_level("INFO", logger="persona.swapper")
    worker.stop()
    wait_until(lambda: live_worker_ids(redis_client) == set(), timeout=5)  # left, the load still under way
    gated.release()
    swapping.join(timeout=30)
    wait_until(lambda: "stopping: abandoned the swap of tiny to v1" in caplog.messages, timeout=10)
    [outcome] = done
    # the worker left, so it was not waited for; it did not vote once its load ended
    assert "w-one" not in outcome.votes and "w-one" not in swaps.votes(redis_client, outcome.proposal.id)
