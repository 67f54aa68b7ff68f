"""What the queue looks like right now, in one snapshot for the CLI, dashboard and /metrics.

Depth, waiting age, in-flight and stuck work, latency and throughput, dead letters,
counters, live workers (and, apart, those still loading their models) and the active
persona versions. Ages and deadlines are judged by Redis's clock (entry ids, reply-log
ids and the deadline each entry carries are stamped by it), not by the clock of the
machine that reads them.

A request no worker has taken yet is waiting only while it is still wanted: one its
caller withdrew, or whose deadline passed, is counted as withdrawn or expired (a worker
discards it when it takes it, and counts it so again: not as failed). A request refused as
it was submitted (its stream full, or its user with their share waiting) was never queued:
it is counted as refused, by why.

Whether Redis takes changes at all is learnt by writing a short-lived key of its own
(``write_probe``, which ``/readyz`` writes too): one that refuses every change (full, unable
to save its data to disk, a read-only replica) refuses workers' heartbeats too, so none is
listed live while the workers still run. What an operator must fix in Redis is listed once,
in the order to say it (``QueueStats.redis_warnings``), for `queue stats`, `queue watch` and
the page alike.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping

import redis
from pydantic import BaseModel, Field, computed_field

from persona import constants as keys
from persona.dead_letters import trimmed_count
from persona.heartbeat import (
    StartingWorker,
    WorkerInfo,
    live_worker_ids,
    live_workers,
    redis_now,
    starting_workers,
)
from persona.jobs import DUE_FIELD, EPOCH_FIELD, REQUEST_FIELD
from persona.personas import Persona
from persona.queue_scripts import REFUSED_COUNTERS
from persona.redis_refusals import full_redis_text, refusal_text, size_text
from persona.settings import QueueSettings
from persona.swap import served_versions
from persona.telemetry_reading import (
    LatencySummary,
    counters_named,
    read_counts,
    summarize,
)

__all__ = [
    "QueueStats", "RedisMemory", "StreamStats", "StuckEntry", "collect_stats", "find_stuck", "read_memory", "stream_label",
    "warn_if_evicting", "write_probe", "writes_refused",
]

log = logging.getLogger(__name__)

STUCK_SCAN_LIMIT = 200
# The queue's default deadline where a reader is not given the one in effect
# (PERSONA_QUEUE__DEFAULT_DEADLINE_S): an entry that names none is judged by it.
DEFAULT_DEADLINE_S: float = QueueSettings.model_fields["default_deadline_s"].default
# Requests not taken yet that are read to tell the withdrawn and the expired from those
# still waiting: the oldest this many of each stream (which holds about
# PERSONA_QUEUE__MAX_LENGTH, 1,000 unless set); any past them count as waiting.
UNTAKEN_SCAN_LIMIT = 5000
# The counters shown at 0 before anything has counted into them: on a fresh install
# `queue stats --json` had none, and a script reading "completed" failed.
# (The refusals are read as 0 before their first count by QueueStats.refused_full and
# refused_user_share, where scripts read them.)
ALWAYS_COUNTED = ("completed", "tokens", "withdrawn", "expired", "dead_lettered", "retried", "dropped")
# The one maxmemory-policy that never deletes a key: every other one, once maxmemory is
# reached, deletes keys persona keeps (queued requests, counters, dead letters, the swapped
# versions; the volatile-* ones first the replies and heartbeats, which carry a TTL).
KEEPING_POLICY = "noeviction"
# Tries at reading the counters and the dead letters held with nothing set aside between.
CONSISTENT_READ_TRIES = 3
# What a reading of the figures and ``/readyz`` write to learn that Redis takes changes: a
# key of its own, gone in seconds.
WRITE_PROBE_KEY = keys.KEY_PREFIX + "write-probe"
WRITE_PROBE_TTL_MS = 10_000


def stream_label(stream: str) -> str:
    """A queue stream as people call it (``chat``, ``batch``), not its Redis key
    (``persona:q:chat``): what the tables, the page and ``/metrics``' ``stream`` label show."""
    return stream.removeprefix(keys.KEY_PREFIX + "q:")


class StreamStats(BaseModel):
    """One stream's figures."""

    name: str = Field(description="the stream's Redis key")
    waiting: int = Field(description="requests no worker has taken yet that are still wanted")
    in_flight: int
    oldest_waiting_s: float = Field(0.0, description="age of the oldest of those waiting")
    withdrawn: int = Field(0, description="requests not taken yet whose callers withdrew them (a worker discards each)")
    expired: int = Field(0, description="requests not taken yet whose deadline has passed (a worker discards each)")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def label(self) -> str:
        """The stream as people call it: ``chat`` or ``batch``."""
        return stream_label(self.name)


