"""A real Redis made to refuse writes, as a full one does (``maxmemory`` reached, no eviction)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis


@contextlib.contextmanager
def redis_refusing_writes(client: redis.Redis) -> Iterator[None]:
    """Every write is refused with OOM while inside; the limits are put back after."""
    before = client.config_get("maxmemory*")
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        yield
    finally:
        client.config_set("maxmemory", before["maxmemory"])
        client.config_set("maxmemory-policy", before["maxmemory-policy"])
