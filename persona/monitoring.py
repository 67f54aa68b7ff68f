"""What the queue looks like right now: depth, in-flight work, counters, live workers."""

from __future__ import annotations

import redis
from pydantic import BaseModel

from persona import constants as keys
from persona.heartbeat import WorkerInfo, live_workers

__all__ = ["QueueStats", "StreamStats", "collect_stats"]


class StreamStats(BaseModel):
    """One stream's figures."""

    name: str
    waiting: int
    in_flight: int


class QueueStats(BaseModel):
    """A snapshot of the whole queue."""

    streams: list[StreamStats]
    dead_letters: int
    counters: dict[str, int]
    workers: list[WorkerInfo]

    @property
    def completed(self) -> int:
        return self.counters.get("completed", 0)

    @property
    def failed(self) -> int:
        return sum(v for k, v in self.counters.items() if k.startswith("failed:"))


def _stream_stats(client: redis.Redis, stream: str) -> StreamStats:
    length = client.xlen(stream)
    try:
        pending = client.xpending(stream, keys.CONSUMER_GROUP)["pending"]
    except redis.exceptions.ResponseError:  # no group yet: no worker has started
        pending = 0
    # Settled entries are deleted, so the stream holds waiting plus in-flight entries.
    return StreamStats(name=stream, waiting=max(0, length - pending), in_flight=pending)


def collect_stats(client: redis.Redis) -> QueueStats:
    """Read every figure the CLI, the dashboard and /metrics show."""
    counters = {k.decode(): int(v) for k, v in client.hgetall(keys.STATS_KEY).items()}
    return QueueStats(
        streams=[_stream_stats(client, s) for s in keys.STREAMS_BY_PRIORITY],
        dead_letters=client.xlen(keys.STREAM_DEAD),
        counters=counters,
        workers=live_workers(client),
    )
