"""The soak: steady load for a set time while workers are killed and restarted at random.

It starts its own embedded Redis in a temporary data directory, a persona on a tiny
random model (the bundled tokenizer, so prompts are real) or on the bundled model, and
``workers`` real ``persona worker`` processes. Callers submit at a steady rate and wait
for their replies; a chaos loop SIGKILLs or SIGTERMs a random worker every few seconds
and starts a fresh one. At the end it reports requests sent, answered (ok or with an
error, by kind), lost (never answered) and duplicated (answered more than once).

Ctrl-C stops it within seconds: the callers stop sending and waiting, the workers and
Redis are stopped, and the report so far comes back marked ``interrupted``. Its
temporary folder (the tiny model, Redis's data, the workers' logs) is deleted unless a
request was lost, duplicated or answered with an error: then it is kept for its logs,
and the report names it (``kept``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
import redis.asyncio

from persona import constants as keys
from persona.contract import GenerationRequest, Message, SamplingOverrides
from persona.embedded_redis import EmbeddedRedis
from persona.errors import ConfigError, PersonaError
from persona.queue import AsyncQueueClient
from persona.settings import QueueSettings
from persona.telemetry_reading import percentile

__all__ = ["SOAK_MODELS", "SoakReport", "run_soak"]

log = logging.getLogger(__name__)

DRAIN_S = 90.0
DUPLICATE_GRACE_S = 2.0
PROGRESS_EVERY_S = 1.0
SOAK_MODELS = ("tiny", "bundled")  # a tiny random model with the real tokenizer, or the bundled one


@dataclass
class SoakReport:
    """What happened to every request the soak sent."""

    seconds: float
    sent: int = 0
    answered_ok: int = 0
    answered_error: Counter = field(default_factory=Counter)
    refused_busy: int = 0
    lost: int = 0
    duplicated: int = 0
    kills: int = 0
    terms: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C before the end: what was sent so far
    kept: str = ""  # the folder kept for its worker logs (something went wrong), else ""

    @property
    def answered(self) -> int:
        return self.answered_ok + sum(self.answered_error.values())

    def as_dict(self) -> dict:
        data = self.__dict__.copy()
        data["answered_error"] = dict(self.answered_error)
        return data


def _tiny_model(folder: Path) -> Path:
    """A tiny random Llama with the bundled model's real tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from persona.models import bundled_tokenizer

    tokenizer = bundled_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    quiet = hf_logging.is_progress_bar_enabled()
    if quiet:  # its "Writing model shards" bar would cut through the caller's progress line
        hf_logging.disable_progress_bar()
    try:
        LlamaForCausalLM(config).save_pretrained(folder)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    return folder


