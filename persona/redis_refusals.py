"""What Redis refusing persona means, in words a user can act on.

At first contact (``_refusal``): a password wanted or refused, a session refused (a
database number it does not have), a Redis too old to know HELLO, a TLS setting to fix
(``_tls_refusal``), or no Redis answering at all; and a Redis older than ``OLDEST_REDIS``
(``_check_version``). Once serving (``refusal_text``): a user its ACL denies a command
(NOPERM), Redis full (OOM), unable to save (MISCONF), a read-only replica, a primary with
too few replicas in step (NOREPLICAS: ``too_few_replicas``). The ACL that
persona needs (``ACL_RULES``, ``acl_advice``) is checked as long-running services start
(``check_permissions``). A server's words are quoted with the URL's password hidden.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import redis
import redis.connection

from persona.errors import ConfigError, PersonaError, RedisUnavailable
from persona.logs import describe_url, hide_secrets, url_secrets

__all__ = [
    "acl_advice", "check_permissions", "full_redis_text", "is_full", "refusal_text", "size_text", "too_few_replicas",
    "user_of",
]

# BLMOVE, which callers read their replies with, came in Redis 6.2.
OLDEST_REDIS = (6, 2)
NEWER_REDIS = "the official redis:7 image, or `persona up`'s embedded one"
BYTES_PER_MB = 1 << 20


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
    ACL (NOPERM), unable to save (MISCONF), a read-only replica, too few replicas in step
    (NOREPLICAS); None for any other failure. (It quotes Redis's words: the caller hides any
    secret in them.)"""
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
    if too_few_replicas(exc):
        # Its words only: a script's error wraps them in its name and line ("Error running script ...").
        return (f"Redis refuses every change until enough of its replicas are in step with it, as its "
                f"min-replicas-to-write asks ({said[said.index('NOREPLICAS'):]}); it takes changes again once "
                "they catch up: bring its replicas back (`INFO replication` lists them), or lower that "
                "setting (`CONFIG SET min-replicas-to-write 0`)")
    return None


def is_full(exc: redis.exceptions.RedisError) -> bool:
    """Whether Redis refused for want of memory (maxmemory reached under noeviction): in its own
    words, or quoted in a script's error (``... -OOM command not allowed ...``)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or _said(str(exc), "OOM")


def too_few_replicas(exc: redis.exceptions.RedisError) -> bool:
    """Whether Redis refused a write for want of replicas in step with it (NOREPLICAS: fewer
    than its min-replicas-to-write answered within min-replicas-max-lag): for now, until they
    catch up. In its own words, or quoted in a script's or a pipeline's error."""
    return isinstance(exc, redis.exceptions.ResponseError) and _said(str(exc), "NOREPLICAS")


def _said(text: str, code: str) -> bool:
    """Whether ``text`` holds Redis's error ``code`` (as a script's error quotes it: ``-OOM ...``)."""
    return re.search(rf"(?<![A-Za-z]){code} ", text) is not None


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
    return hide_secrets(said, url_secrets(url))


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
