"""Finding and connecting to Redis: the configured URL, or the embedded server.

What a refusal at first contact tells the user (a password, a Redis too old, TLS) is
worded in ``redis_refusals``; a TLS file the URL names that holds no certificate or key, here.
"""

from __future__ import annotations

import contextlib
import resource
import ssl
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
from redis.backoff import AbstractBackoff, ExponentialBackoff
from redis.retry import Retry

from persona.embedded_following import following_options
from persona.embedded_locks import served_on
from persona.embedded_record import recorded_url
from persona.embedded_redis import find_embedded_url, server_pid
from persona.errors import ConfigError, PersonaError, RedisUnavailable
from persona.logs import describe_url
from persona.redis_refusals import _check_version, _refusal
from persona.settings import QueueSettings, Settings

__all__ = ["connect", "connect_async", "not_ready", "redis_url", "retrying_until", "unchecked_client"]

RETRIES = 8
# How long a connection may take to open, and a reply to come: a host that drops packets
# (a firewall, a machine gone) is "cannot reach Redis" after this, not after the OS's
# minutes. Said outright, as redis-py before 8 waits forever by default. No call waits
# longer on purpose: a caller's BLMOVE and a worker's XREADGROUP block for 2 s at most.
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 5.0
# How long a command waits for an embedded Redis that runs but does not answer yet (loading
# a large data set after a restart, or starting) before it says so.
EMBEDDED_WAIT_S = 5.0
# A caller waiting for its reply holds one of its client's connections (its BLMOVE), so a client
# has one for every request both streams can hold (``max_length`` each), and this many more for
# all else that goes on at once (python-telegram-bot handles 256 updates at once). redis-py's own
# pool has 100: the 101st caller of a bot was refused ("Too many connections") and told the
# service was restarting, with the queue 900 requests short of full.
OTHER_CALLS_AT_ONCE = 256
# Open files a process keeps for all but its Redis connections (models, logs, a platform's API).
OTHER_OPEN_FILES = 256
# The fewest connections a client is given, whatever the limit on open files (redis-py's own pool).
MIN_CONNECTIONS = 100


def redis_url(settings: Settings) -> str:
    """The configured Redis URL, or the embedded one that `persona up` started: waited for
    a few seconds while it loads its data, or while a process serving on it starts it
    again (it died)."""
    if settings.redis_url is not None:
        return settings.redis_url.get_secret_value()
    data_dir = settings.data_dir
    deadline = time.monotonic() + EMBEDDED_WAIT_S
    while (url := find_embedded_url(data_dir)) is None:
        pid = server_pid(data_dir)
        if pid is None and not served_on(data_dir):
            raise RedisUnavailable(
                f"no Redis is running for data directory {data_dir}: start the "
                "service with `persona up` (it starts an embedded Redis), or set "
                "PERSONA_REDIS_URL to a running Redis"
            )
        if time.monotonic() >= deadline:
            raise RedisUnavailable(not_ready(data_dir, pid) if pid is not None else _not_back(data_dir))
        time.sleep(0.2)
    return url


def _not_back(data_dir: Path) -> str:
    """Why there is no embedded Redis, though a process serves on ``data_dir``: it died, and
    was not started again in time."""
    log_file = data_dir.absolute() / "redis" / "redis.log"
    return (f"the embedded Redis of data directory {data_dir} is not running, and the service using it "
            f"(`persona up`, or a `persona worker` or `dashboard`) has not started it again within "
            f"{EMBEDDED_WAIT_S:.0f} s; see that service's log, and Redis's, {log_file}")


def not_ready(data_dir: Path, pid: int) -> str:
    """Why the embedded Redis that runs on ``data_dir``'s files does not answer: loading its
    data (for how long so far), or starting or stuck."""
    url = recorded_url(data_dir)
    if url:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        with client, contextlib.suppress(redis.exceptions.RedisError):
            info = client.info("persistence")  # answered while loading, saying since when
            if info.get("loading"):
                since_s = max(0.0, time.time() - float(info.get("loading_start_time", time.time())))
                return (f"the embedded Redis of data directory {data_dir} is loading its data "
                        f"({since_s:.0f} s so far); try again in a moment")
    log_file = data_dir.absolute() / "redis" / "redis.log"
    return (f"the embedded Redis{f' (pid {pid})' if pid else ''} of data directory {data_dir} runs but has not "
            f"answered for {EMBEDDED_WAIT_S:.0f} s (starting, or stuck); try again in a moment, and if it goes on, "
            f"see its log, {log_file}")


