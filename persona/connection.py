"""Finding and connecting to Redis: the configured URL, or the embedded server."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
import redis.connection
from redis.backoff import AbstractBackoff, ExponentialBackoff
from redis.retry import Retry

from persona.embedded_following import following_options
from persona.embedded_locks import served_on
from persona.embedded_record import recorded_url
from persona.embedded_redis import find_embedded_url, server_pid
from persona.errors import ConfigError, PersonaError, RedisUnavailable
from persona.logs import REDACTED, describe_url, url_secrets
from persona.settings import Settings

__all__ = [
    "acl_advice", "check_permissions", "connect", "connect_async", "full_redis_text", "is_full", "not_ready", "redis_url",
    "refusal_text", "retrying_until", "size_text", "unchecked_client", "user_of",
]

RETRIES = 8
# How long a connection may take to open, and a reply to come: a host that drops packets
# (a firewall, a machine gone) is "cannot reach Redis" after this, not after the OS's
# minutes. Said outright, as redis-py before 8 waits forever by default. No call waits
# longer on purpose: a caller's BLMOVE and a worker's XREADGROUP block for 2 s at most.
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 5.0
# BLMOVE, which callers read their replies with, came in Redis 6.2.
OLDEST_REDIS = (6, 2)
NEWER_REDIS = "the official redis:7 image, or `persona up`'s embedded one"
# How long a command waits for an embedded Redis that runs but does not answer yet (loading
# a large data set after a restart, or starting) before it says so.
EMBEDDED_WAIT_S = 5.0
BYTES_PER_MB = 1 << 20


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


def _check_version(info: dict, url: str) -> None:
    """Refuse a Redis too old for the queue, saying which one is needed. A setting to
    change, not an outage: waiting for it to answer again cannot help."""
    version = str(info.get("redis_version", ""))
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return  # a server that names its version otherwise (a Redis-compatible one): let it try
    if found < OLDEST_REDIS:
        raise ConfigError(
            f"Redis at {describe_url(url)} is version {version}; persona needs "
            f"{'.'.join(map(str, OLDEST_REDIS))} or newer ({NEWER_REDIS})"
        )


# What persona runs, and on which keys: every key it uses starts with persona: (no pub/sub
# channel). INFO is @dangerous, but lets it warn of a Redis that may delete its keys.
ACL_RULES = "~persona:* +@all -@dangerous +info"
# A key no one writes: a stream read through a group it does not have answers NOGROUP, once
# the user's ACL has let the command run on it.
ACL_PROBE_KEY = "persona:acl-probe"


def user_of(url: str) -> str:
    """The Redis user ``url`` connects as (``default`` where it names none)."""
    return redis.connection.parse_url(url).get("username") or "default"


def acl_advice(user: str) -> str:
    """What a Redis user needs for persona, as the ACL line that grants it."""
    return (f"persona needs scripting (EVAL, EVALSHA, SCRIPT LOAD), streams, lists and hashes on keys persona:*; "
            f"grant it with `ACL SETUSER {user} reset on >PASSWORD {ACL_RULES}` (in redis.conf or users.acl: "
            f"`user {user} on >PASSWORD {ACL_RULES}`)")


def check_permissions(client: redis.Redis, url: str) -> None:
    """Refuse, as a ConfigError naming the user and the rules it needs, a Redis user whose ACL
    denies what persona runs (scripts; streams on persona:* keys): a worker found out only
    after loading every model. Run by long-running services as they start."""
    try:
        client.eval("return 1", 0)
        client.evalsha(client.script_load("return 1"), 0)
        try:
            client.xreadgroup("persona-acl-probe", "probe", {ACL_PROBE_KEY: ">"}, count=1)
        except redis.exceptions.NoPermissionError:
            raise
        except redis.exceptions.ResponseError:  # NOGROUP: the ACL let it run, and nothing was read
            pass
    except redis.exceptions.NoPermissionError as exc:
        raise ConfigError(
            f"Redis at {describe_url(url)} refuses user {user_of(url)!r} what persona needs "
            f"({_without_password(str(exc).rstrip('.'), url)}): {acl_advice(user_of(url))}"
        ) from None


def full_redis_text(max_bytes: int | None = None) -> str:
    """What a Redis at its maxmemory (under noeviction) means for persona, and what to do."""
    limit = f" {size_text(max_bytes)}" if max_bytes else ""
    return (f"Redis is full (maxmemory{limit} reached): nothing new can be queued; "
            "free memory or raise maxmemory (`CONFIG SET maxmemory ...`)")


def size_text(count: int) -> str:
    """A size in bytes as people read it: ``6.1 MB``, ``1.0 GB``, or under a MB, ``512 bytes``."""
    if count >= 1 << 30:
        return f"{count / (1 << 30):.1f} GB"
    return f"{count / BYTES_PER_MB:.1f} MB" if count >= BYTES_PER_MB else f"{count} bytes"


def refusal_text(exc: redis.exceptions.RedisError, *, user: str = "default", max_bytes: int | None = None) -> str | None:
    """What Redis refusing a command means where it is a state of Redis's to fix, not a fault:
    full (OOM; ``max_bytes``, its maxmemory, where known), ``user`` denied the command by its
    ACL (NOPERM), unable to save (MISCONF), a read-only replica; None for any other failure.
    (It quotes Redis's words: the caller hides any secret in them.)"""
    said = str(exc).rstrip(".")
    if isinstance(exc, redis.exceptions.NoPermissionError) or _said(said, "NOPERM"):
        return f"Redis refuses user {user!r} a command ({said}): {acl_advice(user)}"
    if is_full(exc):
        return full_redis_text(max_bytes)
    if _said(said, "MISCONF"):  # it refuses every write, PING too, until it can save again
        return (f"Redis cannot write its data to disk (full, or not writable), so it refuses every change until it can "
                f"({said}); free space or fix its folder's permissions: its log says which")
    if isinstance(exc, redis.exceptions.ReadOnlyError) or _said(said, "READONLY"):
        return f"Redis is a read-only replica, which refuses every change ({said}); point PERSONA_REDIS_URL at its primary"
    return None


def is_full(exc: redis.exceptions.RedisError) -> bool:
    """Whether Redis refused for want of memory (maxmemory reached under noeviction): in its own
    words, or quoted in a script's error (``... -OOM command not allowed ...``)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or _said(str(exc), "OOM")


def _said(text: str, code: str) -> bool:
    """Whether ``text`` holds Redis's error ``code`` (as a script's error quotes it: ``-OOM ...``)."""
    return re.search(rf"(?<![A-Za-z]){code} ", text) is not None


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


def _options(url: str) -> dict:
    # Reconnect with backoff: a restarted Redis costs callers a pause, not an error.
    options = _timeouts() | {
        "retry": _Retry(_backoff(), RETRIES),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        "health_check_interval": 15,
    }
    if not url.startswith("unix:"):  # TCP keepalive; a unix socket has none (redis-py refuses the option)
        options["socket_keepalive"] = True
    return options


def _refusal(exc: redis.exceptions.RedisError, url: str, *, chosen: bool) -> PersonaError:
    """What a failed first contact tells the user. A refused password, or a session Redis
    will not open (a database number it does not have), is a setting to fix (a caller that
    waits for Redis to come back would wait forever); anything else is Redis not
    answering: the one PERSONA_REDIS_URL names (``chosen``), or the embedded one.
    (redis-py's asyncio client wraps the refusal in a plain ConnectionError.)"""
    said = _without_password(str(exc).rstrip("."), url)
    if any(isinstance(e, redis.exceptions.AuthenticationError) for e in (exc, exc.__cause__)):
        if not redis.connection.parse_url(url).get("password"):  # as redis-py reads it: before the @, or ?password=
            return ConfigError(f"Redis at {describe_url(url)} wants a password, and PERSONA_REDIS_URL gives none: "
                               "redis://:PASSWORD@HOST:PORT/0")
        return ConfigError(f"Redis at {describe_url(url)} refused the password: {said}. "
                           "Check the password in PERSONA_REDIS_URL")
    if isinstance(exc, redis.exceptions.ResponseError) and _NO_HELLO.search(said):
        # Its words quote the greeting back, password and all: not repeated.
        return ConfigError(f"Redis at {describe_url(url)} is too old: it does not know HELLO, which came in "
                           f"Redis 6; persona needs {'.'.join(map(str, OLDEST_REDIS))} or newer ({NEWER_REDIS})")
    if isinstance(exc, redis.exceptions.ResponseError):
        return ConfigError(f"Redis at {describe_url(url)} refused the session PERSONA_REDIS_URL asks for: {said}. "
                           "Check the URL's database number (/0 is always there) and user")
    tls = _tls_refusal(said, url)
    if tls is not None:
        return tls
    if url.startswith("rediss://"):
        hint = " (rediss:// is TLS: does that port speak it?)"
    elif any(words in said for words in _PLAIN_TO_TLS):
        hint = " (a Redis that speaks only TLS closes plain connections: if it does, the URL is rediss://)"
    else:
        hint = ""
    if chosen:  # `persona up` starts only the embedded Redis, not this one
        advice = ("Check that the Redis at that address is running and can be reached from here, "
                  "or unset PERSONA_REDIS_URL to use the embedded one (`persona up` starts it)")
    else:
        advice = "Is it running? `persona up` starts one; PERSONA_REDIS_URL points elsewhere"
    return RedisUnavailable(f"cannot reach Redis at {describe_url(url)}: {said}{hint}. {advice}")


# What a Redis older than 6 answers the greeting with ("unknown command `HELLO`, with args
# beginning with: ..."; before 5, quoted 'HELLO').
_NO_HELLO = re.compile(r"unknown command [`']HELLO[`']", re.IGNORECASE)


def _without_password(said: str, url: str) -> str:
    """A server's words with the URL's password hidden: an error quoting the greeting
    back (a Redis older than 6 does) would show it in a log or a terminal."""
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        said = said.replace(secret, REDACTED)
    return said


# What a plain connection to a TLS port meets once its first command is sent.
_PLAIN_TO_TLS = ("Connection reset by peer", "Connection closed by server")
# The files a rediss:// URL may name, and what each is.
_TLS_FILES = {"ssl_ca_certs": "CA certificate", "ssl_certfile": "client certificate", "ssl_keyfile": "client key"}


def _tls_refusal(said: str, url: str) -> ConfigError | None:
    """A TLS handshake that failed for a setting to fix (a file the URL names is missing,
    the server's certificate is not trusted or names another host): waiting for Redis
    cannot help, and "is it running?" sent people looking in the wrong place."""
    if not url.startswith("rediss://"):
        return None
    where = describe_url(url)
    query = parse_qs(urlparse(url).query)
    for option, what in _TLS_FILES.items():
        for path in query.get(option, []):
            if not Path(path).is_file():
                return ConfigError(f"the {what} file that PERSONA_REDIS_URL names ({option}={path}) "
                                   f"does not exist; fix the path in the URL ({where})")
    if "CERTIFICATE_VERIFY_FAILED" not in said:
        return None
    if "mismatch" in said:
        return ConfigError(
            f"Redis at {where} has a TLS certificate for another name: {said}. Put the host name "
            "the certificate names in PERSONA_REDIS_URL (an IP address rarely is one), or add "
            "ssl_check_hostname=false to its query (…/0?ssl_check_hostname=false)"
        )
    return ConfigError(
        f"Redis at {where} has a TLS certificate this machine does not trust: {said}. Name the "
        "CA certificate that signed it in PERSONA_REDIS_URL (rediss://HOST:PORT/0?ssl_ca_certs="
        "/path/to/ca.pem), or skip the check: ssl_cert_reqs=none in its query"
    )


# What first contact can fail with: refused, not answering (a TLS URL for a plain port
# times out), or a session refused (a database number it does not have).
FIRST_CONTACT_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError)


