"""The embedded Redis across restarts and crashes: one server per data directory, found
again at the address its clients hold, and failures of the data directory said in words."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from persona.embedded_redis import EmbeddedRedis, find_embedded_url
from persona.errors import RedisUnavailable
from tests.test_embedded_redis import Serving, redis_pid


def servers_on(data: Path) -> list[int]:
    """The redis-server processes running on ``data``'s files (Redis works in its folder)."""
    folder = (data / "redis").resolve()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == folder:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                found += [int(entry.name)] if state != "Z" else []
        except OSError:
            pass
    return found


@pytest.fixture
def server(tmp_path: Path):
    started = EmbeddedRedis(tmp_path / "data")
    yield started
    if started.process is not None and started.process.poll() is None:
        os.kill(started.process.pid, signal.SIGCONT)
    started.stop()


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="reads /proc")
def test_a_second_server_is_never_started_on_the_files_one_serves(server: EmbeddedRedis, tmp_path: Path):
    """Its record gone (a start killed before it wrote one, a folder tidied), the next start
    would run a second redis-server on the same append-only file."""
    server.start()
    (tmp_path / "data" / "redis.json").unlink()
    with pytest.raises(RedisUnavailable, match=rf"another embedded Redis \(pid {server.process.pid}\) already runs on"):
        EmbeddedRedis(tmp_path / "data").start()
    assert servers_on(tmp_path / "data") == [server.process.pid]


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="reads /proc")
def test_a_serving_process_waits_for_a_redis_that_is_slow_to_answer_rather_than_start_another(tmp_path: Path):
    """A Redis that did not answer a ping within 2 s (busy, swapped out, loading its data)
    was taken for none: a second one started on its files, and took over its socket."""
    data = tmp_path / "data"
    starter = Serving(data)
    pid = redis_pid(data)
    os.kill(pid, signal.SIGSTOP)
    try:
        arriving = Serving(data, wait=False)
        time.sleep(3)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert arriving.serving() == starter.url
    assert redis_pid(data) == pid and servers_on(data) == [pid]
    assert "left running" in starter.leave()
    assert "embedded Redis stopped" in arriving.leave()
    assert servers_on(data) == []


def test_a_start_returns_once_the_data_is_loaded(server: EmbeddedRedis):
    """It returned while Redis still loaded its data, so the first command of whoever came
    next was refused with LOADING (and another serving process started a second Redis)."""
    client = redis.Redis.from_url(server.start())
    client.execute_command("DEBUG", "POPULATE", 1_500_000)
    client.bgrewriteaof()  # into the append-only file, which a start loads
    time.sleep(0.2)
    while client.info("persistence")["aof_rewrite_in_progress"]:
        time.sleep(0.1)
    client.close()
    server.stop()
    client = redis.Redis.from_url(server.start())
    assert client.ping() and client.dbsize() == 1_500_000
    client.close()


def test_a_tcp_only_redis_comes_back_on_its_port_so_its_clients_reconnect(tmp_path: Path):
    """Where there is no unix socket (a path too long for one here), a restart by the next
    `persona worker` took a new random port, and every chat or bot still open had lost Redis
    for good."""
    data = tmp_path / ("d" * 60) / ("e" * 60)
    first = Serving(data)
    assert first.url.startswith("redis://")
    client = redis.Redis.from_url(first.url)  # `persona chat`, a bot: holds the address it found
    client.rpush("persona:kept", "queued before the restart")
    assert "embedded Redis stopped" in first.leave()
    second = Serving(data)
    assert second.url == first.url
    assert client.lrange("persona:kept", 0, -1) == [b"queued before the restart"]  # persisted, and reached
    client.close()
    second.leave()


def _persona(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
        "PERSONA_DATA_DIR": str(tmp_path / "data"), "PERSONA_WORKER__DEVICE": "cpu",
    }


