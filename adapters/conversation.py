"""A chat's conversation: its turns in Redis (with a TTL), trimmed to a budget, made a request.

Turns are kept per platform, chat and user, so that each person in a group has their
own thread and a restart forgets nothing; a quiet conversation expires on its own and
``/reset`` forgets it at once. The request that is being answered is remembered too,
so ``/cancel`` can withdraw it. A chat whose id changes (a Telegram group upgraded to a
supergroup) takes its conversations along (``move_chat``).
"""

from __future__ import annotations

import json
import re

import redis.asyncio

from persona import constants as keys
from persona.contract import GenerationRequest, Message, SamplingOverrides

__all__ = ["ConversationStore", "build_request", "trim_turns"]

INFLIGHT_TTL_S = 3600
SCAN_STEP = 500  # keys Redis looks at per SCAN call: each call is short, so Redis never stalls

# Move KEYS[1] to KEYS[2], unless KEYS[2] was written as late (each save restarts a
# conversation's expiry, so the longer time to live is the later save; -1, no expiry,
# counts as the latest): then KEYS[1] is dropped. 1 if it moved.
MOVE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old_ttl, new_ttl = redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2])
if new_ttl ~= -2 and (new_ttl == -1 or (old_ttl ~= -1 and new_ttl >= old_ttl)) then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


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
    patience_s: float | None = None,
) -> GenerationRequest:
    """A chat request for the newest turns that fit, from ``user`` on ``source``; one that
    no worker may start once ``patience_s`` has passed (the asker has been told by then
    that it timed out), or the queue's default deadline if None."""
    request = GenerationRequest(
        persona=persona,
        messages=trim_turns(turns, max_turns=max_turns, max_chars=max_chars),
        sampling=SamplingOverrides(seed=seed),
        user=user,
        source=source,
    )
    if patience_s is not None:
        request = request.model_copy(update={"deadline": request.created_at + patience_s})
    return request


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

    async def move_chat(self, old_chat: str, new_chat: str) -> int:
        """Move every conversation of ``old_chat`` (one per user) to ``new_chat``; how many moved.

        No index lists a chat's users, so their keys are found by SCAN on the chat's prefix:
        it walks the keyspace a bounded step at a time (``SCAN_STEP``) without blocking Redis,
        as KEYS would. That walk is paid once per chat that changes id, a rare event; an index
        would instead cost a write on every message.
        """
        prefix = keys.conversation_key(self.platform, f"{old_chat}:")
        moved = 0
        async for key in self.redis.scan_iter(match=_glob_escape(prefix) + "*", count=SCAN_STEP):
            name = key.decode() if isinstance(key, bytes) else key
            user = name.removeprefix(prefix)
            moved += await self.move_key(name, keys.conversation_key(self.platform, f"{new_chat}:{user}"))
        return moved

    async def move_key(self, old: str, new: str) -> bool:
        """Move ``old`` to ``new``, expiry and all; whether it moved. Where ``new`` exists
        already, the one saved later wins and the other is dropped rather than left to
        linger. Both orders happen: a message under the new id before the move came makes
        ``new`` the later; an answer saved under the old id after a first move (it was on
        its way during the upgrade) makes ``old`` the later, and a second move brings it."""
        return bool(await self.redis.eval(MOVE_SCRIPT, 2, old, new))

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