def _server_info(info, ping) -> dict:
    """What Redis says about itself; {} for a user its ACL denies INFO (managed Redis often
    does), whose Redis is then only pinged and its version left unchecked."""
    try:
        return info("server")
    except redis.exceptions.ResponseError:
        ping()
        return {}


# When the calls made in this context must have given up (time.monotonic()), or None.
_GIVE_UP_AT: ContextVar[float | None] = ContextVar("persona_redis_give_up_at", default=None)


@contextlib.contextmanager
def retrying_until(give_up_at: float) -> Iterator[None]:
    """Within this block, redis-py's reconnects end by ``give_up_at`` (time.monotonic()): no
    backoff sleeps past it, and a call that fails after it raises at once. Its 8 reconnects
    with backoff take about 9 s, which a caller's deadline (``persona ask --timeout 5``)
    should not wait out. (Only clients made by ``connect`` and ``connect_async``.)"""
    token = _GIVE_UP_AT.set(give_up_at)
    try:
        yield
    finally:
        _GIVE_UP_AT.reset(token)


class _UntilGiveUp(AbstractBackoff):
    """A backoff that never sleeps past the give-up time ``retrying_until`` sets."""

    def __init__(self, backoff: AbstractBackoff) -> None:
        self.backoff = backoff

    def reset(self) -> None:
        self.backoff.reset()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _UntilGiveUp) and self.backoff == other.backoff

    def __hash__(self) -> int:
        return hash(self.backoff)

    def compute(self, failures: int) -> float:
        pause = self.backoff.compute(failures)
        give_up_at = _GIVE_UP_AT.get()
        return pause if give_up_at is None else max(0.0, min(pause, give_up_at - time.monotonic()))


def _given_up() -> bool:
    give_up_at = _GIVE_UP_AT.get()
    return give_up_at is not None and time.monotonic() >= give_up_at


class _Retry(Retry):
    """redis-py's Retry, ending by the give-up time of ``retrying_until``."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        if _GIVE_UP_AT.get() is None:  # outside retrying_until: redis-py's own
            return super().call_with_retry(do, fail, is_retryable, with_failure_count)

        def failed(error: Exception, failures: int) -> None:
            fail(error, failures) if with_failure_count else fail(error)
            if _given_up():
                raise error

        return super().call_with_retry(do, failed, is_retryable, with_failure_count=True)


class _AsyncRetry(redis.asyncio.retry.Retry):
    """The asyncio client's Retry, ending by the give-up time of ``retrying_until``."""

    async def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        if _GIVE_UP_AT.get() is None:
            return await super().call_with_retry(do, fail, is_retryable, with_failure_count)

        async def failed(error: Exception, failures: int) -> None:
            await (fail(error, failures) if with_failure_count else fail(error))
            if _given_up():
                raise error

        return await super().call_with_retry(do, failed, is_retryable, with_failure_count=True)


def _backoff() -> AbstractBackoff:
    return _UntilGiveUp(ExponentialBackoff(cap=2.0, base=0.05))


def _timeouts() -> dict:
    return {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S}


def _connections_for(queue: QueueSettings) -> int:
    """How many connections a client may open: one for every caller the queue can keep waiting,
    and room for everything else (``OTHER_CALLS_AT_ONCE``); within the files the process may
    open (``_room_for``). Past them a call fails with MaxConnectionsError: "busy", not an outage."""
    return _room_for(2 * queue.max_length + OTHER_CALLS_AT_ONCE)


def _room_for(connections: int) -> int:
    """How many of ``connections`` the process can open beside its other files: its soft limit on
    open files is raised to fit them, as far as its hard limit allows (the soft limit is often
    1024, which a bot's thousand waiting callers would pass: "Too many open files", an outage)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + OTHER_OPEN_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY:
        return connections
    return max(MIN_CONNECTIONS, min(connections, soft - OTHER_OPEN_FILES))


def _options(url: str, queue: QueueSettings) -> dict:
    # Reconnect with backoff: a restarted Redis costs callers a pause, not an error.
    options = _timeouts() | {
        "retry": _Retry(_backoff(), RETRIES),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        "health_check_interval": 15,
        "max_connections": _connections_for(queue),
    }
    if not url.startswith("unix:"):  # TCP keepalive; a unix socket has none (redis-py refuses the option)
        options["socket_keepalive"] = True
    return options


# What first contact can fail with: refused, not answering (a TLS URL for a plain port
# times out), or a session refused (a database number it does not have).
FIRST_CONTACT_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError)


def _first_contact_refusal(exc: redis.exceptions.RedisError, url: str, *, chosen: bool) -> PersonaError:
    """What a failed first contact tells the user (``_refusal``), but first a TLS file the URL
    names that is there but is not what it must be: ssl's words for a CA file holding no
    certificate ("no certificate or crl found") came with "rediss:// is TLS: does that port
    speak it?", though the port did and the file was the fault."""
    return _unusable_tls_file(url) or _refusal(exc, url, chosen=chosen)


