"""`persona up` and `persona worker`: running the service."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

import typer

from persona.cli.common import console, friendly_errors, get_settings
from persona.connection import connect, describe_url
from persona.embedded_redis import (
    EmbeddedRedis,
    find_embedded_url,
    serving_lock,
    stop_embedded,
)
from persona.errors import ConfigError
from persona.logs import setup_logging
from persona.settings import Settings

log = logging.getLogger(__name__)


@contextlib.contextmanager
def redis_for_service(settings: Settings) -> Iterator[str]:
    """The Redis URL to serve on: the configured one, a running embedded one, or a new one.

    The embedded Redis is stopped by the last serving process (``persona up``,
    ``worker``, ``dashboard``) to leave, whichever started it: one that leaves while
    another still serves on it leaves it running for that one (see ``serving_lock``).
    """
    if settings.redis_url is not None:
        yield settings.redis_url.get_secret_value()
        return
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot keep data in {settings.data_dir} ({exc.strerror}); set PERSONA_DATA_DIR "
            "to a folder you can write"
        ) from None
    with serving_lock(settings.data_dir) as lock:
        embedded = None
        url = find_embedded_url(settings.data_dir)
        if url is None:
            embedded = EmbeddedRedis(settings.data_dir)
            url = embedded.start()
        lock.share()
        try:
            yield url
        finally:
            if not lock.last():
                log.info("embedded Redis left running: another serving process still uses it, "
                         "and the last of them to stop stops it")
            else:
                if embedded is not None:
                    embedded.stop()
                else:
                    stop_embedded(settings.data_dir)
                log.info("embedded Redis stopped (data kept in %s)", settings.data_dir / "redis")


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
    token is set.

    Stop with Ctrl-C (or SIGTERM, or by closing the terminal): workers hand their work
    back, then Redis saves and exits (unless a `persona worker` or `dashboard` started
    on its own still serves on it: the last of them stops it).
    """
    from persona.supervisor import Supervisor, services_for_up

    settings = get_settings()
    setup_logging(settings)
    stop = threading.Event()
    # The signals are handled until the very end: a second SIGTERM must not kill this
    # process while it stops the services and Redis, leaving them running.
    with friendly_exit(), _stopped_by_signals(stop, interrupt=bool(chat)), redis_for_service(settings) as url:
        connect(settings, url=url).close()
        env = dict(os.environ)
        if settings.redis_url is None:
            env["PERSONA_REDIS_URL"] = url
        log_dir = settings.data_dir / "logs" if chat else None
        supervisor = Supervisor(services_for_up(settings, workers=workers, dashboard=dashboard), env=env, log_dir=log_dir)
        # While chatting, the chat holds this thread: the restarts happen in another.
        watcher = threading.Thread(target=_supervise, args=(supervisor, stop), name="supervisor", daemon=True)
        try:
            supervisor.start()
            names = ", ".join(s.name for s in supervisor.services)
            console.print(f"[green]persona is up[/green] on Redis {describe_url(url)}: {names}")
            watcher.start()
            if chat:
                console.print(f"logs in {log_dir}; the first reply waits for the model to load")
                from persona.cli.talk import run_chat

                run_chat(settings, chat, url=url)
            else:
                console.print("talk to it from another terminal: [bold]persona chat sage[/bold]  (Ctrl-C here stops everything)")
                while not stop.wait(1.0):
                    pass
        finally:
            stop.set()
            with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                console.print("stopping...")
            if watcher.is_alive():
                watcher.join()
            supervisor.stop()


def _supervise(supervisor, stop: threading.Event) -> None:
    """Restart crashed services until ``stop`` is set."""
    while not stop.wait(1.0):
        supervisor.check()


@contextlib.contextmanager
def _stopped_by_signals(stop: threading.Event, *, interrupt: bool) -> Iterator[None]:
    """SIGTERM and SIGHUP set ``stop``; with ``interrupt`` the first also ends the chat, as Ctrl-C does."""

    def handler(signum: int, frame: object) -> None:
        first = not stop.is_set()
        stop.set()
        if interrupt and first:
            raise KeyboardInterrupt  # the chat waiting for a line leaves at once

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def friendly_exit() -> Iterator[None]:
    with contextlib.suppress(KeyboardInterrupt):
        yield


@friendly_errors
def worker(
    device: str = typer.Option(None, help="cpu, cuda or auto (default: the setting, else auto)"),
    preload: list[str] = typer.Option(None, "--preload", help="load these personas' models before serving"),
    max_batch: int = typer.Option(None, min=1, help="most requests generated together"),
) -> None:
    """Run one inference worker: take requests from the queue, answer them, repeat.

    Many workers on many machines can share one Redis. SIGTERM or Ctrl-C finishes the
    batch in hand and hands back anything unfinished.
    """
    from persona.models import pick_device
    from persona.pool import ModelPool
    from persona.worker import Worker, freeze_heap

    settings = get_settings()
    if max_batch:
        settings.worker.max_batch = max_batch
    setup_logging(settings)
    if settings.worker.threads:
        import torch

        torch.set_num_threads(settings.worker.threads)
    with redis_for_service(settings) as url:
        client = connect(settings, url=url)
        pool = ModelPool(settings, pick_device(device or settings.worker.device))
        served = Worker(settings, client, pool)
        signal.signal(signal.SIGTERM, _stop_then_interrupt(served, finish=True))
        signal.signal(signal.SIGINT, _stop_then_interrupt(served))
        started = time.perf_counter()
        try:
            served.preload(preload or settings.worker.personas or None)
            log.info("models ready in %.1f s", time.perf_counter() - started)
            freeze_heap()
        except KeyboardInterrupt:  # told to stop while loading: nothing was taken yet
            log.info("stopped while loading models; nothing was taken from the queue")
            return
        try:
            served.run()
        except KeyboardInterrupt:
            served.stop()


def _stop_then_interrupt(served, *, finish: bool = False):
    """First Ctrl-C (or every SIGTERM, ``finish``): finish and hand back. Second Ctrl-C:
    stop at once. While the models load, with nothing taken yet, any of them stops at
    once (it used to load every model, minutes on a GPU's first start, then leave)."""

    def handler(signum, frame):
        if served.info.state == "starting" or served.stopping.is_set() and not finish:
            served.stop()
            raise KeyboardInterrupt
        if not served.stopping.is_set():
            log.info("stopping after the batch in hand%s", "" if finish else " (Ctrl-C again to stop at once)")
        served.stop()

    return handler


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(worker)
