"""Where posts go: the ``Sink`` protocol, the file sink, and building sinks from their specs.

A persona file (or ``--sink``) names sinks by spec:

    x                      X (Twitter), API v2, through tweepy
    mastodon               Mastodon, through Mastodon.py
    bluesky                Bluesky, through atproto
    discord:CHANNEL_ID     a Discord channel, through discord.py with the bot's token
    telegram:CHAT_ID       a Telegram channel or chat (@name or id), through python-telegram-bot
    file:PATH              one JSON line per post; a relative PATH lives under DATA_DIR/posts

How each sink makes a retry after a crash safe is its ``retry``: ``check`` (the sink can
look for an earlier post: a file by its marker; Mastodon, Bluesky and Discord by its text
among the account's latest, since Mastodon's idempotency key and Discord's nonce are
remembered for an hour and for minutes), ``idempotent`` (the platform drops a repeat of
the same idempotency key, however late) or ``none`` (nothing can tell: the slot is marked
uncertain and left for the operator, rather than risk a double post). A sink that cannot
look (its platform down) leaves the post to a later try.

A sink raises ``SinkError`` when the platform refused the post (nothing went out), its
subclass ``SinkRateLimited`` when the refusal was only "too many requests", and
``SinkUnreachable`` when no connection to the platform could be made (so nothing was
sent, even to a sink whose retry is ``none``): the slot is then tried again at a later
tick instead of being closed as failed or uncertain. ``SinkNoAnswer`` (not a
``SinkError``) says the request went out and no answer came back: the post may be
there. Any other exception from ``post`` is read the same way, as a bug to log in full.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from persona.errors import ConfigError, PostingError, SinkError
from persona.settings import Settings

__all__ = [
    "FileSink", "Posted", "Sink", "SinkNoAnswer", "SinkRateLimited", "SinkUnreachable", "make_sink", "network_reason",
    "one_line", "one_place_twice", "parse_sink", "platform_of", "sink_place",
]

RetrySafety = Literal["check", "idempotent", "none"]
PLATFORMS = ("x", "mastodon", "bluesky", "discord", "telegram", "file")
# Errors of a connection that could not be made or went down, said by their own words ("no route to host").
NETWORK_ERRNOS = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN)
MAX_CHAINED_ERRORS = 32  # how far back ``network_reason`` looks (a chain is a handful; a cycle is cut short)


class SinkRateLimited(SinkError):
    """The platform asked us to slow down: nothing went out, and a later try may succeed."""


class SinkUnreachable(SinkError):
    """No connection to the platform could be made (refused, no such host): nothing was sent."""


class SinkNoAnswer(PostingError):
    """The request went out and no answer came back (the connection broke, a time-out, a 5xx): it may have posted."""


def one_line(exc: Exception) -> str:
    """A platform library's message on one line (tweepy puts the status and the detail on
    two), or the exception's name where it has none; for a network failure, its essence
    (see ``network_reason``) instead of the library's wall of text. A sink's own error is
    worded already (and names the address): it is kept whole."""
    said = None if isinstance(exc, PostingError) else network_reason(exc)
    return said or " ".join(str(exc).split()) or type(exc).__name__


def network_reason(exc: BaseException) -> str | None:
    """Why a connection failed, in a few words ("connection refused", "name not resolved",
    "timed out"), from the network error anywhere behind ``exc``; None if there is none.

    Each library wraps the socket's error its own way (requests in urllib3's
    ``MaxRetryError`` and ``NewConnectionError``, httpx in httpcore's, aiohttp in
    ``ClientConnectorError``), and says it in a line or three of repr: the address is in
    the sink's own message already.
    """
    chain = _chain(exc)
    for error in chain:
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
    for error in chain:
        if isinstance(error, socket.gaierror) or type(error).__name__ == "NameResolutionError":
            return "name not resolved"
    for error in chain:
        # Every library names its time-out so: requests' ConnectTimeout, urllib3's ConnectTimeoutError,
        # httpx's ConnectTimeout, python-telegram-bot's TimedOut; aiohttp's is a TimeoutError.
        if isinstance(error, TimeoutError) or re.search("Timeout|TimedOut", type(error).__name__):
            return "timed out"
    for error in chain:
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({error.verify_message})"
        if isinstance(error, ssl.SSLError):
            return f"TLS failed ({error.reason or error.strerror or error})"
        if isinstance(error, ConnectionError) or (isinstance(error, OSError) and error.errno in NETWORK_ERRNOS):
            said = error.strerror or " ".join(str(error).split()) or type(error).__name__
            return said[:1].lower() + said[1:]  # "connection reset by peer", "remote end closed connection without response"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception behind it: causes, contexts, urllib3's ``reason``, aiohttp's
    ``os_error``, the members of a group, and exceptions passed as arguments (requests')."""
    found: list[BaseException] = []
    todo = [exc]
    while todo and len(found) < MAX_CHAINED_ERRORS:
        error = todo.pop(0)
        if any(error is seen for seen in found):
            continue
        found.append(error)
        linked = [error.__cause__, error.__context__, getattr(error, "reason", None), getattr(error, "os_error", None),
                  *getattr(error, "exceptions", ()), *error.args]
        todo.extend(link for link in linked if isinstance(link, BaseException))
    return found