class StuckEntry(BaseModel):
    """A request in flight that should not be: past its deadline, or its worker is gone."""

    stream: str
    entry_id: str
    request_id: str
    persona: str
    worker: str
    held_s: float
    deliveries: int
    reason: str


class RedisMemory(BaseModel):
    """What Redis says of its memory (INFO memory and stats): whether it may delete persona's
    keys to make room, or is full."""

    used_bytes: int = Field(description="used_memory")
    max_bytes: int = Field(description="maxmemory; 0: no limit")
    policy: str = Field(description="maxmemory_policy: what Redis does once max_bytes is reached")
    evicted_keys: int = Field(description="keys Redis has deleted to make room since it started")
    uncounted_bytes: int = Field(0, description="mem_not_counted_for_evict: replica and AOF buffers, which "
                                 "Redis leaves out of the limit")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def evicts(self) -> bool:
        """Whether Redis deletes keys once full: a limit, and a policy other than noeviction."""
        return self.max_bytes > 0 and self.policy != KEEPING_POLICY

    @computed_field  # type: ignore[prop-decorator]
    @property
    def full(self) -> bool:
        """Whether Redis is at its limit under noeviction: it refuses every write that adds data."""
        # As Redis judges it: its replicas' and AOF rewrite's buffers do not count towards the
        # limit, and a primary with replicas read as full while it still took writes.
        return self.max_bytes > 0 and not self.evicts and self.used_bytes - self.uncounted_bytes >= self.max_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def warning(self) -> str:
        """What an operator must fix, in one line; '' when nothing."""
        if self.evicts:
            deleted = f"; it has deleted {self.evicted_keys} keys so far" if self.evicted_keys else ""
            return (f"Redis deletes keys when full (maxmemory-policy {self.policy}, maxmemory {size_text(self.max_bytes)}){deleted}: "
                    "it can silently lose queued requests, replies, counters, dead letters and swapped persona versions. "
                    "Set `CONFIG SET maxmemory-policy noeviction` (in redis.conf: `maxmemory-policy noeviction`; "
                    "on a managed Redis, its parameter group)")
        if self.full:
            return full_redis_text(self.max_bytes)
        return ""


def read_memory(client: redis.Redis) -> RedisMemory | None:
    """Redis's memory figures, from INFO (which a managed Redis answers where it hides
    CONFIG); None where INFO is denied (an ACL) or says none of them."""
    pipe = client.pipeline(transaction=False)
    pipe.info("memory")
    pipe.info("stats")
    try:
        memory, stats = pipe.execute()
    except redis.exceptions.ResponseError as exc:  # NOPERM, or a Redis-like server without these sections
        log.debug("not checking Redis's maxmemory-policy: INFO is refused (%s)", exc)
        return None
    try:
        return RedisMemory(used_bytes=int(memory["used_memory"]), max_bytes=int(memory.get("maxmemory", 0)),
                           policy=str(memory.get("maxmemory_policy", KEEPING_POLICY)),
                           evicted_keys=int(stats.get("evicted_keys", 0)),
                           uncounted_bytes=int(memory.get("mem_not_counted_for_evict", 0)))
    except (KeyError, TypeError, ValueError):
        log.debug("not checking Redis's maxmemory-policy: INFO memory does not say it")
        return None


def warn_if_evicting(client: redis.Redis) -> RedisMemory | None:
    """Log, once, a Redis that may delete persona's keys to make room (or is full): what a
    long-running service says as it starts. Its figures (None where INFO is denied)."""
    memory = read_memory(client)
    if memory is not None and memory.warning:
        log.warning("%s", memory.warning)
    return memory


def write_probe(client: redis.Redis) -> None:
    """Write persona's short-lived probe key, to learn that Redis takes changes; raises what
    Redis answers where it refuses them (full, unable to save to disk, a read-only replica)."""
    client.set(WRITE_PROBE_KEY, b"1", px=WRITE_PROBE_TTL_MS)


def writes_refused(client: redis.Redis, memory: RedisMemory | None = None) -> str:
    """Why Redis refuses every change, in one line that says what to do; '' while it takes
    them. Full (``memory``, its figures, says so without a write), unable to save its data to
    disk (MISCONF), a read-only replica: found by writing a short-lived key."""
    if memory is not None and memory.full:
        return memory.warning
    try:
        write_probe(client)
    except redis.exceptions.NoPermissionError:  # a user kept to reads (a monitor's): not the workers' refusal
        return ""
    except redis.exceptions.ResponseError as exc:
        return refusal_text(exc, max_bytes=memory.max_bytes if memory else None) or ""
    return ""


