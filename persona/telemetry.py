"""What each answered request cost, kept in Redis so every figure survives a restart.

Each reply leaves one capped stream entry (for percentiles and throughput over a recent
window) and counts in durable histograms and counters (for Prometheus): queue wait,
generation time, batch size, tokens generated and replies per persona version. Queue
waits count failures too, wherever a worker measured them: under overload the worst
waits end as timeouts, and text replies alone showed a healthy p99.

How each request ended is counted in the stats hash (``outcome_counter``): ``completed``,
``withdrawn`` (its caller took it back), ``expired`` (its deadline passed before it was
generated), else ``failed:<kind>``. Withdrawn and expired requests are not failures:
counted as failures they read as workers breaking. A request refused as it is submitted
(never queued) is counted there too, by the submit script: ``refused:full`` or
``refused:user_share`` (``queue_scripts.REFUSED_COUNTERS``).

A ``Tally`` sums many batches in Python first, so they touch each counter and histogram
bucket once. A worker records timings in the round trip that delivers their replies,
written right behind them (no round trip of its own, never ahead of a reply, and none
lost when it is killed under load); an idle worker's within a quarter second.
``record_replies`` writes one from anywhere else.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis
from pydantic import BaseModel, Field

from persona import constants as keys
from persona.contract import ErrorKind, GenerationReply
from persona.queue_scripts import RECORD_SCRIPT

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS_S",
    "LatencySummary",
    "Percentiles",
    "Tally",
    "counters_named",
    "outcome_counter",
    "percentile",
    "read_counts",
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
# The log counts as trimmed (not merely short) once it holds this share of its cap
# (Redis trims it approximately, so it may hold a little less).
REPLY_LOG_FULL = 0.9
# A reply-log row's first field: how the request ended. Older workers wrote "1" and "0"
# and measured no failure's queue wait, so "0" stays a failure whose wait is unknown.
ROW_TEXT, ROW_FAILED, ROW_FAILED_WAITED = "1", "0", "w"
# Requests that ended unanswered for a reason of their own, not a failure: their counter.
UNWANTED = {ErrorKind.cancelled: "withdrawn", ErrorKind.timeout: "expired"}
# Older workers counted those as failures of their kind; read, they count as these.
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


def outcome_counter(reply: GenerationReply) -> str:
    """The stats-hash counter a delivered reply adds to: ``completed``, ``withdrawn``,
    ``expired``, or ``failed:<kind>`` (a refusal, a model that failed...)."""
    if reply.ok:
        return "completed"
    kind = reply.error.kind if reply.error else ErrorKind.internal
    return UNWANTED.get(kind) or f"failed:{kind}"


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


def _labels(bounds: Sequence[float]) -> tuple[str, ...]:
    return (*(f"{bound:g}" for bound in bounds), "+Inf")


@dataclass(frozen=True)
class _Histogram:
    """Where one histogram's observations are counted: its hash, buckets, count and sum fields."""

    key: str
    bounds: Sequence[float]
    labels: tuple[str, ...]
    count: tuple[str, str]
    total: tuple[str, str]

    def observe(self, counts: dict, sums: dict, value: float) -> None:
        counts[(self.key, self.labels[bisect_left(self.bounds, value)])] += 1
        counts[self.count] += 1
        sums[self.total] += value


def _histogram(name: str) -> _Histogram:
    key = keys.histogram_key(name)
    return _Histogram(key, HISTOGRAMS[name], _labels(HISTOGRAMS[name]), (key, "count"), (key, "sum"))


_HISTOGRAMS = {name: _histogram(name) for name in HISTOGRAMS}
# What ``Tally.add`` touches for every reply, named once.
_TOKENS = (keys.STATS_KEY, "tokens")
_QUEUE_WAIT, _GENERATE = _HISTOGRAMS["queue_wait_seconds"], _HISTOGRAMS["generate_seconds"]


