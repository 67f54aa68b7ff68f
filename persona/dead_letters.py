"""Requests set aside after too many failed deliveries: list them, put them back, or drop them.

A retried request keeps its id and arguments (persona, messages, sampling, priority);
it gets a fresh deadline of the same length, and its "answered" mark and old error
reply are cleared so the new answer is delivered to its reply list. So is a withdrawal
(its cancel flag) left from before it was set aside: an operator who retries a request
wants it answered, and it used to be answered "cancelled" at once. Its sender's count
of requests waiting (their fair share) counts it again: setting it aside answered it,
and its new answer will be counted off. One script moves it, so two operators
retrying at once re-queue it once. Given the queue's ``max_length``, a retry waits for room as
callers do: a stream that is full refuses it (``QueueBusy``); ``retry_all`` leaves the
letters bound for that stream and goes on with the others.

A letter that holds no readable request can never be retried, nor one whose request names
no id (nobody waits on a reply list it could be answered in), and one that crashes every
worker should not be: ``drop_dead`` deletes letters for good (their callers were answered
when they were set aside), counted as ``dropped``. One whose id another request holds (it
was set aside for that) is refused while that request holds it: its retry cleared that
request's mark and reply list, and handed its caller this one's reply. One of a newer
contract (``newer_contract``) is listed under its id and persona, and refused at retry until
this persona is upgraded.

The stream keeps about ``DEAD_STREAM_MAX_LEN`` letters and Redis trims the oldest past
that. How many went that way is read from counters the queue keeps anyway (set aside,
less retried, dropped and still held: ``trimmed_count``), so setting a letter aside
costs no extra round trip; ``trimmed_note`` says so, and ``cap_warning`` warns while
the cap is near. The total only grows (``/metrics`` shows it); what the CLI and the
dashboard say is the part since an operator last emptied the stream (a retry or drop
that leaves no letter records the total then as ``dead_trimmed_cleared``): a clean-up
used to leave "deleted unseen" on every screen for good.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping

import redis
from pydantic import BaseModel, Field

from persona import constants as keys
from persona.busy import id_in_use
from persona.contract import CONTRACT_VERSION, GenerationRequest
from persona.errors import InvalidRequest, QueueBusy
from persona.queue_scripts import (
    NO_KEY_LUA,
    ONE_MORE_WAITING,
    REDIS_NOW,
    payload_digest,
)
from persona.telemetry_reading import read_counts

__all__ = [
    "DeadLetter", "RetryReport", "cap_warning", "count_dead", "dead_ids", "drop_dead", "find_dead", "list_dead", "newer_contract",
    "retry_all", "retry_dead", "trimmed_count", "trimmed_note",
]

# A stream entry id as `persona queue dead` lists it: milliseconds-sequence.
ENTRY_ID = re.compile(r"\d+-\d+")

# Run after a retry or a drop (KEYS[1] the dead-letter stream, KEYS[2] the counters): the
# stream emptied, every letter the cap trimmed so far counts as seen.
CLEARED_IF_EMPTY = """
local function cleared_if_empty(dead, stats)
  if redis.call('XLEN', dead) > 0 then return end
  local c = redis.call('HMGET', stats, 'dead_lettered', 'retried', 'dropped')
  local gone = (tonumber(c[1]) or 0) - (tonumber(c[2]) or 0) - (tonumber(c[3]) or 0)
  redis.call('HSET', stats, 'dead_trimmed_cleared', math.max(0, gone))
end
"""

# Re-queue only if the entry is still in the dead-letter stream (false where it is not), with its
# deadline by Redis's clock (ARGV[3]: the allowance; '' for none), as a submit does; and
# only while its stream holds fewer than ARGV[4] entries ('' for no limit), else 'busy'.
# The sender's pending counter (KEYS[6], NO_KEY for an anonymous caller) counts it again, as
# a submit does (without the fair-share limit: an operator asked for it), and lives at
# least ARGV[5] seconds, so a decrement that is lost heals itself. Its answered mark
# (KEYS[3]) and the digest kept beside it (KEYS[8]), old reply (KEYS[5]) and any cancel
# flag (KEYS[7]) go, but only where they are its own: the digest kept is none (or of
# another type: a damaged key) or its payload's (ARGV[6]). Under another request's digest
# the letter stays ('in_use'): it was set aside because that request held its id, and
# clearing them handed that request's caller this one's reply.
RETRY_SCRIPT = REDIS_NOW + NO_KEY_LUA + ONE_MORE_WAITING + CLEARED_IF_EMPTY + """
if ARGV[4] ~= '' and redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[4]) then return 'busy' end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local kept = redis.pcall('GET', KEYS[8])
if type(kept) == 'string' and kept ~= ARGV[6] then return 'in_use' end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[5], KEYS[7], KEYS[8])
redis.pcall('HINCRBY', KEYS[4], 'retried', 1)
cleared_if_empty(KEYS[1], KEYS[4])
if KEYS[6] ~= NO_KEY then
  one_more_waiting(KEYS[6])
  if redis.call('TTL', KEYS[6]) < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[6], ARGV[5]) end
