"""`persona ask` and `persona chat` as a user meets them when the queue misbehaves: real
processes on a real Redis that the test stops halfway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from persona import constants as keys
from persona.embedded_redis import EmbeddedRedis

# `python -m persona`, with Ctrl-C raising KeyboardInterrupt as in a terminal, even where the
# tests run as a background job (which starts Python with SIGINT ignored).
AS_IN_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'persona'; runpy.run_module('persona', run_name='__main__', alter_sys=True)"
)


def _talking(tmp_path: Path, url: str, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(tmp_path / "data"), "PERSONA_REDIS_URL": url, "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-c", AS_IN_A_TERMINAL, *args], env=env, text=True, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _queued(client: redis.Redis, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.exists(keys.STREAM_INTERACTIVE) or not client.xlen(keys.STREAM_INTERACTIVE):
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.05)


@pytest.mark.parametrize("command", ["ask", "chat"])
def test_ctrl_c_with_redis_down_answers_at_once_and_says_the_message_was_not_withdrawn(tmp_path, own_redis, command):
    """Withdrawing the message went through redis-py's reconnects: the terminal hung for 9 s
    after Ctrl-C, and the chat then said "(withdrawn)" of a message still queued."""
    server, url, client = own_redis
    talking = _talking(tmp_path, url, *(["ask", "sage", "hello"] if command == "ask" else ["chat", "sage"]))
    if command == "chat":
        talking.stdin.write("hello\n")
        talking.stdin.flush()
    _queued(client)  # no worker: it waits for the reply
    server.stop()
    pressed = time.monotonic()
    talking.send_signal(signal.SIGINT)
    stdout, stderr = talking.communicate("/quit\n" if command == "chat" else None, timeout=30)
    assert time.monotonic() - pressed < 4.0
    assert "Traceback" not in stderr
    assert "could not withdraw that message: Redis cannot be reached" in stderr
    assert "(withdrawn" not in stdout + stderr
    if command == "chat":
        assert talking.returncode == 0 and stdout.count("you>") == 2  # the chat goes on, then /quit


def test_an_ask_that_timed_out_is_past_its_deadline_so_no_worker_generates_it_later(tmp_path, own_redis):
    """`persona ask` does not withdraw a message it stopped waiting for: its deadline (the
    --timeout) has passed by then, by Redis's clock, so a worker that comes back later
    answers it "waited past its deadline" without generating (see test_worker)."""
    from persona.settings import QueueSettings
    from persona.work_queue import WorkQueue

    _server, url, client = own_redis
    talking = _talking(tmp_path, url, "ask", "sage", "hello", "--timeout", "1")
    _stdout, stderr = talking.communicate(timeout=30)
    assert talking.returncode == 1 and "no worker answered request" in stderr
    [job] = WorkQueue(client, QueueSettings()).claim("late-worker", 10, block_ms=0)
    seconds, micros = client.time()
    assert job.expired(seconds + micros / 1e6)


def _request_id(client: redis.Redis) -> str:
    import json

    _queued(client)
    [(_, fields)] = client.xrange(keys.STREAM_INTERACTIVE)
    return json.loads(fields[b"r"])["id"]


@pytest.mark.parametrize(("command", "stop_signal", "status"), [
    ("ask", signal.SIGTERM, 143), ("chat", signal.SIGTERM, 143), ("ask", signal.SIGHUP, 129),
])
def test_sigterm_or_a_closed_terminal_withdraws_the_message_waiting(tmp_path, own_redis, command, stop_signal, status):
    """`kill` or closing the terminal left the message queued, for a worker to answer for
    nobody later (and `persona chat` ended without a word): now it is withdrawn as Ctrl-C's is."""
    _server, url, client = own_redis
    talking = _talking(tmp_path, url, *(["ask", "sage", "hello"] if command == "ask" else ["chat", "sage"]))
    if command == "chat":
        talking.stdin.write("hello\n")
        talking.stdin.flush()
    request_id = _request_id(client)  # no worker: it waits for the reply
    talking.send_signal(stop_signal)
    stdout, stderr = talking.communicate(timeout=30)
    assert talking.returncode == status and "Traceback" not in stderr, stderr
    assert client.exists(keys.cancel_key(request_id)), "a worker would still answer it"
    assert "(withdrawn" in stdout + stderr


def test_ctrl_c_under_json_prints_the_withdrawal_as_json(tmp_path, own_redis):
    """A script reading `persona ask --json` got nothing on stdout after Ctrl-C (exit 130)."""
    import json

    _server, url, client = own_redis
    talking = _talking(tmp_path, url, "ask", "sage", "hello", "--json")
    request_id = _request_id(client)
    talking.send_signal(signal.SIGINT)
    stdout, stderr = talking.communicate(timeout=30)
    assert talking.returncode == 130 and "Traceback" not in stderr, stderr
    reply = json.loads(stdout)
    assert reply["ok"] is False and reply["id"] == request_id
    assert reply["error"]["kind"] == "cancelled" and "withdrawn" in reply["error"]["message"]
