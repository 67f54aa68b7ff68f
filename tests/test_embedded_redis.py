"""The embedded Redis: local clients reach it on a unix socket, anything else on TCP."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from persona.connection import connect, connect_async
from persona.embedded_redis import SOCKET_FILE, EmbeddedRedis, find_embedded_url
from persona.errors import RedisUnavailable
from persona.settings import Settings


@pytest.fixture
def server(tmp_path: Path):
    started = EmbeddedRedis(tmp_path / "data")
    yield started
    started.stop()


def test_local_clients_get_the_unix_socket_and_tcp_reaches_the_same_data(server: EmbeddedRedis, tmp_path: Path):
    url = server.start()
    assert url.startswith("unix://") and url.split("@", 1)[1].startswith(str(tmp_path / "data" / "redis" / SOCKET_FILE))
    assert server.tcp_url.startswith("redis://") and server.tcp_url.endswith(f"@127.0.0.1:{server.port}/0")
    assert find_embedded_url(tmp_path / "data") == url  # what `persona` commands connect to

    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    over_socket = connect(settings)  # the service's own connection options work on a socket
    over_tcp = connect(settings, url=server.tcp_url)
    over_socket.set("written", "through the socket")
    assert over_tcp.get("written") == b"through the socket"

    async def through_asyncio() -> bytes:
        client = await connect_async(settings)
        try:
            return await client.get("written")
        finally:
            await client.aclose()

    assert asyncio.run(through_asyncio()) == b"through the socket"


def test_a_socket_path_too_long_for_the_system_means_tcp(tmp_path: Path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = EmbeddedRedis(deep)
    try:
        url = server.start()
        assert url == server.tcp_url
        assert redis.Redis.from_url(url).ping()
    finally:
        server.stop()


def test_a_folder_that_cannot_hold_the_socket_falls_back_to_tcp(server: EmbeddedRedis, tmp_path: Path, caplog):
    # Something already sits where the socket would go, and Redis cannot replace it.
    (tmp_path / "data" / "redis" / SOCKET_FILE / "in-the-way").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="persona.embedded_redis"):
        url = server.start()
    assert url == server.tcp_url
    assert redis.Redis.from_url(url).ping()
    assert "could not open a unix socket" in caplog.text


def test_an_idle_service_is_not_snapshotted_every_minute(server: EmbeddedRedis):
    """Heartbeats change a key every few seconds, and `save 60 1` forked a full snapshot of
    every conversation each minute, each one five more lines in redis.log, for ever; the
    append-only file is what a restart loads."""
    client = redis.Redis.from_url(server.start())
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("save") == {"save": "3600 1"}


def test_a_data_directory_named_with_spaces_and_url_characters_works():
    # Under a short folder: a longer one (pytest's own under a parallel run's worker folder) leaves
    # no room for the socket's path in 108 bytes, and Redis is served over TCP instead, as it should.
    short = Path(tempfile.mkdtemp(prefix="pr-"))
    data = short / 'My "data" #1 100%?'  # what a folder on a desktop may be called
    server = EmbeddedRedis(data)
    try:
        url = server.start()
        assert url.startswith("unix://")
        client = redis.Redis.from_url(url)
        client.set("kept", "1")
        assert redis.Redis.from_url(server.tcp_url).get("kept") == b"1"
        assert find_embedded_url(data) == url
        client.save()
        assert (data / "redis" / "dump.rdb").exists()  # it writes where it was told
    finally:
        server.stop()
        shutil.rmtree(short, ignore_errors=True)


def test_a_redis_that_cannot_start_says_why_in_the_log_it_names(tmp_path: Path):
    server = EmbeddedRedis(tmp_path / "data")
    with pytest.raises(RedisUnavailable, match=r"exited at start \(argument must be between 0 and 65535") as refused:
        server.start(port=70000)  # a line of its config it refuses, before it opens its log
    log_file = Path(str(refused.value).rsplit("; see ", 1)[1])
    assert "port 70000" in log_file.read_text()


def test_a_relative_data_directory_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    server = EmbeddedRedis(Path("data"))  # PERSONA_DATA_DIR=data
    try:
        assert redis.Redis.from_url(server.start()).ping()
        assert (tmp_path / "data" / "redis" / "redis.log").exists()
    finally:
        server.stop()


def test_a_port_held_by_something_else_is_refused_at_once_with_the_reason(server: EmbeddedRedis):
    server.start()
    server.stop()  # an earlier run: its log speaks of the unix socket it removed
    with socket.socket() as squatter:  # a program that holds the port and never answers
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match=r"exited at start \(Failed listening on port \d+ \(TCP\), aborting.\); see "):
            server.start(port=server.port)
    assert time.monotonic() - started < 10
    assert find_embedded_url(server.data_dir) is None


def test_a_restart_keeps_the_socket_and_the_password(server: EmbeddedRedis):
    url = server.start()
    client = redis.Redis.from_url(url)
    client.set("kept", "1")
    server.stop()
    assert server.start(port=server.port) == url
    assert client.get("kept") == b"1"  # the same client reconnects through the same socket


def test_the_stored_conversations_are_readable_by_this_user_alone(tmp_path: Path):
    before = os.umask(0o022)  # a usual login umask: new files readable by everyone
    try:
        (tmp_path / "data" / "redis").mkdir(parents=True, mode=0o755)  # left by an older version
        server = EmbeddedRedis(tmp_path / "data")
        client = redis.Redis.from_url(server.start())
        client.set("persona:conv:telegram:123", "a user's private conversation")
        client.save()
        server.stop()
    finally:
        os.umask(before)
    folder = tmp_path / "data" / "redis"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert {"redis.conf", "redis.log", "dump.rdb"} <= {p.name for p in written}
    assert [p.name for p in written if p.stat().st_mode & 0o077] == []  # nothing for group or others


def test_a_record_left_by_a_dead_redis_whose_pid_was_reused_is_ignored(tmp_path: Path):
    from persona.served_redis import redis_for_service

    data = tmp_path / "data"
    data.mkdir()
    # What a host crash leaves: after the reboot its pid belongs to another process (this one).
    stale = {"url": "redis://:old-password@127.0.0.1:1/0", "pid": os.getpid(), "port": 1}
    (data / "redis.json").write_text(json.dumps(stale))
    assert find_embedded_url(data) is None
    with redis_for_service(Settings(_env_file=None, data_dir=data)) as url:
        assert url != stale["url"] and redis.Redis.from_url(url).ping()
        assert find_embedded_url(data) == url


SERVING = """
import sys
from pathlib import Path
from persona.served_redis import redis_for_service
from persona.logs import setup_logging
from persona.settings import Settings
settings = Settings(_env_file=None, data_dir=Path(sys.argv[1]))
setup_logging(settings)
with redis_for_service(settings) as url:
    print(url, flush=True)
    sys.stdin.read()  # serves until its stdin closes
