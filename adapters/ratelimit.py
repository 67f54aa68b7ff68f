"""Per-user and per-chat message limits, counted in Redis so every adapter process agrees.

A fixed one-minute window per user and per chat. The first message over a limit gets
a friendly notice saying when to try again; the rest of that window is ignored
quietly, so a flood is not answered with a flood of notices. While Redis cannot count
(out of reach, or the client out of connections) each process counts for itself: a
flood let through then was answered with a flood of apologies.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import redis.asyncio

from persona import constants as keys

__all__ = ["RateDecision", "RateLimiter", "rate_limited_text"]

WINDOW_S = 60


def rate_limited_text(retry_after_s: int) -> str:
    """The notice a user gets when they go over a limit."""
    return (
        f"I need a moment to catch up with everyone. Please try again in about {retry_after_s} s."
    )


@dataclass(frozen=True)
class RateDecision:
    """Whether to answer, and if not, whether to say so."""

    allowed: bool
    retry_after_s: int = 0
    notify: bool = False


class RateLimiter:
    """Counts messages per user and per chat in one-minute windows."""

    def __init__(self, client: redis.asyncio.Redis, platform: str, *, per_user: int, per_chat: int) -> None:
        self.redis = client
        self.platform = platform
        self.per_user = per_user
        self.per_chat = per_chat
        # Messages counted here, by rate key, while Redis could not count them (this window's only).
        self._counted_here: Counter[str] = Counter()
        self._window_here = -1

    async def check(self, user: str, chat: str, now: float | None = None) -> RateDecision:
        """Count this message and decide; while Redis cannot count, it is counted here."""
        now = time.time() if now is None else now
        window = int(now // WINDOW_S)
        retry_after_s = max(1, int((window + 1) * WINDOW_S - now))
        user_key = keys.rate_key(self.platform, "user", user, window)
        chat_key = keys.rate_key(self.platform, "chat", chat, window)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(user_key).expire(user_key, WINDOW_S * 2)
                pipe.incr(chat_key).expire(chat_key, WINDOW_S * 2)
                user_count, _, chat_count, _ = await pipe.execute()
        except redis.exceptions.RedisError:
            user_count, chat_count = self._count_here(window, user_key, chat_key)
        if user_count <= self.per_user and chat_count <= self.per_chat:
            return RateDecision(allowed=True)
        first_over = user_count == self.per_user + 1 or (
            user_count <= self.per_user and chat_count == self.per_chat + 1
        )
        return RateDecision(allowed=False, retry_after_s=retry_after_s, notify=first_over)

    def _count_here(self, window: int, user_key: str, chat_key: str) -> tuple[int, int]:
        """Count a message in this process, for a window Redis could not count it in."""
        if window != self._window_here:
            self._counted_here.clear()
            self._window_here = window
        self._counted_here.update((user_key, chat_key))
        return self._counted_here[user_key], self._counted_here[chat_key]
