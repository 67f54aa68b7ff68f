"""A newcomer's path: `persona up`, then ask and chat on the real bundled model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# generous: on a loaded machine the one-time model conversion alone can take minutes
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def persona(*args: str, env: dict[str, str], input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "persona", *args], env=env, input=input, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def service(tmp_path: Path, model_cache_dir: Path):
    """`persona up` in a fresh data directory (the converted model shared across the run)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "model-cache").symlink_to(model_cache_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
        "PERSONA_DATA_DIR": str(data),
        # a loaded CI machine may take minutes to convert the model; the test is not a timer
        "PERSONA_QUEUE__DEFAULT_DEADLINE_S": "600",
    }
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "persona", "up", "--no-dashboard"], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (data / "redis.json").exists():
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        assert time.monotonic() < deadline, "the embedded Redis did not start"
        time.sleep(0.2)
    yield up, env, data, tmp_path / "up.log"
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)


def test_up_then_ask_and_chat_on_the_bundled_model(service):
    up, env, data, log = service
    started = time.monotonic()
    result = persona("ask", "sage", "How should I spend a quiet morning?", "--json", env=env, timeout=660)
    assert result.returncode == 0, result.stderr + log.read_text()
    reply = json.loads(result.stdout)
    print(f"first reply after {time.monotonic() - started:.1f} s: {reply['text']!r}")
    assert reply["ok"] and reply["persona"] == "sage" and reply["version"] == "base"
    assert len(reply["text"].split()) >= 3
    assert "<|im_end|>" not in reply["text"] and "<|im_start|>" not in reply["text"]

    chat = persona("chat", "bofh", env=env, input="Why is the printer broken?\nAnd the wifi?\n/quit\n", timeout=660)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("bofh>") == 2

    stats = json.loads(persona("queue", "stats", "--json", env=env).stdout)
    assert stats["counters"]["completed"] == 3
    assert [w["personas"] for w in stats["workers"]] == [{"bofh": "base", "sage": "base"}]

    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0
    assert not (data / "redis.json").exists()  # Redis stopped and forgot its address
    assert (data / "redis" / "appendonly.aof").stat().st_size > 0  # its append-only file on disk
