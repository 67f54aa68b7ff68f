"""Reading the figures workers record (``persona.telemetry``) back out of Redis, for the
queue's stats, the dashboard, ``/metrics`` and the dead-letter report.

``summarize`` turns the capped reply log into a ``LatencySummary``: queue-wait and generation
``Percentiles`` over a recent window, throughput over the last minute, and how the other
requests ended (failed, withdrawn, expired). ``read_histogram`` reads one durable histogram
as Prometheus shows it, ``read_counts`` a hash of counters, and ``counters_named`` gives the
counters older workers wrote their names of now. ``percentile`` is the nearest-rank quantile
the figures (and the benchmarks) use.

Whatever a damaged or foreign writer left in Redis is left out of the figures and named
once in a warning that says how to repair it: it never ends a reading of them.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

import redis
from pydantic import BaseModel, Field

from persona import constants as keys
from persona.telemetry import (
    ROW_FAILED,
    ROW_FAILED_WAITED,
    ROW_TEXT,
    UNWANTED,
    bucket_labels,
)

__all__ = [
    "THROUGHPUT_WINDOW_S",
    "WINDOW_S",
    "LatencySummary",
    "Percentiles",
    "counters_named",
    "percentile",
    "read_counts",
    "read_histogram",
    "summarize",
]

log = logging.getLogger(__name__)

WINDOW_S = 300.0
THROUGHPUT_WINDOW_S = 60.0
# The log counts as trimmed (not merely short) once it holds this share of its cap
# (Redis trims it approximately, so it may hold a little less).
REPLY_LOG_FULL = 0.9
# Older workers counted withdrawn and expired requests as failures of their kind; read, they count as these.
OLDER_COUNTERS = {f"failed:{kind}": counter for kind, counter in UNWANTED.items()}
# The same, by the error kind a reply-log row names.
_UNWANTED_KINDS = {kind.value: counter for kind, counter in UNWANTED.items()}
# What HINCRBY counts with: signed 64-bit integers, written plainly ("12", not "012" or "1.5").
_INT64 = range(-(2**63), 2**63)
# How much of a value that cannot be read a warning quotes (a foreign writer's may be huge).
MAX_QUOTED_CHARS = 40
# Values that could not be read and were named already: (key, field, value). The
# dashboard reads them every few seconds, and one warning says what to do; past this many
# they are forgotten (and named again), so a hash flooded with them holds no memory down.
MAX_REPORTED = 1000
_reported: set[tuple[str, str, bytes | str]] = set()


def counters_named(counters: dict[str, int]) -> dict[str, int]:
    """The stats hash's counters with those older workers wrote added to their names now
    (``failed:cancelled`` to ``withdrawn``, ``failed:timeout`` to ``expired``)."""
    named: dict[str, int] = {}
    for name, value in counters.items():
        name = OLDER_COUNTERS.get(name, name)
        named[name] = named.get(name, 0) + value
    return named


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _quoted(value: bytes | str) -> str:
    text = _text(value)
    return repr(text[:MAX_QUOTED_CHARS] + ("…" if len(text) > MAX_QUOTED_CHARS else ""))


def _warn_once(key: str, name: str, value: bytes | str, message: str, *args: object) -> None:
    """Log ``message`` about ``value`` (field ``name`` of ``key``) unless it was logged already."""
    if (key, name, value) in _reported:
        return
    if len(_reported) >= MAX_REPORTED:
        _reported.clear()
    _reported.add((key, name, value))
    log.warning(message, *args)


def _unreadable(key: str, name: str, value: bytes | str, what: str) -> None:
    """Name a counter that is not ``what`` once, with how to repair it: Redis cannot add to
    it either, so a worker's delivery or recording that counts into it fails until then."""
    _warn_once(
        key, name, value,
        "counter %s in %s is not %s (%s): left out of the figures. Redis cannot add to it either, so every count "
        "into it fails until it is deleted (it then counts again from 0): redis-cli HDEL %s %s",
        name, key, what, _quoted(value), shlex.quote(key), shlex.quote(name),
    )


