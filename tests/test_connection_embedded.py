"""Clients of the embedded Redis (no PERSONA_REDIS_URL) through its restarts and loads: a
long-running client follows it to a new address, and a command started while it loads
its data is told so, not that no Redis runs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from persona import connection
from persona.connection import connect, connect_async, redis_url, retrying_until
from persona.embedded_redis import (
    ADDRESS_FILE,
    SERVER_LOCK_FILE,
    SOCKET_FILE,
    EmbeddedRedis,
    redis_server_binary,
)
from persona.errors import RedisUnavailable
from persona.settings import Settings


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def settings(data: Path) -> Settings:
    return Settings(_env_file=None, data_dir=data)


@contextlib.contextmanager
def another_program_on(port: int) -> Iterator[None]:
    """A program that took the port meanwhile: it accepts connections, and closes them."""
    listener = socket.create_server(("127.0.0.1", port))

    def refuse() -> None:
        while True:
            try:
                accepted, _ = listener.accept()
            except OSError:
                return
            accepted.close()

    threading.Thread(target=refuse, daemon=True).start()
    try:
        yield
    finally:
        listener.close()


@contextlib.contextmanager
def restarted_elsewhere(first: EmbeddedRedis, data: Path) -> Iterator[EmbeddedRedis]:
    """``first`` (TCP only) stopped, its port taken by another program, and the embedded
    Redis started again: on a new port, its record saying so."""
    port = first.port
    first.stop()
    with another_program_on(port):
        second = EmbeddedRedis(data)
        second.start(unix_socket=False)
        try:
            assert second.port != port
            yield second
        finally:
            second.stop()


def test_a_long_running_client_follows_the_embedded_redis_to_its_new_port(data: Path, settings: Settings):
    """A `persona chat` kept the address it first found: once the embedded Redis came back on
    another port (a TCP-only one whose port another program took), every message failed."""
    first = EmbeddedRedis(data)
    first.start(unix_socket=False)
    client = connect(settings)
    client.set("said", "before the restart")
    with restarted_elsewhere(first, data), retrying_until(time.monotonic() + 3):
        assert client.get("said") == b"before the restart"  # the same data, at the new address
        client.close()


async def test_a_bot_follows_the_embedded_redis_to_its_new_port(data: Path, settings: Settings):
    first = EmbeddedRedis(data)
    first.start(unix_socket=False)
    client = await connect_async(settings)
    try:
        await client.set("said", "before the restart")
        with restarted_elsewhere(first, data), retrying_until(time.monotonic() + 3):
            assert await client.get("said") == b"before the restart"
    finally:
        await client.aclose()


def test_a_client_of_a_configured_redis_url_does_not_follow_the_record(data: Path, settings: Settings):
    """PERSONA_REDIS_URL names the Redis: a record in the data directory is not read."""
    first = EmbeddedRedis(data)
    url = first.start(unix_socket=False)
    configured = settings.model_copy(update={"redis_url": url})
    client = connect(configured, url=url)
    assert "embedded" not in client.connection_pool.connection_kwargs
    client.close()
    first.stop()


def test_a_command_started_while_the_embedded_redis_loads_its_data_says_so(data: Path, settings: Settings, monkeypatch):
    """`persona ask` just after a restart said "no Redis is running" for as long as the
    embedded Redis loaded a large data set."""
    with loading_slowly(data):
        monkeypatch.setattr(connection, "EMBEDDED_WAIT_S", 0.0, raising=False)  # said at once, not after the wait
        with pytest.raises(RedisUnavailable) as told:
            redis_url(settings)
    said = str(told.value)
    assert f"the embedded Redis of data directory {data} is loading its data (" in said
    assert "s so far); try again in a moment" in said and "no Redis is running" not in said


@contextlib.contextmanager
def loading_slowly(data: Path) -> Iterator[None]:
    """The embedded Redis of ``data`` started again on its files, as its starter does (its
    record and its lock), loading for seconds: a test setting of Redis's makes each key
    take 20 ms. Incompressible values: Redis answers others while it loads once per 2 MB
    read, so every 8 of these (0.16 s), 16 times before it has loaded."""
    server = EmbeddedRedis(data)
    url = server.start()
    value = os.urandom(256 * 1024)
    with redis.Redis.from_url(url) as client:
        client.mset({f"key{n}": value for n in range(128)})
        client.bgrewriteaof()  # its data as a snapshot, which the setting slows
        while any(client.info("persistence")[f"aof_rewrite_{what}"] for what in ("in_progress", "scheduled")):
            time.sleep(0.02)
        with contextlib.suppress(redis.exceptions.ConnectionError):  # it closes the connection as it goes
            client.shutdown(nosave=True)  # all in its append-only file already
    server.stop()
    folder = data / "redis"
    lock = os.open(folder / SERVER_LOCK_FILE, os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    loading = subprocess.Popen([redis_server_binary(), str(folder / "redis.conf"), "--key-load-delay", "20000"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(lock,))
    os.close(lock)
    try:
        (data / ADDRESS_FILE).write_text(json.dumps({"url": url, "pid": loading.pid, "port": server.port}))
        while not listening(folder / SOCKET_FILE):  # it opens its socket, then loads
            time.sleep(0.01)
        yield
    finally:
        loading.kill()  # mid-load: nothing to save
        loading.wait()


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def test_a_command_started_while_a_serving_process_starts_the_redis_again_waits_for_it(settings: Settings):
    """`persona ask` run just as `persona up` started a killed embedded Redis again was told
    "no Redis is running ...: start the service with `persona up`", which was running, and
    had Redis back 30 ms later."""
    from persona.served_redis import served_redis

    with served_redis(settings) as served, ThreadPoolExecutor(1) as pool:  # served on, as `persona up` does
        served.embedded.process.kill()
        served.embedded.process.wait()
        asked = pool.submit(redis_url, settings)
        time.sleep(0.5)  # it looks for the server meanwhile
        served.keep_alive()  # as `persona up` does each second
        assert asked.result(timeout=10) == served.url


def test_a_command_is_told_when_a_serving_process_does_not_start_the_redis_again(settings: Settings, monkeypatch):
    with served_redis_killed(settings):
        monkeypatch.setattr(connection, "EMBEDDED_WAIT_S", 0.3)
        with pytest.raises(RedisUnavailable) as told:
            redis_url(settings)
    said = str(told.value)
    assert f"the embedded Redis of data directory {settings.data_dir} is not running, and the service using it" in said
    assert "has not started it again within" in said and "no Redis is running" not in said


def test_a_command_with_nothing_serving_is_told_to_start_the_service_at_once(settings: Settings):
    with served_redis_killed(settings):
        pass  # left: nothing serves on the data directory now
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"no Redis is running for data directory .*: start the service with `persona up`"):
        redis_url(settings)
    assert time.monotonic() - started < 1  # not waited for: no one would start it


@contextlib.contextmanager
def served_redis_killed(settings: Settings) -> Iterator[None]:
    """Served on as `persona up` does, its embedded Redis killed and not started again."""
    from persona.served_redis import served_redis

    with served_redis(settings) as served:
        served.embedded.process.kill()
        served.embedded.process.wait()
        yield