def _unusable_tls_file(url: str) -> ConfigError | None:
    """A file that a rediss:// URL names and that ssl cannot use: a CA file (``ssl_ca_certs``)
    with no CA certificate in it, a client certificate and key (``ssl_certfile``,
    ``ssl_keyfile``) that are no PEM, or not a pair. None if each is usable, or missing
    (``_refusal`` says that), or the URL is not TLS."""
    if not url.startswith("rediss://"):
        return None
    query = {name: values[0] for name, values in parse_qs(urlparse(url).query).items()}
    where = describe_url(url)
    context = ssl.create_default_context()
    ca_file = query.get("ssl_ca_certs")
    if ca_file and Path(ca_file).is_file():
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            return ConfigError(
                f"the file that ssl_ca_certs names in PERSONA_REDIS_URL ({ca_file}) holds no CA certificate "
                f"({exc.reason or exc}): name the PEM file of the CA that signed Redis's certificate ({where})"
            )
    cert_file, key_file = query.get("ssl_certfile"), query.get("ssl_keyfile")
    if cert_file and Path(cert_file).is_file() and (key_file is None or Path(key_file).is_file()):
        password = query.get("ssl_password")
        try:  # a callable password: an encrypted key without one never prompts on the terminal
            context.load_cert_chain(cert_file, key_file, password=lambda: password or "")
        except ssl.SSLError as exc:
            said = ("do not belong together: the key is not the certificate's" if exc.reason == "KEY_VALUES_MISMATCH"
                    else "cannot be read as a PEM certificate and key (or the key is encrypted, and ssl_password "
                    "in the query is not its password)")
            return ConfigError(
                f"the files that ssl_certfile and ssl_keyfile name in PERSONA_REDIS_URL ({cert_file}, {key_file or cert_file}) "
                f"{said} ({exc.reason or exc}); fix them in the URL ({where})"
            )
    return None


def connect(settings: Settings, *, url: str | None = None) -> redis.Redis:
    """A checked connection to the service's Redis. One to the embedded Redis follows it to
    the address it records, should it come back on another."""
    url = url or redis_url(settings)
    try:
        # One quick try first: a user with Redis down hears so at once, not after backoff.
        with redis.Redis.from_url(url, **_timeouts()) as probe:
            info = _server_info(probe.info, probe.ping)
    except FIRST_CONTACT_ERRORS as exc:
        raise _first_contact_refusal(exc, url, chosen=settings.redis_url is not None) from None
    _check_version(info, url)
    return unchecked_client(settings, url)


def unchecked_client(settings: Settings, url: str | None = None) -> redis.Redis:
    """The client ``connect`` returns (its retries and timeouts, following the embedded Redis),
    without the first contact: redis-py connects at its first command. For a service that
    serves while Redis is out of reach (the dashboard, whose /readyz says so)."""
    url = url or redis_url(settings)
    return redis.Redis.from_url(url, **_options(url, settings.queue), **following_options(settings, url, asynchronous=False))


async def connect_async(settings: Settings, *, url: str | None = None) -> redis.asyncio.Redis:
    """A checked asyncio connection to the service's Redis, probed once (and following the
    embedded Redis) as ``connect`` does."""
    url = url or redis_url(settings)
    probe = redis.asyncio.Redis.from_url(url, **_timeouts())
    try:
        try:
            info = await probe.info("server")
        except redis.exceptions.ResponseError:  # as in _server_info: INFO denied, so only ping
            await probe.ping()
            info = {}
    except FIRST_CONTACT_ERRORS as exc:
        raise _first_contact_refusal(exc, url, chosen=settings.redis_url is not None) from None
    finally:
        await probe.aclose()
    _check_version(info, url)
    options = _options(url, settings.queue) | {"retry": _AsyncRetry(_backoff(), RETRIES)}
    following = following_options(settings, url, asynchronous=True)
    if not following:
        return redis.asyncio.Redis.from_url(url, **options)
    # Built as from_url builds it, but with the following connection class: the asyncio
    # from_url puts its own unix socket class over the one it is given.
    pool = redis.asyncio.ConnectionPool(**(options | redis.asyncio.connection.parse_url(url) | following))
    return redis.asyncio.Redis.from_pool(pool)
