"""The approval queue: curated posts that wait for a person before they go out.

Each waiting post is a hash (persona, slot, text, the runner-up candidates, sinks) and
its id sits in a sorted set by creation time. Approving or rejecting moves it out of
the pending set in one script, so two operators cannot both act on the same post. A post
left waiting lapses after ``APPROVAL_TTL_S`` (its hash expires). Its times are Redis's,
the clock every machine that reads them shares.

Approving also writes the post into its slot's ledger record (``persona.ledger``: state
``approved``, the text that goes out) in that same script, fenced by the approver's claim on
the slot and its hold on the persona's text choice: there is no moment at which a post is
approved while its slot still reads as waiting (listed nowhere, its edit unseen by other posts).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

import redis

from persona import constants as keys
from persona.errors import PostingError
from persona.heartbeat import redis_now, redis_time
from persona.ledger import CHOOSING_LEASE_MS, CHOOSING_LOCK_SLOT

__all__ = ["Approval", "ApprovalQueue"]

APPROVAL_TTL_S = 30 * 24 * 3600

# Settle a pending approval (approve or reject) exactly once.
DECIDE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then
  return redis.call('HGET', KEYS[1], 'state') or 'missing'
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'decided', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'text', ARGV[3]) end
redis.call('ZREM', KEYS[2], ARGV[4])
return 'ok'
"""

