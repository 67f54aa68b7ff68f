"""A real worker and the dead letters: what it sets aside, and what a retry brings back."""

from __future__ import annotations

import json
import logging

import pytest

from persona import constants as keys
from persona.bench_queue import InstantEngine
from persona.contract import ErrorKind, GenerationReply, GenerationRequest, Message
from persona.dead_letters import dead_ids, list_dead, retry_dead
from persona.pool import ModelPool
from persona.queue import QueueClient, WorkQueue
from persona.worker import Worker


def instant_worker(settings, redis_client, worker_id: str = "w-test") -> Worker:
    """A real worker whose engine answers at once (the queue's side is what is tested)."""
    return Worker(settings, redis_client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id=worker_id)


def test_a_malformed_entry_is_set_aside_whole_and_its_caller_answered(settings, redis_client, caplog):
    """An entry that holds no valid request was deleted, counted and named in a log line,
    its payload nowhere: `persona queue dead` and `show` could not show it."""
    garbage = b"\xff not json"
    wrong_types = json.dumps({"id": "abc123", "persona": 5, "user": "ann"}).encode()
    # One a worker took and died holding: reclaimed, then set aside with its deliveries.
    redis_client.xadd(keys.STREAM_BATCH, {"r": b'{"id": "lost"}'})
    WorkQueue(redis_client, settings.queue).claim("w-died", 1, block_ms=0)
    redis_client.set(keys.user_pending_key("ann"), 1)
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": garbage})
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": wrong_types})
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": b""})  # no request field at all

    worker = instant_worker(settings, redis_client)
    worker.step(block_ms=0)

    letters = {letter.payload: letter for letter in list_dead(redis_client)}
    assert set(letters) == {garbage.decode(errors="replace"), wrong_types.decode(), '{"id": "lost"}', ""}
    assert letters[wrong_types.decode()].reason == "malformed request: persona: Input should be a valid string"
    assert letters[garbage.decode(errors="replace")].reason.startswith("malformed request: Invalid JSON")
    assert letters['{"id": "lost"}'].deliveries == 2
    assert {letter.worker for letter in letters.values()} == {"w-test"}
    assert sorted(dead_ids(redis_client, unreadable=True)) == sorted(letter.id for letter in letters.values())
    with pytest.raises(ValueError):  # `persona queue retry` refuses it, saying why
        retry_dead(redis_client, letters[wrong_types.decode()].id)

    # Whoever sent one with a readable id hears why at once, not at its deadline.
    [raw] = redis_client.lrange(keys.reply_key("abc123"), 0, -1)
    reply = GenerationReply.from_json(raw)
    assert reply.error.kind is ErrorKind.invalid and "persona: Input should be a valid string" in reply.error.message
    assert int(redis_client.get(keys.user_pending_key("ann"))) == 0
    stats = {k.decode(): int(v) for k, v in redis_client.hgetall(keys.STATS_KEY).items()}
    assert stats == {"dead_lettered": 4, "failed:invalid": 2, "failed:unanswerable": 2}
    for stream in keys.STREAMS_BY_PRIORITY:  # settled: nothing waits, nothing is held
        assert redis_client.xlen(stream) == 0
        assert redis_client.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0
    said = [r.getMessage() for r in caplog.records if "set aside malformed entry" in r.getMessage()]
    assert len(said) == 4 and all("persona queue show" in line for line in said), said


def test_a_retried_request_withdrawn_before_it_was_set_aside_is_answered(
    settings, redis_client, write_persona, tiny_llama_dir
):
    """A request whose caller gave up (Ctrl-C) while the worker holding it died was set
    aside; retried by an operator, it was answered "cancelled" at once: the old flag stayed."""
    write_persona("tiny", base=str(tiny_llama_dir))
    client = QueueClient(redis_client, settings.queue)
    request = client.submit(GenerationRequest(persona="tiny", messages=[Message(role="user", content="hi")]))
    queue = WorkQueue(redis_client, settings.queue)
    [job] = queue.claim("w-dying", 1, block_ms=0)
    assert client.cancel(request.id)  # withdrawn while its worker was dying
    letter = queue.dead_letter(job, "it was delivered to workers that died or stalled", 3, "w-other")
    assert client.wait(request, timeout=1).error.kind is ErrorKind.dead_letter

    assert retry_dead(redis_client, letter)
    worker = instant_worker(settings, redis_client)
    assert worker.step(block_ms=0) == 1
    reply = GenerationReply.from_json(redis_client.lindex(keys.reply_key(request.id), 0))
    assert reply.ok, reply.error
    assert reply.text == "ok"


