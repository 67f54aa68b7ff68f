"""Worker heartbeats: each live worker keeps a key with a TTL saying what it serves.

An index (a sorted set of worker ids scored by when their heartbeat lapses) lists
them, so finding the live workers reads two keys instead of scanning a keyspace that
holds a day of answered-request flags. A worker that stops beating drops out of the
index when its score passes. Those times are Redis's own (its TIME), never a worker's
clock: a machine whose clock ran ahead would otherwise drop every other worker from the
index, and its work would be taken from them as if they had died.

A worker still loading its models (seconds on a CPU, minutes of warm-up on a GPU) is not
live: it keeps a key of its own, in an index of its own (``StartingBeat``), which its
first heartbeat replaces. So a caller can hear that a worker is starting rather than that
none runs, while swaps, reclaiming and every count of live workers leave it out.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Self, TypeVar

import redis
from pydantic import BaseModel, Field

from persona import constants as keys
from persona.queue_scripts import REDIS_NOW
from persona.version import persona_version

__all__ = [
    "StartingBeat",
    "StartingWorker",
    "WorkerInfo",
    "announce_starting",
    "live_worker_ids",
    "live_workers",
    "longest_loading_first",
    "new_worker_id",
    "publish",
    "redis_now",
    "redis_time",
    "starting_workers",
    "withdraw",
]

log = logging.getLogger(__name__)

MAX_REPORTED = 1000  # (worker, value) pairs already warned of, forgotten past this many
_reported: set[tuple[str, bytes | str]] = set()
M = TypeVar("M", bound=BaseModel)


def new_worker_id() -> str:
    """A fresh worker id: this machine's name and a random part."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def redis_now(client: redis.Redis) -> float:
    """Redis's time, in seconds: the clock every machine sharing it agrees on."""
    return redis_time(client.time())


def redis_time(reply: tuple[int, int]) -> float:
    """Seconds from the answer to a TIME command (say, one sent in a pipeline)."""
    seconds, microseconds = reply
    return seconds + microseconds / 1_000_000


class WorkerInfo(BaseModel):
    """What one worker reports about itself every few seconds."""

    id: str
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    device: str = "cpu"
    personas: dict[str, str] = Field(default_factory=dict, description="persona -> loaded version")
    started_at: float = Field(default_factory=time.time)
    last_seen: float = Field(default_factory=time.time, description="its latest heartbeat, by Redis's clock")
    batches: int = 0
    requests: int = 0
    memory_mb: float = 0.0
    state: str = "starting"
    version: str = Field("", description="the persona it runs (`persona --version`), stamped as it publishes; "
                                         "'' from versions that did not say")


class StartingWorker(BaseModel):
    """A worker still loading its models: shown to people, never counted as serving."""

    id: str
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    device: str = "auto"
    persona: str = Field("", description="the persona whose model it is loading now ('' before it reaches one)")
    model: str = Field("", description="that persona's base model")
    since: float = Field(0.0, description="when it began starting, by Redis's clock")
    last_seen: float = Field(0.0, description="its latest word, by Redis's clock")
    loading_s: float = Field(0.0, description="how long it had been starting when read (by Redis's clock)")
    version: str = Field("", description="the persona it runs, stamped as it announces itself; '' from versions that did not say")

    def doing(self) -> str:
        """What it is doing, in words: "loading smollm2 for sage"."""
        return f"loading {self.model or 'the model'} for {self.persona}" if self.persona else "starting up"


# KEYS: the worker's key, the index. ARGV: worker id, its info without last_seen (a JSON
# object), TTL in ms. The info is stored with last_seen set to Redis's time, so how long
# ago a worker was seen is judged on one clock whichever machines wrote and read it.
# Returns Redis's time. With KEYS[3] and KEYS[4] (its starting key and that index), a
# heartbeat also ends the worker's starting key: it serves now, and a reader sees it as
# one or the other, never as both or neither.
PUBLISH_SCRIPT = REDIS_NOW + """
local info = string.sub(ARGV[2], 1, -2) .. ',"last_seen":' .. string.format('%.6f', now) .. '}'
redis.call('SET', KEYS[1], info, 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]) / 1000, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if KEYS[4] then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
return tostring(now)
"""
# KEYS: the index. The ids whose heartbeat has not lapsed by Redis's time.
LIVE_SCRIPT = REDIS_NOW + """
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""


def publish(client: redis.Redis, info: WorkerInfo, ttl_s: float) -> float:
    """Say this worker is alive for the next ``ttl_s`` seconds, and which persona it runs
    (``version``, when it does not say already); returns Redis's time.

    ``last_seen`` is written as Redis's time of the beat, not this machine's: the
    monitoring shows it as an age measured on Redis's clock, and a worker whose clock
    ran ten minutes ahead read "seen -600.0s ago".
    """
    ttl_ms = max(1, int(ttl_s * 1000))
    info.version = info.version or persona_version()  # which workers a rolling upgrade has reached
    described = info.model_dump_json(exclude={"last_seen"})
    now = float(client.eval(
        PUBLISH_SCRIPT, 4, keys.worker_key(info.id), keys.WORKER_INDEX_KEY, keys.starting_key(info.id),
        keys.STARTING_INDEX_KEY, info.id, described, ttl_ms,
    ))
    info.last_seen = now
    return now


def withdraw(client: redis.Redis, worker_id: str) -> None:
    """Say this worker is gone (serving or still starting), so its leftovers are reclaimed at once."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.worker_key(worker_id), keys.starting_key(worker_id))
    pipe.zrem(keys.WORKER_INDEX_KEY, worker_id)
    pipe.zrem(keys.STARTING_INDEX_KEY, worker_id)
    pipe.execute()