def _whole(value: bytes | str) -> int | None:
    """``value`` as the whole number HINCRBY adds to; None where it is none."""
    try:
        text = value.decode() if isinstance(value, bytes) else value
        number = int(text)
    except ValueError:  # a UnicodeDecodeError too
        return None
    return number if str(number) == text and number in _INT64 else None


def _real(value: bytes | str) -> float | None:
    """``value`` as the finite number HINCRBYFLOAT adds to; None where it is none."""
    try:
        text = value.decode() if isinstance(value, bytes) else value
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) and text == text.strip() and "_" not in text else None


def read_counts(key: str, raw: Mapping[bytes | str, bytes | str]) -> dict[str, int]:
    """A hash of counters (``key``'s, as HGETALL returns it) as numbers: one that is no
    whole number (a damaged or foreign writer's) is left out, and named once in a warning
    that says how to repair it; it never ends a reading of the figures."""
    counts: dict[str, int] = {}
    for name, value in raw.items():
        number = _whole(value)
        if number is None:
            _unreadable(key, _text(name), value, "a whole number")
        else:
            counts[_text(name)] = number
    return counts


class Percentiles(BaseModel):
    """p50/p95/p99 of one duration, in milliseconds."""

    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0


class LatencySummary(BaseModel):
    """Recent latency and throughput, from the per-reply log."""

    window_s: float
    replies: int = Field(description="replies with text: what generate_ms and the throughput are of")
    queue_ms: Percentiles
    generate_ms: Percentiles
    replies_per_s: float
    tokens_per_s: float
    failed: int = Field(0, description="replies with an error (a refusal, a model that failed...), not withdrawn or expired")
    withdrawn: int = Field(0, description="requests their callers withdrew, answered 'cancelled' ungenerated")
    expired: int = Field(0, description="requests whose deadline passed before they were generated")
    queue_waits: int = Field(0, description="what queue_ms is of: every text reply and each failure whose wait was measured")


def read_histogram(client: redis.Redis, name: str) -> tuple[list[tuple[str, int]], float, int]:
    """(cumulative buckets as (upper bound, count), sum, count) for a Prometheus histogram;
    a field that cannot be read counts as 0 (see ``read_counts``)."""
    key, labels = keys.histogram_key(name), bucket_labels(name)
    raw = {_text(k): v for k, v in client.hgetall(key).items()}
    counts = read_counts(key, {field: raw[field] for field in (*labels, "count") if field in raw})
    running, buckets = 0, []
    for bound in labels:
        running += counts.get(bound, 0)
        buckets.append((bound, running))
    total = _real(raw.get("sum", b"0"))
    if total is None:
        _unreadable(key, "sum", raw["sum"], "a number")
    return buckets, total or 0.0, counts.get("count", 0)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q < 1) of ``values``: the smallest value with at
    least ``q`` of them at or below it (the median of 10 and 1000 is 10); 0.0 when there are none."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q * len(ordered))) - 1)] if ordered else 0.0


def _percentiles(values: list[float]) -> Percentiles:
    def at(q: float) -> float:
        return round(percentile(values, q), 1)

    return Percentiles(p50=at(0.50), p95=at(0.95), p99=at(0.99))


def _logged(fields: dict) -> tuple[str, int, float, float, str] | None:
    """(outcome, new tokens, queue ms, generate ms, error kind) of a reply-log entry; the
    outcome is one of ``ROW_TEXT``, ``ROW_FAILED`` (its queue wait unknown) and
    ``ROW_FAILED_WAITED``, the error kind '' for a text reply. None for one that cannot be
    read (a damaged or foreign writer's: too few fields, or no numbers where they go).

    An entry is one row, "outcome tokens queue_ms generate_ms error_kind persona version";
    entries written before rows (a field each, no error kind) are read too.
    """
    row = fields.get(b"r")
    try:
        if row is None:
            outcome = ROW_TEXT if fields.get(b"ok") == b"1" else ROW_FAILED
            logged = outcome, int(fields.get(b"t", 0)), float(fields.get(b"q", 0)), float(fields.get(b"g", 0)), ""
        else:
            outcome, new_tokens, queue_ms, generate_ms, rest = row.split(b" ", 4)
            kind = rest.split(b" ", 1)[0].decode()
            logged = outcome.decode(), int(new_tokens), float(queue_ms), float(generate_ms), kind
    except ValueError:  # a UnicodeDecodeError too
        return None
    return logged if math.isfinite(logged[2]) and math.isfinite(logged[3]) else None


