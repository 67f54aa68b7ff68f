"""How the Discord client reaches the gateway, waits out its outages, and hears that it may not.

``PERSONA_DISCORD__API_URL`` points the whole client elsewhere (``point_client_at``). While the
gateway cannot be reached, discord.py tries again at most the settings' reconnect_wait_cap_s apart
(``bound_reconnect_waits``), and the outage is logged as it begins and ends (``OneLinePerOutage``).
A session Discord ends for good, as it does when the token is reset in the Developer Portal (4004),
becomes the one-line error that says what to fix (``gateway_refusal``).
"""

from __future__ import annotations

import functools
import logging
import time

import discord
from discord.backoff import ExponentialBackoff

from persona.errors import ConfigError, PlatformUnreachable

__all__ = [
    "INTENT_REFUSED_TEXT", "TOKEN_REFUSED_TEXT", "OneLinePerOutage", "bound_reconnect_waits", "gateway_refusal",
    "point_client_at",
]

log = logging.getLogger(__name__)

TOKEN_REFUSED_TEXT = "Discord refused the token: check PERSONA_DISCORD__TOKEN"
INTENT_REFUSED_TEXT = (
    "Discord refused the Message Content intent: enable it for this bot in the Developer "
    "Portal (Bot → Privileged Gateway Intents → Message Content Intent), then start again"
)

# What the close codes that end a session for good mean (discord.py resumes after the others),
# as Discord's documentation names them: discord.py gives no reason of its own.
CLOSE_REASONS = {4010: "invalid shard", 4011: "sharding required", 4012: "invalid API version", 4013: "invalid intents"}


def point_client_at(api_url: str) -> None:
    """Send discord.py's REST calls to ``api_url`` (the gateway follows in ``setup_hook``)."""
    discord.http.Route.BASE = api_url.rstrip("/")


# While the gateway cannot be reached, discord.py waits a random time up to 2, 4, 8, ... 1,024 s
# between tries: here at most the settings' reconnect_wait_cap_s.
class _BoundedBackoff(ExponentialBackoff):
    """discord.py's reconnect backoff, each wait cut to ``cap_s`` (its randomness kept)."""

    def __init__(self, cap_s: float) -> None:
        super().__init__()
        self.cap_s = cap_s

    def delay(self) -> float:
        return min(super().delay(), self.cap_s)


def bound_reconnect_waits(cap_s: float) -> None:
    """Make discord.py wait at most ``cap_s`` between tries to reach the gateway. It builds its
    backoff in ``Client.connect`` and takes no other: like the REST base, a module's global."""
    discord.client.ExponentialBackoff = functools.partial(_BoundedBackoff, cap_s)


class OneLinePerOutage(logging.Filter):
    """discord.py logs each failed try to reach the gateway with its traceback ("Attempting a
    reconnect in 3.02s"): during an outage, one every few seconds. The first of an outage is said
    in one line of our own and the rest dropped, until ``connected`` ends the outage."""

    def __init__(self, wait_cap_s: float) -> None:
        super().__init__()
        self.wait_cap_s = wait_cap_s
        self.since: float | None = None
        self.tries = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Attempting a reconnect"):
            return True
        self.tries += 1
        if self.since is None:
            self.since = time.monotonic()
            error = record.exc_info[1] if record.exc_info else None
            reason = " ".join(str(error).split()) or type(error).__name__
            log.warning("lost the connection to the Discord gateway (%s); trying again, at most %g s apart",
                        reason, self.wait_cap_s)
        return False

    def connected(self) -> None:
        """The gateway took the bot again: say after how long, if it had been lost."""
        if self.since is not None:
            log.info("connected to the Discord gateway again after %.1f s (%d failed tries)",
                     time.monotonic() - self.since, self.tries)
        self.since, self.tries = None, 0


def gateway_refusal(exc: discord.ConnectionClosed) -> ConfigError | PlatformUnreachable:
    """The error for a gateway session Discord ended for good: a refused token (4004, as when it is
    reset in the Developer Portal), a refused intent (4014), another 4xxx setting it refuses."""
    if exc.code == 4004:
        return ConfigError(TOKEN_REFUSED_TEXT)
    if exc.code == 4014:
        return ConfigError(INTENT_REFUSED_TEXT)
    reason = exc.reason or CLOSE_REASONS.get(exc.code, "no reason given")
    if 4000 <= exc.code < 5000:
        return ConfigError(f"Discord closed the gateway connection for good ({exc.code}, {reason}): "
                           "check the bot's settings in the Developer Portal, and PERSONA_DISCORD__API_URL")
    return PlatformUnreachable(f"Discord closed the gateway connection ({exc.code}, {reason}): start again")
