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

A slot closed for good (``posted``, ``rejected``, ``skipped``, ``expired``, or ``failed``
with no sink left waiting for an answer) keeps its record ``closed_record_ttl_s`` (30 days at
least, twice ``posting.grace_s``), long past the last moment the scheduler or ``persona post
--slot`` may post it again; then the record expires (the history stream and the recent posts,
both capped, keep what went out). Only the persona's newest closed scheduled slot keeps its
record for good: ``schedule.missed = "latest"`` posts the newest slot however late it is. Every
other record (a slot open, waiting for approval, or with a sink that got no answer) is kept, and
its slot is listed in the persona's open set (``post_open_key``), kept in step by the scripts
that write the record: the readers of open slots (``open_texts``, ``unsettled``) read that set,
never every record. Records written before the set existed are put in it once, by the first
reader that finds it not built (``_ensure_index``).

A persona's text is chosen by one poster at a time (``PostLedger.choosing``): the look for
the text among its posts and the write that shows it to the others (the slot's record)
are one step, or two posters started together both found one text new and both posted it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from persona import constants as keys
from persona.errors import PostingError

__all__ = ["ClaimResult", "PostLedger", "SinkEntry", "closed_record_ttl_s", "slot_state", "slot_summary"]

log = logging.getLogger(__name__)

# A slot in one of these states is never posted again.
FINAL_STATES = ("posted", "rejected", "skipped", "expired")
# A slot closed in one of these states, with no sink left waiting for an answer, matters to nobody
# once nothing may post it again: its record expires (``closed_record_ttl_s``). A ``failed`` one is
# tried again only within the missed-slot grace period (or by hand while its record lasts).
SETTLED_STATES = (*FINAL_STATES, "failed")
# A closed slot's record is kept this long at least, and twice posting.grace_s where that is longer.
CLOSED_RECORD_KEPT_S = 30 * 24 * 3600
# Sink states a person may settle: the request went out and no answer came back.
UNSETTLED_STATES = ("uncertain", "intent")
# A poster is working on a slot in one of these states, or was when it died: '' while
# the scheduler or `persona post` publishes it, 'approved' while its approver does.
OPEN_STATES = ("", "approved")
# The slots `persona post` makes up when none is named (``adapters.posting.slots.manual_slot``).
# No scheduler ever looks at them: one left open is finished by a person or by nobody.
MANUAL_SLOT_PREFIX = "manual-"
# A persona's text choice is held (``PostLedger.choosing``) by a lock beside its slots' locks,
# under a name no slot has (slot names are instants or ``manual-…``). A holder that dies
# keeps the others waiting this long at most; holding it takes milliseconds.
CHOOSING_LOCK_SLOT = "+choosing"
CHOOSING_LEASE_MS = 30_000

# Shared by every script that writes a slot's record: ``reindex(record, ttl)`` puts the slot in its
# persona's open set while its record matters (open, pending, a sink with no answer), else takes it
# out and lets the record expire in ``ttl`` seconds, except the persona's newest closed scheduled
# slot, kept for good (the one before it then expires). A record that is gone leaves the set.
_INDEX_LUA = """
local RECORD_PREFIX, OPEN_PREFIX, PERSONAS = '__RECORD__', '__OPEN__', '__PERSONAS__'
local NEWEST_PREFIX, MANUAL = '__NEWEST__', '__MANUAL__'
local SETTLED, UNSETTLED = {__SETTLED__}, {__UNSETTLED__}
-- nil: no record (or no hash); true: closed for good; false: it still matters
local function settled(record)
  if redis.call('TYPE', record)['ok'] ~= 'hash' then return nil end
  if not SETTLED[redis.call('HGET', record, 'state') or ''] then return false end
  local fields = redis.call('HGETALL', record)
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 5) == 'sink:' then
      local ok, entry = pcall(cjson.decode, fields[i + 1])
      if not ok or type(entry) ~= 'table' or UNSETTLED[entry.state] then return false end
    end
  end
  return true
end
local function reindex(record, ttl)
  local rest = string.sub(record, #RECORD_PREFIX + 1)
  local colon = string.find(rest, ':', 1, true)
  if not colon then return end  -- no record's name: nobody reads it
  local persona, slot = string.sub(rest, 1, colon - 1), string.sub(rest, colon + 1)
  local closed = settled(record)
  if closed == false then
    redis.call('SADD', OPEN_PREFIX .. persona, slot)
    redis.call('SADD', PERSONAS, persona)
    redis.call('PERSIST', record)
    return
  end
  redis.call('SREM', OPEN_PREFIX .. persona, slot)
  if closed == nil then return end
  if string.sub(slot, 1, #MANUAL) ~= MANUAL then
    local newest = redis.call('GET', NEWEST_PREFIX .. persona)
    if newest == slot then redis.call('PERSIST', record) return end
    if not newest or slot > newest then
      redis.call('SET', NEWEST_PREFIX .. persona, slot)
      redis.call('PERSIST', record)
      if newest and settled(RECORD_PREFIX .. persona .. ':' .. newest) then
        redis.call('EXPIRE', RECORD_PREFIX .. persona .. ':' .. newest, ttl)
      end
      return
    end
  end
  redis.call('EXPIRE', record, ttl)
end
""".replace("__RECORD__", keys.POST_RECORD_KEY_PREFIX).replace("__OPEN__", keys.POST_OPEN_KEY_PREFIX).replace(
    "__PERSONAS__", keys.POST_OPEN_PERSONAS_KEY).replace("__NEWEST__", keys.POST_NEWEST_KEY_PREFIX).replace(
    "__MANUAL__", MANUAL_SLOT_PREFIX).replace("__SETTLED__", ", ".join(f"['{s}'] = true" for s in SETTLED_STATES)).replace(
    "__UNSETTLED__", ", ".join(f"['{s}'] = true" for s in UNSETTLED_STATES))

# Claim a slot unless it is finished, waiting for approval (unless the approver asks),
# or held by someone else. Returns 'claimed', 'busy', 'pending' or 'done:<state>'. A record
# that is to expire (a failed slot tried again) gets its whole time again: it outlives the claim.
CLAIM_SCRIPT = """
local state = redis.call('HGET', KEYS[2], 'state')
if state == 'posted' or state == 'rejected' or state == 'skipped' or state == 'expired' then return 'done:' .. state end
if state == 'pending' and ARGV[3] ~= '1' then return 'pending' end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then
  if redis.call('TTL', KEYS[2]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
  return 'claimed'
end
return 'busy'
"""

# Close a slot that waits for an approval which is gone (approvals expire unanswered).
EXPIRE_PENDING_SCRIPT = _INDEX_LUA + """
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' or redis.call('HGET', KEYS[1], 'approval') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'expired', 'updated', ARGV[2])
reindex(KEYS[1], ARGV[3])
return 1
"""

# HSET on the record only while the caller still holds the slot's lock (and, with a third
# key, the persona's text choice: a text is written only where it was checked, and still held).
FENCED_HSET_SCRIPT = _INDEX_LUA + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if KEYS[3] and redis.call('GET', KEYS[3]) ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
reindex(KEYS[2], ARGV[3])
return 1
"""

# Record one platform's post id and add it to the history, in one step.
RECORD_POST_SCRIPT = _INDEX_LUA + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3], 'updated', ARGV[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', tonumber(ARGV[5]), '*', unpack(ARGV, 7))
reindex(KEYS[2], ARGV[6])
return 1
"""

# Close a slot: its final state, the text (if given) first among the persona's recent posts
# (once: a slot retried until it is posted gives it again), lock released; closed for good, its
# record expires in ARGV[6] seconds.
FINISH_SCRIPT = _INDEX_LUA + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'state', ARGV[2], 'updated', ARGV[3])
reindex(KEYS[2], ARGV[6])
if ARGV[4] ~= '' then
  redis.call('LREM', KEYS[3], 0, ARGV[4])
  redis.call('LPUSH', KEYS[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
redis.call('DEL', KEYS[1])
return 1
"""

# The open sets, from records written before them (or a slot a reader found out of step): each
# record in KEYS put in its persona's set, or given its expiry, as its writer would have.
REINDEX_SCRIPT = _INDEX_LUA + """
for _, record in ipairs(KEYS) do reindex(record, ARGV[1]) end
return #KEYS
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


def closed_record_ttl_s(grace_s: float = 0.0) -> int:
    """How long a slot closed for good keeps its record: 30 days, or twice ``grace_s`` (posting.grace_s)
    where that is longer. The scheduler, and ``persona post --slot`` for a slot the ledger no longer
    holds, post a slot only within the grace period after its time; the record outlives that."""
    return int(max(CLOSED_RECORD_KEPT_S, 2 * grace_s))


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

    def __init__(
        self, client: redis.Redis, *, lease_s: float = 900.0, owner: str | None = None, grace_s: float = 0.0,
    ) -> None:
        self.redis = client
        self.lease_ms = int(lease_s * 1000)
        self.owner = owner or uuid.uuid4().hex
        # posting.grace_s: a closed slot's record outlives the time anything may post the slot again.
        self.closed_ttl_s = closed_record_ttl_s(grace_s)
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._hset = client.register_script(FENCED_HSET_SCRIPT)
        self._record = client.register_script(RECORD_POST_SCRIPT)
        self._finish = client.register_script(FINISH_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._extend = client.register_script(EXTEND_SCRIPT)
        self._expire_pending = client.register_script(EXPIRE_PENDING_SCRIPT)
        self._reindex = client.register_script(REINDEX_SCRIPT)

    def claim(self, persona: str, slot: str, *, approving: bool = False) -> ClaimResult:
        """Take the slot for this owner, unless it is finished or someone else holds it.

        A slot still waiting for an approval that expired unanswered is closed as
        ``expired`` here: nobody can approve it any more.
        """
        got = _text(self._claim(
            keys=[keys.post_lock_key(persona, slot), keys.post_record_key(persona, slot)],
            args=[self.owner, self.lease_ms, "1" if approving else "0", self.closed_ttl_s],
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
            keys=[keys.post_record_key(persona, slot), keys.approval_key(approval)],
            args=[approval, time.time(), self.closed_ttl_s],
        ))

    def extend(self, persona: str, slot: str) -> bool:
        """Renew this owner's lease on the slot; False if it was lost."""
        return bool(self._extend(keys=[keys.post_lock_key(persona, slot)], args=[self.owner, self.lease_ms]))

    def release(self, persona: str, slot: str) -> None:
        """Give the slot up without finishing it (another may take it at once)."""
        self._release(keys=[keys.post_lock_key(persona, slot)], args=[self.owner])

    def held_s(self, persona: str, slot: str) -> int:
        """Whole seconds until the slot's claim runs out (0 where nobody holds it): how long
        a poster that stopped mid-post keeps everyone else from finishing it."""
        left_ms = self.redis.pttl(keys.post_lock_key(persona, slot))
        return max(0, -(-left_ms // 1000)) if left_ms > 0 else 0

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

    def save(self, persona: str, slot: str, *, choosing: str = "", **fields: str) -> None:
        """Write fields of the record while holding the slot (and, given its token, the persona's
        text choice: see ``choosing``); PostingError if either was lost."""
        pairs = [item for name, value in fields.items() for item in (name, value)]
        fences = [keys.post_lock_key(persona, slot), keys.post_record_key(persona, slot)]
        ok = self._hset(
            keys=[*fences, keys.post_lock_key(persona, CHOOSING_LOCK_SLOT)] if choosing else fences,
            args=[self.owner, choosing, self.closed_ttl_s, *pairs, "updated", time.time()],
        )
        if ok == -1:
            raise PostingError(f"{persona}'s text for slot {slot} took more than {CHOOSING_LEASE_MS // 1000} s to check "
                               f"against its other posts, and another poster may have chosen the same text meanwhile; "
                               f"nothing was posted: try again")
        if not ok:
            raise PostingError(f"lost the claim on {persona} slot {slot} (its lease, posting.lease_s, ran out); another "
                               "poster (a scheduler, `persona post` or `persona posts approve`) may hold it now: "
                               "`persona posts uncertain` shows what is unfinished")

    @contextmanager
    def choosing(self, persona: str, *, wait_s: float = CHOOSING_LEASE_MS / 1000 + 5) -> Iterator[str]:
        """Hold the persona's text choice while a poster checks a text against its posts and
        saves it in a slot (``save(..., choosing=token)``); yields the token.

        Held, a text the others have not seen yet cannot be chosen twice: the check of each
        later poster finds it (an open slot's text, then a recent post). A poster waits here
        for one ahead of it, at most ``wait_s``, then PostingError.
        """
        self._ensure_index()  # once, after an upgrade: not within the hold, whose lease it could outlast
        lock, token = keys.post_lock_key(persona, CHOOSING_LOCK_SLOT), uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        while not self.redis.set(lock, token, nx=True, px=CHOOSING_LEASE_MS):
            if time.monotonic() > deadline:
                raise PostingError(f"another poster of {persona} has been choosing its text for over {wait_s:.0f} s "
                                   f"(its hold runs out in {max(1, self.redis.pttl(lock) // 1000)} s); nothing was "
                                   f"posted: try again then")
            time.sleep(0.01)
        try:
            yield token
        finally:
            self._release(keys=[lock], args=[token])

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
                self.owner, f"sink:{sink}", entry.to_json(), entry.at, keys.POST_HISTORY_MAX_LEN, self.closed_ttl_s,
                *[item for pair in history.items() for item in pair],
            ],
        )
        if not ok:
            raise PostingError(f"lost the claim on {persona} slot {slot} after posting to {sink} (post id {entry.id})")

    def finish(self, persona: str, slot: str, state: str, text: str = "", *, recent_kept: int = keys.RECENT_POSTS_KEPT) -> None:
        """Close the slot in ``state`` and release it; ``text``, if given (it went out somewhere), joins the recent posts."""
        ok = self._finish(
            keys=[keys.post_lock_key(persona, slot), keys.post_record_key(persona, slot), keys.recent_posts_key(persona)],
            args=[self.owner, state, time.time(), text, max(1, recent_kept), self.closed_ttl_s],
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
        approval, held_s (seconds its claim has left, 0 where none), and command: what finishes it
        (`persona posts settle` once a person has looked, `persona post --slot` where posting again
        is safe, `persona posts approve ID` for an approved post).

        ``state`` is ``uncertain`` where a person must look (the sink cannot tell a repeat),
        ``intent`` where the sink never answered although a retry is safe, ``approved`` (or
        ``begun``) where an approved post (or another) never reached the sink, its poster
        stopped before. The
        scheduler retries a closed slot's intent only within the missed-slot grace period, so
        one left past it waits for `persona post --slot`.

        An open slot's intents are listed where nobody but a person will finish it (see
        ``stopped_midway``); in one the scheduler holds, a post under way, they are not.
        """
        found: list[dict[str, str]] = []
        tracked, indexed = self._tracked(persona)
        for owner, slot in tracked:
            record = self.record(owner, slot)
            if indexed and self._tidy(owner, slot, record):
                continue
            entries = _sink_entries(record)
            if record.get("state", "") not in OPEN_STATES:
                left, held_s = _unfinished(record, entries), 0
            elif self.stopped_midway(owner, slot, record):
                left, held_s = _unfinished(record, entries, stopped=True), self.held_s(owner, slot)
            else:  # under way: only what a person must look at already
                left, held_s = {spec: e for spec, e in entries.items() if e.state == "uncertain"}, 0
            for sink, entry in left.items():
                found.append({
                    "persona": owner, "slot": slot, "sink": sink, "state": entry.state,
                    "text": record.get("text", ""), "error": entry.error or _STOPPED_WORDS.get(entry.state, ""),
                    "at": str(entry.at or record.get("updated", 0)), "approval": record.get("approval", ""),
                    "held_s": str(held_s), "command": _finishing_command(owner, slot, sink, entry.state, record),
                })
        return sorted(found, key=lambda item: float(item["at"]))

    def stopped_midway(self, persona: str, slot: str, record: dict[str, str] | None = None) -> bool:
        """Whether an open slot (its text chosen, never closed) waits for a person to finish it.

        An approved post and a slot of `persona post`'s own (``manual-…``) are finished by
        nobody else: each is listed from the moment it is open, its claim held or not (a
        poster killed mid-post holds it for posting.lease_s, and `persona posts uncertain` is
        where a person looks meanwhile). A scheduled slot is the scheduler's while its claim
        is held; once the claim is gone, its poster stopped mid-post.
        """
        record = self.record(persona, slot) if record is None else record
        if not record.get("text") or record.get("state", "") not in OPEN_STATES:
            return False
        if record.get("state") == "approved" or slot.startswith(MANUAL_SLOT_PREFIX):
            return True
        return not self.redis.exists(keys.post_lock_key(persona, slot))

    def open_texts(self, persona: str) -> dict[str, str]:
        """The texts of the persona's open slots (chosen, never closed: being posted, or stopped
        mid-post), by slot: a text that may be out already although no history shows it."""
        found: dict[str, str] = {}
        tracked, _ = self._tracked(persona)
        pipe = self.redis.pipeline(transaction=False)
        for _, slot in tracked:
            pipe.hmget(keys.post_record_key(persona, slot), "state", "text")
        for (_, slot), (state, text) in zip(tracked, pipe.execute(), strict=True):
            if text and _text(state) in OPEN_STATES:
                found[slot] = _text(text)
        return found

    def _tracked(self, persona: str | None) -> tuple[list[tuple[str, str]], bool]:
        """The (persona, slot) of every record that may still matter, one persona's or every one's,
        from the open sets; and whether it was, or (Redis refusing the writes that build them) every
        record there is."""
        if not self._ensure_index():
            pattern = f"{keys.POST_RECORD_KEY_PREFIX}{persona or '*'}:*"
            names = (_text(key)[len(keys.POST_RECORD_KEY_PREFIX):] for key in self.redis.scan_iter(match=pattern, count=1000))
            return [(owner, slot) for owner, _, slot in (name.partition(":") for name in names)], False
        personas = [persona] if persona is not None else sorted(_text(p) for p in self.redis.smembers(keys.POST_OPEN_PERSONAS_KEY))
        pipe = self.redis.pipeline(transaction=False)
        for owner in personas:
            pipe.smembers(keys.post_open_key(owner))
        return [(owner, _text(slot)) for owner, slots in zip(personas, pipe.execute(), strict=True) for slot in sorted(slots)], True

    def _ensure_index(self) -> bool:
        """Put the records written before the open sets existed in them, once (the first reader
        after an upgrade does); False where Redis refuses the writes (a read-only replica, a full
        disk): the reader then reads every record, as before the sets."""
        if self.redis.exists(keys.POST_OPEN_BUILT_KEY):
            return True
        try:
            batch: list[bytes] = []
            for key in self.redis.scan_iter(match=f"{keys.POST_RECORD_KEY_PREFIX}*", count=1000):
                batch.append(key)
                if len(batch) == 1000:
                    self._reindex(keys=batch, args=[self.closed_ttl_s])
                    batch = []
            if batch:
                self._reindex(keys=batch, args=[self.closed_ttl_s])
            self.redis.set(keys.POST_OPEN_BUILT_KEY, repr(time.time()))
        except redis.exceptions.ResponseError as exc:
            log.warning("could not list the open post slots (%s); every post record is read instead, which is slower: "
                        "see that Redis takes writes", exc)
            return False
        return True

    def _tidy(self, persona: str, slot: str, record: dict[str, str]) -> bool:
        """True where a slot in the open set is no longer open: its record gone or closed for good
        (taken out of the set, the record left to expire). One waiting for an approval that lapsed
        unanswered is closed ``expired`` here, as ``claim`` would. Each change is best effort."""
        try:
            if not record or _settled(record):
                self._reindex(keys=[keys.post_record_key(persona, slot)], args=[self.closed_ttl_s])
                return True
            if record.get("state") == "pending" and record.get("approval"):
                self._expired_approval(persona, slot)  # listed as before: only a sink with no answer shows
        except redis.exceptions.ResponseError as exc:  # Redis refuses writes: read it as it is
            log.debug("left post slot %s %s as it is: %s", persona, slot, exc)
        return False

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


# What happened, for a sink entry a poster that stopped mid-post left with no words of its own.
_STOPPED_WORDS = {
    "intent": "its poster stopped before the platform answered",
    "approved": "approved; its poster stopped before posting it here",
    "begun": "its poster stopped before posting it here",
}


def _settled(record: dict[str, str]) -> bool:
    """Whether a slot's record is closed for good: in a settled state, no sink waiting for an answer."""
    return record.get("state", "") in SETTLED_STATES and not any(
        entry.state in UNSETTLED_STATES for entry in _sink_entries(record).values())


def _unfinished(record: dict[str, str], entries: dict[str, SinkEntry], *, stopped: bool = False) -> dict[str, SinkEntry]:
    """The sinks of a slot a person must finish: those that got no answer and, where its poster
    ``stopped`` mid-post, those it never reached (``approved`` in an approved post, else ``begun``)."""
    left = {spec: entry for spec, entry in entries.items() if entry.state in UNSETTLED_STATES}
    if stopped:
        never = "approved" if record.get("state") == "approved" else "begun"
        for spec in json.loads(record.get("sinks") or "[]"):
            if spec not in entries:
                left[spec] = SinkEntry(state=never, marker="")
    return left


def _finishing_command(persona: str, slot: str, sink: str, state: str, record: dict[str, str]) -> str:
    """What finishes a post that got no answer: settle it (a person looked), or post it again (safe);
    an approved post, by approving it again."""
    if state == "uncertain":
        return f"persona posts settle {persona} {slot} --sink {sink} --posted LINK"
    if record.get("state") == "approved" and record.get("approval"):
        return f"persona posts approve {record['approval']}"
    return f"persona post {persona} --slot {slot}"
