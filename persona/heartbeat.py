"""Worker heartbeats: each live worker keeps a key with a TTL saying what it serves.

An index (a sorted set of worker ids scored by when their heartbeat lapses) lists
them, so finding the live workers reads two keys instead of scanning a keyspace that
holds a day of answered-request flags. A worker that stops beating drops out of the
index when its score passes.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import redis
from pydantic import BaseModel, Field

from persona import constants as keys

__all__ = ["WorkerInfo", "live_worker_ids", "live_workers", "publish", "withdraw"]

log = logging.getLogger(__name__)


class WorkerInfo(BaseModel):
    """What one worker reports about itself every few seconds."""

    id: str
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    device: str = "cpu"
    personas: dict[str, str] = Field(default_factory=dict, description="persona -> loaded version")
    started_at: float = Field(default_factory=time.time)
    last_seen: float = Field(default_factory=time.time)
    batches: int = 0
    requests: int = 0
    memory_mb: float = 0.0
    state: str = "starting"


def publish(client: redis.Redis, info: WorkerInfo, ttl_s: float) -> None:
    """Say this worker is alive for the next ``ttl_s`` seconds."""
    info.last_seen = time.time()
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.worker_key(info.id), info.model_dump_json(), px=int(ttl_s * 1000))
    pipe.zadd(keys.WORKER_INDEX_KEY, {info.id: info.last_seen + ttl_s})
    pipe.zremrangebyscore(keys.WORKER_INDEX_KEY, "-inf", info.last_seen)
    pipe.execute()


def withdraw(client: redis.Redis, worker_id: str) -> None:
    """Say this worker is gone, so its leftovers are reclaimed at once."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.worker_key(worker_id))
    pipe.zrem(keys.WORKER_INDEX_KEY, worker_id)
    pipe.execute()


def live_worker_ids(client: redis.Redis) -> set[str]:
    """The ids of every worker whose heartbeat has not lapsed, from the index alone."""
    return {i.decode() if isinstance(i, bytes) else i for i in client.zrangebyscore(keys.WORKER_INDEX_KEY, time.time(), "+inf")}


def live_workers(client: redis.Redis) -> list[WorkerInfo]:
    """Every worker whose heartbeat has not lapsed and can be read.

    A heartbeat that is not a ``WorkerInfo`` (written by something else, or by a version
    of persona that reports differently) is skipped with a warning, so one odd key
    cannot stop the stats, the dashboard, swaps or reclaiming; ``live_worker_ids`` still
    counts its worker as alive.
    """
    ids = sorted(live_worker_ids(client))
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
