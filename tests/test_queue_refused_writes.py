"""A caller whose request is queued, when Redis or this program's client cannot serve it for now:
every connection the client may open is in use, or Redis refuses writes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio

from persona import constants as keys
from persona.contract import GenerationReply, GenerationRequest, Message
from persona.errors import ReplyTimeout
from persona.queue import AsyncQueueClient, QueueClient, WorkQueue


def chat(text: str = "hi") -> GenerationRequest:
    return GenerationRequest(persona="sage", messages=[Message(role="user", content=text)])


def _answer(work: WorkQueue, text: str = "answered") -> None:
    """A worker claims the one request waiting and answers it."""
    [job] = work.claim("w1", 10, block_ms=1000)
    work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text=text))], "w1")


def _until_another_caller_blocks(redis_client: redis.Redis) -> None:
    """Until another caller's BLPOP holds its client's connection (as Redis sees it)."""
    started = time.monotonic()
    while not any(c["cmd"] == "blpop" for c in redis_client.client_list()):
        assert time.monotonic() - started < 5, "the other caller never blocked"
        time.sleep(0.01)


async def test_a_queued_question_waits_out_a_client_with_no_connection_free(settings, redis_url, redis_client, work):
    """A bot's question, queued and answered, found its client's connections all taken by other
    callers as it waited: it was told the queue was busy, its answer left unread (and asked
    again, answered twice). It waits for a connection instead, until its deadline."""
    client = redis.asyncio.Redis.from_url(redis_url, max_connections=1)
    queue = AsyncQueueClient(client, settings.queue)
    request = await queue.submit(chat())
    _answer(work)
    other_caller = asyncio.create_task(client.blpop(["nothing-comes"], timeout=0.5))
    await asyncio.to_thread(_until_another_caller_blocks, redis_client)
    assert (await queue.wait(request, timeout=5)).text == "answered"
    await other_caller
    await client.aclose()


def test_a_queued_request_waits_out_a_blocking_client_with_no_connection_free(settings, redis_url, redis_client, work):
    """The same for the blocking client, shared by a program's threads."""
    client = redis.Redis.from_url(redis_url, max_connections=1)
    queue = QueueClient(client, settings.queue)
    request = queue.submit(chat())
    _answer(work)
    other_caller = threading.Thread(target=client.blpop, args=(["nothing-comes"],), kwargs={"timeout": 0.5})
    other_caller.start()
    _until_another_caller_blocks(redis_client)
    assert queue.wait(request, timeout=5).text == "answered"
    other_caller.join()
    client.close()


async def test_a_wait_with_no_connection_free_to_its_end_says_the_request_is_still_queued(
    settings, redis_url, redis_client
):
    """No connection came free before the deadline: the caller hears its request may yet be
    answered (a ReplyTimeout), not redis-py's MaxConnectionsError nor "busy, try again"."""
    client = redis.asyncio.Redis.from_url(redis_url, max_connections=1)
    queue = AsyncQueueClient(client, settings.queue)
    request = await queue.submit(chat())
    other_caller = asyncio.create_task(client.blpop(["nothing-comes"], timeout=1))
    await asyncio.to_thread(_until_another_caller_blocks, redis_client)
    with pytest.raises(ReplyTimeout, match="every connection this program may open to Redis was in use") as caught:
        await queue.wait(request, timeout=0.3)
    assert "still queued and may yet be answered" in str(caught.value)
    await other_caller
    await client.aclose()


def _refuse_writes(client: redis.Redis, folder: Path) -> None:
    """Make Redis fail to save, as on a full disk: it then refuses every write with MISCONF."""
    folder.mkdir()
    client.config_set("dir", str(folder))
    folder.rmdir()
    client.bgsave()
    while client.info("persistence")["rdb_last_bgsave_status"] != "err" or \
            client.info("persistence")["rdb_bgsave_in_progress"]:
        time.sleep(0.05)


def _writable_again(client: redis.Redis, folder: Path) -> None:
    """Give Redis its folder back and let it save: it takes writes again (and stops cleanly)."""
    folder.mkdir()
    client.config_set("dir", str(folder))  # its working folder was the one removed
    client.bgsave()
    while client.info("persistence")["rdb_last_bgsave_status"] != "ok":
        time.sleep(0.05)


def test_an_ask_stopped_while_redis_refuses_writes_says_why_it_stays_queued(tmp_path, own_redis):
    """`timeout 20 persona ask` on a full disk said "could not withdraw that message: Redis cannot
    be reached": Redis answered, and refused the write. It says so, why, and that the message
    may still be answered, for nobody."""
    _server, url, client = own_redis
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(tmp_path / "data"), "PERSONA_REDIS_URL": url, "COLUMNS": "200"}
    asking = subprocess.Popen([sys.executable, "-m", "persona", "ask", "sage", "hello"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        started = time.monotonic()
        while not client.exists(keys.STREAM_INTERACTIVE):  # queued; no worker runs
            assert time.monotonic() - started < 30 and asking.poll() is None, "the message was never queued"
            time.sleep(0.05)
        _refuse_writes(client, tmp_path / "gone")
        asking.send_signal(signal.SIGTERM)  # as `timeout` sends
        _stdout, stderr = asking.communicate(timeout=30)
        queued = client.xlen(keys.STREAM_INTERACTIVE)
    finally:
        asking.kill()
        _writable_again(client, tmp_path / "gone")
    assert asking.returncode == 143
    assert "cannot be reached" not in stderr
    assert "could not withdraw that message, so a worker may still answer it, for nobody" in stderr
    assert "Redis cannot write its data to disk (full, or not writable), so it refuses every change" in stderr
    assert queued == 1  # still queued, as said
