"""`persona bench queue` drains real requests through a real worker and a plain loop."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from persona.bench_queue import BASELINE_LOOP, InstantEngine, _baseline_step
from persona.contract import GenerationRequest, Message
from persona.engine import Work
from persona.personas import Sampling
from persona.queue import QueueClient, WorkQueue


def test_instant_engine_answers_every_row_at_once():
    rows = [Work([1, 2], Sampling()), Work([3], Sampling())]
    completions = InstantEngine(loaded=None).generate(rows)
    assert [c.text for c in completions] == ["ok", "ok"]


def test_bench_queue_prints_ours_and_the_baseline_as_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env["PERSONA_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "persona", "bench", "queue", "--jobs", "300", "--seconds", "0.2", "--batch", "32", "--json"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("jobs_per_s", "p50_ms", "p99_ms", "baseline_jobs_per_s", "baseline_p50_ms", "ratio"):
        assert data[key] > 0, key
    assert data["p99_ms"] >= data["p50_ms"]
    assert data["transport"] == "unix socket"  # as `persona up` reaches its embedded Redis
    # Both sides drain as many: the baseline drained a quarter of ours, or 1,000 (here more), and the JSON hid it.
    assert data["jobs"] == data["baseline_jobs"] == 300


def test_the_baseline_is_described_by_the_commands_it_sends(own_redis, settings):
    """The label said one XREADGROUP, LPUSH and XACK per job; the loop also sent an XDEL."""
    _, _, redis_client = own_redis
    WorkQueue(redis_client, settings.queue)  # the consumer group
    QueueClient(redis_client, settings.queue).submit(
        GenerationRequest(persona="bench", messages=[Message(role="user", content="hello")])
    )
    redis_client.config_resetstat()
    assert _baseline_step(redis_client, "baseline") == 1
    sent = {name.removeprefix("cmdstat_").upper() for name in redis_client.info("commandstats")} - {"CONFIG"}
    assert sent == set(re.findall(r"\b[A-Z]{4,}\b", BASELINE_LOOP)) == {"XREADGROUP", "LPUSH", "XACK", "XDEL"}


def _soak_cli(tmp_path, *args: str) -> subprocess.Popen:
    """`persona bench soak ARGS` in its own process group (as a terminal's Ctrl-C reaches a
    whole group), its temporary folder under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(tmp_path / "data"), "TMPDIR": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, "-m", "persona", "bench", "soak", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


@pytest.mark.slow  # about 12 s on two cores: the tiny model and a worker start first
def test_bench_soak_stops_at_ctrl_c_and_leaves_nothing_behind(tmp_path):
    """Ctrl-C during the load stops the soak in seconds with what it sent so far; its workers,
    Redis and temporary folder are gone (it used to run on to the end of --minutes, then
    wait minutes more for replies from a Redis it had stopped, and kept its folder)."""
    import signal
    import time

    soak = _soak_cli(tmp_path, "--minutes", "1", "--workers", "1", "--rate", "5")
    try:
        deadline = time.monotonic() + 90
        while not list(tmp_path.glob("persona-soak-*/worker-0.log")):  # its workers are starting
            assert soak.poll() is None and time.monotonic() < deadline, soak.communicate()
            time.sleep(0.1)
        time.sleep(1.0)  # the callers are sending
        os.killpg(soak.pid, signal.SIGINT)
        out, err = soak.communicate(timeout=30)
    finally:
        if soak.poll() is None:
            os.killpg(soak.pid, signal.SIGKILL)
            soak.communicate()
    assert soak.returncode == 130, err[-3000:]
    assert "interrupted after" in out and "sent " in out
    assert "Traceback" not in err and "cannot be reached" not in err
    assert not list(tmp_path.glob("persona-soak-*"))
    for _ in range(50):  # the worker and redis-server processes have left with it
        try:
            os.killpg(soak.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the soak are still running")


def test_bench_soak_refuses_an_unknown_model(tmp_path):
    soak = _soak_cli(tmp_path, "--model", "huge", "--minutes", "0.1")
    _, err = soak.communicate(timeout=60)
    assert soak.returncode == 2
    assert "choose one of tiny, bundled, not 'huge'" in " ".join(err.replace("│", " ").split())
