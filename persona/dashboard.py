"""The web dashboard and Prometheus ``/metrics``, on one port (FastAPI + uvicorn).

Live figures come from one JSON endpoint the page polls; the server samples depth and
latency every few seconds into a bounded history for the charts. Access rules:

- bound to loopback with no token set: reads are open to this machine; a POST (dead-
  letter retry or drop) must carry the ``X-Persona-Action`` header, which a page on another
  site cannot send without the browser asking first (so it cannot be forged).
- a token set (required when bound anywhere else): every route but the page itself (which
  holds no figure) and the probes wants it, as ``Authorization: Bearer TOKEN`` or
  ``?token=TOKEN`` (how the page is opened: its script then keeps the token for the tab,
  out of the address bar, and sends it as a Bearer header).
- with no token, a request must name this machine (or the bound address) in its
  ``Host`` header: a site whose name an attacker points at 127.0.0.1 (DNS rebinding)
  is the browser's same origin, but its requests say its own name and are refused.
- every answer forbids framing and referrers (``dashboard_access``: a framed "retry all"
  click would carry the page's own ``X-Persona-Action``).

With Redis out of reach the dashboard keeps answering: the page's figures and actions
get 503 with the reason (the page shows it), and ``/metrics`` still answers, with
``persona_redis_up 0`` and nothing else, as an exporter does when what it watches is
down (a failed scrape would read as the dashboard being down).

Posts that got no answer from a sink (``persona posts uncertain``) are listed on the page,
each with the command that finishes it, and counted in ``/metrics`` (``dashboard_metrics``).
Persona files that cannot be read are listed too, and a persona no worker can load says why.

Two probes, open without the token (a probe seldom carries one) and answering at once:
``/healthz`` is liveness, 200 while the process serves HTTP, Redis or not (restarting
the dashboard would not bring Redis back); ``/readyz`` is readiness, 200 when Redis can
be read and takes a write (``monitoring.write_probe``'s short-lived ``persona:write-probe``,
which the page's figures write too: a full Redis, one that cannot save, or a replica,
refuses it), else 503 with the reason, tried once within ``READY_TIMEOUT_S`` (the page's
reads retry with backoff for seconds, longer than a probe waits). A container
healthcheck or a load balancer should ask ``/readyz``. Neither waits for a worker thread:
the page's reads and scrapes run on those, and a Redis that stops answering held each for
a minute, until they were all taken and /healthz went unanswered too.

A page read or a scrape rides out a Redis restart for ``READ_GIVE_UP_S`` (a silent Redis:
one read timeout), then answers 503 (``persona_redis_up 0``), well within Prometheus's
10 s scrape timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import redis
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.backoff import NoBackoff
from redis.retry import Retry

from persona import constants as keys
from persona.checkpoint_checks import static_problem
from persona.checkpoints import resolve_checkpoint, scan_checkpoints
from persona.connection import retrying_until
from persona.dashboard_access import (
    AccessGuard,
    allowed_hosts,
    check_binding,
    has_token,
)
from persona.dashboard_metrics import PostsToSettle, QueueCollector, RedisWatch
from persona.dashboard_page import PAGE_HTML
from persona.dead_letters import (
    cap_warning,
    drop_dead,
    list_dead,
    retry_all,
    retry_dead,
    trimmed_note,
)
from persona.errors import ConfigError, InvalidRequest, ModelError, QueueBusy
from persona.logs import secrets_of
from persona.models import BUNDLED_ALIASES, resolve_base
from persona.monitoring import QueueStats, collect_stats, warn_if_evicting, write_probe
from persona.personas import Persona, PersonaRegistry
from persona.settings import Settings
from persona.swap import served_versions
from persona.telemetry_reading import THROUGHPUT_WINDOW_S

__all__ = ["PersonaProblems", "bind", "create_app", "http_address", "serve"]

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 2.0
HISTORY_POINTS = 900  # 30 minutes at one point every two seconds
ACTION_HEADER = "x-persona-action"
READY_TIMEOUT_S = 2.0  # under a probe's usual timeout (Compose's and Kubernetes' default: 30 s and 1 s)
# How long a page read or a scrape retries a Redis that fails (a silent one: until its
# first read timeout, 5 s) before it answers 503: redis-py's own 8 reconnects took 54 s.
READ_GIVE_UP_S = 3.0


def _reading() -> contextlib.AbstractContextManager[None]:
    """The Redis reads of one page request, scrape or sample, given up after ``READ_GIVE_UP_S``."""
    return retrying_until(time.monotonic() + READ_GIVE_UP_S)


def _mtime_ns(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:  # gone: a change as well
        return None


class PersonaProblems:
    """What `persona personas validate` finds wrong with a persona's base model or checkpoint
    before loading anything (a base folder gone, a checkpoint without weights): a persona
    that no worker can load showed as serving `base`, as a healthy one did. Checked again
    only when the persona file, or a folder it names, changes (the page asks every 2 s)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._checked: dict[str, tuple[tuple, str | None, Path | None]] = {}

    def __call__(self, persona: Persona) -> str | None:
        """The problem, in `personas validate`'s words, or None."""
        base = None if persona.model.base in BUNDLED_ALIASES else Path(persona.model.base).expanduser()
        folder = self._checked.get(persona.name, ((), None, None))[2]
        watched = (persona.source, base, base / "config.json" if base else None,
                   self.settings.checkpoints_dir / persona.name, folder)
        key = tuple(_mtime_ns(path) for path in watched)
        if (seen := self._checked.get(persona.name)) is not None and seen[0] == key:
            return seen[1]
        problem, folder = self._check(persona, base)
        self._checked[persona.name] = (key, problem, folder)
        return problem

    def _check(self, persona: Persona, base: Path | None) -> tuple[str | None, Path | None]:
        if base is not None:  # the bundled model is written on first use: not a problem here
            try:
                resolve_base(persona.model.base, self.settings.model_cache_dir, weights=False)
            except ModelError as exc:
                return f"model.base: {exc}", None
        try:
            _, folder = resolve_checkpoint(persona, self.settings)
        except ModelError as exc:
            return f"model.checkpoint: {exc}", None
        problem = static_problem(persona, folder) if folder is not None else None
        return (f"model.checkpoint: {problem}" if problem else None), folder