def connect(settings: Settings, *, url: str | None = None) -> redis.Redis:
    """A checked connection to the service's Redis. One to the embedded Redis follows it to
    the address it records, should it come back on another."""
    url = url or redis_url(settings)
    try:
        # One quick try first: a user with Redis down hears so at once, not after backoff.
        with redis.Redis.from_url(url, **_timeouts()) as probe:
            info = _server_info(probe.info, probe.ping)
    except FIRST_CONTACT_ERRORS as exc:
        raise _refusal(exc, url, chosen=settings.redis_url is not None) from None
    _check_version(info, url)
    return unchecked_client(settings, url)


def unchecked_client(settings: Settings, url: str | None = None) -> redis.Redis:
    """The client ``connect`` returns (its retries and timeouts, following the embedded Redis),
    without the first contact: redis-py connects at its first command. For a service that
    serves while Redis is out of reach (the dashboard, whose /readyz says so)."""
    url = url or redis_url(settings)
    return redis.Redis.from_url(url, **_options(url), **following_options(settings, url, asynchronous=False))


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
        raise _refusal(exc, url, chosen=settings.redis_url is not None) from None
    finally:
        await probe.aclose()
    _check_version(info, url)
    options = _options(url) | {"retry": _AsyncRetry(_backoff(), RETRIES)}
    following = following_options(settings, url, asynchronous=True)
    if not following:
        return redis.asyncio.Redis.from_url(url, **options)
    # Built as from_url builds it, but with the following connection class: the asyncio
    # from_url puts its own unix socket class over the one it is given.
    pool = redis.asyncio.ConnectionPool(**(options | redis.asyncio.connection.parse_url(url) | following))
    return redis.asyncio.Redis.from_pool(pool)
