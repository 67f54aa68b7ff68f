"""Sinks for a Discord channel (discord.py) and a Telegram channel (python-telegram-bot).

Both use the chat adapters' bot tokens and API base URLs (``settings.discord``,
``settings.telegram``). discord.py builds every URL from the class attribute
``Route.BASE``; the sink points it at the configured API for the length of one post.

A connection that could not be made is ``SinkUnreachable`` (nothing was sent); one that
broke after the request went out, a time-out waiting for the answer, or a server error
is ``SinkNoAnswer``: the message may be in the channel. A retry to Discord looks for the
bot's message in the channel first, and sends with an enforced nonce besides, so it is
safe; Telegram has nothing like either, so the post is left for a person to look
(``persona posts uncertain``).

discord.py sleeps through a 429 for as long as Discord asks, however long, unless told a
limit: the sink waits out a short one (``DISCORD_RATE_LIMIT_WAIT_S``, the least discord.py
allows) and reads a longer one, or five in a row, as ``SinkRateLimited``, so the slot is
tried again at a later tick instead of the scheduler stalling past its lease.

A post notifies nobody it names, as the chat bots' replies do: Discord is told to parse no
mentions ("@everyone" included), and Telegram, which links and notifies every "@username"
in a text, gets each "@" followed by an invisible word joiner (``quiet_mentions``), except in a
link ("medium.com/@jane/post"), where Telegram makes no mention and the joiner would end the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from adapters.posting.sinks import (
    Posted,
    RetrySafety,
    SinkNoAnswer,
    SinkRateLimited,
    SinkUnreachable,
    one_line,
)
from persona.curation import TELEGRAM_LIMIT_CHARS
from persona.errors import ConfigError, SinkError
from persona.settings import Settings

if TYPE_CHECKING:
    from discord.http import HTTPClient

__all__ = ["DiscordSink", "TelegramSink", "telegram_api_url"]

log = logging.getLogger(__name__)

DISCORD_NONCE_CHARS = 25
DISCORD_LOOKBACK_MESSAGES = 50  # the channel's latest messages a retry looks through for its post
DISCORD_RATE_LIMIT_WAIT_S = 30.0  # discord.py's smallest max_ratelimit_timeout
# Each request's limit (discord.py sets none: aiohttp's default waited 5 minutes on a stalled
# connection, holding the scheduler); a rate limit's wait, between requests, is not counted.
DISCORD_REQUEST_TIMEOUT_S = 30.0
HTTP_TOO_MANY_REQUESTS = 429
TELEGRAM_API_URL_SETTING = "PERSONA_TELEGRAM__API_URL"
TELEGRAM_DEFAULT_API_URL = "https://api.telegram.org/bot"
# How long a post's answer may take: python-telegram-bot's 5 s left a post that Telegram was
# slow to confirm "uncertain", for a person to look for and settle.
TELEGRAM_SEND_TIMEOUT_S = 30.0


@contextlib.contextmanager
def _discord_base(url: str) -> Iterator[None]:
    from discord.http import Route

    previous = Route.BASE
    Route.BASE = url.rstrip("/")
    try:
        yield
    finally:
        Route.BASE = previous


class DiscordSink:
    """Sends the post as a message in one channel, as the bot.

    A retry looks first among the channel's latest messages for the bot's own with the
    same text: Discord drops a repeat of the enforced nonce for only a few minutes, and a
    slot whose poster died is taken up again only when its lease runs out, later than that.
    """

    platform = "discord"
    retry: RetrySafety = "check"

    def __init__(self, spec: str, channel: str, settings: Settings) -> None:
        if settings.discord.token is None:
            raise ConfigError(f"sink {spec!r} needs the bot token PERSONA_DISCORD__TOKEN")
        self.spec = spec
        self.channel = int(channel)
        self.token = settings.discord.token.get_secret_value()
        self.api_url = settings.discord.api_url

    def post(self, text: str, marker: str) -> Posted:
        return asyncio.run(self._post(text, marker))

    def find(self, marker: str, text: str) -> Posted | None:
        """The bot's message with ``text`` among the channel's latest, if there is one."""
        return asyncio.run(self._find(text))

    async def _post(self, text: str, marker: str) -> Posted:
        import discord
        from discord.http import handle_message_parameters

        nonce = hashlib.sha256(marker.encode()).hexdigest()[:DISCORD_NONCE_CHARS]
        async with self._session() as (http, _):
            # A post mentions nobody: without this, Discord parses "@everyone" or "<@&role>" in a
            # generated (or typed) post, and a bot allowed to would ping the whole server.
            with handle_message_parameters(content=text, nonce=nonce,
                                           allowed_mentions=discord.AllowedMentions.none()) as params:
                params.payload["enforce_nonce"] = True  # a repeat within minutes gets the first message back
                message = await http.send_message(self.channel, params=params)
            place = await self._place(http)
        return self._posted(message, place)

    async def _find(self, text: str) -> Posted | None:
        import discord

        try:
            async with self._session() as (http, bot):
                latest = await http.logs_from(self.channel, DISCORD_LOOKBACK_MESSAGES)
                place = await self._place(http)
        except SinkError as exc:
            if not isinstance(exc.__cause__, discord.Forbidden):
                raise
            # Without Read Message History the nonce is all there is: right within minutes of the first try.
            log.warning("%s: cannot read the channel's history (%s); a retry relies on the nonce alone", self.spec, exc)
            return None
        mine = (m for m in latest if str(m.get("author", {}).get("id")) == str(bot["id"]) and m.get("content") == text)
        found = next(mine, None)
        return self._posted(found, place) if found is not None else None

    async def _place(self, http: HTTPClient) -> str:
        """The server the channel is in, as a message's link names it (``@me`` for a direct
        message, or where the channel cannot be read: the post is made, only its link is off)."""
        import aiohttp
        import discord

        try:
            channel = await http.get_channel(self.channel)
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("%s: cannot read the channel (%s); its posts' links name no server", self.spec, one_line(exc))
            return "@me"
        return str(channel.get("guild_id") or "@me")

    def _posted(self, message: dict, place: str) -> Posted:
        return Posted(id=str(message["id"]), url=f"https://discord.com/channels/{place}/{self.channel}/{message['id']}")

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[tuple[HTTPClient, dict]]:
        """discord.py's REST client, logged in as the bot (its user), with every failure said as a sink's."""
        import aiohttp
        import discord
        from discord.http import HTTPClient

        class TimedHTTPClient(HTTPClient):
            async def request(self, route, **kwargs):  # type: ignore[override]
                kwargs.setdefault("timeout", aiohttp.ClientTimeout(total=DISCORD_REQUEST_TIMEOUT_S))
                return await super().request(route, **kwargs)

        http = TimedHTTPClient(asyncio.get_running_loop(), max_ratelimit_timeout=DISCORD_RATE_LIMIT_WAIT_S)
        logged_in = False
        with _discord_base(self.api_url):
            try:
                bot = await http.static_login(self.token)
                logged_in = True
                yield http, bot
            except discord.LoginFailure as exc:  # 401 at login: nothing was sent
                raise SinkError(f"Discord refused the bot token ({exc}); check PERSONA_DISCORD__TOKEN") from exc
            except discord.RateLimited as exc:  # asked to wait longer than we do: nothing was sent
                raise SinkRateLimited(f"Discord is rate-limiting posts: it asks to wait {exc.retry_after:.0f} s") from exc
            except discord.DiscordServerError as exc:  # may or may not have posted; the nonce makes a retry safe
                raise SinkNoAnswer(f"Discord answered with a server error: {one_line(exc)}") from exc
            except discord.HTTPException as exc:
                if exc.status == HTTP_TOO_MANY_REQUESTS:  # still limited after discord.py's five tries
                    raise SinkRateLimited(f"Discord is rate-limiting posts: {one_line(exc)}") from exc
                raise SinkError(f"Discord refused the post: {exc}") from exc
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:  # no connection: nothing sent
                raise SinkUnreachable(f"cannot reach Discord at {self.api_url} ({one_line(exc)})") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not logged_in:  # the login's answer did not come: nothing was sent yet
                    raise SinkUnreachable(f"cannot log in to Discord at {self.api_url} ({one_line(exc)})") from exc
                # The request went out; its answer did not come.
                if isinstance(exc, TimeoutError):
                    raise SinkNoAnswer(f"Discord did not answer in {DISCORD_REQUEST_TIMEOUT_S:g} s") from exc
                raise SinkNoAnswer(f"the connection broke before Discord answered: {one_line(exc)}") from exc
            finally:
                await http.close()


def telegram_api_url(url: str, who: str) -> str:
    """The Bot API's base URL, if python-telegram-bot can make a method's address of it; else
    ConfigError, its message opening with ``who`` (the sink, or the chat adapter).

    python-telegram-bot writes the token right after the URL (``…/bot`` + ``TOKEN/sendMessage``),
    unless the URL says where (``{token}``). After a bare host the token was read as part
    of the address ("Invalid port"), and the post, never sent, was left for a person to
    settle as one that may have gone out. The URL is not mended here: the chat adapter
    reads the same setting as it is.
    """
    if "{" in url:  # python-telegram-bot's own placeholder for the token ({token}, {bot_token}, …)
        return url
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{who}: {TELEGRAM_API_URL_SETTING}={url!r} is not an http:// or https:// address; "
            f"Telegram's is {TELEGRAM_DEFAULT_API_URL}"
        )
    if not parts.path:
        raise ConfigError(
            f"{who}: {TELEGRAM_API_URL_SETTING}={url!r} ends at the host, so the bot's token would be read "
            f"as part of the address; the Bot API's address ends in /bot: set {TELEGRAM_API_URL_SETTING}={url.rstrip('/')}/bot"
        )
    return url


class TelegramSink:
    """Sends the post to a channel or chat, as the bot."""

    platform = "telegram"
    retry: RetrySafety = "none"

    def __init__(self, spec: str, chat: str, settings: Settings) -> None:
        if settings.telegram.token is None:
            raise ConfigError(f"sink {spec!r} needs the bot token PERSONA_TELEGRAM__TOKEN")
        self.spec = spec
        self.chat: int | str = int(chat) if chat.lstrip("-").isdigit() else chat
        self.token = settings.telegram.token.get_secret_value()
        self.api_url = telegram_api_url(settings.telegram.api_url, f"sink {spec!r}")

    def post(self, text: str, marker: str) -> Posted:
        from adapters.telegram_format import quiet_mentions

        quiet = quiet_mentions(text)
        if len(quiet) > TELEGRAM_LIMIT_CHARS:  # Telegram would refuse it as too long, in fewer words
            raise SinkError(
                f"the post is {len(quiet):,} characters once its @mentions are kept from notifying anyone (an "
                f"invisible character after each \"@\"); Telegram takes {TELEGRAM_LIMIT_CHARS:,}: shorten it by "
                f"{len(quiet) - TELEGRAM_LIMIT_CHARS:,}"
            )
        try:
            return asyncio.run(self._post(quiet))
        except (SinkError, SinkNoAnswer) as exc:
            # python-telegram-bot spells the token out ("The token `123:ABC` was rejected"), and
            # the bot's URL holds it: a message goes to logs, the ledger and the dashboard.
            if self.token not in str(exc):
                raise
            raise type(exc)(str(exc).replace(self.token, "<PERSONA_TELEGRAM__TOKEN>")) from None

    async def _post(self, text: str) -> Posted:
        import httpx
        from telegram import Bot
        from telegram.error import (
            BadRequest,
            ChatMigrated,
            EndPointNotFound,
            Forbidden,
            InvalidToken,
            NetworkError,
            RetryAfter,
            TimedOut,
        )

        # Only answers that say "not sent" become SinkError; a network error or time-out
        # may have been delivered, and the ledger treats it as unknown.
        refused = (BadRequest, ChatMigrated, EndPointNotFound, Forbidden, InvalidToken)
        sending = False  # entering the bot asks Telegram who it is (getMe): nothing is sent yet
        try:
            async with Bot(self.token, base_url=self.api_url) as bot:
                sending = True
                message = await bot.send_message(chat_id=self.chat, text=text, read_timeout=TELEGRAM_SEND_TIMEOUT_S)
        except RetryAfter as exc:
            raise SinkRateLimited(f"Telegram is rate-limiting posts: {exc}") from exc
        except InvalidToken as exc:  # a 401, or a 404: no such token, or no Bot API at that address
            elsewhere = f", and {TELEGRAM_API_URL_SETTING} ({self.api_url})" if self.api_url != TELEGRAM_DEFAULT_API_URL else ""
            raise SinkError(f"Telegram refused the bot token ({exc}); check PERSONA_TELEGRAM__TOKEN{elsewhere}") from exc
        except refused as exc:
            raise SinkError(f"Telegram refused the post: {exc}") from exc
        except NetworkError as exc:  # TimedOut is one: a connect (or pool) time-out, like a refusal, sent nothing
            if isinstance(exc.__cause__, (httpx.InvalidURL, httpx.UnsupportedProtocol)):  # no request could be made of it
                raise SinkError(f"{TELEGRAM_API_URL_SETTING} ({self.api_url}) makes no valid address: {one_line(exc)}") from exc
            if not sending or isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
                raise SinkUnreachable(f"cannot reach Telegram at {self.api_url} ({one_line(exc)})") from exc
            # The connection broke mid-request, or the answer was too slow: it may have been delivered.
            broke = "Telegram did not answer in time" if isinstance(exc, TimedOut) else "the connection broke before Telegram answered"
            raise SinkNoAnswer(f"{broke}: {one_line(exc)}") from exc
        return Posted(id=str(message.message_id), url=message.link or "")

    def find(self, marker: str, text: str) -> Posted | None:
        return None
