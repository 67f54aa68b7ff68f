"""Faults with real processes: killed workers, stopping workers, poison requests, Redis restarts.

Workers here are real `persona worker` processes on a tiny random model that is made
slow on purpose (long replies, one request at a time), so a test can kill one while it
holds work. Every caller must hear back exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from persona import constants as keys
from persona.contract import ErrorKind, GenerationRequest, Message
from persona.embedded_redis import EmbeddedRedis
from persona.queue import QueueClient

HEARTBEAT_TTL_S = 2.0


@pytest.fixture
def slow_persona(write_persona, tiny_llama_dir):
    write_persona("slow", base=str(tiny_llama_dir), sampling={"max_new_tokens": 400, "temperature": 1.0})
    return "slow"


@pytest.fixture
def worker_env(settings, personas_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return env | {
        "PERSONA_REDIS_URL": settings.redis_url.get_secret_value(),
        "PERSONA_DATA_DIR": str(settings.data_dir),
        "PERSONA_PERSONAS_DIRS": json.dumps([str(personas_dir)]),
        "PERSONA_WORKER__MAX_BATCH": "1",
        "PERSONA_WORKER__HEARTBEAT_S": "0.3",
        "PERSONA_WORKER__HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
        "PERSONA_WORKER__THREADS": "1",
        "PERSONA_QUEUE__VISIBILITY_TIMEOUT_S": "300",
    }


@pytest.fixture
def spawn_worker(worker_env, tmp_path: Path):
    """Start `persona worker` processes; returns (process, worker id) once it serves."""
    processes: list[subprocess.Popen] = []

    def spawn(client: redis.Redis, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
        before = {k.decode() for k in client.scan_iter(match=keys.WORKER_KEY_PREFIX + "*")}
        log = (tmp_path / f"worker-{len(processes)}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "persona", "worker", "--preload", "slow"],
            env=env or worker_env, stdout=log, stderr=subprocess.STDOUT,
        )
        processes.append(process)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / f"worker-{len(processes) - 1}.log").read_text()
            for key in client.scan_iter(match=keys.WORKER_KEY_PREFIX + "*"):
                name = key.decode()
                if name not in before and json.loads(client.get(key) or "{}").get("pid") == process.pid:
                    return process, name.removeprefix(keys.WORKER_KEY_PREFIX)
            time.sleep(0.1)
        raise AssertionError("worker did not start serving")

    yield spawn
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def ask_many(client: QueueClient, persona: str, count: int) -> list[GenerationRequest]:
    return [
        client.submit(GenerationRequest(persona=persona, messages=[Message(role="user", content=f"question {i}")]))
        for i in range(count)
    ]


def wait_until_holding(client: redis.Redis, worker_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for consumer in client.xinfo_consumers(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP):
            if consumer["name"].decode() == worker_id and consumer["pending"] > 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"{worker_id} never held a request")


def wait_until_not_holding(client: redis.Redis, worker_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = {c["name"].decode(): c["pending"] for c in client.xinfo_consumers(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)}
        if not held.get(worker_id):
            return
        time.sleep(0.05)
    raise AssertionError(f"{worker_id} still holds requests")


def assert_answered_exactly_once(client: QueueClient, requests: list[GenerationRequest], timeout: float = 120):
    # A client of its own for each wait, so no reply list is deleted once read (a client
    # deletes the lists it has read with its next call): each must hold exactly one reply.
    replies = [QueueClient(client.redis, client.settings).wait(r, timeout=timeout) for r in requests]
    time.sleep(0.5)  # a duplicate would land after the first reply
    for request in requests:
        assert client.redis.llen(keys.reply_key(request.id)) == 1, f"{request.id} was answered twice"
    return replies


@pytest.mark.slow
def test_killed_worker_is_replaced_within_seconds_and_no_one_waits_twice(
    settings, redis_client, slow_persona, spawn_worker
):
    client = QueueClient(redis_client, settings.queue)
    doomed, doomed_id = spawn_worker(redis_client)
    requests = ask_many(client, slow_persona, 4)
    wait_until_holding(redis_client, doomed_id)
    doomed.kill()  # SIGKILL: no chance to hand anything back
    spawn_worker(redis_client)
    serving_at = time.monotonic()
    wait_until_not_holding(redis_client, doomed_id)
    # reclaimed once the heartbeat lapsed, long before the 300 s visibility timeout
    assert time.monotonic() - serving_at < 30
    replies = assert_answered_exactly_once(client, requests)
    assert all(r.ok for r in replies), [r.error for r in replies]
    assert doomed_id not in {r.worker for r in replies}


@pytest.mark.slow
def test_sigterm_finishes_hands_back_and_leaves_cleanly(settings, redis_client, slow_persona, spawn_worker):
    client = QueueClient(redis_client, settings.queue)
    leaving, leaving_id = spawn_worker(redis_client)
    requests = ask_many(client, slow_persona, 3)
    wait_until_holding(redis_client, leaving_id)
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(timeout=60) == 0
    assert redis_client.get(keys.worker_key(leaving_id)) is None  # heartbeat withdrawn
    consumers = {c["name"].decode() for c in redis_client.xinfo_consumers(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)}
    assert leaving_id not in consumers  # left the group with nothing pending
    spawn_worker(redis_client)
    replies = assert_answered_exactly_once(client, requests)
    assert all(r.ok for r in replies)
    assert any(r.worker == leaving_id for r in replies)  # it finished what it had started


@pytest.mark.slow
def test_request_that_keeps_killing_workers_is_dead_lettered(settings, redis_client, slow_persona, spawn_worker, worker_env):
    env = worker_env | {"PERSONA_QUEUE__MAX_DELIVERIES": "2"}
    settings.queue.max_deliveries = 2
    client = QueueClient(redis_client, settings.queue)
    [poison] = ask_many(client, slow_persona, 1)
    for _ in range(2):
        victim, victim_id = spawn_worker(redis_client, env)
        wait_until_holding(redis_client, victim_id)
        victim.kill()
    spawn_worker(redis_client, env)
    reply = client.wait(poison, timeout=60)
    assert not reply.ok and reply.error.kind is ErrorKind.dead_letter
    [(_, fields)] = redis_client.xrange(keys.STREAM_DEAD)
    assert int(fields[b"deliveries"]) == 2
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0  # the queue is not blocked


@pytest.mark.slow
def test_queued_requests_survive_a_redis_restart_and_workers_reconnect(
    tmp_path: Path, settings, slow_persona, spawn_worker, worker_env
):
    server = EmbeddedRedis(tmp_path / "own-redis")
    url = server.start()
    port = server.port
    try:
        env = worker_env | {"PERSONA_REDIS_URL": url}
        client = QueueClient(redis.Redis.from_url(url), settings.queue)
        worker_client = redis.Redis.from_url(url)
        spawn_worker(worker_client, env)[0].send_signal(signal.SIGTERM)  # creates the group, then leaves
        time.sleep(1)
        queued = ask_many(client, slow_persona, 3)
        time.sleep(1.2)  # appendfsync everysec
        server.stop()
        assert server.start(port=port) == url  # same port, same password
        worker, _ = spawn_worker(worker_client, env)
        replies = assert_answered_exactly_once(client, queued)
        assert all(r.ok for r in replies)

        server.stop()  # now with a worker connected
        time.sleep(1)
        server.start(port=port)
        later = ask_many(QueueClient(redis.Redis.from_url(url), settings.queue), slow_persona, 1)
        assert client.wait(later[0], timeout=120).ok
        assert worker.poll() is None  # it rode out the outage
    finally:
        server.stop()


def test_a_worker_stopping_while_redis_is_down_leaves_its_rows_to_others(
    tmp_path: Path, settings, write_persona, tiny_llama_dir
):
    """Its rows cannot be delivered, so it does not wait for Redis: it leaves, and the
    entries stay pending for another worker to take."""
    import threading

    from persona.contract import SamplingOverrides
    from persona.pool import ModelPool
    from persona.worker import Worker

    server = EmbeddedRedis(tmp_path / "own-redis")
    url = server.start()
    try:
        write_persona("tiny", base=str(tiny_llama_dir))
        client = QueueClient(redis.Redis.from_url(url), settings.queue)
        worker = Worker(settings, redis.Redis.from_url(url), ModelPool(settings, "cpu"), worker_id="w-gone")
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        sampling = SamplingOverrides(max_new_tokens=400, temperature=1.0, top_k=0, seed=5)
        client.submit(GenerationRequest(persona="tiny", messages=[Message(role="user", content="hi")], sampling=sampling))
        deadline = time.monotonic() + 30
        while not worker.decoding and time.monotonic() < deadline:
            time.sleep(0.001)
        assert worker.decoding
        server.stop()
        worker.stop()
        thread.join(timeout=20)
        assert not thread.is_alive()
    finally:
        server.stop()


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_wait_rides_out_redis_restarting_and_reads_the_reply_after(tmp_path: Path, settings, side):
    """Redis restarting while a caller waits: the request is still queued (persistence), so
    the wait goes on until its deadline and reads the reply once Redis is back. It used to
    end with "lost the connection" once the client's reconnects ran out (about 9 s), and
    the answer was generated for nobody. (This client does not reconnect at all, so the
    outage need not be long.)"""
    import asyncio
    import threading

    import redis.asyncio
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from persona.contract import GenerationReply
    from persona.queue import AsyncQueueClient, WorkQueue

    server = EmbeddedRedis(tmp_path / "own-redis")
    url = server.start(unix_socket=False)
    port = server.port
    try:
        WorkQueue(redis.Redis.from_url(url), settings.queue)  # the group
        request = QueueClient(redis.Redis.from_url(url), settings.queue).submit(
            GenerationRequest(persona="sage", messages=[Message(role="user", content="still there?")]))
        time.sleep(1.2)  # appendfsync everysec

        def restart_and_answer() -> None:
            time.sleep(0.5)
            server.stop()
            time.sleep(1.5)
            server.start(port=port, unix_socket=False)
            work = WorkQueue(redis.Redis.from_url(url), settings.queue)
            [job] = work.claim("w", 10, block_ms=1000)
            work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text="here"))], "w")

        restarting = threading.Thread(target=restart_and_answer, daemon=True)
        restarting.start()
        if side == "sync":
            client = QueueClient(redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0)), settings.queue)
            reply = client.wait(request, timeout=20)
        else:
            async def wait() -> GenerationReply:
                caller = redis.asyncio.Redis.from_url(url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0))
                try:
                    return await AsyncQueueClient(caller, settings.queue).wait(request, timeout=20)
                finally:
                    await caller.aclose()

            reply = asyncio.run(wait())
        restarting.join()
        assert reply.text == "here"
    finally:
        server.stop()


def test_a_wait_still_ends_when_redis_stays_down(tmp_path: Path, settings):
    """Riding out an outage stops at the wait's deadline, with Redis's own error."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    server = EmbeddedRedis(tmp_path / "own-redis")
    url = server.start(unix_socket=False)
    request = QueueClient(redis.Redis.from_url(url), settings.queue).submit(
        GenerationRequest(persona="sage", messages=[Message(role="user", content="anyone?")]))
    server.stop()
    client = QueueClient(redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0)), settings.queue)
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.wait(request, timeout=1.5)
    assert 1.4 < time.monotonic() - started < 4


