"""Who may talk to the bot in private: everyone, an allow-list, or people the operator paired.

``open`` answers anyone. ``allowlist`` answers the configured user ids and those the
operator approved. ``pairing`` does the same, and gives an unknown user a one-time
code to pass to the operator, who approves it with ``persona access approve CODE``.
Approvals live in Redis (a set per platform), so they survive restarts and reach every
adapter process at once.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import redis
import redis.asyncio

from persona import constants as keys

__all__ = [
    "AccessControl",
    "AccessDecision",
    "PendingPairing",
    "approve_code",
    "approved_users",
    "pairing_text",
    "pending_pairings",
    "revoke_user",
]

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I to misread
CODE_LENGTH = 8
PLATFORMS = ("telegram", "discord")

CANNOT_CHECK_TEXT = "I can't check my list of friends right now; please try again in a little while."
NOT_ALLOWED_TEXT = "Sorry, I only talk to people on my list. Ask the operator of this bot to add you."


def pairing_text(code: str) -> str:
    """What an unknown user is told under the pairing policy."""
    return (
        f"Hello! I don't know you yet. Your pairing code is {code}. Send it to the operator "
        "of this bot; once they approve it, just write to me again."
    )


@dataclass(frozen=True)
class AccessDecision:
    """Whether to answer, and what to say if not."""

    allowed: bool
    reply: str = ""


@dataclass(frozen=True)
class PendingPairing:
    """A code waiting for the operator's approval."""

    code: str
    platform: str
    user: str
    name: str
    created_at: float


class AccessControl:
    """Decides, per private message, whether its sender may be answered."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        platform: str,
        policy: Literal["open", "allowlist", "pairing"],
        allowed_users: list[int],
        code_ttl_s: int,
    ) -> None:
        self.redis = client
        self.platform = platform
        self.policy = policy
        self.allowed = {str(u) for u in allowed_users}
        self.code_ttl_s = code_ttl_s

    async def check(self, user: str, name: str = "") -> AccessDecision:
        """Allowed, or the refusal (with a pairing code) to send back."""
        if self.policy == "open" or user in self.allowed:
            return AccessDecision(True)
        try:
            if await self.redis.sismember(keys.access_key(self.platform), user):
                return AccessDecision(True)
            if self.policy == "allowlist":
                return AccessDecision(False, NOT_ALLOWED_TEXT)
            return AccessDecision(False, pairing_text(await self._code_for(user, name)))
        except redis.exceptions.RedisError:
            return AccessDecision(False, CANNOT_CHECK_TEXT)

    async def _code_for(self, user: str, name: str) -> str:
        """The user's pending code, or a new one (one code per user at a time)."""
        user_key = keys.pairing_user_key(self.platform, user)
        existing = await self.redis.get(user_key)
        if existing:
            code = existing.decode() if isinstance(existing, bytes) else existing
            if await self.redis.exists(keys.pairing_code_key(code)):
                return code
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        record = {"platform": self.platform, "user": user, "name": name, "created_at": time.time()}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.pairing_code_key(code), json.dumps(record), ex=self.code_ttl_s)
            pipe.set(user_key, code, ex=self.code_ttl_s)
            await pipe.execute()
        return code


def _pending(code: str, raw: bytes | str) -> PendingPairing:
    data = json.loads(raw)
    return PendingPairing(code=code, platform=data["platform"], user=data["user"], name=data.get("name", ""),
                          created_at=float(data.get("created_at", 0)))


def approve_code(client: redis.Redis, code: str) -> PendingPairing | None:
    """Approve a pairing code (the operator's side); None if no such code is pending."""
    code = code.strip().upper()
    raw = client.get(keys.pairing_code_key(code))
    if raw is None:
        return None
    pending = _pending(code, raw)
    pipe = client.pipeline(transaction=True)
    pipe.sadd(keys.access_key(pending.platform), pending.user)
    pipe.delete(keys.pairing_code_key(code), keys.pairing_user_key(pending.platform, pending.user))
    pipe.execute()
    return pending


def approved_users(client: redis.Redis) -> dict[str, list[str]]:
    """Approved user ids per platform."""
    return {
        platform: sorted(m.decode() for m in client.smembers(keys.access_key(platform)))
        for platform in PLATFORMS
    }


def pending_pairings(client: redis.Redis) -> list[PendingPairing]:
    """Codes still waiting for approval, oldest first."""
    found = []
    for key in client.scan_iter(match=keys.PAIRING_CODE_KEY_PREFIX + "*", count=500):
        name = key.decode()
        raw = client.get(name)
        if raw is not None:
            found.append(_pending(name.removeprefix(keys.PAIRING_CODE_KEY_PREFIX), raw))
    return sorted(found, key=lambda p: p.created_at)


def revoke_user(client: redis.Redis, platform: str, user: str) -> bool:
    """Withdraw a user's approval; whether they had one."""
    return bool(client.srem(keys.access_key(platform), user))
