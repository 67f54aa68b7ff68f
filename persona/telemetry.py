"""Recording what each answered request cost, in Redis so every figure survives a restart
(``persona.telemetry_reading`` reads them back: percentiles, throughput, histograms).

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
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from persona import constants as keys
from persona.contract import ErrorKind, GenerationReply
from persona.queue_scripts import RECORD_SCRIPT

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS_S", "Tally", "bucket_labels", "outcome_counter", "record_replies"]

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
HISTOGRAMS = {"queue_wait_seconds": LATENCY_BUCKETS_S, "generate_seconds": LATENCY_BUCKETS_S, "batch_size": BATCH_BUCKETS}
# A reply-log row's first field: how the request ended. Older workers wrote "1" and "0"
# and measured no failure's queue wait, so "0" stays a failure whose wait is unknown.
ROW_TEXT, ROW_FAILED, ROW_FAILED_WAITED = "1", "0", "w"
# Requests that ended unanswered for a reason of their own, not a failure: their counter.
UNWANTED = {ErrorKind.cancelled: "withdrawn", ErrorKind.timeout: "expired"}


def outcome_counter(reply: GenerationReply) -> str:
    """The stats-hash counter a delivered reply adds to: ``completed``, ``withdrawn``,
    ``expired``, or ``failed:<kind>`` (a refusal, a model that failed...)."""
    if reply.ok:
        return "completed"
    kind = reply.error.kind if reply.error else ErrorKind.internal
    return UNWANTED.get(kind) or f"failed:{kind}"


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


def bucket_labels(name: str) -> tuple[str, ...]:
    """The bucket fields of histogram ``name`` in its hash: each upper bound, then ``+Inf``."""
    return _HISTOGRAMS[name].labels

# What ``Tally.add`` touches for every reply, named once.
_TOKENS = (keys.STATS_KEY, "tokens")
_QUEUE_WAIT, _GENERATE = _HISTOGRAMS["queue_wait_seconds"], _HISTOGRAMS["generate_seconds"]


@dataclass
class Tally:
    """A batch's telemetry summed in Python: reply-log rows, counter and histogram increments."""

    # One reply-log row per reply, "outcome tokens queue_ms generate_ms error_kind persona version"
    # (``telemetry_reading`` reads them back).
    rows: list[str] = field(default_factory=list)
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
