"""Sending text to a Telegram chat: split, formatted, waiting out flood control, tried again.

A text longer than a message is split at Telegram's 4,096-character limit, and again where a
part holds more formatting than the 100 entities Telegram shows (``split_for_formatting``) or
its @mentions, once quieted, take it past the limit; each part's Markdown goes as Telegram's
HTML, and again as plain text if Telegram cannot parse it, its @mentions quieted either way, so
no one is pinged by what the bot says (``quiet_mentions``; an asker in a group is notified by
the answer quoting their message); its links and code go as written. Flood control
(``RetryAfter``) delays a message, never drops it (``with_flood_control``); a failure after which
nothing arrived is tried again (``delivery``).

A message Telegram took but did not confirm within ``SEND_ANSWER_WAIT_S`` may or may not be
shown, and the Bot API can neither tell nor drop a second copy: it is not sent again, it counts
as sent (Telegram had all of it, so most likely posted it, and the conversation must then read
with it; if it never arrived, /retry answers again), and the log says that its fate is unknown.
Waiting that long for Telegram's answer, not python-telegram-bot's 5 s, leaves fewer sends so.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import warnings
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
from telegram import Bot, ReplyParameters
from telegram.constants import ParseMode
from telegram.error import (
    BadRequest,
    ChatMigrated,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)

from adapters.delivery import Failure, send_parts
from adapters.splitting import TELEGRAM_MESSAGE_LIMIT_CHARS, split_message
from adapters.telegram_format import (
    quiet_html_mentions,
    quiet_markdown_mentions,
    quiet_mentions,
    split_for_formatting,
    telegram_html,
)

__all__ = ["SEND_ANSWER_WAIT_S", "send_text", "with_flood_control"]

log = logging.getLogger(__name__)

FLOOD_RETRIES = 8
# How long a message sent waits for Telegram to confirm it (python-telegram-bot's default read
# timeout is 5 s). Past it, the message may or may not be shown: see the module's docstring.
# Well within `persona up`'s 30 s for a service to stop, should it be stopping then.
SEND_ANSWER_WAIT_S = 15.0

T = TypeVar("T")


def _retry_after_s(exc: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB 22 warns that the type of this value will change
        warnings.simplefilter("ignore")
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


async def with_flood_control(call: Callable[[], Awaitable[T]]) -> T:
    """Run a Bot API call, waiting out Telegram's flood control instead of failing."""
    for _ in range(FLOOD_RETRIES):
        try:
            return await call()
        except RetryAfter as exc:
            pause = _retry_after_s(exc)
            log.warning("Telegram asks us to slow down; waiting %.1f s", pause)
            await asyncio.sleep(pause)
    return await call()


async def send_text(
    bot: Bot, chat_id: int, text: str, *, reply_to: int | None = None, topic: int | None = None,
    on_moved: Callable[[int, int], Awaitable[None]],
) -> bool:
    """Send text in as many messages as it takes, formatted, waiting out flood control; whether
    all went out (each part is tried again while nothing arrived: ``delivery``). A group
    upgraded to a supergroup while its answer was on the way refuses it (``ChatMigrated``):
    ``on_moved(old, new)`` moves the chat and the text goes to the new id, so the asker still
    gets the answer."""
    # Telegram formats only a message's first 100 entities: a part holding more is cut again.
    chunks = [
        fitting for chunk in split_message(text, TELEGRAM_MESSAGE_LIMIT_CHARS)
        for part in split_for_formatting(chunk) for fitting in _fitting_once_quiet(part)
    ]
    to = f"Telegram chat {chat_id}"

    async def send_part(part: tuple[int, str]) -> None:
        nonlocal chat_id
        index, chunk = part
        reply = ReplyParameters(message_id=reply_to, allow_sending_without_reply=True) if reply_to and index == 0 else None
        try:
            await _send_one(bot, chat_id, chunk, reply, topic)
        except ChatMigrated as moved:
            log.info("chat %s became %s while its answer was on the way; sending it there", chat_id, moved.new_chat_id)
            await on_moved(chat_id, moved.new_chat_id)
            chat_id = moved.new_chat_id
            await _send_one(bot, chat_id, chunk, reply, topic)

    return await send_parts(list(enumerate(chunks)), send_part, _send_failure, to=to)


def _fitting_once_quiet(text: str) -> list[str]:
    """``text``, cut again where quieting its @mentions (a character each) would take it past
    Telegram's limit: its HTML and its plain text, which quiet only those outside code, are never longer."""
    if len(quiet_mentions(text)) <= TELEGRAM_MESSAGE_LIMIT_CHARS:
        return [text]
    return [part for half in split_message(text, len(text) // 2 + 1) for part in _fitting_once_quiet(half)]


async def _send_one(bot: Bot, chat_id: int, text: str, reply: ReplyParameters | None, topic: int | None) -> None:
    """Send one message, its @mentions outside code and links quieted: its Markdown as HTML; as it
    is when it has none, or when Telegram refuses the HTML ("can't parse entities"; any 400 there
    is worth a try without it)."""
    formatted = telegram_html(text)
    if "<" in formatted:  # escaped text holds no "<": a tag is formatting
        try:
            await with_flood_control(lambda: bot.send_message(
                chat_id, quiet_html_mentions(formatted), parse_mode=ParseMode.HTML, reply_parameters=reply,
                message_thread_id=topic, read_timeout=SEND_ANSWER_WAIT_S,
            ))
            return
        except BadRequest as exc:
            log.warning("Telegram refused a reply's formatting (%s); sending it as plain text", exc.message)
    await with_flood_control(lambda: bot.send_message(
        chat_id, quiet_markdown_mentions(text), reply_parameters=reply, message_thread_id=topic,
        read_timeout=SEND_ANSWER_WAIT_S,
    ))


def _send_failure(exc: Exception) -> Failure | None:
    """What a failed send means: a 5xx (Telegram's front answers 502 while the API behind it is
    down) or a connection dropped before any answer is tried again; so is a timeout before the
    whole request left (connecting, waiting for a free connection, or writing it: Telegram acts on
    none it has not read to its end). After it left, Telegram may have posted the message, and the
    Bot API has no way to drop a second copy: a second answer would confuse more than a missing
    one, which /retry brings back, so it is not sent again."""
    if isinstance(exc, TimedOut):
        before_sending = isinstance(exc.__cause__, httpx.ConnectTimeout | httpx.PoolTimeout | httpx.WriteTimeout)
        return Failure.TRY_AGAIN if before_sending else Failure.MAY_HAVE_ARRIVED
    if isinstance(exc, NetworkError):
        return Failure.TRY_AGAIN
    if isinstance(exc, TelegramError):
        return Failure.REFUSED  # blocked by the user, the chat gone, flood control past its patience...
    return None
