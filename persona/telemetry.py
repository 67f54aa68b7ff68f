"""What each answered request cost, kept in Redis so every figure survives a restart.

Workers call ``record_replies`` after delivering a group: one capped stream entry per
reply (for percentiles and throughput over a recent window) and durable histograms and
counters (for Prometheus): queue wait, generation time, batch size, tokens generated
and replies per persona version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis
from pydantic import BaseModel

from persona import constants as keys
from persona.contract import GenerationReply

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS_S",
    "LatencySummary",
    "Percentiles",
    "percentile",
    "read_histogram",
    "record_replies",
    "summarize",
]

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
HISTOGRAMS = {"queue_wait_seconds": LATENCY_BUCKETS_S, "generate_seconds": LATENCY_BUCKETS_S, "batch_size": BATCH_BUCKETS}
WINDOW_S = 300.0
THROUGHPUT_WINDOW_S = 60.0


class Percentiles(BaseModel):
    """p50/p95/p99 of one duration, in milliseconds."""

    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0


class LatencySummary(BaseModel):
    """Recent latency and throughput, from the per-reply log."""

    window_s: float
    replies: int
    queue_ms: Percentiles
    generate_ms: Percentiles
    replies_per_s: float
    tokens_per_s: float


def _bucket(value: float, bounds: Sequence[float]) -> str:
    for bound in bounds:
        if value <= bound:
            return f"{bound:g}"
    return "+Inf"


def _observe(pipe: redis.client.Pipeline, name: str, value: float) -> None:
    key = keys.histogram_key(name)
    pipe.hincrby(key, _bucket(value, HISTOGRAMS[name]), 1)
    pipe.hincrbyfloat(key, "sum", value)
    pipe.hincrby(key, "count", 1)


def record_replies(client: redis.Redis, replies: Sequence[GenerationReply], batch_size: int = 0) -> None:
    """Log each reply's timings and count it; a failure to record never fails the worker."""
    if not replies:
        return
    pipe = client.pipeline(transaction=False)
    for reply in replies:
        fields = {
            "p": reply.persona, "v": reply.version, "ok": int(reply.ok), "t": reply.new_tokens,
            "q": round(reply.timings.queue_ms, 2), "g": round(reply.timings.generate_ms, 2),
            "k": reply.error.kind if reply.error else "",
        }
        pipe.xadd(keys.REPLY_LOG_STREAM, fields, maxlen=keys.REPLY_LOG_MAX_LEN, approximate=True)
        if reply.ok:
            pipe.hincrby(keys.VERSION_REPLIES_KEY, f"{reply.persona}@{reply.version}", 1)
            pipe.hincrby(keys.STATS_KEY, "tokens", reply.new_tokens)
            _observe(pipe, "queue_wait_seconds", reply.timings.queue_ms / 1000)
            _observe(pipe, "generate_seconds", reply.timings.generate_ms / 1000)
    if batch_size:
        _observe(pipe, "batch_size", batch_size)
    try:
        pipe.execute()
    except redis.exceptions.RedisError as exc:
        log.warning("could not record reply timings: %s", exc)


def read_histogram(client: redis.Redis, name: str) -> tuple[list[tuple[str, int]], float, int]:
    """(cumulative buckets as (upper bound, count), sum, count) for a Prometheus histogram."""
    raw = {k.decode(): v.decode() for k, v in client.hgetall(keys.histogram_key(name)).items()}
    running, buckets = 0, []
    for bound in [f"{b:g}" for b in HISTOGRAMS[name]] + ["+Inf"]:
        running += int(raw.get(bound, 0))
        buckets.append((bound, running))
    return buckets, float(raw.get("sum", 0.0)), int(raw.get("count", 0))


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q < 1) of ``values``; 0.0 when there are none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _percentiles(values: list[float]) -> Percentiles:
    def at(q: float) -> float:
        return round(percentile(values, q), 1)

    return Percentiles(p50=at(0.50), p95=at(0.95), p99=at(0.99))


def summarize(client: redis.Redis, window_s: float = WINDOW_S, now: float | None = None) -> LatencySummary:
    """Latency percentiles over the last ``window_s`` and throughput over the last minute."""
    now = now if now is not None else time.time()
    since_ms = int((now - window_s) * 1000)
    entries = client.xrange(keys.REPLY_LOG_STREAM, min=f"{since_ms}-0", max="+")
    queue, generate, recent, tokens = [], [], 0, 0
    recent_ms = (now - THROUGHPUT_WINDOW_S) * 1000
    for entry_id, fields in entries:
        if fields.get(b"ok") != b"1":
            continue
        queue.append(float(fields[b"q"]))
        generate.append(float(fields[b"g"]))
        if int(entry_id.split(b"-")[0]) >= recent_ms:
            recent += 1
            tokens += int(fields[b"t"])
    span = min(THROUGHPUT_WINDOW_S, window_s)
    return LatencySummary(
        window_s=window_s,
        replies=len(queue),
        queue_ms=_percentiles(queue),
        generate_ms=_percentiles(generate),
        replies_per_s=round(recent / span, 2),
        tokens_per_s=round(tokens / span, 1),
    )
