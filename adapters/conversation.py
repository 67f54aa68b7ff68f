"""A chat's conversation: its turns in Redis (with a TTL), trimmed to a budget, made a request.

Turns are kept per platform, chat and user, so that each person in a group has their
own thread and a restart forgets nothing; a quiet conversation expires on its own and
``/reset`` forgets it at once. The request that is being answered is remembered too,
so ``/cancel`` can withdraw it.
"""

from __future__ import annotations

import json

import redis.asyncio

from persona import constants as keys
from persona.contract import GenerationRequest, Message, SamplingOverrides

__all__ = ["ConversationStore", "build_request", "trim_turns"]

INFLIGHT_TTL_S = 3600


def trim_turns(turns: list[Message], *, max_turns: int, max_chars: int) -> list[Message]:
    """The newest turns that fit both budgets; the newest is always kept (its tail if too long)."""
    if not turns:
        return []
    newest = turns[-1]
    if len(newest.content) > max_chars:
        newest = Message(role=newest.role, content=newest.content[-max_chars:])
    kept = [newest]
    used = len(newest.content)
    for turn in reversed(turns[:-1]):
        if len(kept) >= max_turns or used + len(turn.content) > max_chars:
            break
        kept.append(turn)
        used += len(turn.content)
    kept.reverse()
    # A chat request must not open with the persona's own words: drop a leading answer.
    while len(kept) > 1 and kept[0].role == "assistant":
        kept.pop(0)
    return kept


def build_request(
    persona: str,
    turns: list[Message],
    *,
    user: str,
    source: str,
    max_turns: int,
    max_chars: int,
    seed: int | None = None,
) -> GenerationRequest:
    """A chat request for the newest turns that fit, from ``user`` on ``source``."""
    return GenerationRequest(
        persona=persona,
        messages=trim_turns(turns, max_turns=max_turns, max_chars=max_chars),
        sampling=SamplingOverrides(seed=seed),
        user=user,
        source=source,
    )


class ConversationStore:
    """Conversation turns and in-flight request ids for one platform, in Redis."""

    def __init__(self, client: redis.asyncio.Redis, platform: str, ttl_s: int) -> None:
        self.redis = client
        self.platform = platform
        self.ttl_s = ttl_s

    async def load(self, scope: str) -> list[Message]:
        """The stored turns, oldest first (empty when forgotten or expired)."""
        raw = await self.redis.get(keys.conversation_key(self.platform, scope))
        if not raw:
            return []
        try:
            return [Message.model_validate(turn) for turn in json.loads(raw)]
        except ValueError:  # written by an incompatible version: start afresh
            return []

    async def save(self, scope: str, turns: list[Message]) -> None:
        """Store the turns and restart the expiry clock."""
        data = json.dumps([turn.model_dump() for turn in turns])
        await self.redis.set(keys.conversation_key(self.platform, scope), data, ex=self.ttl_s)

    async def forget(self, scope: str) -> bool:
        """Delete the conversation; whether there was one."""
        return bool(await self.redis.delete(keys.conversation_key(self.platform, scope)))

    async def set_inflight(self, scope: str, request_id: str) -> None:
        await self.redis.set(keys.inflight_key(self.platform, scope), request_id, ex=INFLIGHT_TTL_S)

    async def get_inflight(self, scope: str) -> str | None:
        raw = await self.redis.get(keys.inflight_key(self.platform, scope))
        return raw.decode() if isinstance(raw, bytes) else raw

    async def clear_inflight(self, scope: str, request_id: str) -> None:
        """Forget the in-flight id, unless a newer request has replaced it."""
        key = keys.inflight_key(self.platform, scope)
        if await self.get_inflight(scope) == request_id:
            await self.redis.delete(key)
