"""`persona up` as a real process: it restarts crashed services and stops everything it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def children(pid: int) -> dict[int, str]:
    """The running child processes of ``pid``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and running(int(entry.name)) and _parent(entry) == pid:
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def _parent(entry: Path) -> int | None:
    try:
        return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


@pytest.fixture
def start_up(tmp_path: Path, write_persona, tiny_gpt2_dir, settings):
    """Start `persona up ARGS...` on a fresh embedded Redis, serving a tiny persona."""
    write_persona("tiny", base=str(tiny_gpt2_dir))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
        "PERSONA_DATA_DIR": str(tmp_path / "up-data"),
        "PERSONA_PERSONAS_DIRS": json.dumps([str(p) for p in settings.personas_dirs]),
        "PERSONA_WORKER__PERSONAS": '["tiny"]',
        "PERSONA_WORKER__DEVICE": "cpu",
        "TEST_SERVE_RUN": str(tmp_path),  # inherited by every process `persona up` starts
    }
    started: list[subprocess.Popen] = []

    def start(*args: str) -> tuple[subprocess.Popen, int]:
        """The `persona up` process and its embedded Redis's pid."""
        output = (tmp_path / "up.log").open("w")
        up = subprocess.Popen([sys.executable, "-m", "persona", "up", "--no-dashboard", *args], env=env,
                              stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT)
        started.append(up)
        record = tmp_path / "up-data" / "redis.json"
        wait_for(lambda: record.exists() or up.poll() is not None, "the embedded Redis did not start")
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        return up, json.loads(record.read_text())["pid"]

    yield start
    for up in started:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)
    for pid in started_under(tmp_path):  # whatever a failed test left behind
        os.kill(pid, signal.SIGKILL)


def started_under(folder: Path) -> list[int]:
    """Running processes that `persona up` started in ``folder``: by their environment, or
    by their working directory for redis-server, which writes over its environment."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            marked = f"TEST_SERVE_RUN={folder}".encode() in (entry / "environ").read_bytes().split(b"\0")
            if marked or Path(os.readlink(entry / "cwd")).is_relative_to(folder):
                found.append(int(entry.name))
        except OSError:
            pass
    return [pid for pid in found if running(pid)]


def workers_of(up: subprocess.Popen) -> dict[int, str]:
    return {pid: cmd for pid, cmd in children(up.pid).items() if cmd.endswith(" worker ")}


def test_closing_the_terminal_stops_every_service_and_redis(start_up):
    up, redis_pid = start_up()
    services = wait_for(lambda: workers_of(up), "no worker started")
    up.send_signal(signal.SIGHUP)  # the terminal or SSH session closed
    assert up.wait(timeout=60) == 0
    left = [pid for pid in [*services, redis_pid] if running(pid)]
    assert left == [], "left running after SIGHUP"


def test_chatting_still_restarts_a_crashed_worker_and_a_hangup_stops_all(start_up):
    up, redis_pid = start_up("--chat", "tiny")
    [first] = wait_for(lambda: workers_of(up), "no worker started")
    os.kill(first, signal.SIGKILL)  # a worker crashes while the chat waits for a line
    [second] = wait_for(lambda: [p for p in workers_of(up) if p != first], "the crashed worker was not restarted", 20)

    up.send_signal(signal.SIGHUP)
    assert up.wait(timeout=60) == 0
    assert [pid for pid in (second, redis_pid) if running(pid)] == []
