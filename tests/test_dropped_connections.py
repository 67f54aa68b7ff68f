"""A connection that drops mid-call loses nothing: no request is queued twice, no reply is lost.

redis-py re-sends a call whose connection dropped (the service's clients retry with
backoff). Whether Redis ran the call before the drop, the caller cannot know; these
tests cut the connection at the worst moment, through a real proxy in front of the
real Redis, and check what the caller and the queue end up with.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from persona import connection
from persona import constants as keys
from persona.connection import connect, connect_async
from persona.contract import GenerationReply, GenerationRequest, Message
from persona.errors import ConfigError, QueueBusy, RedisUnavailable, ReplyTimeout
from persona.queue import AsyncQueueClient, QueueClient, WorkQueue
from persona.queue_scripts import SUBMIT_SCRIPT
from tests.fakes.cutting_proxy import CuttingProxy


def chat(text: str = "hi", **kwargs) -> GenerationRequest:
    return GenerationRequest(persona="sage", messages=[Message(role="user", content=text)], **kwargs)


@pytest.fixture
def proxy(redis_url):
    made = CuttingProxy(redis_url)
    yield made
    made.close()


def answer(work: WorkQueue, text: str) -> None:
    [job] = work.claim("w", 10, block_ms=100)
    assert work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text=text))], "w") == 1


def test_a_submission_whose_answer_was_lost_is_queued_once(settings, redis_client, proxy):
    redis_client.script_load(SUBMIT_SCRIPT)  # so the cut answer is the script's, not "no such script"
    through_proxy = QueueClient(connect(settings, url=proxy.url), settings.queue)
    request = chat(user="ann")
    proxy.cut_answer_to(request.id.encode())
    through_proxy.submit(request)
    assert proxy.cuts == 1
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 1
    assert int(redis_client.get(keys.user_pending_key("ann"))) == 1  # ann's share counted once


def test_an_ask_whose_answer_was_lost_is_queued_once_and_answered(settings, redis_client, proxy, work):
    through_proxy = QueueClient(connect(settings, url=proxy.url), settings.queue)
    request = chat()
    proxy.cut_answer_to(request.id.encode())
    with pytest.raises(ReplyTimeout):  # nobody answers yet: only the queue is looked at
        through_proxy.ask(request, timeout=0.5)
    assert proxy.cuts == 1
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 1
    answer(work, "once")
    assert through_proxy.wait(request, timeout=5).text == "once"


def refusals_counted(redis_client) -> dict[str, int]:
    """The refusals in the stats hash, by reason, as `persona queue stats` and /metrics read them."""
    counts = redis_client.hgetall(keys.STATS_KEY)
    return {reason: int(counts.get(f"refused:{reason}".encode(), 0)) for reason in ("full", "user_share")}


def test_a_refusal_whose_answer_was_lost_is_counted_once(settings, redis_client, client, proxy):
    """redis-py re-sends a submission whose answer a dropped connection lost: one refused the
    first time was refused again, and counted again, so `queue stats` said more requests were
    turned away than were."""
    settings.queue.max_length = 1
    client.submit(chat())  # the stream is full
    redis_client.script_load(SUBMIT_SCRIPT)
    through_proxy = QueueClient(connect(settings, url=proxy.url), settings.queue)
    request = chat()
    proxy.cut_answer_to(request.id.encode())
    with pytest.raises(QueueBusy, match="the queue is full"):
        through_proxy.submit(request)
    assert proxy.cuts == 1  # sent twice, refused twice
    assert refusals_counted(redis_client) == {"full": 1, "user_share": 0}


async def test_a_refused_ask_whose_answer_was_lost_is_counted_once(settings, redis_client, client, proxy):
    """The same for a chat adapter's ask, its submission and first wait in one round trip."""
    settings.queue.max_pending_per_user = 1
    client.submit(chat(user="ann"))  # ann has her share waiting
    request = chat(user="ann")
    proxy.cut_answer_to(request.id.encode())
    with pytest.raises(QueueBusy, match="you already have 1 request waiting"):
        await _ask_async(settings, proxy.url, request, timeout=5)
    assert proxy.cuts == 1
    assert refusals_counted(redis_client) == {"full": 0, "user_share": 1}


