"""The post ledger: who may work on a (persona, slot), and what went out where.

A slot (``2026-11-25T09:00:00Z``, or any name a user gives) is *claimed* with a lock
key holding the claimant's id and a lease (``SET NX PX``, in one script with a look at
the slot's record), so two schedulers never work on the same slot at once. Every write
to the record goes through a script that first checks the writer still holds the lock
(a fencing check): a scheduler whose lease ran out cannot overwrite its successor.

The record (a hash) holds the slot's ``state``, the chosen ``text``, and one field per
sink, ``sink:<spec>``, JSON with the sink's ``state`` (``intent`` → ``posted``, or
``failed`` / ``uncertain``), an idempotency ``marker`` and the platform's post ``id``.
The intent is written *before* the platform is called; a retry that finds an intent
without an id knows a crash (or a lost reply) happened mid-post, and asks the sink.

A slot's ``state`` is empty while it is being posted, ``pending`` while it waits for an
approval (``approved`` once approved), then ``posted``, ``failed`` or ``uncertain``
(which may be tried again), or ``rejected`` or ``expired`` (its approval was never
given), which close it for good. A sink left ``uncertain`` (the platform took the
request and never answered, and cannot be searched) stays so until a person who looked
settles it: ``posted`` (with its link) or ``failed`` (not there, safe to post again).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import redis

from persona import constants as keys
from persona.errors import PostingError

__all__ = ["ClaimResult", "PostLedger", "SinkEntry", "slot_state", "slot_summary"]

# A slot in one of these states is never posted again.
FINAL_STATES = ("posted", "rejected", "skipped", "expired")
# Sink states a person may settle: the request went out and no answer came back.
UNSETTLED_STATES = ("uncertain", "intent")
# A poster is working on a slot in one of these states, or was when it died: '' while
# the scheduler or `persona post` publishes it, 'approved' while its approver does.
OPEN_STATES = ("", "approved")

# Claim a slot unless it is finished, waiting for approval (unless the approver asks),
# or held by someone else. Returns 'claimed', 'busy', 'pending' or 'done:<state>'.
CLAIM_SCRIPT = """
local state = redis.call('HGET', KEYS[2], 'state')
if state == 'posted' or state == 'rejected' or state == 'skipped' or state == 'expired' then return 'done:' .. state end
if state == 'pending' and ARGV[3] ~= '1' then return 'pending' end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then return 'claimed' end
return 'busy'
"""

# Close a slot that waits for an approval which is gone (approvals expire unanswered).
EXPIRE_PENDING_SCRIPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' or redis.call('HGET', KEYS[1], 'approval') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'expired', 'updated', ARGV[2])
return 1
"""

# HSET on the record only while the caller still holds the slot's lock.
FENCED_HSET_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1
"""

# Record one platform's post id and add it to the history, in one step.
RECORD_POST_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3], 'updated', ARGV[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', tonumber(ARGV[5]), '*', unpack(ARGV, 6))
return 1
"""

