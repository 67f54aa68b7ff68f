"""Clients of the embedded Redis that follow it to a new address: when a connection
cannot connect, the data directory's record is read again (the server restarted on another
port, its own taken meanwhile by another program)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from urllib.parse import urlparse

import redis
import redis.asyncio.connection
import redis.connection

from persona.embedded_record import find_embedded_url, recorded_url
from persona.settings import Settings

__all__ = ["following_options"]


class _EmbeddedAddress:
    """Where one client's connections find the embedded Redis of a data directory: the URL
    it was found at, until a connection fails and the record names another (it restarted
    on a new port, its own taken by another program meanwhile). Shared by the connections."""

    def __init__(self, data_dir: Path, url: str) -> None:
        self.data_dir, self.url = data_dir, url
        self._lock = threading.Lock()

    def moved(self, failed_url: str) -> bool:
        """After a connection to ``failed_url`` failed: whether the embedded Redis now
        answers elsewhere (then ``url`` says where)."""
        with self._lock:
            if self.url == failed_url:  # not yet looked up by another of the connections
                self.url = find_embedded_url(self.data_dir) or self.url
            return self.url != failed_url


class _Following:
    """A redis-py connection to the embedded Redis that follows it to a new address: when it
    cannot connect, it reads the record again. (Its kind, unix socket or TCP, stays.)"""

    def __init__(self, *, embedded: _EmbeddedAddress, **kwargs) -> None:
        super().__init__(**kwargs)
        self.embedded, self.following = embedded, embedded.url

    def take_address(self) -> bool:
        """Point this (unconnected) connection at ``embedded.url``; False if it cannot go there."""
        url = self.embedded.url
        if url == self.following:
            return True
        found = redis.connection.parse_url(url)
        if ("path" in found) != isinstance(self, _UNIX_CONNECTIONS):
            return False
        for name in ("host", "port", "path"):
            if name in found:
                setattr(self, name, found[name])
        self.username, self.password, self.db = found.get("username"), found.get("password"), found.get("db", 0)
        self.following = url
        return True


class _FollowingSync(_Following):
    def _connect(self):
        self.take_address()  # where another of this client's connections found it
        return super()._connect()

    def connect_check_health(self, *args, **kwargs):
        try:
            return super().connect_check_health(*args, **kwargs)
        except redis.exceptions.RedisError:  # refused, or another program answered where it was
            if not (self.embedded.moved(self.following) and self.take_address()):
                raise
        self.disconnect()
        return super().connect_check_health(*args, **kwargs)


class _FollowingAsync(_Following):
    async def _connect(self):
        self.take_address()
        return await super()._connect()

    async def connect_check_health(self, *args, **kwargs):
        try:
            return await super().connect_check_health(*args, **kwargs)
        except redis.exceptions.RedisError:
            if not (await asyncio.to_thread(self.embedded.moved, self.following) and self.take_address()):
                raise
        await self.disconnect()
        return await super().connect_check_health(*args, **kwargs)


class _TCP(_FollowingSync, redis.connection.Connection):
    pass


class _Unix(_FollowingSync, redis.connection.UnixDomainSocketConnection):
    pass


class _AsyncTCP(_FollowingAsync, redis.asyncio.connection.Connection):
    pass


class _AsyncUnix(_FollowingAsync, redis.asyncio.connection.UnixDomainSocketConnection):
    pass


_UNIX_CONNECTIONS = (redis.connection.UnixDomainSocketConnection, redis.asyncio.connection.UnixDomainSocketConnection)


def following_options(settings: Settings, url: str, *, asynchronous: bool) -> dict:
    """The options that make a client follow the embedded Redis to a new address, when
    ``url`` is the one its record gives (no PERSONA_REDIS_URL); {} otherwise."""
    if settings.redis_url is not None or recorded_url(settings.data_dir) != url:
        return {}
    scheme = urlparse(url).scheme
    if scheme not in ("redis", "unix"):
        return {}
    classes = {("redis", False): _TCP, ("unix", False): _Unix, ("redis", True): _AsyncTCP, ("unix", True): _AsyncUnix}
    return {"connection_class": classes[scheme, asynchronous], "embedded": _EmbeddedAddress(settings.data_dir, url)}
