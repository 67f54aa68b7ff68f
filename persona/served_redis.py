"""The Redis a serving process (`persona up`, `worker`, `dashboard`) serves on.

The configured one (``PERSONA_REDIS_URL``), or the embedded one in the data directory:
started by the first serving process, shared by every later one, started again should it
die (by `persona up`'s supervision, or by a worker or dashboard run alone), and stopped by
the last serving process to leave, whichever started it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from persona.embedded_redis import (
    EmbeddedRedis,
    ServingLock,
    recorded_server,
    running_url,
    server_pid,
    serving_lock,
    stop_embedded,
)
from persona.errors import DataDirUnwritable, RedisUnavailable
from persona.settings import Settings

__all__ = ["KEEP_ALIVE_EVERY_S", "KEEP_ALIVE_MAX_PAUSE_S", "ServedRedis", "data_dir_made", "redis_for_service", "served_redis"]

log = logging.getLogger(__name__)


def data_dir_made(settings: Settings) -> Path:
    """The data directory, made if it is not there yet."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirUnwritable(settings.data_dir, exc) from None
    return settings.data_dir


@dataclass
class ServedRedis:
    """The Redis a serving process uses: for the embedded one, its data directory, and the
    server itself if this process started it."""

    url: str
    data_dir: Path | None = None
    lock: ServingLock | None = None
    embedded: EmbeddedRedis | None = None

    def keep_alive(self) -> None:
        """Start the embedded Redis again if it died (killed, say): on the same port and
        socket, with the same password, so that every client reconnects."""
        if self.lock is None:
            return  # PERSONA_REDIS_URL's Redis is someone else's to run
        if self.embedded is not None:
            running = self.embedded.process.poll() is None
        else:  # started by another serving process, or by one that was killed
            running = recorded_server(self.data_dir)[1]
        if running:
            return
        with self.lock.turn():
            if running_url(self.data_dir) is not None:  # a serving process that came meanwhile started it
                self.embedded = None
                return
            log.warning("the embedded Redis has died; starting it again")
            port = self.embedded.port if self.embedded is not None else recorded_server(self.data_dir)[0]
            self.embedded = None  # a start that fails leaves none of this process's running
            started = EmbeddedRedis(self.data_dir)
            started.start(port=port or None)
            self.embedded = started

    def stop(self) -> None:
        """Stop the embedded Redis, as the last serving process to leave: this process's own,
        or the one another started after that one died (it used to stop only its own,
        already dead, and leave that one running with no one to stop it)."""
        own = self.embedded
        if own is not None and own.process is not None and own.process.poll() is None:
            if not own.stop():
                return  # killed, unable to save: it said what may be lost
        else:
            if own is not None:
                own.stop()  # reaps it, and forgets its record (not a later server's)
            try:
                if not stop_embedded(self.data_dir):
                    self._none_stopped()
                    return
            except redis.exceptions.RedisError as exc:  # it refused: SHUTDOWN failed to save
                self._not_saved(str(exc))
                return
            if server_pid(self.data_dir) is not None:  # asked, it did not exit: it could not save
                self._not_saved("it did not exit")
                return
        log.info("embedded Redis stopped (data kept in %s)", self.data_dir / "redis")

    def _not_saved(self, said: str) -> None:
        """The embedded Redis (another process's) could not save its data, and so still runs."""
        folder = self.data_dir.absolute() / "redis"
        log.warning("the embedded Redis of %s could not save its data to stop (%s), so it still runs, holding what "
                    "it has not saved; see its log, %s (a full disk?), make room, then stop it (`kill %s`)",
                    folder, said, folder / "redis.log", server_pid(self.data_dir) or "its redis-server")

    def _none_stopped(self) -> None:
        """Say why no embedded Redis was stopped: none runs (it died), or one runs that does not answer."""
        folder = self.data_dir.absolute() / "redis"
        pid = server_pid(self.data_dir)
        if pid is None:
            log.info("the embedded Redis had died, so there was none to stop (data kept in %s)", folder)
            return
        log.warning("the embedded Redis%s of %s does not answer, so it was not stopped; stop it yourself (%s), "
                    "and see its log, %s", f" (pid {pid})" if pid else "", folder,
                    f"`kill {pid}`" if pid else "the redis-server serving it", folder / "redis.log")


# How often a `persona worker` or `dashboard` run alone looks whether the embedded Redis it
# serves on still runs; and at most how long it waits between starts that fail.
KEEP_ALIVE_EVERY_S = 1.0
KEEP_ALIVE_MAX_PAUSE_S = 30.0


@contextlib.contextmanager
def _kept_alive(served: ServedRedis) -> Iterator[None]:
    """While serving (`persona worker` or `dashboard` run alone), start the embedded Redis
    again should it die, as `persona up` does: it had served on, retrying a dead Redis for
    ever, while clients were told to start `persona up`. The serving processes take turns
    (``ServingLock.turn``): one of them starts it, the others find it."""
    if served.lock is None:
        yield  # PERSONA_REDIS_URL's Redis is someone else's to run
        return
    stop = threading.Event()

    def keep() -> None:
        pause_s = KEEP_ALIVE_EVERY_S
        while not stop.wait(pause_s):
            try:
                served.keep_alive()
                pause_s = KEEP_ALIVE_EVERY_S
            except Exception as exc:  # its port taken meanwhile, say: tried again, less often
                pause_s = min(pause_s * 2, KEEP_ALIVE_MAX_PAUSE_S)
                log.error("the embedded Redis died, and could not be started again: %s; trying again in %.0f s "
                          "(if this goes on, stop this service and start it again)", exc, pause_s,
                          exc_info=not isinstance(exc, RedisUnavailable))

    keeper = threading.Thread(target=keep, name="embedded-redis", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()  # before this process's turn to leave: it may be starting Redis now


@contextlib.contextmanager
def served_redis(settings: Settings) -> Iterator[ServedRedis]:
    """The Redis to serve on: the configured one, a running embedded one, or a new one.

    The embedded Redis is stopped by the last serving process (``persona up``,
    ``worker``, ``dashboard``) to leave, whichever started it: one that leaves while
    another still serves on it leaves it running for that one (see ``serving_lock``).
    """
    if settings.redis_url is not None:
        yield ServedRedis(settings.redis_url.get_secret_value())
        return
    with serving_lock(data_dir_made(settings)) as lock:
        # One that runs but is still loading its data is waited for, never started twice.
        served = ServedRedis(running_url(settings.data_dir) or "", settings.data_dir, lock)
        if not served.url:
            served.embedded = EmbeddedRedis(settings.data_dir)
            served.url = served.embedded.start()
        lock.share()
        try:
            yield served
        finally:
            if not lock.last():
                log.info("embedded Redis left running: another serving process still uses it, "
                         "and the last of them to stop stops it")
            else:
                served.stop()


@contextlib.contextmanager
def redis_for_service(settings: Settings) -> Iterator[str]:
    """The URL of the Redis to serve on (see ``served_redis``), kept running while serving
    (`persona up` keeps its own, in ``_supervise``)."""
    with served_redis(settings) as served, _kept_alive(served):
        yield served.url
