"""Logging set-up, with every secret from the settings scrubbed from every line."""

from __future__ import annotations

import logging
import re

from pydantic import SecretStr

from persona.settings import Settings

__all__ = ["RedactingFilter", "secrets_of", "setup_logging"]

REDACTED = "***"
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
                if "@" in secret and "://" in secret:  # a URL with a password
                    found.append(secret.split("://", 1)[1].rsplit("@", 1)[0])
        elif hasattr(value, "__pydantic_fields__"):
            for name in type(value).__pydantic_fields__:
                walk(getattr(value, name))

    walk(settings)
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


class RedactingFilter(logging.Filter):
    """Replaces secrets in a record's final message before any handler writes it."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = BOT_TOKEN_IN_URL.sub("/bot" + REDACTED, message)
        for secret in self.secrets:
            cleaned = cleaned.replace(secret, REDACTED)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup_logging(settings: Settings, *, level: str | None = None) -> None:
    """One log format for every process; secrets never reach a handler."""
    root = logging.getLogger()
    root.setLevel(level or settings.log_level)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(secrets_of(settings)))
    root.handlers[:] = [handler]
    for noisy in ("httpx", "httpcore", "urllib3", "discord.http", "telegram.ext"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
