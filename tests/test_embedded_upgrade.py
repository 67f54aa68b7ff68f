"""An embedded Redis that an older version of persona started, found by this one: those
versions held no server lock, so only the process they recorded says a server runs on the
files, and a second one must never be started beside it (both appended to one file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from persona.embedded_locks import server_pid
from persona.embedded_redis import EmbeddedRedis, redis_server_binary, running_url
from persona.errors import RedisUnavailable
from tests.conftest import free_port
from tests.test_embedded_restarts import servers_on

pytestmark = pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="reads /proc")


@pytest.fixture
def old_server(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A redis-server on a data directory's files, started as versions before
    ``server.lock`` started one: the same config, its address recorded in redis.json as
    ``EmbeddedRedis._record`` writes it, and no lock held. Stopped (continued first) after."""
    data = tmp_path / "data"
    folder = data.absolute() / "redis"
    folder.mkdir(parents=True, mode=0o700)
    port = free_port()
    EmbeddedRedis._write_config(folder / "redis.conf", port, "old-password", folder / "redis.log", None)
    process = subprocess.Popen([redis_server_binary(), str(folder / "redis.conf")], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:old-password@127.0.0.1:{port}/0"
    (data / "redis.json").write_text(json.dumps({"url": url, "pid": process.pid, "port": port}))
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            assert time.monotonic() < deadline and process.poll() is None, "the old-style server did not start"
            time.sleep(0.05)
    client.close()
    yield process
    os.kill(process.pid, signal.SIGCONT)
    process.terminate()
    process.wait(timeout=15)


def test_a_stalled_server_an_old_version_started_is_not_joined_by_a_second_one(old_server, tmp_path: Path):
    """Stopped (SIGSTOP, standing for any stall: swapping, a fork, a long command), it was
    taken for none: a new start ran a second redis-server on the same append-only file."""
    data = tmp_path / "data"
    os.kill(old_server.pid, signal.SIGSTOP)
    arriving = EmbeddedRedis(data)
    try:
        with pytest.raises(RedisUnavailable, match=rf"an embedded Redis \(pid {old_server.pid}\) that an earlier "
                                                   rf"version of persona started already runs on .*`kill {old_server.pid}`"):
            arriving.start()
        assert servers_on(data) == [old_server.pid]
    finally:
        arriving.stop()  # the second server, had one started


def test_a_serving_process_waits_for_it_then_says_which_process_to_stop(old_server, tmp_path: Path):
    """What `persona worker` and `up` ask before they start one: it is waited for (it may be
    loading its data, or stalled for a moment), then refused by its pid, never started again."""
    data = tmp_path / "data"
    os.kill(old_server.pid, signal.SIGSTOP)
    began = time.monotonic()
    with pytest.raises(RedisUnavailable, match=rf"an embedded Redis \(pid {old_server.pid}\) runs on .* has not "
                                               rf"answered for 1 s.*If it is stuck, stop it \(`kill {old_server.pid}`\)"):
        running_url(data, timeout_s=1)
    assert time.monotonic() - began >= 1  # waited for it first
    assert servers_on(data) == [old_server.pid]


def test_queue_stats_says_it_runs_but_does_not_answer(old_server, tmp_path: Path, monkeypatch):
    """`persona queue stats` said "no Redis is running for data directory ...", while one ran on its files."""
    from persona import connection
    from tests.test_cli import invoke

    os.kill(old_server.pid, signal.SIGSTOP)
    monkeypatch.setattr(connection, "EMBEDDED_WAIT_S", 0.5)
    monkeypatch.chdir(tmp_path)  # no .env file
    told = invoke(monkeypatch, {"PERSONA_DATA_DIR": str(tmp_path / "data")}, "queue", "stats")
    said = " ".join(told.output.split())
    assert told.exit_code == 1 and "no Redis is running" not in said, said
    assert f"the embedded Redis (pid {old_server.pid}) of data directory" in said and "has not answered" in said
    assert servers_on(tmp_path / "data") == [old_server.pid]


def test_once_it_answers_again_a_new_version_joins_it(old_server, tmp_path: Path):
    """The upgrade's usual case: the new version serves on the server the old one started."""
    data = tmp_path / "data"
    os.kill(old_server.pid, signal.SIGSTOP)
    os.kill(old_server.pid, signal.SIGCONT)
    assert running_url(data, timeout_s=5) == json.loads((data / "redis.json").read_text())["url"]
    assert servers_on(data) == [old_server.pid]


def test_a_recorded_pid_that_is_not_a_redis_on_these_files_is_no_server(tmp_path: Path):
    """A record left by a server that died, its pid since given to another process (here, this one)."""
    data = tmp_path / "data"
    (data / "redis").mkdir(parents=True)
    (data / "redis.json").write_text(json.dumps({"url": "redis://:x@127.0.0.1:1/0", "pid": os.getpid(), "port": 1}))
    assert server_pid(data) is None
    assert running_url(data, timeout_s=1) is None
