"""``persona up``: every service on one machine, as child processes of one supervisor.

The embedded Redis (when no URL is set) starts first and stops last. Every other
service is the same ``persona`` command an operator could run alone (``persona worker``,
``persona dashboard``, ...), started in its own process group so that Ctrl-C reaches the
supervisor alone, which then stops the services in order: workers hand their work back
before Redis saves and exits. A service that crashes is restarted, with a growing pause;
one that keeps failing soon after it starts is given up on, with its exit status logged,
rather than restarted for ever. One that ends on a configuration error (a setting it
cannot read, a token refused) says so with its own exit status, ``CONFIG_ERROR_EXIT_STATUS``,
and is not restarted at all: the same error again, four times, helped no one. On Linux each service
is also stopped (SIGTERM) by the kernel if the supervisor itself dies (``kill -9``, the
OOM killer): it would otherwise serve on, unseen, beside the next ``persona up``.

With a log folder (``persona up --chat``), each service writes straight into its own
``<service>.log`` there, which is rotated once it reaches a size (see ``_rotate``).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from persona.errors import ConfigError, DataDirUnwritable
from persona.extras import EXTRA_OF_MODULE, install_command, installed
from persona.settings import Settings

__all__ = [
    "CONFIG_ERROR_EXIT_STATUS",
    "SERVICE_EXTRAS",
    "Service",
    "Supervisor",
    "config_error_exit_status",
    "missing_extra",
    "one_up_per_data_dir",
    "services_for_up",
]

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0
FIRST_RESTART_PAUSE_S = 0.5
MAX_RESTART_PAUSE_S = 30.0
QUICK_EXIT_S = 60.0  # a service that exits sooner than this after starting failed to start
MAX_QUICK_EXITS = 5  # quick exits in a row before a service is given up on
UP_LOCK_FILE = "up.lock"  # held by the one `persona up` serving a data directory
CONFIG_ERROR_EXIT_STATUS = 78  # sysexits.h's EX_CONFIG: a service's settings are wrong; restarting cannot help
# Set in each service's environment: a command run alone keeps exit status 1 for a ConfigError.
SERVICE_ENV = "PERSONA_UP_SERVICE"
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
# A service's log (`up --chat`) is rotated at this size, LOG_BACKUPS older ones kept as
# <service>.log.1, .2, ...: 40 MB a service at most. The busiest, a worker answering 2.5
# replies/s, wrote 18 kB/min in the soak audit: 9 hours in one file, 1.5 days in all four.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3
COPY_CHUNK_BYTES = 1024 * 1024


@contextmanager
def one_up_per_data_dir(data_dir: Path) -> Iterator[None]:
    """Held while `persona up` runs for ``data_dir``: a second one is refused, in words.

    A second would start every service again beside the first: its dashboard fails on the
    taken port, and two chat adapters on one bot token answer every message twice.
    The system lets go of the lock of a process that dies.
    """
    try:
        held = (data_dir / UP_LOCK_FILE).open("a+")
    except OSError as exc:  # a read-only folder, or a lock file another user left
        raise DataDirUnwritable(data_dir, exc) from None
    with held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.seek(0)
            pid = held.read().strip() or "unknown"
            raise ConfigError(
                f"`persona up` is already running for data directory {data_dir} (pid {pid}). "
                "Stop it first (Ctrl-C in its terminal), or set PERSONA_DATA_DIR to another folder "
                "for a second one. To chat with it: `persona chat PERSONA`; more workers: `persona worker`"
            ) from None
        try:  # unbuffered: a full disk is told here, not by a traceback as the file closes
            os.ftruncate(held.fileno(), 0)
            os.pwrite(held.fileno(), f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            raise DataDirUnwritable(data_dir, exc) from None
        yield


def config_error_exit_status() -> int:
    """The exit status a ConfigError ends a command with: ``CONFIG_ERROR_EXIT_STATUS`` in a
    service `persona up` runs (so it is not restarted), 1 everywhere else.

    Read from the environment the supervisor gives its services, not from the settings:
    it is no setting of the user's, and it must hold when the settings cannot be read.
    """
    return CONFIG_ERROR_EXIT_STATUS if os.environ.get(SERVICE_ENV) == "1" else 1


def _dies_with_this_process() -> Callable[[], None] | None:
    """Linux: what a child runs before it starts, so that the kernel sends it SIGTERM when
    the thread that started it ends (this process killed, as a rule). A thread that
    restarts services must outlive them (see ``persona.cli.serve._supervise``): a second
    SIGTERM, on top of ``stop``'s, cuts a service's own stopping short."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def before_exec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the call above
            os._exit(1)

    return before_exec


