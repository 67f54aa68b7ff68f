"""`persona up` and `persona worker`: running the service."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
import typer
from rich.markup import escape

from persona import heartbeat
from persona.cli.common import console, friendly_errors, get_settings
from persona.connection import connect
from persona.errors import ConfigError, ModelError, RedisUnavailable
from persona.logs import describe_url, setup_logging
from persona.redis_refusals import check_permissions
from persona.served_redis import (
    ServedRedis,
    data_dir_made,
    redis_for_service,
    served_redis,
)
from persona.settings import Settings

if TYPE_CHECKING:
    from persona.worker import Worker

log = logging.getLogger(__name__)


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
        one_up_per_data_dir(data_dir_made(settings)),
        _dashboard_can_listen(settings, wanted=dashboard),
        served_redis(settings) as served,
    ):
        url = served.url
        with connect(settings, url=url) as client:
            check_redis_for_service(client, url)
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
                     f"{data_dir_made(settings) / 'redis'})" if settings.redis_url is None else describe_url(url))
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
    """Refuse, before anything starts, a persona to chat with, to preload or to serve on a chat
    platform that is not there or not valid: every service started, then the chat stopped them
    all again; each worker exited on it, was restarted four times, then was given up on; and a
    chat adapter served every message the worker's refusal."""
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
    from adapters.responder import check_default_persona

    for platform in ("discord", "telegram"):  # each chat adapter `up` starts: those given a token
        if getattr(settings, platform).token is not None:
            check_default_persona(settings, platform)


@contextlib.contextmanager
def _dashboard_can_listen(settings: Settings, *, wanted: bool) -> Iterator[None]:
    """Refuse to start when the dashboard could not listen (its port taken, say): it
    exited at once, was started again four times, each saying so among the log lines,
    then given up on while `persona up` served on without it. Without the dashboard extra
    there is nothing to check: `services_for_up` leaves the dashboard out and says so."""
    from persona.supervisor import missing_extra

    without = "start without it: `persona up --no-dashboard`"
    if wanted and not missing_extra("dashboard"):
        from persona.dashboard import bind

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
        None, min=1, help="CPU threads for decoding (default: PERSONA_WORKER__THREADS, else all cores; "
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
            check_redis_for_service(client, url)  # before minutes of loading models, not after
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


def check_redis_for_service(client: redis.Redis, url: str) -> None:
    """What a long-running service checks of its Redis as it starts: a user its ACL denies what
    persona runs is a ConfigError; a Redis that may delete persona's keys to make room (or is
    full) is warned of in the log."""
    from persona.monitoring import warn_if_evicting

    check_permissions(client, url)
    warn_if_evicting(client)


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