def test_a_worker_whose_data_directory_cannot_hold_its_locks_says_what_to_do(tmp_path: Path, env):
    """A read-only data directory (or a lock file that is not one) ended `persona worker`
    with a traceback."""
    (tmp_path / "data" / "redis.turn.lock").mkdir(parents=True)
    told = _persona(env, "worker")
    assert told.returncode == 1 and "Traceback" not in told.stderr, told.stderr
    said = " ".join(told.stderr.split())
    assert f"cannot keep data in {tmp_path}/data (Is a directory: {tmp_path}/data/redis.turn.lock)" in said
    assert "set PERSONA_DATA_DIR to a folder you can write" in said


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_up_whose_lock_cannot_be_written_says_so_without_a_traceback(tmp_path: Path, env):
    """Writing its pid into its lock failed on a full disk as the file closed: a traceback.
    (/dev/full refuses every write, with ENOSPC, and truncating, with EINVAL.)"""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "up.lock").symlink_to("/dev/full")
    told = _persona(env, "up", "--no-dashboard")
    assert told.returncode == 1 and "Traceback" not in told.stderr, told.stderr
    said = " ".join(told.stderr.split())
    assert f"cannot keep data in {tmp_path}/data (" in said and "set PERSONA_DATA_DIR to a folder you can write" in said
    assert not (tmp_path / "data" / "redis").exists()  # refused before Redis started


def test_a_client_that_lost_the_embedded_redis_is_told_what_became_of_it(tmp_path: Path, monkeypatch):
    """`persona chat` whose embedded Redis stopped under it (the standalone `persona worker`
    that served on it left) said to check PERSONA_REDIS_URL, which was never set."""
    from persona.cli.common import explain_redis_error, get_settings

    data = tmp_path / "data"
    monkeypatch.delenv("PERSONA_REDIS_URL", raising=False)
    monkeypatch.setenv("PERSONA_DATA_DIR", str(data))
    monkeypatch.chdir(tmp_path)  # no .env file
    get_settings.cache_clear()
    try:
        get_settings()
        lost = redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        said = explain_redis_error(lost)
        assert f"lost the connection to the embedded Redis of data directory {data}" in said
        assert "it has stopped" in said and "Start `persona up` (or `persona worker`) again" in said
        assert "PERSONA_REDIS_URL" not in said
        served = Serving(data)
        assert "it is running again now (this command's connections find it where it is), so try again" in explain_redis_error(lost)
        served.leave()
    finally:
        get_settings.cache_clear()


@pytest.fixture
def full_disk_error() -> OSError:
    """What writing a file on a full disk raises (ENOSPC, no file name): a real write to /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with pytest.raises(OSError) as refused, Path("/dev/full").open("w") as full:
        full.write("x")
        full.flush()
    return refused.value


def test_a_full_disk_says_to_free_space_on_it_or_use_another(tmp_path: Path, full_disk_error: OSError):
    """A full disk was told as "set PERSONA_DATA_DIR to a folder you can write": another folder
    on the same disk is full too, and the folder is writable; space is what it needs."""
    from persona.errors import DataDirUnwritable

    said = str(DataDirUnwritable(tmp_path / "data", full_disk_error))
    assert said.startswith(f"cannot keep data in {tmp_path / 'data'} (No space left on device)"), said
    assert "free some space on that disk (mounted at " in said
    assert "or set PERSONA_DATA_DIR to a folder on another one" in said


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_up_on_a_full_disk_says_to_free_space(tmp_path: Path, env):
    """The embedded Redis's config cannot be written (/dev/full refuses it with ENOSPC)."""
    (tmp_path / "data" / "redis").mkdir(parents=True)
    (tmp_path / "data" / "redis" / ".redis.conf.new").symlink_to("/dev/full")  # where its config is written first
    told = _persona(env, "up", "--no-dashboard")
    assert told.returncode == 1 and "Traceback" not in told.stderr, told.stderr
    said = " ".join(told.stderr.split())
    assert f"cannot keep data in {tmp_path}/data (No space left on device); free some space on that disk" in said
    assert "or set PERSONA_DATA_DIR to a folder on another one" in said


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="reads /proc")
def test_serving_processes_run_alone_start_a_killed_redis_again_one_between_them(tmp_path: Path):
    """A `persona worker` or `dashboard` run alone (no `persona up`) whose embedded Redis was
    killed retried it for ever, while clients were told to start `persona up`."""
    data = tmp_path / "data"
    first, second = Serving(data, wait=False), Serving(data, wait=False)
    client = redis.Redis.from_url(first.serving())
    assert second.serving() == first.url  # `persona chat`, a bot: holds the address it found
    killed = redis_pid(data)
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (servers_on(data) in ([], [killed]) or not find_embedded_url(data)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.ping()  # back at the address its clients hold
    time.sleep(1.5)  # both have looked by now: the second found the one the first started
    [started_again] = servers_on(data)
    assert started_again != killed
    said = first.leave() + second.leave()
    assert said.count("the embedded Redis has died; starting it again") == 1 and "could not be started" not in said
    assert "embedded Redis stopped" in said and servers_on(data) == []
    client.close()