def _skipped(entries: list[tuple[bytes, dict]]) -> None:
    """Name the reply-log entries that could not be read, once: they age out by themselves."""
    entry_id, fields = entries[0]
    _warn_once(
        keys.REPLY_LOG_STREAM, _text(entry_id), b"",
        "left out %d reply-log %s in %s that could not be read (the first, %s: %s); nothing to do: the log "
        "drops them as new replies come in (it keeps the last %d), or delete one: redis-cli XDEL %s %s",
        len(entries), "entry" if len(entries) == 1 else "entries", keys.REPLY_LOG_STREAM, _text(entry_id),
        _quoted(fields.get(b"r") or str(fields)), keys.REPLY_LOG_MAX_LEN, keys.REPLY_LOG_STREAM, _text(entry_id),
    )


def summarize(client: redis.Redis, window_s: float = WINDOW_S, now: float | None = None) -> LatencySummary:
    """Latency percentiles over the last ``window_s`` and throughput over the last minute.

    The log keeps the last ``REPLY_LOG_MAX_LEN`` replies: past about 167 replies/s it no
    longer reaches back a minute, and throughput is then taken over the span it does
    cover (it read as the cap over a minute: a GPU worker at 300/s showed 167). The
    percentiles are then those of the replies it holds, and ``window_s`` says how far back.
    """
    now = now if now is not None else time.time()
    since_ms = int((now - window_s) * 1000)
    pipe = client.pipeline(transaction=False)
    pipe.xrange(keys.REPLY_LOG_STREAM, min=f"{since_ms}-0", max="+")
    pipe.xlen(keys.REPLY_LOG_STREAM)
    entries, length = pipe.execute()
    oldest_ms = int(entries[0][0].split(b"-")[0]) if entries else None
    if oldest_ms is not None and length >= REPLY_LOG_FULL * keys.REPLY_LOG_MAX_LEN and oldest_ms > since_ms:
        window_s = max(1.0, now - oldest_ms / 1000)  # trimmed: the log starts later than the window
    queue, generate, recent, tokens = [], [], 0, 0
    ended: dict[str, int] = defaultdict(int)  # failed, withdrawn, expired: how the others ended
    recent_ms = (now - min(THROUGHPUT_WINDOW_S, window_s)) * 1000
    unreadable = []
    for entry_id, fields in entries:
        logged = _logged(fields)
        if logged is None:
            unreadable.append((entry_id, fields))
            continue
        outcome, new_tokens, queue_ms, generate_ms, kind = logged
        if outcome != ROW_TEXT:
            ended[_UNWANTED_KINDS.get(kind, "failed")] += 1
            if outcome == ROW_FAILED_WAITED:
                queue.append(queue_ms)
            continue
        queue.append(queue_ms)
        generate.append(generate_ms)
        if int(entry_id.split(b"-")[0]) >= recent_ms:
            recent += 1
            tokens += new_tokens
    if unreadable:
        _skipped(unreadable)
    span = min(THROUGHPUT_WINDOW_S, window_s)
    return LatencySummary(
        window_s=window_s,
        replies=len(generate),
        queue_ms=_percentiles(queue),
        generate_ms=_percentiles(generate),
        replies_per_s=round(recent / span, 2),
        tokens_per_s=round(tokens / span, 1),
        failed=ended["failed"],
        withdrawn=ended["withdrawn"],
        expired=ended["expired"],
        queue_waits=len(queue),
    )