end
if ARGV[3] == '' then return redis.call('XADD', KEYS[2], '*', 'r', ARGV[2]) end
return redis.call('XADD', KEYS[2], '*', 'r', ARGV[2], 'd', string.format('%.3f', now + tonumber(ARGV[3])))
"""


# Delete the named letters still there, and count how many went.
DROP_SCRIPT = CLEARED_IF_EMPTY + """
local dropped = redis.call('XDEL', KEYS[1], unpack(ARGV))
if dropped > 0 then
  redis.pcall('HINCRBY', KEYS[2], 'dropped', dropped)
  cleared_if_empty(KEYS[1], KEYS[2])
end
return dropped
"""
DROP_BATCH = 500
# A letter's time past this (the year 3000) is no time it was set aside: the tables could not show it.
LATEST_TIME_S = 32_503_680_000.0
# From this share of the cap on, `persona queue dead`, stats and the dashboard warn.
NEAR_CAP_SHARE = 0.9


class DeadLetter(BaseModel):
    """One dead-lettered request and why it was set aside."""

    id: str
    request_id: str
    persona: str
    stream: str
    reason: str
    deliveries: int
    worker: str
    at: float
    payload: str


class RetryReport(BaseModel):
    """What ``retry_all`` re-queued, and what it left and why."""

    requeued: list[str] = Field(default_factory=list, description="dead-letter ids, newest first")
    full: dict[str, int] = Field(default_factory=dict, description="stream -> letters left because it was full")
    unreadable: int = Field(0, description="letters left because they hold no readable request")
    refused: dict[str, str] = Field(
        default_factory=dict, description="dead-letter id -> why it was left (its id in use by another request, "
                                          "a request of a newer contract)",
    )

    @property
    def left(self) -> int:
        return sum(self.full.values()) + self.unreadable + len(self.refused)


def _text(value: bytes | None) -> str:
    return value.decode(errors="replace") if value is not None else ""


def _count(value: bytes | None) -> int:
    """A whole number a letter holds (its deliveries); 0 where it holds none that can be read."""
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _time(value: bytes | None) -> float:
    """A time a letter holds (when it was set aside); 0.0, shown as none, where it holds none that can be read."""
    try:
        at = float(value or 0)
    except ValueError:
        return 0.0
    return at if 0.0 < at < LATEST_TIME_S else 0.0


def _parse(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    """A letter as it is listed, whatever wrote it: fields that cannot be read (a foreign
    writer's) are shown as none, never raised (they ended `queue dead`, `retry --all`,
    `drop --unreadable` and the page with a traceback, so the letter could not even be dropped)."""
    payload = _text(fields.get(b"r"))
    request_id, persona = "", ""
    try:
        request = GenerationRequest.from_json(payload)
        # One that names no id was listed under an id made up at each reading, and retried.
        request_id, persona = request.id if _names_id(request) else "", request.persona
    except ValueError:
        # A request of a newer contract is listed under its id and persona (`drop --unreadable`
        # deleted it, to be retried once upgraded); retrying it is refused, saying why. A
        # malformed one is listed as it is; retrying it is refused.
        request_id, persona = _newer_ids(payload)
    return DeadLetter(
        id=_text(entry_id), request_id=request_id, persona=persona, stream=_text(fields.get(b"stream")),
        reason=_text(fields.get(b"reason")), deliveries=_count(fields.get(b"deliveries")),
        worker=_text(fields.get(b"worker")), at=_time(fields.get(b"at")), payload=payload,
    )


def _newer_ids(payload: str) -> tuple[str, str]:
    """The id and persona of a request of a newer contract (see ``newer_contract``), read
    as they are; ('', '') for any other this contract cannot read."""
    fields = _object(payload)
    if not newer_contract(fields):
        return "", ""
    request_id, persona = fields.get("id"), fields.get("persona")
    return (request_id if isinstance(request_id, str) else "", persona if isinstance(persona, str) else "")


def _object(payload: str) -> dict:
    """A payload's JSON object; {} where it holds none."""
    try:
        fields = json.loads(payload)
    except (ValueError, RecursionError):
        return {}
    return fields if isinstance(fields, dict) else {}


