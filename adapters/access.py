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

# The user's key names their one live code; it is the only index of a user's codes. A code it
# does not name (the spare of two made at once before this script, or one it has moved past)
# is dead: never given, listed or approved, and gone within the code's time to live.
# KEYS: the user's key. ARGV: code key prefix, a new code, its record, ttl (s).
CODE_FOR_SCRIPT = """
local prefix, code, record, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local existing = redis.call('GET', KEYS[1])
if existing and redis.call('EXISTS', prefix .. existing) == 1 then
  return existing
end
if not redis.call('SET', prefix .. code, record, 'EX', ttl, 'NX') then
  return false
end
redis.call('SET', KEYS[1], code, 'EX', ttl)
return code
"""

# Approve a code only while it is the user's live one; the approval and the end of every
# live code of the user happen together, so no check slips a code in between.
# KEYS: code key, the user's key, the platform's approved set. ARGV: the code, the user.
APPROVE_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] or redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# Revoke, and end the user's live code with it (a code from before the revoke re-admitted them).
# KEYS: the platform's approved set, the user's key. ARGV: the user, code key prefix.
REVOKE_SCRIPT = """
local had = redis.call('SREM', KEYS[1], ARGV[1])
local code = redis.call('GET', KEYS[2])
if code then
  redis.call('DEL', ARGV[2] .. code, KEYS[2])
end
return had
"""


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
        """The user's pending code, or a new one (one code per user at a time).

        Read and written in one script: two messages checked at once (discord.py runs each
        on_message as its own task) got two codes when this was a GET, then a SET."""
        record = json.dumps({"platform": self.platform, "user": user, "name": name, "created_at": time.time()})
        script = self.redis.register_script(CODE_FOR_SCRIPT)
        while True:
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
            given = await script(
                keys=[keys.pairing_user_key(self.platform, user)],
                args=[keys.PAIRING_CODE_KEY_PREFIX, code, record, self.code_ttl_s],
            )
            if given:  # nothing: the new code is another user's (1 in 10^12); draw again
                return given.decode() if isinstance(given, bytes) else given

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
    approved = client.register_script(APPROVE_SCRIPT)(
        keys=[
            keys.pairing_code_key(code),
            keys.pairing_user_key(pending.platform, pending.user),
            keys.access_key(pending.platform),
        ],
        args=[code, pending.user],
    )
    return pending if approved else None

def approved_users(client: redis.Redis) -> dict[str, list[str]]:
    """Approved user ids per platform."""
    return {
        platform: sorted(m.decode() for m in client.smembers(keys.access_key(platform)))
        for platform in PLATFORMS
    }


def pending_pairings(client: redis.Redis) -> list[PendingPairing]:
    """Codes still waiting for approval, oldest first (each user's live one)."""
    found = []
    for key in client.scan_iter(match=keys.PAIRING_CODE_KEY_PREFIX + "*", count=500):
        name = key.decode()
        raw = client.get(name)
        if raw is None:
            continue
        pending = _pending(name.removeprefix(keys.PAIRING_CODE_KEY_PREFIX), raw)
        live = client.get(keys.pairing_user_key(pending.platform, pending.user))
        if live is not None and live.decode() == pending.code:
            found.append(pending)
    return sorted(found, key=lambda p: p.created_at)

def revoke_user(client: redis.Redis, platform: str, user: str) -> bool:
    """Withdraw a user's approval, and their pending code; whether they had an approval."""
    return bool(client.register_script(REVOKE_SCRIPT)(
        keys=[keys.access_key(platform), keys.pairing_user_key(platform, user)],
        args=[user, keys.PAIRING_CODE_KEY_PREFIX],
    ))
