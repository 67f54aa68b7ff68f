"""`persona up` and `persona worker`: running the service."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import redis
import typer
from rich.markup import escape

from persona import heartbeat
from persona.cli.common import console, friendly_errors, get_settings
from persona.connection import connect, describe_url
from persona.embedded_redis import (
    EmbeddedRedis,
    ServingLock,
    recorded_server,
    running_url,
    server_pid,
    serving_lock,
    stop_embedded,
)
from persona.errors import ConfigError, DataDirUnwritable, ModelError, RedisUnavailable
from persona.logs import setup_logging
from persona.settings import Settings

if TYPE_CHECKING:
    from persona.worker import Worker

log = logging.getLogger(__name__)


def _data_dir(settings: Settings) -> Path:
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
            own.stop()
        else:
            if own is not None:
                own.stop()  # reaps it, and forgets its record (not a later server's)
            if not stop_embedded(self.data_dir):
                self._none_stopped()
                return
        log.info("embedded Redis stopped (data kept in %s)", self.data_dir / "redis")

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
    with serving_lock(_data_dir(settings)) as lock:
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal or SSH session closed


@friendly_errors
def up(
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="inference workers to run"),
    dashboard: bool = typer.Option(True, help="serve the web dashboard and /metrics"),
    chat: str | None = typer.Option(
        None, "--chat", metavar="PERSONA", help="then chat with PERSONA in this terminal (logs go to files)"
    ),
) -> None:
    """Run everything on this machine: Redis, workers, dashboard, scheduler, adapters.

    Redis is embedded unless PERSONA_REDIS_URL is set; each chat adapter runs when its
    token is set. The dashboard is at http://127.0.0.1:8787 by default
    (PERSONA_DASHBOARD__PORT). What it keeps (Redis's data, converted models, the logs
    of --chat) is in PERSONA_DATA_DIR, and one `persona up` runs per data directory. A
    service that crashes is restarted, and so is the embedded Redis (one that keeps
    failing as it starts is given up on, its error logged; one stopped by a configuration
    error, exit status 78, is not restarted: its error says what to fix).

    Stop with Ctrl-C (or SIGTERM, or by closing the terminal): workers hand their work
    back, then Redis saves and exits (unless a `persona worker` or `dashboard` started
    on its own still serves on it: the last of them stops it). Ctrl-C again kills the
    services still stopping.
    """
    from persona.supervisor import Supervisor, one_up_per_data_dir, services_for_up

    settings = get_settings()
    setup_logging(settings)
    _check_personas_named(settings, chat)
    stop, stopped = threading.Event(), threading.Event()
    redis_failed: list[Exception] = []
    # The signals are handled until the very end: a second SIGTERM must not kill this
    # process while it stops the services and Redis, leaving them running.
    with (
        friendly_exit(),
        _stopped_by_signals(stop, interrupt=bool(chat)),
        one_up_per_data_dir(_data_dir(settings)),
        _dashboard_can_listen(settings, wanted=dashboard),
        served_redis(settings) as served,
    ):
        url = served.url
        connect(settings, url=url).close()
        env = dict(os.environ)
        if settings.redis_url is None:
            env["PERSONA_REDIS_URL"] = url
        log_dir = settings.data_dir / "logs" if chat else None
        supervisor = Supervisor(services_for_up(settings, workers=workers, dashboard=dashboard), env=env, log_dir=log_dir)
        # While chatting, the chat holds this thread: the restarts happen in another.
        watcher = threading.Thread(
            target=_supervise, args=(supervisor, served, stop, stopped, redis_failed), name="supervisor", daemon=True
        )
        try:
            supervisor.start()
            names = ", ".join(s.name for s in supervisor.services)
            # The embedded Redis has a password of its own (in its folder's config): "***@" in
            # its address read as one the user had set, or a garbled address.
            where = (f"{describe_url(url).replace('***@', '')} (embedded; its password is kept in "
                     f"{_data_dir(settings) / 'redis'})" if settings.redis_url is None else describe_url(url))
            console.print(f"[green]persona is up[/green] on Redis {where}: {names}")
            watcher.start()
            if chat:
                console.print(f"logs in {log_dir}; the first reply waits for the model to load")
                from persona.cli.talk import run_chat

                starting = f"`persona up` is starting one; its log: {supervisor.services[0].log_file}"
                run_chat(settings, chat, url=url, stop=stop, starters=starting)
            else:
                _say_how_to_talk(settings)
                while not stop.wait(1.0):
                    pass
        finally:
            stop.set()  # the watcher restarts nothing more; it ends once the services are stopped
            try:
                with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                    console.print("stopping...")
            finally:  # even if Ctrl-C comes again: no service is left running
                try:
                    supervisor.stop()
                finally:
                    stopped.set()
                    if watcher.is_alive():
                        watcher.join()  # before Redis stops: it may be starting Redis again now
    if redis_failed:
        raise RedisUnavailable(f"the embedded Redis died, and could not be started again: {redis_failed[0]}")


def _check_personas_named(settings: Settings, chat: str | None) -> None:
    """Refuse, before anything starts, a persona to chat with or to preload that is not
    there or not valid: every service started, then the chat stopped them all again; and
    each worker exited on it, was restarted four times, then was given up on."""
    from persona.personas import PersonaRegistry

    registry = PersonaRegistry.from_settings(settings)
    for name in settings.worker.personas:
        try:
            registry.get(name)
        except ConfigError as exc:
            raise ConfigError(
                f"PERSONA_WORKER__PERSONAS names {name!r}, which the workers cannot preload: {exc} "
                "Fix the setting, or leave it out to preload every persona"
            ) from None
    if chat:
        registry.get(chat)


@contextlib.contextmanager
def _dashboard_can_listen(settings: Settings, *, wanted: bool) -> Iterator[None]:
    """Refuse to start when the dashboard could not listen (its port taken, say): it
    exited at once, was started again four times, each saying so among the log lines,
    then given up on while `persona up` served on without it."""
    from persona.dashboard import bind

    without = "start without it: `persona up --no-dashboard`"
    if wanted:
        try:
            bind(settings, port_advice=f"set PERSONA_DASHBOARD__PORT to a free port, or {without}").close()
        except ConfigError as exc:
            said = str(exc)
            raise ConfigError(said if said.endswith(without) else f"{said}; or {without}") from None
    yield


def _say_how_to_talk(settings: Settings) -> None:
    """How to chat with what is served: it named `sage` even where the workers preload
    only other personas, or no valid sage file is found."""
    name = _persona_to_suggest(settings)
    if name is None:
        console.print(
            "no valid persona file found, so nothing can be answered yet: `persona personas validate` names "
            "the problems (Ctrl-C here stops everything)", style="yellow", markup=False, highlight=False,
        )
        return
    console.print(f"talk to it from another terminal: [bold]persona chat {escape(name)}[/bold]  (Ctrl-C here stops everything)")


def _persona_to_suggest(settings: Settings) -> str | None:
    """The default persona where the workers serve it, else the first they serve: those
    they preload (PERSONA_WORKER__PERSONAS), else every valid persona."""
    from persona.cli.talk import DEFAULT_PERSONA
    from persona.personas import PersonaRegistry

    valid, _ = PersonaRegistry.from_settings(settings).scan()  # the workers log the invalid files
    preloaded = settings.worker.personas
    served = [name for name in preloaded if name in valid] if preloaded else sorted(valid)
    if DEFAULT_PERSONA in served:
        return DEFAULT_PERSONA
    return served[0] if served else None


def _supervise(
    supervisor, served: ServedRedis, stop: threading.Event, stopped: threading.Event, redis_failed: list
) -> None:
    """Restart crashed services, and the embedded Redis, until ``stop`` is set; then wait
    until ``stopped``. The kernel sends a service SIGTERM when the thread that started it
    ends (see ``supervisor._dies_with_this_process``): ended before ``Supervisor.stop``,
    this thread would add a second SIGTERM to that one, and a second cuts a service's own
    stopping short (the Telegram adapter's: the askers of questions in flight not told)."""
    try:
        while not stop.wait(1.0):
            try:
                supervisor.check()
            except Exception:  # a restart that failed (no memory to fork, say): tried again next time
                log.exception("could not restart a service")
            try:
                served.keep_alive()
            except Exception as exc:  # without Redis nothing can be served: stop, and say why
                log.error("%s; stopping everything", exc, exc_info=not isinstance(exc, RedisUnavailable))
                redis_failed.append(exc)
                os.kill(os.getpid(), signal.SIGTERM)  # stop as SIGTERM does, ending the chat too
                return
    finally:
        stopped.wait()


@contextlib.contextmanager
def _stopped_by_signals(stop: threading.Event, *, interrupt: bool) -> Iterator[None]:
    """SIGTERM and SIGHUP set ``stop``; with ``interrupt`` the first also ends the chat, as Ctrl-C does.
    SIGINT is Ctrl-C, even where this process started with it ignored."""

    def handler(signum: int, frame: object) -> None:
        first = not stop.is_set()
        stop.set()
        if interrupt and first:
            raise KeyboardInterrupt  # the chat waiting for a line leaves at once

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    # Started with SIGINT ignored (a script's `persona up &`), Python leaves it ignored and
    # `kill -INT` did nothing; here it stops everything, as Ctrl-C in a terminal does.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def friendly_exit() -> Iterator[None]:
    """Ctrl-C (or a stop signal raised as one) ends the command quietly."""
    with contextlib.suppress(KeyboardInterrupt):
        yield


@friendly_errors
def worker(
    device: str = typer.Option(None, help="cpu, cuda or auto (default: PERSONA_WORKER__DEVICE, else auto)"),
    preload: list[str] = typer.Option(
        None, "--preload", metavar="PERSONA",
        help="load this persona's model before serving; repeat for more. Default: PERSONA_WORKER__PERSONAS, "
        "else every persona (skipping, with a warning, any that cannot load; one named cannot be skipped)",
    ),
    max_batch: int = typer.Option(
        None, min=1, help="most requests generated together (default: PERSONA_WORKER__MAX_BATCH, else 16)"
    ),
    threads: int = typer.Option(
        None, min=1, help="CPU threads for decoding (default: PERSONA_WORKER__THREADS, else every core; "
        "1 on a machine shared with other work)",
    ),
) -> None:
    """Run one inference worker: take requests from the queue, answer them, repeat.

    It serves on PERSONA_REDIS_URL, or without it on the embedded Redis of
    PERSONA_DATA_DIR (the one `persona up` runs, or one it starts itself, and starts
    again should it die). Many workers on many machines can share one Redis. SIGTERM
    or Ctrl-C finishes the batch in hand and hands back anything unfinished; Ctrl-C
    again stops at once.
    """
    from persona.models import pick_device

    settings = get_settings()
    if max_batch:
        settings.worker.max_batch = max_batch
    if threads:
        settings.worker.threads = threads
    setup_logging(settings)
    preference = device or settings.worker.device
    starting = heartbeat.StartingWorker(id=heartbeat.new_worker_id(), device=preference)
    told_to_stop = threading.Event()
    # SIGTERM while torch imports (a second or two) ended the process at once, and its
    # starting key stayed listed until it lapsed; now it is withdrawn as it leaves (see
    # ``StartingBeat``). Once the worker is made, ``_load_worker`` handles the signals itself.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_while_starting(told_to_stop))
    try:
        if preference not in ("cpu", "auto"):  # a wrong one refused before Redis starts (cpu and auto cannot be)
            pick_device(preference)
        with redis_for_service(settings) as url:
            client = connect(settings, url=url)
            # Seen as starting from here on, by `persona ask`, the chat adapters and the
            # monitoring (torch's import and the models take seconds, a GPU's warm-up minutes),
            # but not as serving: swaps and reclaiming count only heartbeats, from `run`.
            beat = heartbeat.StartingBeat(client, starting, settings.worker.heartbeat_ttl_s, settings.worker.heartbeat_s)
            try:
                with beat:
                    served = _load_worker(settings, client, pick_device(preference), beat, preload, told_to_stop)
            except KeyboardInterrupt:  # told to stop while loading: nothing was taken yet
                log.info("stopped while loading models; nothing was taken from the queue")
                return
            try:
                served.run()
            except KeyboardInterrupt:
                served.stop()
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C before its models began loading (or again while leaving)
        log.info("worker stopped")
    except ModelError as exc:
        raise _cannot_start(exc, starting.persona) from None


def _cannot_start(exc: ModelError, persona: str) -> ConfigError:
    """A model the worker must load that cannot load, as the configuration error it is: the
    same files (or the same machine, for a GPU) fail the same way at every start. Under
    `persona up` such a worker was restarted four times, seconds of loading each, then
    given up on; a ConfigError ends it with the status up does not restart."""
    if not persona:  # the device asked for
        return ConfigError(f"the worker cannot start: {exc}")
    return ConfigError(
        f"the worker cannot start: persona {persona!r}, which it was told to preload (PERSONA_WORKER__PERSONAS "
        f"or --preload), cannot load: {exc}. Once that is fixed, start it again; or leave {persona!r} out "
        "of the preloaded personas to serve the others"
    )


def _stop_while_starting(told: threading.Event):
    """SIGTERM or Ctrl-C before the worker is made: stop now. Noted as well, since an
    interrupt raised inside a finalizer (one that runs while torch imports) is dropped."""

    def handler(signum, frame):
        told.set()
        raise KeyboardInterrupt

    return handler


def _load_worker(
    settings: Settings, client: redis.Redis, device: str, beat: heartbeat.StartingBeat, preload: list[str] | None,
    told_to_stop: threading.Event,
) -> Worker:
    """A worker with its models loaded, ready to ``run``; ``beat`` says meanwhile what it
    loads. ``told_to_stop``: set by a signal that came before the worker could handle it."""
    from persona.pool import ModelPool
    from persona.worker import Worker, freeze_heap

    if settings.worker.threads:
        import torch

        torch.set_num_threads(settings.worker.threads)
    beat.info.device = device
    served = Worker(settings, client, ModelPool(settings, device), worker_id=beat.info.id)
    signal.signal(signal.SIGTERM, _stop_then_interrupt(served, finish=True))
    signal.signal(signal.SIGINT, _stop_then_interrupt(served))
    if told_to_stop.is_set():
        raise KeyboardInterrupt
    started = time.perf_counter()
    served.preload(preload or settings.worker.personas or None, starting=beat)
    if served.stopping.is_set():  # a stop that a library's C code held back until it returned
        raise KeyboardInterrupt
    log.info("models ready in %.1f s", time.perf_counter() - started)
    freeze_heap()
    return served


def _stop_then_interrupt(served, *, finish: bool = False):
    """First Ctrl-C (or every SIGTERM, ``finish``): finish and hand back. Second Ctrl-C:
    stop at once. While the models load, with nothing taken yet, any of them stops at
    once (it used to load every model, minutes on a GPU's first start, then leave)."""

    from persona.llamacpp_decoder import interrupt

    def handler(signum, frame):
        if served.info.state == "starting" or served.stopping.is_set() and not finish:
            served.stop()
            interrupt(frame)  # raises, or where llama.cpp called back into Python, once it returns
        if not served.stopping.is_set():
            log.info("stopping after the batch in hand%s", "" if finish else " (Ctrl-C again to stop at once)")
        served.stop()

    return handler


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(worker)