def _rotate(path: Path, max_bytes: int, backups: int) -> bool:
    """Once ``path`` holds ``max_bytes``, move what it holds to ``path.1`` (``.1`` to ``.2``, and
    so on; the one past ``backups`` is dropped) and empty it; return whether it did.

    Copied, then truncated, rather than renamed: a running service keeps its file open and
    writes on into it (opened to append, from its start again), and ``tail -f`` follows it
    on. What a service writes in the moment between the copy's end and the truncation is
    lost (none of 20,000 lines written at 2,000 a second, over 114 rotations).
    """
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    kept = [path.with_name(f"{path.name}.{n}") for n in range(1, backups + 1)]
    copied = path.with_name(f"{path.name}.rotating")
    current = os.open(path, os.O_RDWR)
    try:
        if kept:
            try:  # nothing is emptied or moved unless it is copied whole (a full disk)
                _copy_to_end(current, copied, os.fstat(current).st_mode & 0o777)
            except OSError:
                copied.unlink(missing_ok=True)
                raise
        os.ftruncate(current, 0)  # at once: the services write on meanwhile
    finally:
        os.close(current)
    for n in range(backups - 1, 0, -1):  # the oldest first, so that none is written over
        if kept[n - 1].exists():
            kept[n - 1].replace(kept[n])
    if kept:
        copied.replace(kept[0])
    return True


def _copy_to_end(source: int, path: Path, mode: int) -> None:
    """Copy ``source`` from where it is to its end into a new file at ``path``, unbuffered: once
    this returns, every byte is written, and no error is left to come."""
    copy = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        while chunk := os.read(source, COPY_CHUNK_BYTES):
            written = 0
            while written < len(chunk):
                written += os.write(copy, chunk[written:])
    finally:
        os.close(copy)


@dataclass
class Service:
    """One long-running ``persona`` command."""

    name: str
    args: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0  # quick exits in a row
    started_at: float = 0.0
    restart_at: float | None = None  # when it exited: when to start it again
    gave_up: bool = False
    log_file: Path | None = None
    log_unrotated: bool = False  # its last rotation failed (and was said)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "persona", *self.args]


def services_for_up(settings: Settings, *, workers: int = 1, dashboard: bool = True) -> list[Service]:
    """The services `persona up` runs: workers, and each optional part that is set up and
    installed. One set up whose extra is not installed is left out, with a line naming the
    extra: started, it died five times on a ModuleNotFoundError and was given up on."""
    services = [Service(f"worker-{i + 1}", ["worker"]) for i in range(workers)]
    optional = [  # wanted, the service, and what is said when its extra is not installed
        (dashboard, "dashboard", "the dashboard is not served (`persona up --no-dashboard` goes without it)"),
        (settings.discord.token is not None, "discord", "the Discord bot is not started, though PERSONA_DISCORD__TOKEN is set"),
        (settings.telegram.token is not None, "telegram", "the Telegram bot is not started, though PERSONA_TELEGRAM__TOKEN is set"),
        # The scheduler idles until a persona enables its schedule: left out without a word
        # (`persona personas validate` says so of a file whose schedule is enabled).
        (True, "scheduler", ""),
    ]
    for wanted, command, unstarted in optional:
        if not wanted:
            continue
        if extra := missing_extra(command):
            if unstarted:
                log.warning("%s: it needs the %s extra, which is not installed: %s", unstarted, extra, install_command(extra))
            continue
        services.append(Service(command, [command]))
    return services


# The third-party modules each optional service imports (persona's own are always there),
# and the extra that installs them (``persona.extras``).
SERVICE_MODULES: dict[str, tuple[str, ...]] = {
    "dashboard": ("fastapi", "uvicorn", "prometheus_client"),
    "discord": ("discord",),
    "telegram": ("telegram",),
    "scheduler": ("croniter",),
}
SERVICE_EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    service: (modules, EXTRA_OF_MODULE[modules[0]]) for service, modules in SERVICE_MODULES.items()
}


def missing_extra(service: str) -> str:
    """The extra ``service`` needs that is not installed ('' when it can start)."""
    modules, extra = SERVICE_EXTRAS[service]
    return "" if all(installed(module) for module in modules) else extra