class QueueStats(BaseModel):
    """A snapshot of the whole queue."""

    streams: list[StreamStats]
    dead_letters: int
    dead_letters_trimmed: int = Field(
        0, description="dead letters the stream's cap (DEAD_STREAM_MAX_LEN) deleted unseen: never retried or dropped"
    )
    dead_letters_trimmed_since_cleared: int = Field(
        0, description="those of dead_letters_trimmed since an operator last emptied the stream: what the CLI and page warn of"
    )
    counters: dict[str, int] = Field(description="every counter, those in ALWAYS_COUNTED at 0 before their first count")
    workers: list[WorkerInfo]
    unreadable_workers: list[str] = Field(
        default_factory=list, description="live workers whose heartbeat could not be read (left out of workers)"
    )
    starting_workers: list[StartingWorker] = Field(
        default_factory=list, description="workers still loading their models: not live, nothing is served by them yet"
    )
    latency: LatencySummary | None = None
    stuck: list[StuckEntry] = Field(default_factory=list)
    active_versions: dict[str, str] = Field(default_factory=dict, description="persona -> version, for the personas swapped")
    served_versions: dict[str, str] = Field(
        default_factory=dict,
        description="persona -> the version serving it, for every persona file read and every persona swapped",
    )
    version_replies: dict[str, int] = Field(default_factory=dict, description="'persona@version' -> replies")
    redis_memory: RedisMemory | None = Field(
        None, description="Redis's memory limit and policy (its warning: keys it may delete, or full); None where INFO is denied"
    )
    writes_refused: str = Field(
        "", description="why Redis refuses every change (full, unable to save to disk, a read-only replica), with what to "
        "do; '' while it takes them. Workers' heartbeats are refused too: running workers may be missing from workers"
    )
    taken_at: float = Field(default_factory=time.time)
    redis_time: float = Field(0.0, description="Redis's time when read: what each worker's last_seen is measured against")

    # Computed fields: in `queue stats --json` too, as the table shows them.
    @computed_field  # type: ignore[prop-decorator]
    @property
    def redis_warnings(self) -> list[str]:
        """What an operator must fix in Redis, most urgent first: that it refuses every change
        (writes_refused), then what its memory figures warn of; its being full said once."""
        found = [self.writes_refused] if self.writes_refused else []
        memory = self.redis_memory.warning if self.redis_memory is not None else ""
        return found + [memory] if memory and memory not in found else found

    @computed_field  # type: ignore[prop-decorator]
    @property
    def completed(self) -> int:
        """Requests answered with text."""
        return self.counters.get("completed", 0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def withdrawn(self) -> int:
        """Requests a worker discarded because their callers withdrew them."""
        return self.counters.get("withdrawn", 0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def expired(self) -> int:
        """Requests whose deadline passed before they were generated (a worker answered them so)."""
        return self.counters.get("expired", 0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def refused(self) -> int:
        """Requests refused as they were submitted, never queued: the two below."""
        return self.refused_full + self.refused_user_share

    @computed_field  # type: ignore[prop-decorator]
    @property
    def refused_full(self) -> int:
        """Requests refused because their stream was full (PERSONA_QUEUE__MAX_LENGTH)."""
        return self.counters.get(REFUSED_COUNTERS["busy"], 0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def refused_user_share(self) -> int:
        """Requests refused because their user already had their share waiting
        (PERSONA_QUEUE__MAX_PENDING_PER_USER)."""
        return self.counters.get(REFUSED_COUNTERS["user_busy"], 0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def failed(self) -> int:
        """Requests answered with an error: neither withdrawn nor expired."""
        return sum(v for k, v in self.counters.items() if k.startswith("failed:"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _untaken(client: redis.Redis, stream: str) -> list[tuple[bytes, dict]]:
    """The entries no worker has read yet, oldest first (at most ``UNTAKEN_SCAN_LIMIT``)."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.exceptions.ResponseError:  # no stream yet
        return []
    last = next((_text(g["last-delivered-id"]) for g in groups if _text(g["name"]) == keys.CONSUMER_GROUP), "0-0")
    return client.xrange(stream, min=f"({last}", max="+", count=UNTAKEN_SCAN_LIMIT)


def _request(fields: dict) -> dict:
    """An entry's request as plain JSON ({} where it holds none that can be read)."""
    try:
        request = json.loads(fields[REQUEST_FIELD])
    except (ValueError, KeyError, RecursionError):
        return {}
    return request if isinstance(request, dict) else {}


def _due(entry_id: bytes | str, fields: dict, default_deadline_s: float) -> float:
    """When an entry's deadline falls, by Redis's clock, as a worker times it: by its ``d``;
    without one, by its caller's deadline; with neither (a direct writer's request, its
    deadline 0 or left out), ``default_deadline_s`` after it arrived (its id's milliseconds).
    0.0 where it names none that can be read (a worker sets it aside: it is not judged here).
    Such a request was counted as waiting for good, while a worker answers it "timeout"."""
    given = fields.get(DUE_FIELD)
    request = {} if given else _request(fields)  # read only where it must be: d is what the submit script writes
    try:
        due = float(given or request.get("deadline", 0))
    except (TypeError, ValueError, OverflowError):  # malformed: a worker sets it aside, it is not judged here
        return 0.0
    if not math.isfinite(due):
        return 0.0
    request_id = request.get("id")
    if due or given or not (isinstance(request_id, str) and request_id):  # no id: set aside, never answered
        return due
    return int(_text(entry_id).partition("-")[0]) / 1000 + default_deadline_s


def _unwanted(
    client: redis.Redis, untaken: list[tuple[bytes, dict]], now: float, default_deadline_s: float
) -> dict[bytes, str]:
    """Which untaken entries nobody waits for any more: 'withdrawn' where the caller withdrew
    it, whatever its deadline (one withdrawn and then past its deadline was counted as
    expired), else 'expired' where the deadline has passed (by Redis's clock; entries from
    direct writers carry only the caller's, or none: then ``default_deadline_s`` after they
    arrived, see ``_due``). ``FULL_SCRIPT`` judges a full stream's entries by the same rule.

    The cancel epoch spares a look-up for every entry added since the last withdrawal.
    """
    found: dict[bytes, str] = {}
    asked: dict[bytes, str] = {}  # entry id -> request id, for those that may have been withdrawn
    epoch = _cancel_epoch(client)
    for entry_id, fields in untaken:
        request_id = _request(fields).get("id")
        if fields.get(EPOCH_FIELD) != epoch and isinstance(request_id, str) and request_id:
            asked[entry_id] = request_id
        due = _due(entry_id, fields, default_deadline_s)
        if due and now > due:
            found[entry_id] = "expired"
    if asked:
        flags = client.mget([keys.cancel_key(i) for i in asked.values()])
        found |= {entry_id: "withdrawn" for entry_id, flag in zip(asked, flags, strict=True) if flag is not None}
    return found


def _cancel_epoch(client: redis.Redis) -> bytes | None:
    """The cancel epoch entries are compared with (b"0" where there is none), as
    ``FULL_SCRIPT`` reads it; None where it cannot be read (a key of another type, which the
    next submission starts again): no entry carries that, so every entry's flag is read.
    Such a key ended `persona queue stats` with WRONGTYPE."""
    try:
        return client.get(keys.CANCEL_EPOCH_KEY) or b"0"
    except redis.exceptions.ResponseError:
        return None


def _stream_stats(client: redis.Redis, stream: str, now: float, default_deadline_s: float) -> StreamStats:
    length = client.xlen(stream)
    try:
        pending = client.xpending(stream, keys.CONSUMER_GROUP)["pending"]
    except redis.exceptions.ResponseError:  # no group yet: no worker has started
        pending = 0
    untaken = _untaken(client, stream)
    unwanted = _unwanted(client, untaken, now, default_deadline_s)
    wanted = next((_text(entry_id) for entry_id, _ in untaken if entry_id not in unwanted), None)
    oldest_s = max(0.0, now - int(wanted.split("-")[0]) / 1000) if wanted else 0.0  # entry ids carry their time
    withdrawn = sum(1 for why in unwanted.values() if why == "withdrawn")
    # Settled entries are deleted, so the stream holds waiting plus in-flight entries.
    return StreamStats(
        name=stream, waiting=max(0, length - pending - len(unwanted)), in_flight=pending,
        oldest_waiting_s=round(oldest_s, 2), withdrawn=withdrawn, expired=len(unwanted) - withdrawn,
    )


def find_stuck(
    client: redis.Redis, live: set[str], now: float | None = None, *, default_deadline_s: float = DEFAULT_DEADLINE_S
) -> list[StuckEntry]:
    """In-flight requests past their deadline, or held by a worker whose heartbeat lapsed.

    ``now`` is Redis's time (default: asked of it), as is when each entry's deadline falls
    (for one that names none, ``default_deadline_s`` after it arrived: see ``_due``).
    """
    now = now if now is not None else redis_now(client)
    found = []
    for stream in keys.STREAMS_BY_PRIORITY:
        try:
            pending = client.xpending_range(stream, keys.CONSUMER_GROUP, "-", "+", STUCK_SCAN_LIMIT)
        except redis.exceptions.ResponseError:
            continue
        pipe = client.pipeline(transaction=False)
        for item in pending:
            pipe.xrange(stream, min=item["message_id"], max=item["message_id"])
        entries = pipe.execute() if pending else []
        for item, rows in zip(pending, entries, strict=True):
            entry_id, holder = _text(item["message_id"]), _text(item["consumer"])
            fields = rows[0][1] if rows else {}
            # Read as for the waiting ones: an entry a foreign writer damaged (its
            # deadline no number) ended every `queue stats`, /metrics and page with a traceback.
            request, deadline = _request(fields), _due(entry_id, fields, default_deadline_s)
            reasons = []
            if holder not in live:
                reasons.append(f"held by {holder}, whose heartbeat has lapsed")
            if deadline and now > deadline:
                reasons.append(f"in flight {now - deadline:.0f} s past its deadline")
            if reasons:
                found.append(StuckEntry(
                    stream=stream, entry_id=entry_id, request_id=str(request.get("id", "")),
                    persona=str(request.get("persona", "")), worker=holder,
                    held_s=round(item["time_since_delivered"] / 1000, 1),
                    deliveries=item["times_delivered"], reason="; ".join(reasons),
                ))
    return found


def collect_stats(
    client: redis.Redis, *, latency_window_s: float = 300.0, personas: Mapping[str, Persona] | None = None,
    default_deadline_s: float = DEFAULT_DEADLINE_S,
) -> QueueStats:
    """Read every figure the CLI, the dashboard and /metrics show; with ``personas`` (the
    persona files read), the version serving each of them too. ``default_deadline_s``
    (PERSONA_QUEUE__DEFAULT_DEADLINE_S) times the entries that name no deadline, as workers do."""
    now = redis_now(client)
    raw_counters, dead_letters = _counters_and_dead(client)
    # A counter that is no number (a damaged or foreign writer's) is left out and named once.
    counters = counters_named(read_counts(keys.STATS_KEY, raw_counters))
    counters = {name: counters.get(name, 0) for name in ALWAYS_COUNTED} | counters
    # Every live worker, those whose heartbeat cannot be read too: what they hold is
    # not stuck (their work was listed as held by a worker whose heartbeat had lapsed).
    live = live_worker_ids(client)
    workers = live_workers(client, live)
    active = {_text(k): _text(v) for k, v in client.hgetall(keys.ACTIVE_VERSIONS_KEY).items()}
    memory = read_memory(client)
    return QueueStats(
        streams=[_stream_stats(client, s, now, default_deadline_s) for s in keys.STREAMS_BY_PRIORITY],
        dead_letters=dead_letters,
        dead_letters_trimmed=trimmed_count(counters, dead_letters),
        dead_letters_trimmed_since_cleared=trimmed_count(counters, dead_letters, since_cleared=True),
        counters=counters,
        workers=workers,
        unreadable_workers=sorted(live - {w.id for w in workers}),
        # A heartbeat ends a worker's starting key in the same step; one left by a beat of
        # its starting thread that came late still lists the worker once, as live.
        starting_workers=[w for w in starting_workers(client) if w.id not in live],
        latency=summarize(client, latency_window_s, now),
        stuck=find_stuck(client, live, now, default_deadline_s=default_deadline_s),
        active_versions=active,
        # Every persona, not only those swapped (as /metrics and the page show them); a
        # persona swapped on the workers whose file this machine lacks is still listed.
        served_versions=dict(sorted((active | served_versions(personas or {}, active)).items())),
        version_replies=read_counts(keys.VERSION_REPLIES_KEY, client.hgetall(keys.VERSION_REPLIES_KEY)),
        redis_memory=memory,
        writes_refused=writes_refused(client, memory),
        taken_at=time.time(),
        redis_time=now,
    )


def _counters_and_dead(client: redis.Redis) -> tuple[dict, int]:
    """The counters and the dead letters held, read together: what the cap trimmed is their
    difference (a letter set aside or retried between two reads would count as one trimmed).
    Not in MULTI, which a full Redis refuses even for reads: the stream's length read on both
    sides of the counters, and read again (a few times) where it changed meanwhile."""
    for _ in range(CONSISTENT_READ_TRIES):
        pipe = client.pipeline(transaction=False)
        pipe.xlen(keys.STREAM_DEAD)
        pipe.hgetall(keys.STATS_KEY)
        pipe.xlen(keys.STREAM_DEAD)
        before, raw_counters, after = pipe.execute()
        if before == after:
            break
    return raw_counters, after