def test_entries_whose_fields_cannot_be_read_are_set_aside_and_the_rest_answered(
    settings, redis_client, write_persona, tiny_llama_dir
):
    """One entry whose deadline was no number (a foreign writer's) raised in every claim
    and every reclaim: the worker logged "unexpected error in the worker loop" for ever
    and answered nobody. Nor was a payload nested too deep for json read safely."""
    write_persona("tiny", base=str(tiny_llama_dir))
    asked = GenerationRequest(persona="tiny", messages=[Message(role="user", content="hi")])
    # Taken by a worker that died, then reclaimed; and new ones, beside a good request.
    redis_client.xgroup_create(keys.STREAM_BATCH, keys.CONSUMER_GROUP, id="0", mkstream=True)
    redis_client.xadd(keys.STREAM_BATCH, {"r": b'{"x": 1}', "d": b"notanumber"})
    redis_client.xreadgroup(keys.CONSUMER_GROUP, "w-died", {keys.STREAM_BATCH: ">"})
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": asked.to_json(), "d": b"tomorrow"})
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": b'{"x": 1}', "d": b"inf"})
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": b'{"id": "deep", "x": ' + b"[" * 100_000})
    fine = QueueClient(redis_client, settings.queue).submit(
        GenerationRequest(persona="tiny", messages=[Message(role="user", content="still there?")])
    )

    worker = instant_worker(settings, redis_client)
    worker.step(block_ms=0)

    assert QueueClient(redis_client, settings.queue).wait(fine, timeout=5).text == "ok"
    reasons = sorted(letter.reason for letter in list_dead(redis_client))
    assert reasons[:3] == [
        "malformed entry: its deadline (field d) is not a time in seconds: 'inf'",
        "malformed entry: its deadline (field d) is not a time in seconds: 'notanumber'",
        "malformed entry: its deadline (field d) is not a time in seconds: 'tomorrow'",
    ]
    assert reasons[3].startswith("malformed request: Invalid JSON: recursion limit exceeded")
    # Whose request it was can be read: they hear why at once, not at their deadline.
    reply = GenerationReply.from_json(redis_client.lindex(keys.reply_key(asked.id), 0))
    assert reply.error.kind is ErrorKind.invalid and "field d" in reply.error.message
    for stream in keys.STREAMS_BY_PRIORITY:  # settled: nothing waits, nothing is held
        assert redis_client.xlen(stream) == 0


def test_a_malformed_entry_a_dead_worker_held_is_named_by_its_entry_when_reclaimed(settings, redis_client, caplog):
    """Reclaiming an entry whose request id could not be read was logged as "reclaimed
    None from w-died": no entry a reader could look up, nor what became of it."""
    redis_client.xadd(keys.STREAM_BATCH, {"r": b'{"x": 1}'})
    [held] = WorkQueue(redis_client, settings.queue).claim("w-died", 1, block_ms=0)

    with caplog.at_level(logging.WARNING, logger="persona.work_queue"):
        instant_worker(settings, redis_client).step(block_ms=0)

    [letter] = list_dead(redis_client)
    said = [r.getMessage() for r in caplog.records if r.name == "persona.work_queue"]
    assert said == [(
        f"reclaimed malformed entry {held.entry_id} (no readable request id) from w-died (delivery 2): "
        "it is set aside as a dead letter (see `persona queue dead`)"
    )]
    assert letter.deliveries == 2 and letter.reason.startswith("malformed request")


def test_a_counter_redis_cannot_add_to_costs_a_letter_its_count_never_its_answer_or_acknowledgement(
    settings, redis_client
):
    """With `dead_lettered` no number (`HSET persona:stats dead_lettered abc`), setting an
    entry aside failed after the letter was added and the entry deleted: the caller went
    unanswered and the worker's turn raised. Now only the count is lost."""
    wrong_types = json.dumps({"id": "abc123", "persona": 5, "user": "ann"}).encode()
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": wrong_types})
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": b"\xff not json"})  # nobody to answer
    redis_client.hset(keys.STATS_KEY, mapping={"dead_lettered": "abc", "failed:invalid": "abc"})
    redis_client.set(keys.user_pending_key("ann"), "abc")

    assert instant_worker(settings, redis_client).step(block_ms=0) == 2  # nothing raised

    assert len(list_dead(redis_client)) == 2
    reply = GenerationReply.from_json(redis_client.lindex(keys.reply_key("abc123"), 0))
    assert reply.error.kind is ErrorKind.invalid  # its sender heard why at once
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0
    assert redis_client.xpending(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)["pending"] == 0
    stats = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.STATS_KEY).items()}
    assert stats == {"dead_lettered": "abc", "failed:invalid": "abc", "failed:unanswerable": "1"}