def _personas(settings: Settings, stats: QueueStats, problems: PersonaProblems) -> tuple[list[dict], list[str]]:
    """Each persona read (its versions, the one served, what stops it loading), and what is
    wrong with each persona file that cannot be read (`persona personas validate` says the same)."""
    found, invalid = PersonaRegistry.from_settings(settings).scan()
    served = served_versions(found, stats.active_versions)
    rows = []
    for name, persona in sorted(found.items()):
        active = served[name]
        # Unreadable versions are left out quietly: the page asks every two seconds, and
        # `persona checkpoints` names them.
        readable, _ = scan_checkpoints(settings.checkpoints_dir, name)
        versions = [c.version for c in readable]
        rows.append({"name": name, "base": persona.model.base, "active": active, "versions": versions,
                     "problem": problems(persona)})
    return rows, [str(problem) for problem in invalid]


def _sample(stats: QueueStats) -> dict:
    lat = stats.latency
    return {
        "t": round(stats.taken_at, 1),
        "depth": {s.name: s.waiting + s.in_flight for s in stats.streams},
        "queue_p95": lat.queue_ms.p95 if lat else 0, "generate_p95": lat.generate_ms.p95 if lat else 0,
        "queue_p50": lat.queue_ms.p50 if lat else 0, "generate_p50": lat.generate_ms.p50 if lat else 0,
    }


