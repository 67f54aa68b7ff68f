"""`persona dashboard`: the web dashboard and Prometheus /metrics."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

import redis
import typer
from rich.markup import escape

from persona.cli.common import console, friendly_errors, get_settings
from persona.connection import connect, unchecked_client
from persona.errors import RedisUnavailable
from persona.logs import setup_logging
from persona.served_redis import redis_for_service
from persona.settings import Settings

__all__ = ["dashboard", "register"]

log = logging.getLogger("persona.dashboard")


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (`docker stop`, systemd, `persona up` stopping) stops the dashboard as Ctrl-C
    does. uvicorn re-sends the SIGTERM it caught once it has shut down, and with Python's
    default handler that killed the process (status 143) before it could stop the embedded
    Redis it had started, which then ran on with no one to stop it."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@friendly_errors
def dashboard(
    host: str = typer.Option(None, help="address to listen on (default: PERSONA_DASHBOARD__HOST, 127.0.0.1)"),
    port: int = typer.Option(
        None, min=0, max=65535, help="port (default: PERSONA_DASHBOARD__PORT, 8787; 0: any free port)"
    ),
) -> None:
    """Serve the live dashboard (queue, latency, workers, versions, dead letters, posts to settle) and /metrics.

    It listens on loopback unless told otherwise; bound anywhere else it refuses to
    start without PERSONA_DASHBOARD__TOKEN, and then every page wants that token.
    Probes need none: /healthz answers while the dashboard runs, /readyz answers 503
    with the reason while Redis cannot be read (point a healthcheck at /readyz). It starts
    with Redis out of reach too, and reads it once it answers.
    Ctrl-C or SIGTERM stops it (and the embedded Redis, if it was the last to serve on it).
    """
    from persona.dashboard import bind, http_address, serve

    settings = get_settings()
    setup_logging(settings)
    with _sigterm_as_ctrl_c(), contextlib.suppress(KeyboardInterrupt):
        listening = bind(settings, host, port)  # a port already taken is said first
        with listening, redis_for_service(settings) as url:
            client, reachable = _client(settings, url)
            address = http_address(host or settings.dashboard.host, listening.getsockname()[1])
            console.print(f"dashboard on [bold]{escape(address)}[/bold]  (Prometheus: /metrics)")
            serve(settings, client, host=host, listening=listening, redis_reachable=reachable)


def _client(settings: Settings, url: str) -> tuple[redis.Redis, bool]:
    """The dashboard's Redis client, and whether Redis answered at start. A Redis out of
    reach is connected to lazily: refusing to start left Prometheus seeing the target down,
    not `persona_redis_up 0`, and /healthz unanswered. (A refused password, or a Redis too
    old, is a setting to fix: still refused.)"""
    try:
        return connect(settings, url=url), True
    except RedisUnavailable as exc:
        log.warning("%s; the dashboard serves meanwhile (/readyz answers 503 and /metrics persona_redis_up 0 "
                    "until Redis answers)", str(exc).rstrip("."))
    return unchecked_client(settings, url), False


def register(app: typer.Typer) -> None:
    app.command()(dashboard)
