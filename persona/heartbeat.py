"""Worker heartbeats: each live worker keeps a key with a TTL saying what it serves.

An index (a sorted set of worker ids scored by when their heartbeat lapses) lists
them, so finding the live workers reads two keys instead of scanning a keyspace that
holds a day of answered-request flags. A worker that stops beating drops out of the
index when its score passes. Those times are Redis's own (its TIME), never a worker's
clock: a machine whose clock ran ahead would otherwise drop every other worker from the
index, and its work would be taken from them as if they had died.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import redis
from pydantic import BaseModel, Field

from persona import constants as keys
from persona.queue_scripts import REDIS_NOW

__all__ = ["WorkerInfo", "live_worker_ids", "live_workers", "publish", "redis_now", "redis_time", "withdraw"]

log = logging.getLogger(__name__)


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


# KEYS: the worker's key, the index. ARGV: worker id, its info without last_seen (a JSON
# object), TTL in ms. The info is stored with last_seen set to Redis's time, so how long
# ago a worker was seen is judged on one clock whichever machines wrote and read it.
# Returns Redis's time.
PUBLISH_SCRIPT = REDIS_NOW + """
local info = string.sub(ARGV[2], 1, -2) .. ',"last_seen":' .. string.format('%.6f', now) .. '}'
redis.call('SET', KEYS[1], info, 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]) / 1000, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return tostring(now)
"""
# KEYS: the index. The ids whose heartbeat has not lapsed by Redis's time.
LIVE_SCRIPT = REDIS_NOW + """
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""


def publish(client: redis.Redis, info: WorkerInfo, ttl_s: float) -> float:
    """Say this worker is alive for the next ``ttl_s`` seconds; returns Redis's time.

    ``last_seen`` is written as Redis's time of the beat, not this machine's: the
    monitoring shows it as an age measured on Redis's clock, and a worker whose clock
    ran ten minutes ahead read "seen -600.0s ago".
    """
    ttl_ms = max(1, int(ttl_s * 1000))
    described = info.model_dump_json(exclude={"last_seen"})
    now = float(client.eval(PUBLISH_SCRIPT, 2, keys.worker_key(info.id), keys.WORKER_INDEX_KEY, info.id, described, ttl_ms))
    info.last_seen = now
    return now


def withdraw(client: redis.Redis, worker_id: str) -> None:
    """Say this worker is gone, so its leftovers are reclaimed at once."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.worker_key(worker_id))
    pipe.zrem(keys.WORKER_INDEX_KEY, worker_id)
    pipe.execute()


def live_worker_ids(client: redis.Redis) -> set[str]:
    """The ids of every worker whose heartbeat has not lapsed, from the index alone."""
    return {i.decode() if isinstance(i, bytes) else i for i in client.eval(LIVE_SCRIPT, 1, keys.WORKER_INDEX_KEY)}


def live_workers(client: redis.Redis, ids: set[str] | None = None) -> list[WorkerInfo]:
    """Every worker whose heartbeat has not lapsed and can be read (of ``ids``, when the
    caller has just read them with ``live_worker_ids``).

    A heartbeat that is not a ``WorkerInfo`` (written by something else, or by a version
    of persona that reports differently) is skipped with a warning, so one odd key
    cannot stop the stats, the dashboard, swaps or reclaiming; ``live_worker_ids`` still
    counts its worker as alive.
    """
    ids = sorted(live_worker_ids(client) if ids is None else ids)
    if not ids:
        return []
    workers = []
    for worker_id, value in zip(ids, client.mget([keys.worker_key(i) for i in ids]), strict=True):
        if value is None:
            continue
        try:
            workers.append(WorkerInfo.model_validate_json(value))
        except ValueError as exc:
            log.warning("skipping the unreadable heartbeat of worker %s: %s", worker_id, str(exc).splitlines()[0])
    return workers
