"""A primary that refuses writes until enough of its replicas are in step with it
(``min-replicas-to-write``; NOREPLICAS): a state that passes, ridden out by a caller
waiting for its reply, and said as what it means where a request cannot be queued."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import redis.asyncio

from persona.cli.common import explain_redis_error
from persona.contract import GenerationReply, GenerationRequest, Message
from persona.monitoring import collect_stats
from persona.queue import AsyncQueueClient, Job, QueueClient, WorkQueue

REFUSAL_WORDS = "Redis refuses every change until enough of its replicas are in step with it"


def chat(text: str = "still there?") -> GenerationRequest:
    return GenerationRequest(persona="sage", messages=[Message(role="user", content=text)])


@contextmanager
def wanting_a_replica(client: redis.Redis) -> Iterator[None]:
    """Redis asks for one replica in step before it takes a write, and has none: it answers
    every write NOREPLICAS while inside (and until ``takes_writes_again``)."""
    client.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(redis.exceptions.ResponseError, match="NOREPLICAS"):
            client.set("probe", 1)
        yield
    finally:
        takes_writes_again(client)


def takes_writes_again(client: redis.Redis) -> None:
    client.config_set("min-replicas-to-write", 0)


def _taken(settings, url: str) -> tuple[WorkQueue, Job]:
    """A worker's queue, and the one request waiting, which that worker has taken."""
    work = WorkQueue(redis.Redis.from_url(url), settings.queue)
    [job] = work.claim("w", 10, block_ms=1000)
    return work, job


def _answer_after(admin: redis.Redis, work: WorkQueue, job: Job, pause_s: float) -> threading.Thread:
    """After ``pause_s``, Redis takes writes again and the worker answers the request it holds."""

    def mend_and_answer() -> None:
        time.sleep(pause_s)
        takes_writes_again(admin)
        work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text="here"))], "w")

    mending = threading.Thread(target=mend_and_answer, daemon=True)
    mending.start()
    return mending


def test_a_wait_rides_out_a_redis_wanting_replicas_and_reads_the_reply_after(settings, own_redis):
    """A slice's BLMOVE is a write: a waiting `persona ask` gave up at once with Redis's raw
    NOREPLICAS while its request stayed queued. It waits, as through MISCONF or a restart."""
    _, url, admin = own_redis
    request = QueueClient(redis.Redis.from_url(url), settings.queue).submit(chat())
    work, job = _taken(settings, url)
    with wanting_a_replica(admin):
        mending = _answer_after(admin, work, job, pause_s=1.0)
        reply = QueueClient(redis.Redis.from_url(url), settings.queue).wait(request, timeout=10)
        mending.join()
    assert reply.text == "here"


async def test_a_chat_adapters_wait_rides_out_a_redis_wanting_replicas(settings, own_redis):
    """The same for a bot's question (the asyncio client)."""
    _, url, admin = own_redis
    request = QueueClient(redis.Redis.from_url(url), settings.queue).submit(chat())
    work, job = _taken(settings, url)
    async_redis = redis.asyncio.Redis.from_url(url)
    try:
        with wanting_a_replica(admin):
            mending = _answer_after(admin, work, job, pause_s=1.0)
            reply = await AsyncQueueClient(async_redis, settings.queue).wait(request, timeout=10)
            await asyncio.to_thread(mending.join)
    finally:
        await async_redis.aclose()
    assert reply.text == "here"


def test_a_request_redis_will_not_queue_for_want_of_replicas_is_said_as_such(settings, own_redis):
    """Refused as it is sent (nothing was queued, so there is no wait to ride it out): it
    said "Redis refused a command (Error running script (call to f_...) ...)"; it says what
    the refusal means and what mends it, as `queue stats` does."""
    _, url, admin = own_redis
    with wanting_a_replica(admin):
        with pytest.raises(redis.exceptions.ResponseError, match="NOREPLICAS") as refused:
            QueueClient(redis.Redis.from_url(url), settings.queue).ask(chat(), timeout=5)
        stats = collect_stats(admin)
    said = explain_redis_error(refused.value)
    assert said.startswith(REFUSAL_WORDS), said
    assert "(NOREPLICAS Not enough good replicas to write)" in said and "Error running script" not in said
    assert "bring its replicas back" in said and "CONFIG SET min-replicas-to-write 0" in said
    assert stats.writes_refused.startswith(REFUSAL_WORDS)
