"""How the Telegram adapter starts, long-polls and ends when Telegram will not have it.

Starting: a refused token (a ConfigError) or an unreachable Bot API (PlatformUnreachable, which
`persona up` restarts after a pause) ends the adapter in one line naming the setting to check
(``start_failures_in_one_line``). Polling (``PatientPolling``, the long poll's own connection):
an outage, or a second instance polling with the same token (409 Conflict: Telegram serves one
long poll per token), is waited out, logged as it begins and as it ends rather than at every
try; a token refused while polling (revoked with @BotFather) is told to the adapter
(``on_refused``), which stops and ends with the ConfigError a refused token gets at start. So is
one refused to any other call while the bot serves (``WatchedCalls``: sending, showing typing),
which is how a bot served by webhook, with no long poll, finds out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from telegram.error import Conflict, InvalidToken, NetworkError, TimedOut
from telegram.request import HTTPXRequest

from persona.errors import ConfigError, PlatformUnreachable
from persona.settings import TelegramSettings

__all__ = [
    "TOKEN_REFUSED_TEXT", "PatientPolling", "WatchedCalls", "quiet_start_up_tracebacks", "start_failures_in_one_line",
]

log = logging.getLogger(__name__)

TOKEN_REFUSED_TEXT = "Telegram refused the token: check PERSONA_TELEGRAM__TOKEN"
# While the Bot API cannot be reached, the waits between tries grow from this to at most the
# settings' reconnect_wait_cap_s (python-telegram-bot's own grow to 30 s, whatever the reply timeout).
FIRST_RECONNECT_WAIT_S = 1.0
# Why polling stalls, as logged when it begins and ends.
UNREACHABLE, CONFLICT = "unreachable", "conflict"
BOT_CALL_CONNECTIONS = 256  # python-telegram-bot's own pool for the calls other than the long poll


@contextlib.contextmanager
def start_failures_in_one_line(options: TelegramSettings) -> Iterator[None]:
    """A refused token (a ConfigError) or an unreachable Bot API (PlatformUnreachable, which
    `persona up` restarts after a pause) ends the adapter in one line naming the setting to
    check, not a traceback (PTB's own message for a refused token quotes it)."""
    try:
        yield
    except InvalidToken:
        raise ConfigError(TOKEN_REFUSED_TEXT) from None
    except NetworkError as exc:  # raised only while starting: once polling, PTB retries by itself
        token = options.token.get_secret_value() if options.token else ""
        reason = str(exc).replace(token, "***") if token else str(exc)
        raise PlatformUnreachable(
            f"cannot reach the Telegram Bot API at {options.api_url} ({reason}): check the network, "
            "or PERSONA_TELEGRAM__API_URL"
        ) from None


class _NoTracebackForWhatIsRaised(logging.Filter):
    """PTB logs the traceback of a start-up call it gives up on ("... Aborting"), then raises
    the error, which the adapter reports as one line saying what to check: keep PTB's line,
    drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Aborting" in str(record.msg):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_start_up_tracebacks() -> None:
    """Keep PTB's line about a start-up call it gave up on, without its traceback."""
    ptb = logging.getLogger("telegram.ext")
    if not any(isinstance(f, _NoTracebackForWhatIsRaised) for f in ptb.filters):
        ptb.addFilter(_NoTracebackForWhatIsRaised())


class PatientPolling(HTTPXRequest):
    """The long poll's connection (getUpdates): while polling, a try that cannot reach the Bot API
    is made again after a wait that grows, ×1.5 from FIRST_RECONNECT_WAIT_S, to at most
    ``wait_cap_s``; one that timed out has waited already, and is made again at once. So is one
    refused because another instance polls with the token (Conflict). The trouble is logged as it
    begins and as it ends, not at every try (python-telegram-bot logged each with its traceback). A
    token refused while polling is told (``on_refused``) once, and not tried again: the call waits
    until polling stops. Not polling (starting, stopping), a failure is python-telegram-bot's to handle."""

    def __init__(
        self, api_url: str, wait_cap_s: float, polling: Callable[[], bool], on_refused: Callable[[], None]
    ) -> None:
        super().__init__(connection_pool_size=1)  # as python-telegram-bot builds the long poll's own
        self._api_url = api_url
        self._wait_cap_s = wait_cap_s
        self._polling = polling
        self._on_refused = on_refused
        self._refused = False

    async def post(self, *args: Any, **kwargs: Any) -> Any:  # BaseRequest.post's arguments and answer
        """Make the call, trying again while the Bot API cannot be reached (or another instance
        polls) and polling goes on."""
        tries, since, wait_s, trouble = 0, 0.0, 0.0, None
        while True:
            if self._refused:
                # No more calls with a refused token: polling is stopping, and this call waits for
                # that (the stop cancels it); the last one, marking updates read, gets none.
                while self._polling():
                    await asyncio.sleep(FIRST_RECONNECT_WAIT_S)
                return []
            try:
                result = await super().post(*args, **kwargs)
            except InvalidToken:
                if not self._polling():
                    raise
                self._refused = True
                self._on_refused()
                continue
            except (NetworkError, Conflict) as exc:  # TimedOut too; not a refusal (BadRequest, InvalidToken)
                if not self._polling():
                    if isinstance(exc, Conflict):  # stopping: the other instance holds the updates, none to mark read
                        return []
                    raise
                if not tries:
                    since = time.monotonic()
                kind = CONFLICT if isinstance(exc, Conflict) else UNREACHABLE
                if kind != trouble:
                    trouble = kind
                    self._log_trouble(kind, exc)
                tries += 1
                wait_s = min(max(wait_s * 1.5, FIRST_RECONNECT_WAIT_S), self._wait_cap_s)
                await asyncio.sleep(0.0 if isinstance(exc, TimedOut) else wait_s)
                continue
            if trouble == CONFLICT:
                log.info("no other instance polls with this token any more; polling again after %.1f s "
                         "(%d refused tries)", time.monotonic() - since, tries)
            elif trouble == UNREACHABLE:
                log.info("reached the Telegram Bot API again after %.1f s (%d failed tries)",
                         time.monotonic() - since, tries)
            return result

    def _log_trouble(self, trouble: str, exc: NetworkError | Conflict) -> None:
        """Say, once, why polling stalls."""
        if trouble == CONFLICT:
            log.warning("another instance is polling the Telegram Bot API with this token; stop it "
                        "(Telegram serves one at a time); trying again, at most %g s apart", self._wait_cap_s)
        else:
            log.warning("cannot reach the Telegram Bot API at %s (%s); trying again, at most %g s apart",
                        self._api_url, exc.message, self._wait_cap_s)


class WatchedCalls(HTTPXRequest):
    """The connection of every call but the long poll (sending, showing typing...): a token
    refused there while the bot serves (revoked with @BotFather: by webhook no long poll finds
    out) is told (``on_refused``), then raised as before, so the call fails as it would have.
    Not serving (starting, stopping), a refusal is python-telegram-bot's alone to handle."""

    def __init__(self, serving: Callable[[], bool], on_refused: Callable[[], None]) -> None:
        super().__init__(connection_pool_size=BOT_CALL_CONNECTIONS)
        self._serving = serving
        self._on_refused = on_refused

    async def post(self, *args: Any, **kwargs: Any) -> Any:  # BaseRequest.post's arguments and answer
        """Make the call; a refused token is told, then raised."""
        try:
            return await super().post(*args, **kwargs)
        except InvalidToken:
            if self._serving():
                self._on_refused()
            raise
