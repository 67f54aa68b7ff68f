"""The locks around the embedded Redis of one data directory.

The server holds a lock in its folder (``SERVER_LOCK_FILE``) for as long as it, or a
child saving for it, runs: ``server_pid`` reads it, so a second server is never started
on the same files, whatever the address record says (nor beside one that a version from
before that lock started: ``server_pid`` knows that one by its process). The processes
that serve on it share another (``serving_lock``): one at a time finds or starts the
server, or stops it, and the last of them to leave stops it. A client asks ``served_on``
whether any does: one that will start the server again should it die.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

from persona.errors import DataDirUnwritable

__all__ = ["ServingLock", "served_on", "server_pid", "serving_lock", "unlocked_server_pid"]

SERVING_LOCK_FILE = "redis.serving.lock"  # shared by every process serving on it
TURN_LOCK_FILE = "redis.turn.lock"  # held alone by one process starting or stopping it
# In the server's folder; held by the redis-server process itself (an inherited descriptor)
# for as long as it, or a child saving for it, runs.
SERVER_LOCK_FILE = "server.lock"


def server_pid(data_dir: Path) -> int | None:
    """The pid of the embedded Redis running on this data directory's files (0 if it did
    not say), whether or not it answers or was recorded; None if none runs. A fact, not a
    guess from a record: the server holds its lock until it, and any child saving for it,
    has exited. A server that holds no lock, because a version from before the lock started
    it, counts too when its recorded process is still a redis-server on these files
    (``unlocked_server_pid``): one that stalled or loads its data was taken for none, and a
    second server started beside it on the same append-only file."""
    try:
        fd = os.open(data_dir / "redis" / SERVER_LOCK_FILE, os.O_RDONLY)
    except OSError:
        return unlocked_server_pid(data_dir)  # never started here by this version (or unreadable: the start says why)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            said = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(said) if said.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return unlocked_server_pid(data_dir)


# Where a server's starter records its address and pid (``persona.embedded_record``, which
# reads the rest of it); read here too, for the pid of a server that holds no lock.
ADDRESS_FILE = "redis.json"
_RECORD_MAX_BYTES = 64 * 1024  # a few hundred, as written


def unlocked_server_pid(data_dir: Path) -> int | None:
    """The pid of a redis-server running on this data directory's files without holding
    their lock (started by a version of persona from before ``SERVER_LOCK_FILE``): the
    process its starter recorded, if it still runs and is a redis-server working in this
    data directory's Redis folder; None otherwise (a pid since given to another process)."""
    try:
        with (data_dir / ADDRESS_FILE).open("rb") as file:
            record = json.loads(file.read(_RECORD_MAX_BYTES))
        pid, port = int(record.get("pid", 0)), int(record.get("port", 0))
    except (OSError, ValueError, TypeError, AttributeError):  # no record, or not one
        return None
    if pid <= 0 or not _runs_redis_on(pid, data_dir / "redis", port):
        return None
    return pid


def _runs_redis_on(pid: int, folder: Path, port: int) -> bool:
    """Whether process ``pid`` is a redis-server working on ``folder``'s files: its working
    directory is that folder (Redis moves into its ``dir``). Where there is no /proc
    (macOS), its command line says so instead: Redis names itself there by the address it
    listens on (``redis-server 127.0.0.1:PORT``), or it shows the config file it was given."""
    proc = Path("/proc")
    if proc.is_dir():
        try:
            named = (proc / str(pid) / "comm").read_text().strip()
            cwd, here = os.stat(proc / str(pid) / "cwd"), os.stat(folder)
        except OSError:  # gone, or another user's: not this data directory's server
            return False
        return named.startswith("redis-server") and (cwd.st_dev, cwd.st_ino) == (here.st_dev, here.st_ino)
    try:
        command = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True,
                                 timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    words = command.split()
    return bool(words) and Path(words[0]).name == "redis-server" and (
        (port > 0 and re.search(rf":{port}\b", command) is not None) or str(folder.absolute() / "redis.conf") in command
    )


def served_on(data_dir: Path) -> bool:
    """Whether a process serves on the embedded Redis of ``data_dir`` now (`persona up`, a
    `persona worker` or `dashboard` run alone), or is starting or stopping it: one that
    starts it again should it die. Looked at in a turn of its own (an instant), so that a
    serving process leaving meanwhile never takes this look for another still serving."""
    try:
        turn = os.open(data_dir / TURN_LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False  # never served on here
    try:
        serving = os.open(data_dir / SERVING_LOCK_FILE, os.O_RDONLY)
    except OSError:
        os.close(turn)
        return False
    try:
        fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(serving, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True  # held: by one serving, or by one in its turn (starting or stopping it)
    except OSError:
        return False  # a file system without these locks: no one can be seen serving
    finally:
        os.close(serving)  # closing lets go of the locks taken
        os.close(turn)
    return False


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
    try:
        turn, serving = (data_dir / TURN_LOCK_FILE).open("a"), (data_dir / SERVING_LOCK_FILE).open("a")
    except OSError as exc:  # a read-only or full file system, a lock file another user left
        raise DataDirUnwritable(data_dir, exc) from None
    with turn, serving:
        fcntl.flock(turn, fcntl.LOCK_EX)
        yield ServingLock(turn, serving)