class _Workers:
    """The worker processes, started, killed and replaced."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []
        self.logs: list = []
        self.signalled: set[int] = set()
        self.started = 0

    @property
    def alive(self) -> int:
        """Workers running and not told to stop."""
        return sum(p.poll() is None and p.pid not in self.signalled for p in self.processes)

    def start(self) -> None:
        output = (self.log_dir / f"worker-{self.started}.log").open("w")
        self.logs.append(output)
        self.started += 1
        self.processes.append(
            subprocess.Popen([sys.executable, "-m", "persona", "worker", "--preload", "soak"],
                             env=self.env, stdout=output, stderr=subprocess.STDOUT)
        )

    def disrupt(self, rng: random.Random) -> str:
        """Kill (SIGKILL) or stop (SIGTERM) a random worker, then start its replacement.

        Only workers not already told to stop are chosen, so the number of serving
        workers stays the same however slowly the stopped ones leave.
        """
        alive = [p for p in self.processes if p.poll() is None and p.pid not in self.signalled]
        if not alive:
            self.start()
            return "none"
        victim = rng.choice(alive)
        how = rng.choice(["kill", "term"])
        victim.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        self.signalled.add(victim.pid)
        self.start()
        return how

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for output in self.logs:
            output.close()


async def _one(shared: AsyncQueueClient, index: int, report: SoakReport, latencies: list[float], ids: list[str]) -> None:
    # A client of its own, so that no reply list is deleted once read (a client deletes
    # the lists it has read with its next call): each must end up holding one reply.
    client = AsyncQueueClient(shared.redis, shared.settings)
    request = GenerationRequest(
        persona="soak", messages=[Message(role="user", content=f"soak question {index}")],
        sampling=SamplingOverrides(max_new_tokens=12), user=f"user-{index % 7}",
    )
    started = time.perf_counter()
    try:
        request = await client.submit(request)
    except PersonaError:
        report.refused_busy += 1
        return
    report.sent += 1
    ids.append(request.id)
    try:
        reply = await client.wait(request, timeout=request.deadline - time.time() + DRAIN_S)
    except PersonaError:
        report.lost += 1
        return
    latencies.append((time.perf_counter() - started) * 1000)
    if reply.ok:
        report.answered_ok += 1
    else:
        report.answered_error[str(reply.error.kind if reply.error else "unknown")] += 1


async def _load(
    url: str, seconds: float, rate: float, report: SoakReport, latencies: list[float], ids: list[str],
    halt: threading.Event,
) -> None:
    """Send at ``rate`` for ``seconds``, then wait for every reply; ``halt`` (Ctrl-C) ends
    both at once, the requests still waiting abandoned."""
    connection = redis.asyncio.Redis.from_url(url, max_connections=2000)
    client = AsyncQueueClient(connection, QueueSettings(max_length=100_000, default_deadline_s=120))
    tasks: list[asyncio.Task] = []
    started = time.monotonic()
    index = 0
    while time.monotonic() - started < seconds and not halt.is_set():
        tasks.append(asyncio.create_task(_one(client, index, report, latencies, ids)))
        index += 1
        await asyncio.sleep(1.0 / rate)
    waiting = set(tasks)
    while waiting and not halt.is_set():
        _, waiting = await asyncio.wait(waiting, timeout=0.2)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await connection.aclose()


def run_soak(
    seconds: float, *, workers: int = 2, rate: float = 10.0, chaos_every_s: float = 5.0, model: str = "tiny",
    seed: int = 0, keep: Path | None = None, progress: Callable[[SoakReport, float, int], None] | None = None,
) -> SoakReport:
    """Run the soak and return its report; ``progress(report, elapsed_s, workers_alive)``
    is called about once a second. ``keep``: the folder to work in, kept afterwards."""
    if model not in SOAK_MODELS:
        raise ConfigError(f"unknown soak model {model!r}; choose one of {', '.join(SOAK_MODELS)}")
    rng = random.Random(seed)
    folder = Path(keep or tempfile.mkdtemp(prefix="persona-soak-"))
    report = SoakReport(seconds=seconds)
    latencies: list[float] = []
    ids: list[str] = []
    stop = threading.Event()  # the load's time is up: no more chaos
    halt = threading.Event()  # Ctrl-C: the callers stop sending and waiting too
    pool: _Workers | None = None
    server: EmbeddedRedis | None = None
    threads: list[threading.Thread] = []
    started = time.monotonic()

    def tick() -> None:
        if progress:
            progress(report, time.monotonic() - started, pool.alive if pool else 0)

    def chaos() -> None:
        while not stop.wait(rng.uniform(0.5, 1.5) * chaos_every_s):
            how = pool.disrupt(rng)
            report.kills += how == "kill"
            report.terms += how == "term"

    try:
        data = folder / "data"
        (data / "personas").mkdir(parents=True, exist_ok=True)
        base = "smollm2" if model == "bundled" else str(_tiny_model(folder / "tiny-model"))
        (data / "personas" / "soak.toml").write_text(
            f'name = "soak"\n[model]\nbase = {json.dumps(base)}\n[prompt]\nsystem = "You are terse."\n'
        )
        server = EmbeddedRedis(data)
        url = server.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
            "PERSONA_REDIS_URL": url, "PERSONA_DATA_DIR": str(data),
            "PERSONA_WORKER__HEARTBEAT_S": "0.5", "PERSONA_WORKER__HEARTBEAT_TTL_S": "2",
            "PERSONA_WORKER__THREADS": "1", "PERSONA_LOG_LEVEL": "WARNING",
        }
        pool = _Workers(env, folder)
        for _ in range(workers):
            pool.start()
        threads = [
            threading.Thread(target=chaos, daemon=True),
            threading.Thread(target=lambda: asyncio.run(_load(url, seconds, rate, report, latencies, ids, halt)), daemon=True),
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while not stop.wait(min(PROGRESS_EVERY_S, max(0.0, seconds - (time.monotonic() - started)))):
            tick()
            if time.monotonic() - started >= seconds:
                stop.set()  # chaos ends with the load; the survivors drain what is left
        while threads[1].is_alive():
            threads[1].join(PROGRESS_EVERY_S)
            tick()
        time.sleep(DUPLICATE_GRACE_S)
        client = redis.Redis.from_url(url)
        report.duplicated = sum(max(0, client.llen(keys.reply_key(i)) - 1) for i in ids)
    except KeyboardInterrupt:
        report.interrupted = True
        report.seconds = round(time.monotonic() - started, 1)
    finally:
        stop.set()
        halt.set()
        for thread in threads:
            thread.join(timeout=10)
        if pool is not None:
            pool.stop_all()
        if server is not None:
            server.stop()
        if report.lost or report.duplicated or report.answered_error or keep:
            report.kept = str(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report.p50_ms = percentile(latencies, 0.50)
    report.p99_ms = percentile(latencies, 0.99)
    return report