# Close a slot: its final state, the text (if given) first among the persona's recent posts
# (once: a slot retried until it is posted gives it again), lock released.
FINISH_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'state', ARGV[2], 'updated', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('LREM', KEYS[3], 0, ARGV[4])
  redis.call('LPUSH', KEYS[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
redis.call('DEL', KEYS[1])
return 1
"""

RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

EXTEND_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
return 0
"""


@dataclass
class ClaimResult:
    """The answer to a claim: ``claimed``, ``busy``, ``pending`` or ``done`` (``free``: a peek found it claimable)."""

    outcome: str
    state: str = ""

    @property
    def claimed(self) -> bool:
        return self.outcome == "claimed"


@dataclass
class SinkEntry:
    """What the ledger knows about one sink's post for a slot."""

    state: str  # intent | posted | failed | uncertain
    marker: str
    id: str = ""
    url: str = ""
    error: str = ""
    at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: str | bytes) -> SinkEntry:
        return cls(**json.loads(raw))


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def slot_state(states: set[str]) -> str:
    """A published slot's state from its sinks' states: ``posted`` once all are, ``uncertain``
    while any is, else ``failed``."""
    if states == {"posted"}:
        return "posted"
    return "uncertain" if "uncertain" in states else "failed"


def slot_summary(state: str, sink_states: list[str]) -> str:
    """A slot's state as a person reads it: ``partly posted: 2 of 3`` where some of its sinks
    took the post and the others did not, ``being posted`` while it is open, else the state.

    The ledger keeps such a slot ``failed`` (a retry posts where it failed, and only there);
    only the words change.
    """
    if state in OPEN_STATES:
        return "being posted"
    posted = sink_states.count("posted")
    if state == "failed" and posted:
        return f"partly posted: {posted} of {len(sink_states)}"
    return state


def _sink_entries(record: dict[str, str]) -> dict[str, SinkEntry]:
    """The sink entries of a slot's record (its ``sink:SPEC`` fields), by sink spec."""
    return {name[len("sink:"):]: SinkEntry.from_json(raw) for name, raw in record.items() if name.startswith("sink:")}


class PostLedger:
    """Claims, intents and post records for every (persona, slot), in Redis."""

    def __init__(self, client: redis.Redis, *, lease_s: float = 900.0, owner: str | None = None) -> None:
        self.redis = client
        self.lease_ms = int(lease_s * 1000)
        self.owner = owner or uuid.uuid4().hex
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._hset = client.register_script(FENCED_HSET_SCRIPT)
        self._record = client.register_script(RECORD_POST_SCRIPT)
        self._finish = client.register_script(FINISH_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._extend = client.register_script(EXTEND_SCRIPT)
        self._expire_pending = client.register_script(EXPIRE_PENDING_SCRIPT)

    def claim(self, persona: str, slot: str, *, approving: bool = False) -> ClaimResult:
        """Take the slot for this owner, unless it is finished or someone else holds it.

        A slot still waiting for an approval that expired unanswered is closed as
        ``expired`` here: nobody can approve it any more.
        """
        got = _text(self._claim(
            keys=[keys.post_lock_key(persona, slot), keys.post_record_key(persona, slot)],
            args=[self.owner, self.lease_ms, "1" if approving else "0"],
        ))
        outcome, _, state = got.partition(":")
        if outcome == "pending" and self._expired_approval(persona, slot):
            return ClaimResult("done", "expired")
        return ClaimResult(outcome, state)

    def peek(self, persona: str, slot: str) -> ClaimResult:
        """What a claim would answer now, taking nothing (for a dry run): ``free`` where it
        would be claimed, else ``busy``, ``pending`` or ``done`` as ``claim`` says them."""
        record = self.record(persona, slot)
        state = record.get("state", "")
        if state in FINAL_STATES:
            return ClaimResult("done", state)
        if state == "pending":
            approval = record.get("approval", "")
            gone = bool(approval) and not self.redis.exists(keys.approval_key(approval))
            return ClaimResult("done", "expired") if gone else ClaimResult("pending")
        return ClaimResult("busy" if self.redis.exists(keys.post_lock_key(persona, slot)) else "free")

    def _expired_approval(self, persona: str, slot: str) -> bool:
        approval = _text(self.redis.hget(keys.post_record_key(persona, slot), "approval"))
        return bool(approval) and bool(self._expire_pending(
            keys=[keys.post_record_key(persona, slot), keys.approval_key(approval)], args=[approval, time.time()],
        ))

    def extend(self, persona: str, slot: str) -> bool:
        """Renew this owner's lease on the slot; False if it was lost."""
        return bool(self._extend(keys=[keys.post_lock_key(persona, slot)], args=[self.owner, self.lease_ms]))

    def release(self, persona: str, slot: str) -> None:
        """Give the slot up without finishing it (another may take it at once)."""
        self._release(keys=[keys.post_lock_key(persona, slot)], args=[self.owner])

    def record(self, persona: str, slot: str) -> dict[str, str]:
        """The slot's ledger record, decoded (empty if the slot was never touched)."""
        raw = self.redis.hgetall(keys.post_record_key(persona, slot))
        return {_text(k): _text(v) for k, v in raw.items()}

    def sink_entries(self, persona: str, slot: str) -> dict[str, SinkEntry]:
        """Every sink's entry for the slot, by sink spec, in the order the slot's sinks were chosen."""
        record = self.record(persona, slot)
        entries = _sink_entries(record)
        order = {spec: i for i, spec in enumerate(json.loads(record.get("sinks") or "[]"))}
        return dict(sorted(entries.items(), key=lambda item: order.get(item[0], len(order))))

    def sink_entry(self, persona: str, slot: str, sink: str) -> SinkEntry | None:
        """What the ledger knows about ``sink``'s post for the slot."""
        raw = self.redis.hget(keys.post_record_key(persona, slot), f"sink:{sink}")
        return SinkEntry.from_json(raw) if raw else None

    def save(self, persona: str, slot: str, **fields: str) -> None:
        """Write fields of the record while holding the slot; PostingError if the claim was lost."""
        pairs = [item for name, value in fields.items() for item in (name, value)]
        ok = self._hset(
            keys=[keys.post_lock_key(persona, slot), keys.post_record_key(persona, slot)],
            args=[self.owner, *pairs, "updated", time.time()],
        )
        if not ok:
            raise PostingError(f"lost the claim on {persona} slot {slot} (its lease ran out); another scheduler owns it now")

    def set_sink(self, persona: str, slot: str, sink: str, entry: SinkEntry) -> None:
        """Write one sink's entry (an intent, a failure, an uncertainty)."""
        entry.at = time.time()
        self.save(persona, slot, **{f"sink:{sink}": entry.to_json()})

    def record_post(self, persona: str, slot: str, sink: str, entry: SinkEntry, text: str) -> None:
        """Record a platform's post id and add the post to the history, atomically."""
        entry.state, entry.at = "posted", time.time()
        history = {
            "persona": persona, "slot": slot, "sink": sink, "id": entry.id, "url": entry.url,
            "text": text, "at": entry.at,
        }
        ok = self._record(
            keys=[keys.post_lock_key(persona, slot), keys.post_record_key(persona, slot), keys.POST_HISTORY_STREAM],
            args=[
                self.owner, f"sink:{sink}", entry.to_json(), entry.at, keys.POST_HISTORY_MAX_LEN,
                *[item for pair in history.items() for item in pair],
            ],
        )
        if not ok:
            raise PostingError(f"lost the claim on {persona} slot {slot} after posting to {sink} (post id {entry.id})")

    def finish(self, persona: str, slot: str, state: str, text: str = "", *, recent_kept: int = keys.RECENT_POSTS_KEPT) -> None:
        """Close the slot in ``state`` and release it; ``text``, if given (it went out somewhere), joins the recent posts."""
        ok = self._finish(
            keys=[keys.post_lock_key(persona, slot), keys.post_record_key(persona, slot), keys.recent_posts_key(persona)],
            args=[self.owner, state, time.time(), text, max(1, recent_kept)],
        )
        if not ok:
            raise PostingError(f"lost the claim on {persona} slot {slot} before finishing it")

    def recent_texts(self, persona: str, count: int) -> list[str]:
        """The persona's latest posted texts, newest first."""
        if count <= 0:
            return []
        return [_text(t) for t in self.redis.lrange(keys.recent_posts_key(persona), 0, count - 1)]

    def unsettled(self, persona: str | None = None) -> list[dict[str, str]]:
        """Posts that got no answer and were left so, oldest first: persona, slot, sink, state, text, error, at,
        approval, and command: what finishes it (`persona posts settle` once a person has looked,
        or `persona post --slot` where posting again is safe).

        ``state`` is ``uncertain`` where a person must look (the sink cannot tell a repeat),
        or ``intent`` where the slot was closed with the sink unanswered although a retry
        is safe: the scheduler retries it only within the missed-slot grace period, so one
        left past it waits for `persona post --slot`. An intent in a slot still open is a
        post under way (or its poster died, and the scheduler finishes it), not listed.
        """
        found: list[dict[str, str]] = []
        pattern = f"{keys.POST_RECORD_KEY_PREFIX}{persona or '*'}:*"
        for key in self.redis.scan_iter(match=pattern, count=1000):
            owner, _, slot = _text(key)[len(keys.POST_RECORD_KEY_PREFIX):].partition(":")
            record = self.record(owner, slot)
            closed = record.get("state", "") not in OPEN_STATES
            for sink, entry in _sink_entries(record).items():
                if entry.state == "uncertain" or (entry.state == "intent" and closed):
                    found.append({
                        "persona": owner, "slot": slot, "sink": sink, "state": entry.state,
                        "text": record.get("text", ""), "error": entry.error, "at": str(entry.at),
                        "approval": record.get("approval", ""),
                        "command": _finishing_command(owner, slot, sink, entry.state),
                    })
        return sorted(found, key=lambda item: float(item["at"]))

    def history(self, count: int = 20, persona: str | None = None) -> list[dict[str, str]]:
        """What went out, newest first: persona, slot, sink, id, url, text, at, and slot_state: what
        became of the whole slot (``slot_summary``: ``partly posted: 1 of 2`` where a sink turned it away)."""
        found: list[dict[str, str]] = []
        last = "+"
        while len(found) < count:
            batch = self.redis.xrevrange(keys.POST_HISTORY_STREAM, last, "-", count=max(count, 50))
            if not batch:
                break
            for entry_id, fields in batch:
                item = {_text(k): _text(v) for k, v in fields.items()}
                if persona is None or item.get("persona") == persona:
                    found.append(item)
            last = "(" + _text(batch[-1][0])
        found = found[:count]
        summaries: dict[tuple[str, str], str] = {}
        for item in found:
            slot = (item.get("persona", ""), item.get("slot", ""))
            if slot not in summaries:
                record = self.record(*slot)
                summaries[slot] = slot_summary(record.get("state", ""), [e.state for e in _sink_entries(record).values()]) if record else ""
            item["slot_state"] = summaries[slot]
        return found


def _finishing_command(persona: str, slot: str, sink: str, state: str) -> str:
    """What finishes a post that got no answer: settle it (a person looked), or post it again (safe)."""
    if state == "uncertain":
        return f"persona posts settle {persona} {slot} --sink {sink} --posted LINK"
    return f"persona post {persona} --slot {slot}"