@dataclass
class Posted:
    """A post that a platform accepted: its id there, and a link where there is one."""

    id: str
    url: str = ""


class Sink(Protocol):
    """Somewhere a post can go."""

    spec: str
    platform: str
    retry: RetrySafety

    def post(self, text: str, marker: str) -> Posted:
        """Publish ``text``; ``marker`` identifies this (persona, slot, sink) attempt."""
        ...

    def find(self, marker: str, text: str) -> Posted | None:
        """An earlier post of ``text`` made with ``marker``, if the sink can tell (``retry == 'check'``)."""
        ...


def platform_of(spec: str) -> str:
    """The platform a sink spec names (``discord:123`` → ``discord``)."""
    return spec.partition(":")[0].strip().lower()


def _target(spec: str) -> str:
    """What a sink spec names on its platform: a channel, chat or file (``discord: 123`` → ``123``)."""
    return spec.partition(":")[2].strip()


def parse_sink(spec: str) -> tuple[str, str]:
    """A sink spec's platform and what it names there (``Discord: 123`` → ``discord``, ``123``),
    or ConfigError saying how to spell it. Credentials are not looked at: this is the one
    reading of a spec that posting (``make_sink``) and `persona personas validate` share."""
    platform, target = platform_of(spec), _target(spec)
    if platform not in PLATFORMS:
        raise ConfigError(
            f"unknown sink {spec!r}; use one of: x, mastodon, bluesky, discord:CHANNEL, telegram:CHAT, file:PATH"
        )
    if platform == "file" and not target:
        raise ConfigError(f"sink {spec!r}: name the file, e.g. file:posts.jsonl")
    if platform in ("discord", "telegram") and not target:
        example = "discord:123456789012345678" if platform == "discord" else "telegram:-1001234567890 or telegram:@name"
        raise ConfigError(f"sink {spec!r}: name the channel, e.g. {example}")
    if platform == "discord" and not target.isdigit():
        raise ConfigError(f"sink {spec!r}: a Discord channel is a number (its id), e.g. discord:123456789012345678")
    return platform, target


def _file_path(target: str, settings: Settings) -> Path:
    """The file a ``file:`` sink writes: a relative path lives under DATA_DIR/posts."""
    path = Path(target).expanduser()
    return path if path.is_absolute() else settings.data_dir / "posts" / path


def sink_place(spec: str, settings: Settings) -> tuple:
    """Where a sink's posts land, whatever the spec's spelling: its platform, and its channel,
    chat or file (X, Mastodon and Bluesky each post as the one account their settings name).
    Read from the spec alone, as its sink reads it, so no credentials are needed."""
    platform, target = platform_of(spec), _target(spec)
    if platform == "file":
        return platform, _file_path(target, settings).resolve()
    if platform in ("discord", "telegram"):
        chat = str(int(target)) if target.lstrip("-").isdigit() else target
        return platform, chat.lower()  # a Telegram @name is read whatever its case
    return (platform,)


def one_place_twice(specs: list[str], settings: Settings) -> tuple[str, str] | None:
    """The first two specs, spelt differently, that post to one place (``discord:1`` and
    ``Discord: 1``): each is a sink of its own, and the place would get every post twice.
    None if there are none. The same spec listed twice is one sink, not two."""
    seen: dict[tuple, str] = {}
    for spec in dict.fromkeys(specs):
        first = seen.setdefault(sink_place(spec, settings), spec)
        if first != spec:
            return first, spec
    return None


class FileSink:
    """Appends one JSON line per post to a file: for dry runs, archives and tests."""

    platform = "file"
    retry: RetrySafety = "check"

    def __init__(self, spec: str, path: Path) -> None:
        self.spec = spec
        self.path = path

    def post(self, text: str, marker: str) -> Posted:
        """Append the post (locked, flushed to disk) and return its new id."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            out = self.path.open("a", encoding="utf-8")
        except OSError as exc:  # nothing was written: a refusal, named, not "no answer"
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}; fix the path in {self.spec!r}") from exc
        posted = Posted(id=uuid.uuid4().hex, url=self.path.as_uri())
        line = json.dumps({"id": posted.id, "text": text, "marker": marker, "at": time.time()}, ensure_ascii=False)
        with out:
            fcntl.flock(out, fcntl.LOCK_EX)
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        return posted

    def find(self, marker: str, text: str) -> Posted | None:
        """The post written with ``marker``, if the file holds one."""
        if not self.path.exists():
            return None
        with self.path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    item = json.loads(line)
                except ValueError:  # a torn last line from a crash mid-write
                    continue
                if item.get("marker") == marker:
                    return Posted(id=item["id"], url=self.path.as_uri())
        return None


def make_sink(spec: str, settings: Settings) -> Sink:
    """The sink a spec names, with its credentials from the settings."""
    platform, target = parse_sink(spec)
    if platform == "file":
        return FileSink(spec, _file_path(target, settings))
    if platform in ("x", "mastodon", "bluesky"):
        from adapters.posting import social

        return {"x": social.XSink, "mastodon": social.MastodonSink, "bluesky": social.BlueskySink}[platform](
            spec, settings
        )
    from adapters.posting import chat_sinks

    sink_class = chat_sinks.DiscordSink if platform == "discord" else chat_sinks.TelegramSink
    return sink_class(spec, target, settings)
