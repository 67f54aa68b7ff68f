"""An ask's first wait slice rides out Redis going away or refusing writes, as its later ones do.

`persona ask` with a worker live submits and starts waiting in one round trip. That first
slice of the wait used to end it with Redis's raw error (an outage longer than redis-py's
reconnects, a Redis refusing writes as the ask was sent again): the request was queued
and answered, for nobody. Each later slice says once that Redis is away, and waits on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff

from persona import constants as keys
from persona.contract import GenerationReply, GenerationRequest, Message
from persona.queue import AsyncQueueClient, QueueClient, WorkQueue
from tests.fakes.cutting_proxy import CuttingProxy
from tests.fakes.full_redis import redis_refusing_writes

SAID_ONCE = "trying again until its deadline"


def chat(text: str = "hi") -> GenerationRequest:
    return GenerationRequest(persona="sage", messages=[Message(role="user", content=text)])


def answer(work: WorkQueue, text: str) -> None:
    [job] = work.claim("w", 10, block_ms=1000)
    assert work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text=text))], "w") == 1


def ask(side: str, url: str, settings, request: GenerationRequest, timeout: float) -> GenerationReply:
    """Ask through a client that does not reconnect on its own: the outage outlasts redis-py's reconnects."""
    if side == "sync":
        client = redis.Redis.from_url(url, retry=redis.retry.Retry(NoBackoff(), 0))
        try:
            return QueueClient(client, settings.queue).ask(request, timeout=timeout)
        finally:
            client.close()

    async def asking() -> GenerationReply:
        client = redis.asyncio.Redis.from_url(url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0))
        try:
            return await AsyncQueueClient(client, settings.queue).ask(request, timeout=timeout)
        finally:
            await client.aclose()

    return asyncio.run(asking())


def said_once(caplog) -> bool:
    return sum(SAID_ONCE in record.getMessage() for record in caplog.records) == 1


@pytest.fixture
def proxy(redis_url):
    made = CuttingProxy(redis_url)
    yield made
    made.close()


@pytest.mark.parametrize("side", ["sync", "async"])
def test_an_ask_rides_out_redis_going_away_in_its_first_slice(settings, redis_client, work, proxy, caplog, side):
    """Redis goes away 0.3 s into the ask's first slice, for longer than a pause between
    tries, and comes back answered: the ask reads the reply, and says once that Redis is away."""
    request = chat("through the outage")

    def outage_then_answer() -> None:
        proxy.go_down()
        time.sleep(1.5)
        proxy.come_back()
        answer(work, "after the outage")

    threading.Timer(0.3, outage_then_answer).start()
    with caplog.at_level(logging.WARNING, logger="persona.queue"):
        reply = ask(side, proxy.url, settings, request, timeout=10)
    assert reply.text == "after the outage"
    assert said_once(caplog), caplog.text
    assert "cannot be reached" in caplog.text
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0  # sent again, it was queued once, and answered


@pytest.mark.parametrize("side", ["sync", "async"])
def test_an_ask_rides_out_redis_refusing_writes_in_its_first_slice(settings, redis_url, redis_client, client, work,
                                                                   caplog, side):
    """An ask sent again for a request queued already (redis-py re-sends one whose connection
    dropped) to a Redis that now refuses writes: its submission needs no write, its slice
    (BLMOVE, a write) is refused. It waits on, and reads the reply once Redis takes writes."""
    request = client.submit(chat("queued already"))
    refusing = redis_refusing_writes(redis_client)
    refusing.__enter__()

    def mend_then_answer() -> None:
        time.sleep(1.0)
        refusing.__exit__(None, None, None)
        answer(work, "after the refusal")

    mending = threading.Thread(target=mend_then_answer)
    mending.start()
    try:
        with caplog.at_level(logging.WARNING, logger="persona.queue"):
            reply = ask(side, redis_url, settings, request, timeout=10)
    finally:
        mending.join()
    assert reply.text == "after the refusal"
    assert said_once(caplog), caplog.text
    assert "refuses writes for now" in caplog.text
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0


@pytest.mark.parametrize("side", ["sync", "async"])
def test_an_ask_whose_submission_redis_refuses_says_so_at_once(settings, redis_url, redis_client, caplog, side):
    """Refused before it was queued, there is nothing to wait for: the refusal is said at once."""
    started = time.monotonic()
    with redis_refusing_writes(redis_client), pytest.raises(redis.exceptions.ResponseError, match="OOM"):
        ask(side, redis_url, settings, chat("never queued"), timeout=10)
    assert time.monotonic() - started < 2
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0
    assert SAID_ONCE not in caplog.text