# Approve a pending post and write it into its slot's record, in one step, only while the approver
# holds the slot (KEYS[3]) and the persona's text choice (KEYS[5]); else change nothing.
APPROVE_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'pending' then return state or 'missing' end
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 'lost' end
if redis.call('GET', KEYS[5]) ~= ARGV[2] then return 'choosing' end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'text', ARGV[3]) end
redis.call('HSET', KEYS[1], 'state', 'approved', 'decided', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[4], 'text', redis.call('HGET', KEYS[1], 'text'), 'state', 'approved', 'updated', ARGV[4])
return 'ok'
"""


@dataclass
class Approval:
    """One post waiting for (or past) a decision."""

    id: str
    persona: str
    slot: str
    text: str
    sinks: list[str]
    alternatives: list[str] = field(default_factory=list)
    state: str = "pending"
    created: float = 0.0  # epoch seconds, by Redis's clock
    expires: float = 0.0  # when it lapses, by Redis's clock; 0: never (its hash holds no expiry)

    @classmethod
    def from_hash(cls, approval_id: str, raw: dict, now: float = 0.0, left_ms: int = -1) -> Approval:
        """The approval stored as ``raw``; ``left_ms`` (PTTL's answer at Redis time ``now``) dates its lapse."""
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
        return cls(
            id=approval_id, persona=data["persona"], slot=data["slot"], text=data["text"],
            sinks=json.loads(data.get("sinks", "[]")), alternatives=json.loads(data.get("alternatives", "[]")),
            state=data.get("state", "pending"), created=float(data.get("created", 0)),
            expires=now + left_ms / 1000 if left_ms >= 0 else 0.0,
        )

    def waited_s(self, now: float) -> float:
        """How long it has waited at ``now`` (Redis's time)."""
        return max(0.0, now - self.created)


def _unknown(approval_id: str) -> str:
    return (
        f"no post waiting with id {approval_id!r} (a post left waiting {APPROVAL_TTL_S // 86400} days expires); "
        "see `persona posts pending`"
    )


class ApprovalQueue:
    """Posts waiting for an operator's yes or no."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._decide = client.register_script(DECIDE_SCRIPT)
        self._approve = client.register_script(APPROVE_SCRIPT)

    def add(self, persona: str, slot: str, text: str, sinks: list[str], alternatives: list[str]) -> Approval:
        """Put a curated post in the queue; returns it with its short id."""
        now = redis_now(self.redis)
        approval = Approval(
            id=secrets.token_hex(4), persona=persona, slot=slot, text=text, sinks=sinks,
            alternatives=alternatives, created=now, expires=now + APPROVAL_TTL_S,
        )
        pipe = self.redis.pipeline()
        pipe.hset(keys.approval_key(approval.id), mapping={
            "persona": persona, "slot": slot, "text": text, "sinks": json.dumps(sinks),
            "alternatives": json.dumps(alternatives), "state": "pending", "created": approval.created,
        })
        pipe.expire(keys.approval_key(approval.id), APPROVAL_TTL_S)
        pipe.zadd(keys.APPROVALS_PENDING_KEY, {approval.id: approval.created})
        pipe.execute()
        return approval

    def get(self, approval_id: str) -> Approval:
        """One approval by id; PostingError naming the command that lists them if unknown."""
        [found] = self._read([approval_id])
        if found is None:
            raise PostingError(_unknown(approval_id))
        return found

    def pending(self) -> list[Approval]:
        """Every post still waiting, oldest first."""
        ids = [i.decode() if isinstance(i, bytes) else i for i in self.redis.zrange(keys.APPROVALS_PENDING_KEY, 0, -1)]
        found = []
        for approval_id, approval in zip(ids, self._read(ids), strict=True):
            if approval is not None:
                found.append(approval)
            else:  # expired: forget it
                self.redis.zrem(keys.APPROVALS_PENDING_KEY, approval_id)
        return found

    def now(self) -> float:
        """Redis's time: the clock an approval's times are on."""
        return redis_now(self.redis)

    def _read(self, ids: list[str]) -> list[Approval | None]:
        """The approvals with these ids (None for one gone), with when each lapses, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        for approval_id in ids:
            pipe.hgetall(keys.approval_key(approval_id))
            pipe.pttl(keys.approval_key(approval_id))
        now, *answers = pipe.execute()
        return [Approval.from_hash(approval_id, raw, redis_time(now), left_ms) if raw else None
                for approval_id, raw, left_ms in zip(ids, answers[::2], answers[1::2], strict=True)]

    def decide(self, approval_id: str, state: str, text: str = "") -> Approval:
        """Mark a pending post ``approved`` (optionally with new text) or ``rejected``, once."""
        outcome = self._decide(
            keys=[keys.approval_key(approval_id), keys.APPROVALS_PENDING_KEY],
            args=[state, time.time(), text, approval_id],
        )
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        if outcome == "missing":
            raise PostingError(_unknown(approval_id))
        if outcome != "ok":
            raise PostingError(f"post {approval_id} was already {outcome}")
        return self.get(approval_id)

    def approve(self, waiting: Approval, text: str, *, owner: str, choosing: str) -> Approval:
        """Mark a pending post approved (``text``: its edit, or '' for its own) and its slot's ledger
        record ``approved`` with that text, in one step; ``owner`` must still hold the slot and
        ``choosing`` the persona's text choice (``PostLedger.choosing``), else nothing changes."""
        now = time.time()
        outcome = self._approve(
            keys=[keys.approval_key(waiting.id), keys.APPROVALS_PENDING_KEY, keys.post_lock_key(waiting.persona, waiting.slot),
                  keys.post_record_key(waiting.persona, waiting.slot), keys.post_lock_key(waiting.persona, CHOOSING_LOCK_SLOT)],
            args=[owner, choosing, text, now, waiting.id],
        )
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        still = f"nothing was posted and post {waiting.id} still waits: `persona posts approve {waiting.id}` again"
        if outcome == "lost":
            raise PostingError(f"lost the claim on {waiting.persona} slot {waiting.slot} before approving it (its lease, "
                               f"posting.lease_s, ran out; another poster may hold it now); {still}")
        if outcome == "choosing":
            raise PostingError(f"the text of post {waiting.id} took more than {CHOOSING_LEASE_MS // 1000} s to check against "
                               f"{waiting.persona}'s other posts, and another poster may have chosen the same text meanwhile; {still}")
        if outcome == "missing":
            raise PostingError(_unknown(waiting.id))
        if outcome != "ok":
            raise PostingError(f"post {waiting.id} was already {outcome}")
        return self.get(waiting.id)
