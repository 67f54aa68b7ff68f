"""Logging set-up, with every secret from the settings scrubbed from every line."""

from __future__ import annotations

import logging
import re
from typing import TextIO
from urllib.parse import urlsplit

from pydantic import SecretStr

from persona.settings import Settings

__all__ = ["RedactingFormatter", "secrets_of", "setup_logging"]

REDACTED = "***"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Telegram puts the token in its URLs (…/bot123:ABC/getUpdates); hide any such token.
BOT_TOKEN_IN_URL = re.compile(r"/bot\d+:[A-Za-z0-9_-]+")


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the settings hold (tokens, passwords, the Redis URL)."""
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            if secret:
                found.append(secret)
                if "://" in secret:  # a URL: its password alone may be logged too
                    password = urlsplit(secret).password
                    if password:
                        found.append(password)
        elif hasattr(value, "__pydantic_fields__"):
            for name in type(value).__pydantic_fields__:
                walk(getattr(value, name))

    walk(settings)
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then hides every secret, tracebacks included."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        text = BOT_TOKEN_IN_URL.sub("/bot" + REDACTED, super().format(record))
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


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