def _refuse_writes(client: redis.Redis, folder: Path) -> None:
    """Make Redis fail to save, as on a full or unwritable disk: from then on it answers every
    write (and PING) with MISCONF until a save succeeds."""
    folder.mkdir()
    client.config_set("dir", str(folder))
    folder.rmdir()
    client.bgsave()
    deadline = time.monotonic() + 10
    while client.info("persistence")["rdb_last_bgsave_status"] != "err" or \
            client.info("persistence")["rdb_bgsave_in_progress"]:
        assert time.monotonic() < deadline, "the save did not fail"
        time.sleep(0.05)


def test_a_wait_rides_out_redis_refusing_writes_and_reads_the_reply_after(tmp_path: Path, settings):
    """A Redis that cannot write its disk refuses every write with MISCONF, and a reply is read
    with BLMOVE, a write: a waiting `persona ask` gave up at once with Redis's raw error while
    its request was still generated, for nobody. It now waits, as through a restart."""
    import threading

    from persona.contract import GenerationReply
    from persona.queue import WorkQueue

    server = EmbeddedRedis(tmp_path / "own-redis")
    url = server.start(unix_socket=False)
    try:
        admin = redis.Redis.from_url(url)
        work = WorkQueue(redis.Redis.from_url(url), settings.queue)
        request = QueueClient(redis.Redis.from_url(url), settings.queue).submit(
            GenerationRequest(persona="sage", messages=[Message(role="user", content="still there?")]))
        [job] = work.claim("w", 10, block_ms=1000)
        _refuse_writes(admin, tmp_path / "gone")
        with pytest.raises(redis.exceptions.ResponseError, match="MISCONF"):
            admin.set("probe", 1)

        def mend_and_answer() -> None:
            time.sleep(1.0)
            (tmp_path / "gone").mkdir()
            admin.config_set("dir", str(tmp_path / "gone"))  # Redis's working folder was the removed one
            admin.bgsave()
            while admin.info("persistence")["rdb_last_bgsave_status"] != "ok":
                time.sleep(0.05)
            work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text="here"))], "w")

        mending = threading.Thread(target=mend_and_answer, daemon=True)
        mending.start()
        reply = QueueClient(redis.Redis.from_url(url), settings.queue).wait(request, timeout=20)
        mending.join()
        assert reply.text == "here"
    finally:
        server.stop()


def test_a_redis_refusing_writes_is_found_and_said_as_a_disk_it_cannot_write(tmp_path: Path):
    """MISCONF refuses PING too: every command waited 5 s, then called the embedded Redis
    "not answered for 5 s (starting, or stuck)", and a refused write was Redis's raw text."""
    from persona.cli.common import explain_redis_error
    from persona.embedded_record import find_embedded_url

    server = EmbeddedRedis(tmp_path / "data")
    url = server.start(unix_socket=False)
    try:
        admin = redis.Redis.from_url(url)
        _refuse_writes(admin, tmp_path / "gone")
        assert find_embedded_url(tmp_path / "data") == url
        with pytest.raises(redis.exceptions.ResponseError) as refused:
            admin.pipeline(transaction=False).set("probe", 1).execute()
        said = explain_redis_error(refused.value)
        assert said.startswith("Redis cannot write its data to disk (full, or not writable)"), said
        assert "free space or fix the folder's permissions" in said
        admin.config_set("dir", str(tmp_path))  # mended: it saves as it stops
    finally:
        server.stop()
