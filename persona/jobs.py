"""``Job``: one stream entry a worker has claimed, parsed from the fields that
``SUBMIT_SCRIPT`` writes (``persona.work_queue`` claims them)."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from persona.contract import GenerationRequest

__all__ = ["Job"]

# The fields of a stream entry, as SUBMIT_SCRIPT writes them.
REQUEST_FIELD = b"r"
EPOCH_FIELD = b"e"
DUE_FIELD = b"d"  # when the deadline falls, by Redis's clock (entries from older clients lack it)
# What a malformed request's problem names at most (pydantic lists every field wrong).
MAX_PROBLEMS_NAMED = 3
# How much of a field that cannot be read a problem quotes (a foreign writer's may be huge).
MAX_QUOTED_CHARS = 40
# The id at the front of a payload that is no JSON (cut short, a byte not UTF-8): the match
# ``queue_scripts.REQUEST_ID`` makes in Lua (``^{"id":"([%w_.:-]*)"``), with room for the
# spaces json.dumps writes, so its caller is answered why.
LEADING_ID = re.compile(r'\s*\{\s*"id"\s*:\s*"([A-Za-z0-9_.:-]+)"')
# Half of a UTF-16 pair, as ``contract`` mends it: no Redis key can hold one.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _due(value: bytes | str | None) -> float | None:
    """When an entry's deadline falls, from its ``d`` field; None where it has none.

    Raises ValueError, saying why, where the field is no finite number of seconds (a
    foreign or damaged writer's): an entry whose deadline cannot be read is malformed.
    """
    if not value:
        return None
    try:
        due = float(value)
    except (TypeError, ValueError):
        due = math.nan
    if not math.isfinite(due):
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        quoted = text[:MAX_QUOTED_CHARS] + ("…" if len(text) > MAX_QUOTED_CHARS else "")
        raise ValueError(f"malformed entry: its deadline (field d) is not a time in seconds: {quoted!r}")
    return due


def _problem(exc: ValueError) -> str:
    """Why a payload is not a request, in one line: the fields wrong and what is wrong with each."""
    if not isinstance(exc, ValidationError):  # worded whole by ``GenerationRequest.from_wire``
        return str(exc).splitlines()[0]
    errors = exc.errors()
    named = [f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg']}" for e in errors[:MAX_PROBLEMS_NAMED]]
    more = f" (and {len(errors) - MAX_PROBLEMS_NAMED} more)" if len(errors) > MAX_PROBLEMS_NAMED else ""
    return " ".join(("malformed request: " + "; ".join(named) + more).split())  # one line, whatever a message holds


@dataclass
class Job:
    """One claimed stream entry: a valid request, or the reason it is not one."""

    stream: str
    entry_id: str
    payload: bytes
    request: GenerationRequest | None = None
    problem: str | None = None
    claimed_at: float = field(default_factory=time.time)
    # The cancel epoch when it was submitted, if the entry carries one.
    epoch: bytes | None = None
    # Claimed with the epoch unchanged since: nobody has cancelled anything, this included.
    not_cancelled: bool = False
    # When its deadline falls by Redis's clock (None: not known yet; see ``time_by_default``).
    due: float | None = None
    # Whether ``due`` is the entry's own (its field d), not worked out by the worker.
    due_given: bool = False
    # Which delivery of the entry this is (a reclaim says; a new entry's is its first).
    deliveries: int = 1

    @classmethod
    def parse(cls, stream: str, entry_id: bytes | str, fields: dict) -> Job:
        entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        payload = fields.get(REQUEST_FIELD) or fields.get("r") or b""
        job = cls(stream=stream, entry_id=entry, payload=payload, epoch=fields.get(EPOCH_FIELD))
        try:
            # Read as a worker reads the request: one from a writer it cannot trust is set
            # aside, never raised (it stopped the worker answering anyone, turn after turn).
            job.due = _due(fields.get(DUE_FIELD) or fields.get("d"))
        except ValueError as exc:
            job.problem = str(exc)
            return job
        job.due_given = job.due is not None
        try:
            job.request = GenerationRequest.from_wire(payload)
        except ValueError as exc:
            job.problem = _problem(exc)
        return job

    @property
    def arrived_at(self) -> float:
        """When Redis added the entry, by its clock, in seconds: its id's milliseconds."""
        return int(self.entry_id.partition("-")[0]) / 1000

    def time_by_default(self, default_deadline_s: float, redis_offset: float) -> None:
        """Say when its deadline falls (``due``) where the entry does not (no field d: a direct
        writer's, a retried letter's): at its request's deadline (the caller's clock read as
        this machine's, ``redis_offset`` being Redis's clock less this one's), or, where that
        is 0, left out or no finite time, ``default_deadline_s`` after the entry arrived.
        Such a request used to wait for ever, and its answered mark to last a day."""
        if self.due is not None:
            return
        deadline = self.request.deadline if self.request is not None else 0.0
        if deadline and math.isfinite(deadline):
            self.due = deadline + redis_offset
        else:
            self.due = self.arrived_at + default_deadline_s

    def expired(self, redis_now: float) -> bool:
        """Whether its deadline has passed: by Redis's clock (``redis_now``: the worker's
        estimate of it) when the entry says when it falls, else by the caller's deadline."""
        if self.due is not None:
            return redis_now > self.due
        return self.request is not None and self.request.expired()

    @property
    def request_id(self) -> str | None:
        """The request's id, read from a malformed payload too where it holds one (its caller can be answered)."""
        return self.request.id if self.request is not None else self._raw("id")

    @property
    def user(self) -> str:
        """Who sent it ('' for nobody named), read from a malformed payload too."""
        return (self.request.user if self.request is not None else self._raw("user")) or ""

    def _raw(self, name: str) -> str | None:
        """A text field of the payload as JSON, whatever else is wrong with it (a byte that is not
        UTF-8 read as U+FFFD); the id also from the front of a payload that is no JSON (cut
        short); None if unreadable."""
        text = self.payload.decode(errors="replace") if isinstance(self.payload, bytes) else self.payload
        try:
            value = json.loads(text).get(name)
        except (ValueError, AttributeError, RecursionError):  # nested too deep for json: pydantic says so
            leading = LEADING_ID.match(text) if name == "id" else None
            value = leading[1] if leading else None
        return LONE_SURROGATE.sub("\ufffd", value) if isinstance(value, str) and value else None
