"""`persona bench queue`: how fast one worker drains the queue, against a plain loop.

Everything runs for real: an embedded redis-server in a temporary folder, a persona on a
tiny random model with the bundled tokenizer (so prompts are built as in production),
and a real ``Worker`` whose engine answers at once (``InstantEngine``), so what is
measured is the queue and the worker's own work per request: parse, build the prompt,
reply, acknowledge, and log as a worker under `persona up` does (into a file).
Requests are queued as callers queue them (the submit script) and every message
differs, so no cache can answer for the worker. The baseline is the
obvious Streams worker: read one entry, push its reply, acknowledge it, delete it, one
command at a time; it drains as many requests as ours.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from persona import constants as keys
from persona.contract import GenerationReply, GenerationRequest, Message
from persona.embedded_redis import EmbeddedRedis
from persona.engine import Completion, Work
from persona.logs import setup_logging
from persona.models import LoadedModel
from persona.queue import QueueClient, WorkQueue
from persona.settings import QueueSettings, Settings
from persona.telemetry_reading import percentile

__all__ = ["BASELINE_LOOP", "InstantEngine", "QueueBenchResult", "run_queue_bench"]

PERSONA_NAME = "bench"
PREFILL_CHUNK = 1000
# What the baseline sends for each request (``_baseline_step``), as the results name it.
BASELINE_LOOP = "one XREADGROUP, LPUSH, XACK and XDEL per job"


class InstantEngine:
    """A Generator that answers every row at once: the queue's cost, not the model's."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def generate(self, batch: list[Work]) -> list[Completion]:
        """One fixed short reply per row."""
        return [Completion(text="ok", new_tokens=1, finish_reason="stop") for _ in batch]


@dataclass
class QueueBenchResult:
    """Ours and the baseline: drain rate and light-load round trips."""

    jobs: int
    batch: int
    jobs_per_s: float
    p50_ms: float
    p99_ms: float
    baseline_jobs: int  # requests the baseline drained: as many as ours
    baseline_jobs_per_s: float
    baseline_p50_ms: float
    baseline_p99_ms: float
    transport: str = "unix socket"  # how both sides reached Redis: "unix socket" or "tcp"

    @property
    def ratio(self) -> float:
        """How many times the baseline's drain rate ours reaches."""
        return self.jobs_per_s / self.baseline_jobs_per_s if self.baseline_jobs_per_s else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"ratio": round(self.ratio, 2)}


def _request(number: int = 0) -> GenerationRequest:
    # Every message differs, as in real traffic: no cache may answer for the worker.
    text = f"hello there, how are you today? This is message {number}."
    return GenerationRequest(persona=PERSONA_NAME, messages=[Message(role="user", content=text)])


def _prefill(client: redis.Redis, settings: QueueSettings, count: int) -> list[GenerationRequest]:
    """Queue ``count`` requests as callers do, a chunk per round trip (not timed)."""
    queue = QueueClient(client, settings)
    requests = [_request(n) for n in range(count)]
    for start in range(0, count, PREFILL_CHUNK):
        queue.submit_many(requests[start : start + PREFILL_CHUNK])
    return requests


def _round_trips(client: QueueClient, seconds: float) -> list[float]:
    """One request at a time for ``seconds``: each one's submit-to-reply time in ms."""
    times: list[float] = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until or len(times) < 20:
        request = _request(len(times))
        started = time.perf_counter()
        reply = client.ask(request, timeout=10)
        times.append((time.perf_counter() - started) * 1000)
        if not reply.ok:
            raise RuntimeError(f"the benchmark worker failed a request: {reply.error}")
    return times


def _bench_settings(data_dir: Path, url: str, personas_dir: Path, batch: int) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=data_dir,
        redis_url=url,
        personas_dirs=[personas_dir],
        queue=QueueSettings(max_length=10**7, max_pending_per_user=10**7),
        worker={"max_batch": batch},
    )