"""


class Serving:
    """A process serving on the embedded Redis of ``data`` as `persona worker` does, until ``leave``."""

    def __init__(self, data: Path, *, wait: bool = True) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVING, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self.url = self.serving() if wait else ""

    def serving(self) -> str:
        """The URL it serves on, once it does."""
        self.url = self.process.stdout.readline().strip()
        assert self.url, self.process.stderr.read()
        return self.url

    def leave(self) -> str:
        """Stop it; what it logged."""
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0
        return self.process.stderr.read()


def redis_pid(data: Path) -> int:
    return json.loads((data / "redis.json").read_text())["pid"]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_embedded_redis_outlives_its_starter_while_another_serves_on_it(tmp_path: Path):
    data = tmp_path / "data"
    starter = Serving(data)
    pid = redis_pid(data)
    attached = Serving(data)
    assert attached.url == starter.url
    assert "left running: another serving process still uses it" in starter.leave()
    assert redis.Redis.from_url(attached.url).ping()  # the one still serving keeps its Redis
    assert "embedded Redis stopped" in attached.leave()  # the last one out stops it
    assert gone(pid) and find_embedded_url(data) is None


def test_one_that_attached_leaves_the_embedded_redis_to_its_starter(tmp_path: Path):
    data = tmp_path / "data"
    starter = Serving(data)
    pid = redis_pid(data)
    assert "left running" in Serving(data).leave()
    assert redis.Redis.from_url(starter.url).ping()
    starter.leave()
    assert gone(pid) and find_embedded_url(data) is None


def test_clients_that_do_not_serve_do_not_keep_the_embedded_redis_running(tmp_path: Path):
    data = tmp_path / "data"
    starter = Serving(data)
    pid = redis_pid(data)
    chatting = redis.Redis.from_url(starter.url)  # `persona chat`, an adapter: clients, not services
    chatting.ping()
    assert "embedded Redis stopped" in starter.leave()
    assert gone(pid)
    chatting.close()


def test_two_serving_processes_starting_at_once_start_one_redis(tmp_path: Path):
    data = tmp_path / "data"
    first, second = Serving(data, wait=False), Serving(data, wait=False)
    assert first.serving() == second.serving()
    assert "left running" in first.leave()
    assert "embedded Redis stopped" in second.leave()
    assert find_embedded_url(data) is None


def test_the_last_to_leave_stops_the_redis_another_started_after_its_own_died(tmp_path: Path, caplog):
    """A serving process (here as `persona up` serves) whose own Redis was killed, and another
    that started a new one before the first noticed: the first, leaving last, logged
    "embedded Redis stopped" having stopped only its own, dead one, and the new one ran on
    with nothing serving on it."""
    from persona.served_redis import served_redis

    data = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="persona.served_redis"), served_redis(Settings(_env_file=None, data_dir=data)) as served:
        served.embedded.process.kill()
        served.embedded.process.wait()
        arriving = Serving(data)  # finds none running, so starts one
        started_again = redis_pid(data)
        assert "left running" in arriving.leave()
    assert "embedded Redis stopped" in caplog.text
    assert gone(started_again) and find_embedded_url(data) is None