def test_a_request_answered_already_is_not_queued_again(client, redis_client, work):
    request = client.submit(chat())
    answer(work, "first")
    client.submit(request)
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0
    assert client.wait(request, timeout=1).text == "first"


def test_a_reply_lost_on_its_way_to_the_caller_is_read_again(settings, client, proxy, work):
    request = client.submit(chat())
    answer(work, "the reply that got through")
    through_proxy = QueueClient(connect(settings, url=proxy.url), settings.queue)
    proxy.cut_answer_holding(b"the reply that got through")
    assert through_proxy.wait(request, timeout=10).text == "the reply that got through"
    assert proxy.cuts == 1


async def test_a_chat_adapters_reply_lost_on_its_way_is_read_again(settings, client, proxy, work):
    request = client.submit(chat())
    answer(work, "async reply")
    async_redis = await connect_async(settings, url=proxy.url)
    try:
        proxy.cut_answer_holding(b"async reply")
        assert (await AsyncQueueClient(async_redis, settings.queue).wait(request, timeout=10)).text == "async reply"
    finally:
        await async_redis.aclose()
    assert proxy.cuts == 1


def test_reply_lists_read_are_deleted_by_the_next_call(client, redis_client, work):
    first = client.submit(chat("one"))
    answer(work, "1")
    assert client.wait(first, timeout=1).text == "1"
    assert redis_client.exists(keys.reply_key(first.id)) == 1  # kept in case the answer was lost
    second = client.submit(chat("two"))
    answer(work, "2")
    assert client.wait(second, timeout=1).text == "2"
    assert redis_client.exists(keys.reply_key(first.id)) == 0
    assert redis_client.ttl(keys.reply_key(second.id)) > 0  # the last one expires on its own


def test_a_refusal_left_by_an_earlier_attempt_is_not_taken_for_the_reply(client, redis_client, work):
    """A refused ask leaves its word in the reply list; when a re-sent submission is then
    queued, the word must not be taken for the reply."""
    request = chat()
    redis_client.rpush(keys.reply_key(request.id), "busy")  # the earlier attempt's
    with pytest.raises(ReplyTimeout):  # queued, and waiting: not "busy", nor a garbled reply
        client.ask(request, timeout=0.3)
    answer(work, "the real reply")
    assert client.wait(request, timeout=1).text == "the real reply"



async def _ask_async(settings, url: str, request: GenerationRequest, timeout: float) -> GenerationReply:
    async_redis = await connect_async(settings, url=url)
    try:
        return await AsyncQueueClient(async_redis, settings.queue).ask(request, timeout=timeout)
    finally:
        await async_redis.aclose()


@pytest.fixture
def quick_timeouts(monkeypatch):
    """Connections give up after a second or so (5 s in service), so these tests are quick.
    The read timeout stays longer than a wait's slice, as in service."""
    monkeypatch.setattr(connection, "CONNECT_TIMEOUT_S", 0.5, raising=False)
    monkeypatch.setattr(connection, "SOCKET_TIMEOUT_S", 1.5)


async def test_a_redis_that_never_answers_is_said_unreachable_in_seconds(settings, proxy, quick_timeouts):
    """A host that takes connections and answers nothing (a firewall dropping packets, a
    machine gone) is "cannot reach Redis" once the timeout has passed. redis-py before 8
    sets no timeout of its own: with 7.4, `persona queue stats` waited forever."""
    proxy.go_silent()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="cannot reach Redis at"):
        connect(settings, url=proxy.url)
    with pytest.raises(RedisUnavailable, match="cannot reach Redis at"):
        await asyncio.wait_for(connect_async(settings, url=proxy.url), 10)
    assert time.monotonic() - started < 4.0


