"""``persona up``: every service on one machine, as child processes of one supervisor.

The embedded Redis (when no URL is set) starts first and stops last. Every other
service is the same ``persona`` command an operator could run alone (``persona worker``,
``persona dashboard``, ...), started in its own process group so that Ctrl-C reaches the
supervisor alone, which then stops the services in order: workers hand their work back
before Redis saves and exits. A service that crashes is restarted, with a growing pause;
one that keeps failing soon after it starts (a setting it cannot read, say) is given up
on, with its exit status logged, rather than restarted for ever.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from persona.settings import Settings

__all__ = ["Service", "Supervisor", "services_for_up"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0
FIRST_RESTART_PAUSE_S = 0.5
MAX_RESTART_PAUSE_S = 30.0
QUICK_EXIT_S = 60.0  # a service that exits sooner than this after starting failed to start
MAX_QUICK_EXITS = 5  # quick exits in a row before a service is given up on


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

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "persona", *self.args]


def services_for_up(settings: Settings, *, workers: int = 1, dashboard: bool = True) -> list[Service]:
    """The services `persona up` runs: workers, and each optional part that is set up."""
    services = [Service(f"worker-{i + 1}", ["worker"]) for i in range(workers)]
    optional = [
        (dashboard, "dashboard", "persona.dashboard"),
        (settings.discord.token is not None, "discord", "adapters.discord_bot"),
        (settings.telegram.token is not None, "telegram", "adapters.telegram_bot"),
        # The scheduler idles until a persona enables its schedule; it needs the posting extra.
        (_importable("croniter"), "scheduler", "adapters.scheduler"),
    ]
    for wanted, command, module in optional:
        if wanted and _importable(module):
            services.append(Service(command, [command]))
    return services


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@dataclass
class Supervisor:
    """Starts services, restarts crashed ones, and stops them all in order."""

    services: list[Service]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    log_dir: Path | None = None  # None: children write to this terminal
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
            output = service.log_file.open("ab")
        service.process = subprocess.Popen(
            service.argv, env=self.env, stdout=output, stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )
        service.started_at = time.monotonic()
        log.info("started %s (pid %d)", service.name, service.process.pid)

    def check(self) -> None:
        """Restart services that exited on their own, each after a growing pause; never blocks."""
        with self._lock:
            if self._stopping:
                return
            now = time.monotonic()
            for service in self.services:
                process = service.process
                if process is None or service.gave_up or process.poll() is None:
                    continue
                if service.restart_at is None:
                    self._exited(service, process.returncode, now)
                elif now >= service.restart_at:
                    service.restart_at = None
                    self._spawn(service)

    def _exited(self, service: Service, status: int, now: float) -> None:
        """Decide when to start ``service`` again, or give up on it."""
        ran_s = now - service.started_at
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
        for service in running:
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", service.name)
                service.process.kill()
                service.process.wait()
        for service in self.services:
            service.process = None