def newer_contract(payload: str | dict) -> str:
    """Why a request (its JSON, or its fields) is of a newer contract than this one (a
    higher version, or fields this one lacks), as a retry says it; '' where it is not."""
    fields = payload if isinstance(payload, dict) else _object(payload)
    version = fields.get("version")
    if isinstance(version, int | float) and not isinstance(version, bool) and version > CONTRACT_VERSION:
        return f"it speaks contract version {str(version)[:40]}, and this persona speaks {CONTRACT_VERSION}"
    unknown = sorted(name for name in fields if name not in GenerationRequest.model_fields)
    if unknown:
        named = ", ".join(n[:40] for n in unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        return f"it has field(s) contract version {CONTRACT_VERSION} does not: {named} (a newer contract's, or misspelt)"
    return ""


def _names_id(request: GenerationRequest) -> bool:
    """Whether a request read from a letter named its id (else ``from_json`` made one up)."""
    return "id" in request.model_fields_set


def trimmed_count(counters: Mapping[str, int], held: int, *, since_cleared: bool = False) -> int:
    """How many dead letters the stream's cap deleted unseen: every one set aside, less
    those retried, dropped, or ``held`` still; with ``since_cleared``, only those since an
    operator last emptied the stream. ``counters`` and ``held`` must be read in one
    transaction; a letter set aside meanwhile is counted just after it is added, which
    can only make this one too low for a moment."""
    gone = counters.get("dead_lettered", 0) - counters.get("retried", 0) - counters.get("dropped", 0)
    cleared = counters.get("dead_trimmed_cleared", 0) if since_cleared else 0
    return max(0, gone - held - cleared)


def count_dead(client: redis.Redis) -> tuple[int, int]:
    """(letters held, letters trimmed at the cap since the stream was last emptied), read
    together in one round trip."""
    fields = ["dead_lettered", "retried", "dropped", "dead_trimmed_cleared"]
    pipe = client.pipeline(transaction=True)
    pipe.xlen(keys.STREAM_DEAD)
    pipe.hmget(keys.STATS_KEY, fields)
    held, values = pipe.execute()
    # A counter that is no number (a damaged one) is left out and named once with its repair.
    counters = read_counts(keys.STATS_KEY, {n: v for n, v in zip(fields, values, strict=True) if v is not None})
    return held, trimmed_count(counters, held, since_cleared=True)


def cap_warning(held: int, trimmed: int, cap: int = keys.DEAD_STREAM_MAX_LEN) -> str:
    """What to tell an operator whose dead-letter stream is near its cap (where Redis starts
    deleting the oldest unseen); '' while it is not."""
    if held < cap * NEAR_CAP_SHARE:
        return ""
    so_far = f" ({trimmed:,} so far)" if trimmed else ""
    return (
        f"the dead-letter stream holds {held:,} of about {cap:,}: past that Redis deletes the oldest unseen{so_far}; "
        "retry the ones still wanted (`persona queue retry ID` or `--all`) and drop the rest "
        "(`persona queue drop ID` or `--all`)"
    )


def trimmed_note(trimmed: int, cap: int = keys.DEAD_STREAM_MAX_LEN) -> str:
    """That dead letters were deleted unseen at the cap (since the stream was last emptied),
    and how many; '' if none were."""
    if not trimmed:
        return ""
    return (
        f"{trimmed:,} older dead letter(s) were deleted unseen when the stream passed its cap of about {cap:,} "
        "(said until the stream is emptied: retry or drop the rest)"
    )


def list_dead(client: redis.Redis, count: int = 100) -> list[DeadLetter]:
    """The newest dead letters first."""
    return [_parse(i, f) for i, f in client.xrevrange(keys.STREAM_DEAD, count=count)]


def find_dead(client: redis.Redis, entry_id: str) -> DeadLetter | None:
    """One dead letter by its id; None if there is none (gone, or not an id at all: a typo)."""
    if not ENTRY_ID.fullmatch(entry_id):
        return None
    rows = client.xrange(keys.STREAM_DEAD, min=entry_id, max=entry_id)
    return _parse(*rows[0]) if rows else None


def drop_dead(client: redis.Redis, entry_ids: list[str]) -> int:
    """Delete these dead letters for good; how many there were to delete (ids that are
    gone, or not ids at all, count for nothing)."""
    ids = [i for i in entry_ids if ENTRY_ID.fullmatch(i)]
    dropped = 0
    for start in range(0, len(ids), DROP_BATCH):
        dropped += int(client.eval(DROP_SCRIPT, 2, keys.STREAM_DEAD, keys.STATS_KEY, *ids[start : start + DROP_BATCH]))
    return dropped


def dead_ids(client: redis.Redis, *, unreadable: bool = False, page: int = 500) -> list[str]:
    """Every dead letter's id, newest first; with ``unreadable``, only those that hold no
    readable request (none of them can be retried)."""
    found, before = [], "+"
    while rows := client.xrevrange(keys.STREAM_DEAD, max=before, count=page):
        found += [letter.id for letter in (_parse(i, f) for i, f in rows) if not (unreadable and letter.request_id)]
        before = "(" + _text(rows[-1][0])
    return found


def retry_dead(client: redis.Redis, entry_id: str, max_length: int | None = None) -> str | None:
    """Re-queue one dead letter with its original arguments; the new entry id, or None if
    there is no such dead letter (gone, or not an id at all: a typo).

    With ``max_length`` (the queue's setting) a stream already that full refuses it with
    ``QueueBusy`` and the letter stays: `retry --all` of a day's dead letters used to
    push thousands past the limit, and every caller then heard "busy" until they drained.
    ValueError where the letter holds no readable request; InvalidRequest where its request
    names no id: it was re-queued under one made up, and its reply pushed where nobody waits.
    """
    letter = find_dead(client, entry_id)
    if letter is None:
        return None
    if newer := newer_contract(letter.payload):
        raise InvalidRequest(
            f"dead letter {entry_id} holds a request this persona cannot read whole ({newer}): retry it with an "
            f"upgraded persona once the workers are upgraded too, or delete it with `persona queue drop {entry_id}`"
        )
    request = GenerationRequest.from_json(letter.payload)  # ValueError: nothing to re-queue
    if not _names_id(request):
        raise InvalidRequest(
            f"dead letter {entry_id} holds a request without an id, so nobody could read its reply: delete it with "
            f"`persona queue drop {entry_id}`, and have its client send it again with an \"id\" of its own "
            "(1 to 128 characters, not used again for a day)"
        )
    allowed = (request.deadline - request.created_at) if request.deadline else 0.0
    now = time.time()
    fresh = request.model_copy(update={"created_at": now, "deadline": now + allowed if allowed > 0 else 0.0})
    stream = _bound_for(letter)
    new_id = client.eval(
        RETRY_SCRIPT, 8, keys.STREAM_DEAD, stream, keys.answered_key(request.id), keys.STATS_KEY,
        keys.reply_key(request.id), keys.user_pending_key(request.user) if request.user else keys.NO_KEY,
        keys.cancel_key(request.id), keys.digest_key(request.id),
        entry_id, fresh.to_json(), f"{allowed:.3f}" if allowed > 0 else "",
        "" if max_length is None else max_length,
        int(max(allowed, 0.0) * 2) + 60,  # as long as a submit's hold, for its own deadline
        payload_digest(letter.payload),
    )
    if new_id in (b"in_use", "in_use"):
        raise InvalidRequest(
            f"{id_in_use(request.id)}, so dead letter {entry_id} stays where it is: have its client send it again "
            f"under a new id, or `persona queue drop {entry_id}`"
        )
    if new_id in (b"busy", "busy"):
        from persona.monitoring import stream_label  # here: monitoring reads this module's counts

        raise QueueBusy(
            f"the {stream_label(stream)} stream already holds {max_length} requests (PERSONA_QUEUE__MAX_LENGTH), so dead letter {entry_id} "
            "stays where it is; retry it once the queue has drained (see `persona queue stats`)"
        )
    return _text(new_id) if new_id else None


def _bound_for(letter: DeadLetter) -> str:
    """The stream a dead letter goes back to."""
    return letter.stream if letter.stream in keys.STREAMS_BY_PRIORITY else keys.STREAM_INTERACTIVE


def retry_all(client: redis.Redis, page: int = 500, max_length: int | None = None) -> RetryReport:
    """Re-queue every dead letter that holds a readable request, newest first.

    The stream is read a page at a time from the newest entry back, so malformed letters
    (left where they are) never hide the readable ones behind them. With ``max_length``
    a stream that is full leaves its letters where they are (see ``retry_dead``), and
    the letters bound for the other stream still go: it used to stop at the first full
    one, and batch work waited behind a full chat stream that had nothing to do with it.
    """
    report = RetryReport()
    before = "+"
    while rows := client.xrevrange(keys.STREAM_DEAD, max=before, count=page):
        for entry_id, fields in rows:
            letter = _parse(entry_id, fields)
            stream = _bound_for(letter)
            if not letter.request_id:
                report.unreadable += 1
            elif stream in report.full:  # full a moment ago: not asked again for every letter
                report.full[stream] += 1
            else:
                try:
                    if retry_dead(client, letter.id, max_length):
                        report.requeued.append(letter.id)
                except QueueBusy:
                    report.full[stream] = 1
                except InvalidRequest as exc:  # its id in use by another request, or of a newer contract
                    report.refused[letter.id] = str(exc)
        before = "(" + _text(rows[-1][0])
    return report