@contextmanager
def _logging_as_a_worker(settings: Settings) -> Iterator[None]:
    """Log as `persona worker` does (its format and level), into a file as under `persona up`."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    with open(settings.data_dir / "bench-worker.log", "a", encoding="utf-8") as file:
        setup_logging(settings, stream=file)
        try:
            yield
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)


def _ours(settings: Settings, url: str, jobs: int, seconds: float, say: Callable[[str], None]) -> tuple[float, list[float]]:
    """Drain rate of one real Worker, then its round trips at light load."""
    from persona.worker import freeze_heap

    say(f"ours: draining {jobs:,} requests with one worker")
    client = redis.Redis.from_url(url)
    worker = _bench_worker(settings, client, "bench-ours")
    worker.step(block_ms=1)  # the first round pays for imports and script loading
    requests = _prefill(client, settings.queue, jobs)
    thresholds = gc.get_threshold()
    freeze_heap()  # as the worker process does once its models are loaded
    try:
        with _logging_as_a_worker(settings):
            started = time.perf_counter()
            done = 0
            while done < jobs:  # turns as ``Worker.run`` takes them: replies ride with the next claim
                done += worker.turn(block_ms=100)
            worker.flush()
            rate = jobs / (time.perf_counter() - started)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    if client.llen(keys.reply_key(requests[-1].id)) != 1:
        raise RuntimeError("the benchmark worker did not reply to the last request")
    worker.queue.hand_back(worker.id)
    say(f"ours: {rate:,.0f} jobs/s; now {seconds:g} s of single round trips to a worker process")
    return rate, _round_trips_against(_serve_ours, settings, url, seconds)


def _bench_worker(settings: Settings, client: redis.Redis, worker_id: str):
    from persona.pool import ModelPool
    from persona.worker import Worker

    worker = Worker(settings, client, ModelPool(settings, "cpu", engine_factory=InstantEngine), worker_id=worker_id)
    worker.preload([PERSONA_NAME])
    return worker


def _serve_ours(settings: Settings, url: str, ready, stop) -> None:
    """A worker process as ``persona worker`` runs one, with the instant engine."""
    from persona.worker import freeze_heap

    worker = _bench_worker(settings, redis.Redis.from_url(url), "bench-ours-process")
    freeze_heap()
    ready.set()
    thread = threading.Thread(target=lambda: (stop.wait(), worker.stop()), daemon=True)
    thread.start()
    with _logging_as_a_worker(settings):
        worker.run()


def _serve_baseline(settings: Settings, url: str, ready, stop) -> None:
    """The plain loop, in a process of its own."""
    client = redis.Redis.from_url(url)
    ready.set()
    while not stop.is_set():
        _baseline_step(client, "bench-baseline-process")


def _round_trips_against(serve, settings: Settings, url: str, seconds: float) -> list[float]:
    """Round trips from this process to a worker ``serve`` runs in another."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter, not a copy of this one
    ready, stop = context.Event(), context.Event()
    process = context.Process(target=serve, args=(settings, url, ready, stop), daemon=True)
    process.start()
    try:
        if not ready.wait(timeout=120):
            raise RuntimeError("the benchmark's worker process did not start")
        return _round_trips(QueueClient(redis.Redis.from_url(url), settings.queue), seconds)
    finally:
        stop.set()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def _baseline_step(client: redis.Redis, consumer: str) -> int:
    """The obvious worker: one entry, one reply, one acknowledgement, one deletion, each its own command."""
    got = client.xreadgroup(keys.CONSUMER_GROUP, consumer, {keys.STREAM_INTERACTIVE: ">"}, count=1, block=100)
    for _, entries in got or []:
        for entry_id, fields in entries:
            request = GenerationRequest.from_json(fields[b"r"])
            reply = GenerationReply(id=request.id, ok=True, text="ok", persona=request.persona)
            client.lpush(keys.reply_key(request.id), reply.to_json())
            client.xack(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP, entry_id)
            client.xdel(keys.STREAM_INTERACTIVE, entry_id)
            return 1
    return 0


def _baseline(settings: Settings, url: str, jobs: int, seconds: float, say: Callable[[str], None]) -> tuple[float, list[float]]:
    """The same measurements for the plain one-at-a-time loop."""
    say(f"baseline: draining {jobs:,} requests one at a time")
    client = redis.Redis.from_url(url)
    client.flushall()
    WorkQueue(client, settings.queue)  # creates the consumer group
    _prefill(client, settings.queue, jobs)
    started = time.perf_counter()
    done = 0
    while done < jobs:
        done += _baseline_step(client, "bench-baseline")
    rate = jobs / (time.perf_counter() - started)
    say(f"baseline: {rate:,.0f} jobs/s; now {seconds:g} s of single round trips to its process")
    return rate, _round_trips_against(_serve_baseline, settings, url, seconds)


def _write_persona(folder: Path, model_dir: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(str(model_dir))  # a TOML basic string is a JSON string
    (folder / f"{PERSONA_NAME}.toml").write_text(
        f'name = "{PERSONA_NAME}"\ndescription = "queue benchmark"\n'
        f'[model]\nbase = {text}\n[prompt]\nsystem = "You are a brief, kind assistant."\n'
    )


def run_queue_bench(
    jobs: int = 20_000, seconds: float = 3.0, batch: int = 128, tcp: bool = False,
    progress: Callable[[str], None] | None = None,
) -> QueueBenchResult:
    """Measure ours and the baseline against one fresh embedded Redis.

    Both reach it as `persona up`'s processes do (its unix socket), or with ``tcp``
    over TCP loopback, as a Redis on another machine or container is reached.
    ``progress`` is told each phase as it starts, in words.
    """
    from persona.soak import _tiny_model

    say = progress or (lambda _phase: None)

    with tempfile.TemporaryDirectory(prefix="persona-bench-") as tmp:
        root = Path(tmp)
        server = EmbeddedRedis(root / "data")
        url = server.start()
        url = server.tcp_url if tcp else url
        try:
            model_dir = _tiny_model(root / "model")
            _write_persona(root / "personas", model_dir)
            settings = _bench_settings(root / "data", url, root / "personas", batch)
            rate, trips = _ours(settings, url, jobs, seconds, say)
            base_rate, base_trips = _baseline(settings, url, jobs, seconds, say)
        finally:
            server.stop()
    return QueueBenchResult(
        jobs=jobs,
        batch=batch,
        jobs_per_s=round(rate, 1),
        p50_ms=round(statistics.median(trips), 3),
        p99_ms=round(percentile(trips, 0.99), 3),
        baseline_jobs=jobs,
        baseline_jobs_per_s=round(base_rate, 1),
        baseline_p50_ms=round(statistics.median(base_trips), 3),
        baseline_p99_ms=round(percentile(base_trips, 0.99), 3),
        transport="tcp" if url.startswith("redis") else "unix socket",
    )
