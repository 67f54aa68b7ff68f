"""The web dashboard and Prometheus ``/metrics``, on one port (FastAPI + uvicorn).

Live figures come from one JSON endpoint the page polls; the server samples depth and
latency every few seconds into a bounded history for the charts. Access rules:

- bound to loopback with no token set: reads are open to this machine; a POST (dead-
  letter retry or drop) must carry the ``X-Persona-Action`` header, which a page on another
  site cannot send without the browser asking first (so it cannot be forged).
- a token set (required when bound anywhere else): every route wants it, as
  ``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` (how the page is opened).
- with no token, a request must name this machine (or the bound address) in its
  ``Host`` header: a site whose name an attacker points at 127.0.0.1 (DNS rebinding)
  is the browser's same origin, but its requests say its own name and are refused.

With Redis out of reach the dashboard keeps answering: the page's figures and actions
get 503 with the reason (the page shows it), and ``/metrics`` still answers, with
``persona_redis_up 0`` and nothing else, as an exporter does when what it watches is
down (a failed scrape would read as the dashboard being down).

Posts that got no answer from a sink (``persona posts uncertain``) are listed on the page,
each with the command that finishes it, and counted in ``/metrics``; finding them scans
the keyspace, so they are read at most every ``UNSETTLED_EVERY_S``.

Two probes, open without the token (a probe seldom carries one) and answering at once:
``/healthz`` is liveness, 200 while the process serves HTTP, Redis or not (restarting
the dashboard would not bring Redis back); ``/readyz`` is readiness, 200 when Redis can
be read, else 503 with the reason, tried once within ``READY_TIMEOUT_S`` (the page's
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
import ipaddress
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

import redis
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.backoff import NoBackoff
from redis.retry import Retry
from starlette.middleware.trustedhost import TrustedHostMiddleware

from persona import constants as keys
from persona.checkpoints import scan_checkpoints
from persona.connection import retrying_until
from persona.dashboard_page import PAGE_HTML
from persona.dead_letters import (
    cap_warning,
    drop_dead,
    list_dead,
    retry_all,
    retry_dead,
    trimmed_note,
)
from persona.errors import ConfigError, QueueBusy
from persona.ledger import PostLedger
from persona.logs import REDACTED, secrets_of
from persona.monitoring import QueueStats, collect_stats
from persona.personas import PersonaRegistry
from persona.settings import Settings
from persona.swap import served_versions
from persona.telemetry import read_histogram

__all__ = ["PostsToSettle", "QueueCollector", "RedisWatch", "bind", "check_binding", "create_app", "http_address",
           "is_loopback", "serve"]

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 2.0
HISTORY_POINTS = 900  # 30 minutes at one point every two seconds
ACTION_HEADER = "x-persona-action"
BYTES_PER_MB = 1024 * 1024  # a heartbeat's memory_mb is ru_maxrss (KiB) / 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
READY_TIMEOUT_S = 2.0  # under a probe's usual timeout (Compose's and Kubernetes' default: 30 s and 1 s)
UNSETTLED_EVERY_S = 15.0  # posts to settle: a SCAN of the keyspace, not run at every poll of the page
# How long a page read or a scrape retries a Redis that fails (a silent one: until its
# first read timeout, 5 s) before it answers 503: redis-py's own 8 reconnects took 54 s.
READ_GIVE_UP_S = 3.0


def _reading() -> contextlib.AbstractContextManager[None]:
    """The Redis reads of one page request, scrape or sample, given up after ``READ_GIVE_UP_S``."""
    return retrying_until(time.monotonic() + READ_GIVE_UP_S)


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(settings: Settings, host: str) -> None:
    """Refuse to serve beyond this machine without a token."""
    if not is_loopback(host) and not _has_token(settings):
        raise ConfigError(
            f"the dashboard would listen on {host}, reachable from other machines, with no token; "
            "set PERSONA_DASHBOARD__TOKEN (or bind to 127.0.0.1)"
        )


def _has_token(settings: Settings) -> bool:
    # The one test of "a token is set": a blank one (PERSONA_DASHBOARD__TOKEN= in a .env)
    # guards nothing, so it counts as none (Settings already reads it as unset).
    token = settings.dashboard.token
    return token is not None and bool(token.get_secret_value().strip())


def _allowed_hosts(settings: Settings, host: str) -> list[str]:
    """The Host header values a request may carry: any with a token, else this machine's names."""
    if _has_token(settings):
        return ["*"]  # the token, which a rebinding page does not have, guards every route
    hosts = {*LOOPBACK_NAMES, host}
    if ":" in host:
        hosts.add(f"[{host}]")  # how an IPv6 address appears in a Host header
    return sorted(hosts)