@dataclass
class Tally:
    """A batch's telemetry summed in Python: reply-log rows, counter and histogram increments."""

    rows: list[str] = field(default_factory=list)  # one reply-log row per reply (layout: ``_logged``)
    counts: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    sums: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))

    # What it was made of, so a tally that could not be recorded can be made again.
    batches: list[tuple[Sequence[GenerationReply], int]] = field(default_factory=list)

    @classmethod
    def of(cls, replies: Sequence[GenerationReply], batch_size: int = 0) -> Tally:
        """The telemetry of these replies (and of one batch of ``batch_size``, if not 0)."""
        return cls.of_batches([(replies, batch_size)])

    @classmethod
    def of_batches(cls, batches: list[tuple[Sequence[GenerationReply], int]]) -> Tally:
        """The telemetry of many batches: (replies, batch size or 0) each."""
        tally = cls(batches=batches)
        for replies, batch_size in batches:
            for reply in replies:
                tally.add(reply)
            if batch_size:
                tally.observe("batch_size", batch_size)
        return tally

    def add(self, reply: GenerationReply) -> None:
        """Count one reply: its queue wait wherever it was measured, the rest for text replies only."""
        timings, error, ok = reply.timings, reply.error, reply.ok
        queue_ms, generate_ms = timings.queue_ms, timings.generate_ms
        waited = ok or timings.queue_measured  # as ``GenerationReply.queue_wait_ms`` says
        outcome = ROW_TEXT if ok else ROW_FAILED_WAITED if waited else ROW_FAILED
        self.rows.append(
            f"{outcome} {reply.new_tokens} {queue_ms:.2f} {generate_ms:.2f} "
            f"{error.kind.value if error else ''} {reply.persona} {reply.version}"
        )
        counts, sums = self.counts, self.sums
        if waited:
            _QUEUE_WAIT.observe(counts, sums, queue_ms / 1000)
        if ok:
            counts[(keys.VERSION_REPLIES_KEY, f"{reply.persona}@{reply.version}")] += 1
            counts[_TOKENS] += reply.new_tokens
            _GENERATE.observe(counts, sums, generate_ms / 1000)

    def observe(self, name: str, value: float) -> None:
        """One observation of a histogram: its bucket, sum and count."""
        _HISTOGRAMS[name].observe(self.counts, self.sums, value)

    def __bool__(self) -> bool:
        return bool(self.rows or self.counts)

    def script_keys_args(self) -> tuple[list[str], list]:
        """This tally as ``RECORD_SCRIPT`` reads it: the reply log and hashes, rows, increments."""
        hashes: dict[str, int] = {}
        script_keys = [keys.REPLY_LOG_STREAM]
        args: list = [keys.REPLY_LOG_MAX_LEN, len(self.rows), *self.rows]
        for table in (self.counts, self.sums):
            args.append(len(table))
            for (key, name), amount in table.items():
                if key not in hashes:
                    hashes[key] = len(hashes) + 1
                    script_keys.append(key)
                args += [hashes[key], name, amount]
        return script_keys, args


def record_replies(client: redis.Redis, replies: Sequence[GenerationReply], batch_size: int = 0) -> None:
    """Log each reply's timings and count it; a failure to record never fails the caller."""
    tally = Tally.of(replies, batch_size)
    if not tally:
        return
    script_keys, args = tally.script_keys_args()
    try:  # the script a worker records its tallies with
        client.register_script(RECORD_SCRIPT)(keys=script_keys, args=args)
    except redis.exceptions.RedisError as exc:
        log.warning("could not record reply timings: %s", exc)


def read_histogram(client: redis.Redis, name: str) -> tuple[list[tuple[str, int]], float, int]:
    """(cumulative buckets as (upper bound, count), sum, count) for a Prometheus histogram;
    a field that cannot be read counts as 0 (see ``read_counts``)."""
    key, histogram = keys.histogram_key(name), _HISTOGRAMS[name]
    raw = {_text(k): v for k, v in client.hgetall(key).items()}
    counts = read_counts(key, {field: raw[field] for field in (*histogram.labels, "count") if field in raw})
    running, buckets = 0, []
    for bound in histogram.labels:
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
