"""The queue for a Redis user limited to persona's keys (`~persona:*`), as a shared
production Redis grants one: every key a script is passed must be one of persona's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from persona import constants as keys
from persona.contract import GenerationReply, GenerationRequest, Message, Priority
from persona.dead_letters import list_dead, retry_dead
from persona.errors import ReplyTimeout
from persona.queue import QueueClient, WorkQueue

USER, PASSWORD = "persona-only", "persona-only-pass"


def chat(text: str = "hi", **kwargs) -> GenerationRequest:
    return GenerationRequest(persona="sage", messages=[Message(role="user", content=text)], **kwargs)


@pytest.fixture
def persona_only(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """A client logged in as a user that may touch only persona's keys (and no dangerous command)."""
    redis_client.acl_setuser(USER, enabled=True, reset=True, passwords=[f"+{PASSWORD}"], keys=[f"{keys.KEY_PREFIX}*"],
                             channels=["*"], commands=["+@all", "-@dangerous"])
    pool = redis_client.connection_pool
    client = redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class,
        **{**pool.connection_kwargs, "username": USER, "password": PASSWORD},
    ))
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("not-persona")  # the limit holds
        yield client
    finally:
        client.close()
        redis_client.acl_deluser(USER)


def test_an_anonymous_request_is_asked_and_answered(settings, persona_only):
    """An `ask` with no sender (the CLI's) was refused: its script was passed '' for the
    sender's counter, a key outside `~persona:*`."""
    callers, workers = QueueClient(persona_only, settings.queue), WorkQueue(persona_only, settings.queue)
    sent = callers.submit(chat("anonymous"))
    [job] = workers.claim("w1", 10, block_ms=100)
    assert job.request.id == sent.id
    workers.deliver([(job, GenerationReply(id=sent.id, ok=True, text="hello"))], "w1")
    assert callers.wait(sent, timeout=5).text == "hello"

    asked = chat("asked in one round trip")
    queued = callers.submit_many([chat("sample 1", priority=Priority.batch), chat("sample 2", priority=Priority.batch)])
    assert len(queued) == 2  # `persona generate`
    with pytest.raises(ReplyTimeout):
        callers.ask(asked, timeout=0.3)  # queued: only the wait ran out
    assert {job.request.id for job in workers.claim("w1", 10, block_ms=0)} == {asked.id, *(r.id for r in queued)}


def test_a_dead_letter_of_an_anonymous_request_or_of_no_request_is_set_aside_and_retried(settings, persona_only):
    """Setting aside an entry with no sender, or no readable request at all, passed '' for
    the keys it has none of; so did retrying an anonymous request."""
    callers, workers = QueueClient(persona_only, settings.queue), WorkQueue(persona_only, settings.queue)
    sent = callers.submit(chat("doomed"))
    persona_only.xadd(keys.STREAM_INTERACTIVE, {"r": b"not json"})
    jobs = workers.claim("w1", 10, block_ms=100)
    assert [job.request_id for job in jobs] == [sent.id, None]
    for job in jobs:
        assert workers.dead_letter(job, "it crashed every worker", 3, "w1")
    assert callers.wait(sent, timeout=5).error.kind == "dead_letter"
    [malformed, readable] = list_dead(persona_only)
    assert readable.request_id == sent.id and not malformed.request_id

    assert retry_dead(persona_only, readable.id, settings.queue.max_length)
    [job] = workers.claim("w1", 10, block_ms=100)
    assert job.request.id == sent.id
    assert not persona_only.exists(keys.NO_KEY)  # a stand-in, never written
