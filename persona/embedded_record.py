"""Where the embedded Redis of a data directory listens, as its starter recorded it in
``<data_dir>/redis.json`` (``ADDRESS_FILE``): every other ``persona`` command on the
machine finds it there without configuration (``find_embedded_url``, ``running_url``),
and can stop it (``stop_embedded``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from persona.constants import EMBEDDED_REDIS_START_TIMEOUT_S
from persona.embedded_locks import ADDRESS_FILE, server_pid
from persona.errors import RedisUnavailable

__all__ = ["find_embedded_url", "recorded_server", "recorded_url", "running_url", "stop_embedded"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_url(data_dir: Path, timeout_s: float = EMBEDDED_REDIS_START_TIMEOUT_S) -> str | None:
    """The URL of the embedded Redis running for this data directory; None if none runs.

    One that runs but does not answer yet is waited for: still loading its data (as long
    as it loads), or started by a process killed before it was ready. One that runs and
    does not answer within ``timeout_s`` is refused (RedisUnavailable), never joined by
    a second server on the same files.
    """
    deadline = time.monotonic() + timeout_s
    while (url := find_embedded_url(data_dir)) is None:
        pid = server_pid(data_dir)
        if pid is None:
            return None
        if _loading(_address_record(data_dir).get("url")):
            deadline = time.monotonic() + timeout_s
        elif time.monotonic() > deadline:
            folder = data_dir.absolute() / "redis"
            stop = f"stop it (`kill {pid}`)" if pid else "stop the redis-server serving it"
            raise RedisUnavailable(
                f"an embedded Redis{f' (pid {pid})' if pid else ''} runs on {folder} but has not answered for "
                f"{timeout_s:.0f} s, and a second one must not run on its files. If it is stuck, {stop}, then "
                f"start again; its log is {folder / 'redis.log'}"
            )
        time.sleep(0.1)
    return url


def find_embedded_url(data_dir: Path) -> str | None:
    """The URL of an embedded Redis that is running for this data directory, if any."""
    record = _address_record(data_dir)
    url = record.get("url")
    if not url or not _alive(int(record.get("pid", 0))) or not _answers(url):
        return None  # stale: left by a Redis that died, its pid since given to another process
    return url


def recorded_server(data_dir: Path) -> tuple[int, bool]:
    """The port of the embedded Redis last recorded for this data directory (0: none), and
    whether its process still runs."""
    record = _address_record(data_dir)
    try:
        return int(record.get("port", 0)), _alive(int(record.get("pid", 0)))
    except (TypeError, ValueError):
        return 0, False


_RECORD_MAX_BYTES = 64 * 1024  # a few hundred, as written; whatever else sits there is not read whole


def _address_record(data_dir: Path) -> dict:
    """What the embedded Redis's starter recorded for this data directory (url, pid, port);
    {} when there is no readable record."""
    try:
        with (data_dir / ADDRESS_FILE).open("rb") as file:
            record = json.loads(file.read(_RECORD_MAX_BYTES))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded_url(data_dir: Path) -> str | None:
    """The URL the embedded Redis's starter recorded for this data directory, whether or
    not it answers there (``find_embedded_url`` asks it); None without a readable record."""
    url = _address_record(data_dir).get("url")
    return url if isinstance(url, str) else None


def stop_embedded(data_dir: Path, timeout_s: float = 15.0) -> bool:
    """Save and stop the embedded Redis another process started for this data directory
    (it outlives its starter: its own session), by asking it over its password-protected
    address, never by a pid that may belong to someone else now; False if none answers."""
    import redis

    url = find_embedded_url(data_dir)
    if url is None:
        return False
    record, pid = data_dir / ADDRESS_FILE, 0
    with contextlib.suppress(TypeError, ValueError):
        pid = int(_address_record(data_dir).get("pid", 0))
    with contextlib.suppress(redis.exceptions.ConnectionError):  # it closes the connection as it goes
        redis.Redis.from_url(url, socket_timeout=timeout_s).shutdown(save=True)
    deadline = time.monotonic() + timeout_s  # until it has saved and exited (waited for, never signalled)
    while (_answers(url) or (pid and _alive(pid)) or server_pid(data_dir) is not None) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _address_record(data_dir).get("url") == url:
        with contextlib.suppress(OSError):
            record.unlink()
    return True


def _answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.exceptions.ResponseError:  # an error reply is an answer: MISCONF refuses PING too
        return True
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def _loading(url: str | None) -> bool:
    """Whether the Redis at ``url`` is up but still loading its data (it answers LOADING)."""
    import redis

    if not url:
        return False
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.exceptions.BusyLoadingError:
        return True
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()
    return False
