"""Logging set-up, with every secret from the settings scrubbed from every line."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TextIO
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit, urlunsplit

from pydantic import SecretStr

from persona.settings import Settings

__all__ = ["RedactingFormatter", "describe_url", "hide_secrets", "secrets_of", "setup_logging", "url_secrets"]

REDACTED = "***"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Telegram puts the token in its URLs (…/bot123:ABC/getUpdates); hide any such token.
BOT_TOKEN_IN_URL = re.compile(r"/bot\d+:[A-Za-z0-9_-]+")
# The query options of a Redis URL that hold a secret (redis-py reads ``password`` as the
# password when the URL has none before its @; ``ssl_password`` unlocks a TLS key).
SECRET_URL_OPTIONS = ("password", "ssl_password")


def _secret_option(piece: str) -> bool:
    """Whether a query piece names a password, as redis-py reads it: its name decoded
    (``pass%77ord=`` is ``password=`` to redis-py, and was shown as written)."""
    return unquote_plus(piece.partition("=")[0]).lower() in SECRET_URL_OPTIONS


def describe_url(url: str) -> str:
    """A URL as every log line, error and banner shows it: its passwords (before the @, and
    ``password=``/``ssl_password=`` in its query) as ``***``, the user name kept. A user name
    with no password is hidden too (``redis://SECRET@host`` is a password with its colon
    left out), unless the query gives the password."""
    parts = urlsplit(url)
    pieces = parts.query.split("&") if parts.query else []
    userinfo, at, host = parts.netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        named = colon or any(unquote_plus(p.partition("=")[0]).lower() == "password" for p in pieces)
        userinfo = f"{user}:{REDACTED}" if user and colon else user if user and named else REDACTED
    query = "&".join(f"{p.partition('=')[0]}={REDACTED}" if _secret_option(p) else p for p in pieces)
    shown = urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}", query=query))
    # urlunsplit drops the // of an address with no host (unix:///tmp/r.sock): kept as given.
    if f"{parts.scheme}://" in url and f"{parts.scheme}://" not in shown:
        shown = shown.replace(f"{parts.scheme}:", f"{parts.scheme}://", 1)
    return shown


def url_secrets(url: str) -> set[str]:
    """Every secret ``url`` holds, as written and decoded: what ``describe_url`` hides, for
    hiding them in text that quotes them apart from the URL (a server's error)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    found = {value for name, value in query if name.lower() in SECRET_URL_OPTIONS}
    found |= {value for name, value in re.findall(r"([^&=]+)=([^&]*)", parts.query) if name.lower() in SECRET_URL_OPTIONS}
    userinfo, at, _ = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if colon:
        found |= {password, unquote(password)}
    elif at and not any(name.lower() == "password" for name, _ in query):
        found |= {user, unquote(user)}
    return found - {""}


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the settings hold (tokens, passwords, the Redis URL)."""
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            if secret:
                found.append(secret)
                if "://" in secret:  # a URL: its password alone may be logged too
                    found.extend(url_secrets(secret))
        elif hasattr(value, "__pydantic_fields__"):
            for name in type(value).__pydantic_fields__:
                walk(getattr(value, name))

    walk(settings)
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def hide_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every one of ``secrets`` in it as ``***``, the longest first (a password
    as written holds its decoded form, or another secret, whole)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then hides every secret, tracebacks included."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return hide_secrets(BOT_TOKEN_IN_URL.sub("/bot" + REDACTED, super().format(record)), self.secrets)


def setup_logging(settings: Settings, *, level: str | None = None, stream: TextIO | None = None) -> None:
    """One log format for every process; secrets never reach a handler. Lines go to
    ``stream`` (default: stderr)."""
    root = logging.getLogger()
    root.setLevel((level or settings.log_level).upper())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(LOG_FORMAT, secrets_of(settings)))
    root.handlers[:] = [handler]
    for noisy in ("httpx", "httpcore", "urllib3", "discord.http", "telegram.ext"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