@dataclass
class Supervisor:
    """Starts services, restarts crashed ones, and stops them all in order."""

    services: list[Service]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    log_dir: Path | None = None  # None: children write to this terminal
    log_max_bytes: int = LOG_MAX_BYTES  # each log in log_dir rotated at this size...
    log_backups: int = LOG_BACKUPS  # ...keeping this many older ones
    first_pause_s: float = FIRST_RESTART_PAUSE_S
    max_quick_exits: int = MAX_QUICK_EXITS
    _stopping: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def start(self) -> None:
        for service in self.services:
            self._spawn(service)

    def _spawn(self, service: Service) -> None:
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            service.log_file = self.log_dir / f"{service.name}.log"
            self._rotate_log(service)  # one left from an earlier run
            # The service writes into it itself, not through this process: it is never held
            # up by it, and what it says as it stops, should this process die, is kept.
            output = service.log_file.open("ab")
        # preexec_fn with threads about (the restarts run in one): safe here, as the child
        # makes one libc call, looked up before the fork, and no lock is taken.
        try:
            service.process = subprocess.Popen(
                service.argv, env={**self.env, SERVICE_ENV: "1"}, stdout=output,
                stderr=subprocess.STDOUT if output else None,
                start_new_session=True, preexec_fn=_dies_with_this_process(),  # noqa: PLW1509
            )
        finally:
            if output is not None:
                output.close()
        service.started_at = time.monotonic()
        log.info("started %s (pid %d)", service.name, service.process.pid)

    def check(self) -> None:
        """Restart services that exited on their own, each after a growing pause, and rotate
        logs grown too big; never blocks."""
        with self._lock:
            if self._stopping:
                return
            now = time.monotonic()
            for service in self.services:
                self._rotate_log(service)
                process = service.process
                if process is None or service.gave_up or process.poll() is None:
                    continue
                if service.restart_at is None:
                    self._exited(service, process.returncode, now)
                elif now >= service.restart_at:
                    service.restart_at = None
                    self._spawn(service)

    def _rotate_log(self, service: Service) -> None:
        if service.log_file is None:
            return
        try:
            _rotate(service.log_file, self.log_max_bytes, self.log_backups)
        except OSError as exc:  # tried again at each check; said once
            if not service.log_unrotated:
                log.warning("could not rotate %s (%s), so it grows on: free some space or fix the folder's "
                            "permissions; it is tried again every second", service.log_file, exc)
            service.log_unrotated = True
        else:
            service.log_unrotated = False

    def _exited(self, service: Service, status: int, now: float) -> None:
        """Decide when to start ``service`` again, or give up on it."""
        ran_s = now - service.started_at
        if status == CONFIG_ERROR_EXIT_STATUS:  # the same settings would fail the same way
            service.gave_up = True
            where = f" in {service.log_file}" if service.log_file else " above"
            log.error(
                "%s stopped on a configuration error (exit status %d), which restarting cannot fix, so it is "
                "not restarted (the other services keep running): fix what its error%s says, then start "
                "`persona up` again",
                service.name, status, where,
            )
            return
        service.restarts = 0 if ran_s > QUICK_EXIT_S else service.restarts + 1
        if service.restarts >= self.max_quick_exits:
            service.gave_up = True
            where = f"; see {service.log_file}" if service.log_file else ""
            log.error(
                "%s exited with status %s, %d times in a row within %.0f s of starting; "
                "giving up on it (the other services keep running)%s",
                service.name, status, service.restarts, QUICK_EXIT_S, where,
            )
            return
        pause = min(MAX_RESTART_PAUSE_S, self.first_pause_s * 2 ** max(0, service.restarts - 1))
        service.restart_at = now + pause
        log.warning("%s exited with status %s after %.1f s; restarting in %.1f s", service.name, status, ran_s, pause)

    def stop(self) -> None:
        """SIGTERM every service, wait for a clean exit, then SIGKILL stragglers."""
        self._stopping = True  # a check running now (another thread) starts nothing more
        with self._lock:
            self._stop_all()

    def _stop_all(self) -> None:
        running = [s for s in self.services if s.process and s.process.poll() is None]
        for service in running:
            service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            for service in running:
                try:
                    service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time; killing it", service.name)
                    service.process.kill()
                    service.process.wait()
        except KeyboardInterrupt:  # Ctrl-C again: stop now, and leave nothing running
            for service in running:
                if service.process.poll() is None:
                    log.warning("interrupted again: killing %s", service.name)
                    service.process.kill()
                service.process.wait()
        for service in self.services:
            service.process = None
