"""Instructions the worker process spends per drained request, counted by callgrind.

Wall-clock drains on a shared 2-core VM swing by 1.5-2x from minute to minute; an
instruction count does not, so it says whether a change made the worker do less.
Run it under valgrind with instrumentation off; it switches instrumentation on for the
drain alone (after the model is loaded and a warm-up round has run):

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        .venv/bin/python bench/worker_instructions.py 2000

then divide the "I refs" total it prints by the number of requests (about 2 minutes).
The same embedded Redis, tiny model, persona and instant engine as `persona bench queue`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import redis

from persona.bench_queue import (
    PERSONA_NAME,
    _bench_settings,
    _bench_worker,
    _prefill,
    _write_persona,
)
from persona.embedded_redis import EmbeddedRedis
from persona.soak import _tiny_model
from persona.worker import freeze_heap


def _instrument(on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], stdout=subprocess.DEVNULL, check=False)


def _drain(worker, client, settings, jobs: int, counted: bool = False) -> None:
    """Queue ``jobs`` requests and answer them all; ``counted``: as the worker process runs, under count."""
    _prefill(client, settings.queue, jobs)
    if counted:
        freeze_heap()  # as the worker process does once its models are loaded
        _instrument(True)
    done = 0
    while done < jobs:
        done += worker.turn(block_ms=100)
    worker.flush()
    if counted:
        _instrument(False)


def main(jobs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = EmbeddedRedis(root / "data")
        url = server.start()
        try:
            _write_persona(root / "personas", _tiny_model(root / "model"))
            settings = _bench_settings(root / "data", url, root / "personas", 128)
            client = redis.Redis.from_url(url)
            worker = _bench_worker(settings, client, "instructions")
            _drain(worker, client, settings, 512)  # warm: scripts loaded, template shapes and words known
            _drain(worker, client, settings, jobs, counted=True)
            print(f"drained {jobs} requests for {PERSONA_NAME}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