def announce_starting(client: redis.Redis, info: StartingWorker, ttl_s: float) -> float:
    """Say this worker is loading its models, for the next ``ttl_s`` seconds; returns Redis's time.

    Its own key and index, not a heartbeat: nothing that counts live workers sees it.
    """
    if not info.since:
        info.since = redis_now(client)
    ttl_ms = max(1, int(ttl_s * 1000))
    info.version = info.version or persona_version()
    described = info.model_dump_json(exclude={"last_seen", "loading_s"})
    now = float(client.eval(PUBLISH_SCRIPT, 2, keys.starting_key(info.id), keys.STARTING_INDEX_KEY, info.id, described, ttl_ms))
    info.last_seen = now
    return now


# KEYS: the starting index. Redis's time, then the ids whose starting key has not lapsed.
STARTING_SCRIPT = REDIS_NOW + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
table.insert(ids, 1, tostring(now))
return ids
"""


def starting_workers(client: redis.Redis) -> list[StartingWorker]:
    """Every worker still loading its models (longest first), each with ``loading_s`` set.

    None of them is live (``live_worker_ids``): a worker leaves this list in the step
    its first heartbeat is written, and one that died while loading once its key lapses.
    """
    now, *ids = (i.decode() if isinstance(i, bytes) else i for i in client.eval(STARTING_SCRIPT, 1, keys.STARTING_INDEX_KEY))
    return longest_loading_first(float(now), _read_each(client, ids, keys.starting_key, StartingWorker, "starting key"))


def longest_loading_first(now: float, found: list[StartingWorker]) -> list[StartingWorker]:
    """The starting workers ``found``, each with ``loading_s`` set from Redis's time ``now``,
    the one loading longest first."""
    for info in found:
        info.loading_s = round(max(0.0, now - info.since), 1)
    return sorted(found, key=lambda w: (-w.loading_s, w.id))


class StartingBeat:
    """Keeps a starting worker's key fresh, from a thread, while it loads its models.

    Left normally, the key stays until the worker's first heartbeat replaces it (in one
    script, see ``publish``); left by an exception (a model that cannot load, a stop while
    loading), it is withdrawn. A process that dies while loading leaves its key to lapse
    within ``ttl_s``. Redis failing here is logged, never in the way of loading.
    """

    def __init__(self, client: redis.Redis, info: StartingWorker, ttl_s: float, every_s: float) -> None:
        self.redis = client
        self.info = info
        self.ttl_s = ttl_s
        self.every_s = every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"starting-{info.id}", daemon=True)

    def loading(self, persona: str, model: str) -> None:
        """Say which persona's model it loads now."""
        self.info.persona, self.info.model = persona, model
        self._announce()

    def __enter__(self) -> Self:
        self._announce()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        if exc_type is not None:
            try:
                withdraw(self.redis, self.info.id)
            except redis.exceptions.RedisError as exc:
                log.warning("could not withdraw the starting key of worker %s (it lapses by itself): %s", self.info.id, exc)

    def _beat(self) -> None:
        while not self._done.wait(self.every_s):
            self._announce()

    def _announce(self) -> None:
        try:
            announce_starting(self.redis, self.info, self.ttl_s)
        except redis.exceptions.RedisError as exc:
            log.warning("could not say that worker %s is starting: %s", self.info.id, exc)
        except Exception:  # a surprise here must not stop the models loading
            log.exception("could not say that worker %s is starting", self.info.id)


def live_worker_ids(client: redis.Redis) -> set[str]:
    """The ids of every worker whose heartbeat has not lapsed, from the index alone."""
    return {i.decode() if isinstance(i, bytes) else i for i in client.eval(LIVE_SCRIPT, 1, keys.WORKER_INDEX_KEY)}


def live_workers(client: redis.Redis, ids: set[str] | None = None) -> list[WorkerInfo]:
    """Every worker whose heartbeat has not lapsed and can be read (of ``ids``, when the
    caller has just read them with ``live_worker_ids``).

    A heartbeat that is not a ``WorkerInfo`` (written by something else, or by a version
    of persona that reports differently) is skipped with a warning (once per value), so one odd key
    cannot stop the stats, the dashboard, swaps or reclaiming; ``live_worker_ids`` still
    counts its worker as alive.
    """
    return _read_each(client, sorted(live_worker_ids(client) if ids is None else ids), keys.worker_key, WorkerInfo,
                      "heartbeat")


def _read_each(client: redis.Redis, ids: list[str], key_of: Callable[[str], str], model: type[M], what: str) -> list[M]:
    """The workers' keys (``key_of(id)``) read in one MGET as ``model``: a key that lapsed
    since its id was listed is left out, and one that cannot be read is skipped with a warning."""
    if not ids:
        return []
    found = []
    for worker_id, value in zip(ids, client.mget([key_of(i) for i in ids]), strict=True):
        if value is None:
            continue
        try:
            found.append(model.model_validate_json(value))
        except ValueError as exc:
            _warn_once(worker_id, value, "skipping the unreadable %s of worker %s: %s", what, worker_id,
                       str(exc).splitlines()[0])
    return found


def _warn_once(worker_id: str, value: bytes | str, message: str, *args: object) -> None:
    """Log ``message`` about ``value`` (a worker's key) unless it was logged already: the
    dashboard reads every worker's key every two seconds and at each scrape (87 lines in a
    minute and a half of one worker of a newer version). A changed value is said again."""
    if (worker_id, value) in _reported:
        return
    if len(_reported) >= MAX_REPORTED:
        _reported.clear()
    _reported.add((worker_id, value))
    log.warning(message, *args)