@pytest.mark.parametrize("side", ["sync", "async"])
@pytest.mark.parametrize(("outage", "error"), [("go_down", redis.exceptions.ConnectionError),
                                                ("go_silent", redis.exceptions.TimeoutError)])
def test_an_ask_keeps_its_deadline_while_redis_is_away(settings, work, proxy, quick_timeouts, side, outage, error):
    """Redis stopping (connections refused) or falling silent (replies never come, new
    connections never answered) while a caller waits: the wait ends at its deadline, with
    Redis's error, give or take a second. redis-py's own reconnects (8, with backoff) ran
    on past it: `persona ask --timeout 5` answered after about 14 s; a silent Redis held it
    until the OS gave up."""
    threading.Timer(0.3, getattr(proxy, outage)).start()
    started = time.monotonic()
    with pytest.raises(error):
        if side == "sync":
            QueueClient(connect(settings, url=proxy.url), settings.queue).ask(chat(), timeout=1.5)
        else:
            asyncio.run(_ask_async(settings, proxy.url, chat(), timeout=1.5))
    assert time.monotonic() - started < 3.0


def test_a_wait_reads_its_reply_once_redis_is_back_before_the_deadline(settings, client, work, proxy):
    """Bounding redis-py's reconnects by the deadline does not cut a wait short: an outage
    shorter than the time left is ridden out, and the reply read after it."""
    request = client.submit(chat())
    through_proxy = QueueClient(connect(settings, url=proxy.url), settings.queue)

    def outage_then_answer() -> None:
        proxy.go_down()
        time.sleep(1.0)
        proxy.come_back()
        answer(work, "after the outage")

    threading.Timer(0.3, outage_then_answer).start()
    assert through_proxy.wait(request, timeout=5).text == "after the outage"


@pytest.fixture
def old_redis():
    from tests.fakes.old_redis import OldRedis

    server = OldRedis("6.0.16")
    yield server
    server.close()


async def test_a_redis_too_old_for_the_queue_is_refused_with_the_version_needed(settings, old_redis):
    with pytest.raises(ConfigError, match=r"version 6\.0\.16; persona needs 6\.2 or newer"):
        connect(settings, url=old_redis.url)
    with pytest.raises(ConfigError, match=r"needs 6\.2 or newer"):
        await connect_async(settings, url=old_redis.url)


async def test_a_bot_told_a_wrong_redis_password_stops_and_says_so(settings, redis_url):
    """A refused password is a setting to fix: a bot waiting for Redis to come back (as it
    does through an outage) would wait forever, saying "cannot reach Redis"."""
    from urllib.parse import urlsplit

    from pydantic import SecretStr

    from adapters.responder import connect_with_backoff

    password = urlsplit(redis_url).password
    settings = settings.model_copy(update={"redis_url": SecretStr(redis_url.replace(f":{password}@", ":not-the-password@"))})
    with pytest.raises(ConfigError, match="refused the password") as refused:
        await asyncio.wait_for(connect_with_backoff(settings), 20)
    assert "not-the-password" not in str(refused.value) and "PERSONA_REDIS_URL" in str(refused.value)


async def test_a_redis_user_denied_info_still_connects(settings, redis_url, redis_client):
    """Managed Redis often denies INFO to application users: the version goes unchecked."""
    from urllib.parse import urlparse

    redis_client.acl_setuser("app", enabled=True, passwords=["+app-pass"], keys=["*"], channels=["*"],
                             commands=["+@all", "-info"])
    try:
        parsed = urlparse(redis_url)
        url = f"unix://app:app-pass@{parsed.path}?db=0" if parsed.scheme == "unix" else \
            f"redis://app:app-pass@{parsed.hostname}:{parsed.port}/0"
        assert connect(settings, url=url).ping()
        client = await connect_async(settings, url=url)
        assert await client.ping()
        await client.aclose()
    finally:
        redis_client.acl_deluser("app")