def _probe_client(client: redis.Redis) -> redis.Redis:
    """A client for the same Redis (address, password, TLS) that tries once, briefly:
    ``client`` rides out a restart with seconds of backoff, and a probe would time out
    before hearing why."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs) | {
        "retry": Retry(NoBackoff(), 0), "socket_timeout": READY_TIMEOUT_S,
        "socket_connect_timeout": READY_TIMEOUT_S, "health_check_interval": 0,
    }
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, max_connections=4, **kwargs))


def create_app(
    settings: Settings, client: redis.Redis, host: str | None = None, *, redis_reachable: bool = True
) -> FastAPI:
    """The dashboard app, reading from ``client``, served on ``host`` (default: the setting);
    ``redis_reachable`` False where the caller has already said that Redis is out of reach."""
    history: deque[dict] = deque(maxlen=HISTORY_POINTS)
    token = settings.dashboard.token.get_secret_value() if has_token(settings) else None
    watch = RedisWatch(secrets_of(settings), reachable=redis_reachable, client=client)
    writes = RedisWatch(secrets_of(settings), client=client, recovered="Redis takes changes again")  # /readyz's write

    def sample() -> dict:
        with _reading():
            return _sample(collect_stats(client, default_deadline_s=settings.queue.default_deadline_s))

    async def sampler() -> None:
        failing = ""  # the unexpected error met last: logged once, with its traceback, until sampling works again
        while True:
            try:
                history.append(await asyncio.to_thread(sample))
                watch.read()
                failing = ""
            except redis.exceptions.RedisError as exc:
                watch.failed(exc)
            except Exception as exc:  # a boundary: one sample gone must not stop the charts for good
                if repr(exc) != failing:
                    log.exception("the dashboard could not sample the queue (its charts miss these points; it "
                                  "tries again every %.0f s); `persona queue stats` reads the same figures", SAMPLE_EVERY_S)
                failing = repr(exc)
            await asyncio.sleep(SAMPLE_EVERY_S)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(sampler())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def authorized(request: Request) -> None:
        if token is None:
            if request.method == "POST" and request.headers.get(ACTION_HEADER) != "1":
                raise HTTPException(403, f"actions need the {ACTION_HEADER} header")
            return
        given = request.query_params.get("token") or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:]
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "this dashboard needs its token (Authorization: Bearer ..., or ?token=...)")

    app = FastAPI(title="persona dashboard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessGuard, hosts=allowed_hosts(settings, host or settings.dashboard.host))
    posts = PostsToSettle(client, grace_s=settings.posting.grace_s)
    problems = PersonaProblems(settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(client, watch, settings, posts))
    guard = [Depends(authorized)]

    @app.exception_handler(redis.exceptions.RedisError)
    async def redis_down(_: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        # 503, not a bare 500 the page read as "cannot reach the dashboard".
        return JSONResponse({"detail": watch.failed(exc)}, status_code=503)

    # The page itself holds no figure and wants no token: it takes ?token= out of the address
    # bar and keeps it for the tab, so a reload (a wall screen's) asks for "/" without one.
    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE_HTML

    @app.get("/api/stats", dependencies=guard)
    def stats() -> JSONResponse:
        with _reading():
            figures = collect_stats(client, default_deadline_s=settings.queue.default_deadline_s)
            dead = list_dead(client, count=50)
            to_settle = posts()
        watch.read()
        personas, invalid_personas = _personas(settings, figures, problems)
        # The history is the sampler's alone: points the page's polls added too fell at
        # uneven times, and filled HISTORY_POINTS faster than the half hour it is meant to hold.
        return JSONResponse({
            "stats": figures.model_dump(mode="json"),
            "history": list(history),
            "history_window_s": HISTORY_POINTS * SAMPLE_EVERY_S,  # how far back the charts reach
            "personas": personas,
            "invalid_personas": invalid_personas,
            "dead": [d.model_dump(mode="json", exclude={"payload"}) for d in dead],
            "posts_to_settle": to_settle,
            "throughput_window_s": THROUGHPUT_WINDOW_S,  # what the page's replies/s is over, at most
            "dead_note": cap_warning(figures.dead_letters, figures.dead_letters_trimmed_since_cleared)
            or trimmed_note(figures.dead_letters_trimmed_since_cleared),
        })

    # Re-queued work is held to the queue's length as callers' is: a full stream refuses it (as `persona queue retry`).
    limit = settings.queue.max_length

    @app.post("/api/dead/{entry_id}/retry", dependencies=guard)
    def retry_one(entry_id: str) -> dict:
        try:
            with _reading():
                new_id = retry_dead(client, entry_id, limit)
        except ValueError as exc:
            raise HTTPException(422, f"dead letter {entry_id} holds no readable request") from exc
        except QueueBusy as exc:
            raise HTTPException(503, str(exc)) from exc
        except InvalidRequest as exc:  # its id in use by another request, none at all, or a newer contract's
            raise HTTPException(422, str(exc)) from exc
        if new_id is None:
            raise HTTPException(404, f"no dead letter {entry_id}")
        return {"requeued": [entry_id]}

    @app.post("/api/dead/{entry_id}/drop", dependencies=guard)
    def drop_one(entry_id: str) -> dict:
        with _reading():
            dropped = drop_dead(client, [entry_id])
        if not dropped:
            raise HTTPException(404, f"no dead letter {entry_id}")
        return {"dropped": [entry_id]}

    @app.post("/api/dead/retry-all", dependencies=guard)
    def retry_every() -> dict:
        with _reading():  # gives up on failures only: a long run that goes well is not cut short
            report = retry_all(client, max_length=limit)
        return report.model_dump() | {"left": report.left}

    @app.api_route("/metrics", methods=["GET", "HEAD"], dependencies=guard)
    def metrics() -> Response:
        with _reading():
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # The probes are async, on no worker thread: page reads and scrapes that wait on a
    # silent Redis can hold every one, and the probes must still answer.
    @app.api_route("/healthz", methods=["GET", "HEAD"])  # HEAD: what many uptime checkers send
    async def healthz() -> dict:
        """Liveness: the dashboard answers (Redis or not)."""
        return {"ok": True}

    probe = _probe_client(client)

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> JSONResponse:
        """Readiness: 200 when Redis can be read and written, else 503 with the reason."""
        try:
            # On asyncio's own threads (the sampler's), not the page's: tried once, briefly.
            await asyncio.to_thread(probe.exists, keys.STATS_KEY)  # a read of a key, as the page's figures are
        except redis.exceptions.RedisError as exc:
            return JSONResponse({"ready": False, "detail": watch.failed(exc)}, status_code=503)
        watch.read()
        try:
            # A Redis that answers reads but refuses every change (full, unable to save, a
            # replica) queues nothing: /readyz said ready. Watched apart, as the page's reads work.
            await asyncio.to_thread(write_probe, probe)
        except redis.exceptions.RedisError as exc:
            return JSONResponse({"ready": False, "detail": writes.failed(exc)}, status_code=503)
        writes.read()
        return JSONResponse({"ready": True})

    return app


def bind(
    settings: Settings, host: str | None = None, port: int | None = None, *,
    port_advice: str = "pass --port, or set PERSONA_DASHBOARD__PORT",
) -> socket.socket:
    """The dashboard's listening socket, bound now: a port already taken is said before
    anything claims the dashboard is up, with ``port_advice`` (the caller's way to another port)."""
    host = host or settings.dashboard.host
    port = port if port is not None else settings.dashboard.port
    check_binding(settings, host)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listening = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"the dashboard cannot listen on {host}: {exc}; check PERSONA_DASHBOARD__HOST") from None
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart at once
        listening.bind(address)
        listening.listen(2048)
    except OSError as exc:
        listening.close()
        taken = " (another dashboard, or `persona up`, may be running)" if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError(
            f"the dashboard cannot listen on {host}:{port}: {exc.strerror}{taken}; {port_advice}"
        ) from None
    return listening


def http_address(host: str, port: int) -> str:
    """The dashboard's address as a browser takes it: an IPv6 host in brackets
    (``http://[::1]:8787/``; ``http://::1:8787/`` is no address at all)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(
    settings: Settings, client: redis.Redis, host: str | None = None, port: int | None = None,
    listening: socket.socket | None = None, *, redis_reachable: bool = True,
) -> None:
    """Run the dashboard until Ctrl-C or SIGTERM, on ``listening`` (from ``bind``) or a socket bound now."""
    import uvicorn

    listening = listening or bind(settings, host, port)
    bound_host, bound_port = listening.getsockname()[:2]
    log.info("dashboard on %s", http_address(bound_host, bound_port))
    if redis_reachable:  # a Redis that may delete persona's keys: said once in the log, and on the page
        with contextlib.suppress(redis.exceptions.RedisError), _reading():
            warn_if_evicting(client)
    app = create_app(settings, client, host or settings.dashboard.host, redis_reachable=redis_reachable)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])