class RedisWatch:
    """Whether the dashboard could read Redis last time; says so in the log once per change
    (the page asks every two seconds and Prometheus scrapes too: one line, not a traceback each).

    What it says hides ``secrets`` (the settings' passwords and tokens): it is the body of
    ``/readyz``, which answers anyone who can reach the dashboard, token or not, and a
    server that is not quite Redis may quote the password back ("unknown command 'AUTH',
    with args beginning with: ...")."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        self.reachable = True
        self.secrets = secrets or []

    def failed(self, exc: redis.exceptions.RedisError) -> str:
        """Note a failure; the sentence the page and the log show."""
        said = f"the dashboard cannot read the queue from Redis ({str(exc).rstrip('.')}); is Redis running? " \
               "`persona up` starts it; `persona queue stats` checks"
        for secret in self.secrets:
            said = said.replace(secret, REDACTED)
        if self.reachable:
            log.warning("%s", said)
        self.reachable = False
        return said

    def read(self) -> None:
        """Note a success."""
        if not self.reachable:
            log.info("the dashboard reads Redis again")
        self.reachable = True


class PostsToSettle:
    """The posts that got no answer from a sink, as `persona posts uncertain` lists them, each
    with the command that finishes it; read again at most every ``every_s`` seconds."""

    def __init__(self, client: redis.Redis, every_s: float = UNSETTLED_EVERY_S) -> None:
        self.ledger = PostLedger(client)
        self.every_s = every_s
        self._read_at = float("-inf")
        self._items: list[dict[str, str]] = []

    def __call__(self) -> list[dict[str, str]]:
        if time.monotonic() - self._read_at >= self.every_s:
            self._items = self.ledger.unsettled()
            self._read_at = time.monotonic()
        return self._items


class QueueCollector:
    """Prometheus figures read from Redis at each scrape, so every worker's work counts."""

    def __init__(
        self, client: redis.Redis, watch: RedisWatch | None = None, settings: Settings | None = None,
        posts: Callable[[], list[dict[str, str]]] | None = None,
    ) -> None:
        self.redis = client
        self.watch = watch or RedisWatch()
        self.settings = settings  # where the persona files are: each one's version is shown, swapped or not
        self.posts = posts or PostsToSettle(client)

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family; with Redis out of reach, only ``persona_redis_up 0``."""
        try:
            families, up = self._families(), 1
        except redis.exceptions.RedisError as exc:
            self.watch.failed(exc)
            families, up = [], 0
        else:
            self.watch.read()
        yield GaugeMetricFamily("persona_redis_up", "1 if the dashboard could read Redis at this scrape", value=up)
        yield from families

    def _families(self) -> list[Metric]:
        """Every family, read whole before any is yielded: Redis failing half way yields none."""
        stats = collect_stats(self.redis)
        if self.settings is None:
            served = stats.active_versions
        else:
            served = served_versions(PersonaRegistry.from_settings(self.settings).scan()[0], stats.active_versions)
        families = [*_queue_families(stats), *_reply_families(stats, served), *_worker_families(stats)]
        unsettled = GaugeMetricFamily(
            "persona_posts_unsettled", "Posts a sink never answered, left for a person (`persona posts uncertain`): "
            "uncertain (look, then settle) or intent (safe to post again)", labels=["state"],
        )
        posts = self.posts()
        for state in ("uncertain", "intent"):
            unsettled.add_metric([state], sum(1 for item in posts if item["state"] == state))
        families.append(unsettled)
        for name, help_text in (
            ("queue_wait_seconds", "Time requests waited in the queue (failed ones too, where measured)"),
            ("generate_seconds", "Time the batch that answered a request took to generate"),
            ("batch_size", "Requests generated together"),
        ):
            buckets, total, _ = read_histogram(self.redis, name)
            families.append(HistogramMetricFamily(f"persona_{name}", help_text, buckets=buckets, sum_value=total))
        return families


def _queue_families(stats: QueueStats) -> Iterator[Metric]:
    waiting = GaugeMetricFamily("persona_queue_waiting", "Requests waiting per stream (chat, batch)", labels=["stream"])
    in_flight = GaugeMetricFamily("persona_queue_in_flight", "Requests being generated per stream (chat, batch)", labels=["stream"])
    oldest = GaugeMetricFamily("persona_queue_oldest_waiting_seconds", "Age of the oldest waiting request", labels=["stream"])
    # Not taken yet and no longer wanted: not waiting work (a worker discards them).
    withdrawn = GaugeMetricFamily(
        "persona_queue_withdrawn", "Requests not taken yet whose callers withdrew them, per stream", labels=["stream"]
    )
    expired = GaugeMetricFamily(
        "persona_queue_expired", "Requests not taken yet whose deadline has passed, per stream", labels=["stream"]
    )
    for s in stats.streams:  # labelled chat and batch, as people call them, not by Redis key
        waiting.add_metric([s.label], s.waiting)
        in_flight.add_metric([s.label], s.in_flight)
        oldest.add_metric([s.label], s.oldest_waiting_s)
        withdrawn.add_metric([s.label], s.withdrawn)
        expired.add_metric([s.label], s.expired)
    yield from (waiting, in_flight, oldest, withdrawn, expired)
    yield GaugeMetricFamily("persona_dead_letters", "Requests in the dead-letter stream", value=stats.dead_letters)
    # A gauge, not a counter: it is worked out from other counts, which a moment's race
    # can leave one low, and a counter that dips reads as a reset.
    # Every one ever, a clean-up too: what the page and the CLI still warn of is the part
    # since the stream was last emptied (QueueStats.dead_letters_trimmed_since_cleared).
    yield GaugeMetricFamily(
        "persona_dead_letters_trimmed", "Dead letters deleted unseen at the stream's cap (never retried or dropped)",
        value=stats.dead_letters_trimmed,
    )
    yield GaugeMetricFamily("persona_stuck_requests", "Requests in flight past their deadline or held by a dead worker", value=len(stats.stuck))


def _reply_families(stats: QueueStats, served: dict[str, str]) -> Iterator[Metric]:
    replies = CounterMetricFamily("persona_replies", "Replies with text, per persona version", labels=["persona", "version"])
    for key, value in sorted(stats.version_replies.items()):
        persona, _, version = key.partition("@")
        replies.add_metric([persona, version], value)
    yield replies
    errors = CounterMetricFamily(
        "persona_request_errors", "Requests answered with an error, by kind (neither withdrawn nor expired)", labels=["kind"]
    )
    for name, value in sorted(stats.counters.items()):
        if name.startswith("failed:"):
            errors.add_metric([name.removeprefix("failed:")], value)
    yield errors
    yield CounterMetricFamily("persona_requests_withdrawn", "Requests discarded because their callers withdrew them",
                              value=stats.withdrawn)
    yield CounterMetricFamily("persona_requests_expired", "Requests whose deadline passed before they were generated",
                              value=stats.expired)
    yield CounterMetricFamily("persona_tokens_generated", "Tokens generated", value=stats.counters.get("tokens", 0))
    yield CounterMetricFamily("persona_requests_completed", "Requests answered with text", value=stats.completed)
    # Every persona, not only those swapped at least once: a panel or an alert on a
    # persona's version found nothing until its first swap.
    active = GaugeMetricFamily(
        "persona_active_version", "1 for the version each persona serves (base when never swapped)",
        labels=["persona", "version"],
    )
    for persona, version in sorted(served.items()):
        active.add_metric([persona, version], 1)
    yield active


def _worker_families(stats: QueueStats) -> Iterator[Metric]:
    up = GaugeMetricFamily("persona_worker_up", "1 for each worker with a live heartbeat", labels=["worker", "host", "device"])
    # In bytes, Prometheus's base unit (it was megabytes, which no byte-formatting panel reads right).
    memory = GaugeMetricFamily(
        "persona_worker_peak_resident_memory_bytes", "Peak resident memory of each worker", labels=["worker"]
    )
    loaded = GaugeMetricFamily("persona_worker_persona_version", "1 for each persona version a worker serves", labels=["worker", "persona", "version"])
    for w in stats.workers:
        up.add_metric([w.id, w.host, w.device], 1)
        memory.add_metric([w.id], w.memory_mb * BYTES_PER_MB)
        for persona, version in sorted(w.personas.items()):
            loaded.add_metric([w.id, persona, version], 1)
    # Apart from persona_worker_up: a worker loading its models serves nothing yet.
    starting = GaugeMetricFamily(
        "persona_worker_starting_seconds", "How long each worker still loading its models has been starting",
        labels=["worker", "host", "device"],
    )
    for w in stats.starting_workers:
        starting.add_metric([w.id, w.host, w.device], w.loading_s)
    yield from (up, memory, loaded, starting)


def _personas(settings: Settings, stats: QueueStats) -> list[dict]:
    found, _ = PersonaRegistry.from_settings(settings).scan()
    served = served_versions(found, stats.active_versions)
    rows = []
    for name, persona in sorted(found.items()):
        active = served[name]
        # Unreadable versions are left out quietly: the page asks every two seconds, and
        # `persona checkpoints` names them.
        readable, _ = scan_checkpoints(settings.checkpoints_dir, name)
        versions = [c.version for c in readable]
        rows.append({"name": name, "base": persona.model.base, "active": active, "versions": versions})
    return rows


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


def create_app(settings: Settings, client: redis.Redis, host: str | None = None) -> FastAPI:
    """The dashboard app, reading from ``client``, served on ``host`` (default: the setting)."""
    history: deque[dict] = deque(maxlen=HISTORY_POINTS)
    token = settings.dashboard.token.get_secret_value() if _has_token(settings) else None
    watch = RedisWatch(secrets_of(settings))

    def sample() -> dict:
        with _reading():
            return _sample(collect_stats(client))

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
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=_allowed_hosts(settings, host or settings.dashboard.host))
    posts = PostsToSettle(client)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(client, watch, settings, posts))
    guard = [Depends(authorized)]

    @app.exception_handler(redis.exceptions.RedisError)
    async def redis_down(_: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        # 503, not a bare 500 the page read as "cannot reach the dashboard".
        return JSONResponse({"detail": watch.failed(exc)}, status_code=503)

    @app.get("/", response_class=HTMLResponse, dependencies=guard)
    def page() -> str:
        return PAGE_HTML

    @app.get("/api/stats", dependencies=guard)
    def stats() -> JSONResponse:
        with _reading():
            figures = collect_stats(client)
            dead = list_dead(client, count=50)
            to_settle = posts()
        watch.read()
        if not history or time.time() - history[-1]["t"] >= 1.0:
            history.append(_sample(figures))
        return JSONResponse({
            "stats": figures.model_dump(mode="json"),
            "history": list(history),
            "personas": _personas(settings, figures),
            "dead": [d.model_dump(mode="json", exclude={"payload"}) for d in dead],
            "posts_to_settle": to_settle,
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

    @app.get("/metrics", dependencies=guard)
    def metrics() -> Response:
        with _reading():
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # The probes are async, on no worker thread: page reads and scrapes that wait on a
    # silent Redis can hold every one, and the probes must still answer.
    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the dashboard answers (Redis or not)."""
        return {"ok": True}

    probe = _probe_client(client)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 when Redis can be read, else 503 with the reason."""
        try:
            # On asyncio's own threads (the sampler's), not the page's: tried once, briefly.
            await asyncio.to_thread(probe.exists, keys.STATS_KEY)  # a read of a key, as the page's figures are
        except redis.exceptions.RedisError as exc:
            return JSONResponse({"ready": False, "detail": watch.failed(exc)}, status_code=503)
        watch.read()
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
    listening: socket.socket | None = None,
) -> None:
    """Run the dashboard until Ctrl-C or SIGTERM, on ``listening`` (from ``bind``) or a socket bound now."""
    import uvicorn

    listening = listening or bind(settings, host, port)
    bound_host, bound_port = listening.getsockname()[:2]
    log.info("dashboard on %s", http_address(bound_host, bound_port))
    app = create_app(settings, client, host or settings.dashboard.host)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])
