"""Why the queue refused a request ("busy"): the ``QueueBusy`` a caller hears.

A submission is refused when its stream is full (``max_length`` entries) or its sender
already has ``max_pending_per_user`` requests waiting. A full stream is looked at
(``look_at_full``) so the refusal says what fills it and whether trying again can help;
a ``submit_many`` refused part-way names which requests were queued and which not.
A request under an id that another request holds is refused too, for good: as
``InvalidRequest`` (``id_in_use``), since only a new id helps.

``persona.queue``'s clients, sync and async, submit and take the look; the wording is here.
"""

from __future__ import annotations

from persona import constants as keys
from persona.contract import GenerationRequest
from persona.errors import InvalidRequest, QueueBusy
from persona.queue_scripts import FULL_SCRIPT, WORKERS_SCRIPT
from persona.settings import QueueSettings
from persona.unanswered import live_and_starting

__all__ = ["check_submitted", "full_ones", "id_in_use", "in_use_in_batch", "look_at_full", "partly_refused",
           "refused_as_full"]

# A full stream's untaken entries that a refusal looks through for dead ones (FULL_SCRIPT):
# 6 ms of Redis's time for 200 of 6000 characters each (1000 took 32 ms, on every refusal).
FULL_SCAN_LIMIT = 200


def refused_as_full(outcome: bytes | str | None) -> bool:
    """Whether ``SUBMIT_SCRIPT`` refused a request because its stream is full."""
    return outcome in (b"busy", "busy")


def id_in_use(request_id: str, other: str = "another request") -> str:
    """Why a request under an id that ``other`` holds is refused, and what to do."""
    return (f"request id {request_id} is in use by {other} (ids must be unique for 24 h): "
            "make a new id and send the request again")


def check_submitted(
    outcome: bytes | str | None, stream: str, settings: QueueSettings, full: dict[str, QueueBusy] | None = None,
    *, request_id: str = "",
) -> None:
    """Raise QueueBusy for a refusal of a request to ``stream`` (else the request is queued,
    now or before); ``full`` holds the one for each stream that refused a request as full
    (see ``full_ones``). InvalidRequest for request ``request_id`` refused because a different
    request holds its id (the same request sent again counts as queued)."""
    outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
    if outcome == "in_use":
        raise InvalidRequest(id_in_use(request_id))
    if outcome == "busy":
        raise (full or {}).get(stream) or _full(stream, settings, None)
    if outcome == "user_busy":
        mine = settings.max_pending_per_user
        raise QueueBusy(
            f"you already have {_requests(mine)} waiting; please wait for "
            f"{'that answer' if mine == 1 else 'those answers'} first"
        )


def look_at_full(pipe, stream: str, default_deadline_s: float) -> None:
    """Queue on a pipeline the look at a stream that refused a request as full
    (``FULL_SCRIPT``, then ``WORKERS_SCRIPT``): what fills it, and who could clear it. An
    entry that names no deadline is timed ``default_deadline_s`` from its arrival, as a worker times it."""
    pipe.eval(FULL_SCRIPT, 3, stream, keys.CANCEL_EPOCH_KEY, keys.WORKER_INDEX_KEY,
              keys.CONSUMER_GROUP, keys.CANCEL_KEY_PREFIX, FULL_SCAN_LIMIT, default_deadline_s)
    pipe.eval(WORKERS_SCRIPT, 2, keys.WORKER_INDEX_KEY, keys.STARTING_INDEX_KEY, keys.STARTING_KEY_PREFIX)


def full_ones(streams: list[str], looked: list | None, settings: QueueSettings) -> dict[str, QueueBusy]:
    """QueueBusy for each stream that refused a request as full, from the answers of
    ``look_at_full`` run for each in turn (None if those looks failed: the plain "busy")."""
    if looked is None:
        return {stream: _full(stream, settings, None) for stream in streams}
    return {stream: _full(stream, settings, looked[2 * n : 2 * n + 2]) for n, stream in enumerate(streams)}


def _full(stream: str, settings: QueueSettings, looked: list | None) -> QueueBusy:
    """QueueBusy for a stream that refused a request as full, saying what fills it and
    whether trying again can help (``looked``: ``look_at_full``'s answers; None if that
    look failed). "3 requests already waiting" was the limit, not a count: the entries
    were expired and withdrawn ones that, with no worker running, stayed for good."""
    limit = f"its limit, PERSONA_QUEUE__MAX_LENGTH={settings.max_length}"
    if not looked:
        return QueueBusy(f"the queue is busy ({stream} is full: {limit}); please try again in a moment")
    (length, in_flight, live, expired, withdrawn, scanned), workers = [int(n) for n in looked[0]], looked[1]
    if length < settings.max_length:
        return QueueBusy(f"the queue was full as this request came ({stream}: {limit}); it has room again: try again")
    if live:
        return QueueBusy(f"the queue is busy: {stream} holds {_requests(length)} ({limit}), {in_flight} of them "
                         "being answered; please try again in a moment")
    counted = _counted(length, in_flight, expired, withdrawn, scanned)
    _, starting = live_and_starting(workers)
    if starting:
        first = starting[0]
        why = (f"no worker serves yet to take them, or to clear away those nobody waits for (one is starting: "
               f"{first.doing()}, {first.loading_s:.0f} s so far): try again once `persona queue stats` lists it as live")
    else:
        why = ("no worker is running to take them, or to clear away those nobody waits for, so trying again will not "
               "help: start one (`persona worker`, or `persona up`), then try again")
    return QueueBusy(f"the queue is full: {stream} holds {_requests(length)} ({limit}): {counted}; {why}")


def _counted(length: int, in_flight: int, expired: int, withdrawn: int, scanned: int) -> str:
    """What fills a full stream with no live worker, from ``FULL_SCRIPT``'s counts. Past
    the untaken entries it looked at (the oldest ``FULL_SCAN_LIMIT``), it says how many it
    did not: those were once all counted as waiting, under "(of the oldest 200 untaken)"."""
    untaken = length - in_flight
    if scanned >= untaken:
        return _counts([(expired, "past their deadline"), (withdrawn, "withdrawn"),
                        (in_flight, "held by a worker that stopped"), (untaken - expired - withdrawn, "waiting")])
    among = _counts([(expired, "past their deadline"), (withdrawn, "withdrawn"),
                     (scanned - expired - withdrawn, "waiting")])
    counted = (f"{among} among the oldest {scanned} looked at, {untaken - scanned} more not looked at" if among
               else f"{untaken} not looked at")
    return f"{in_flight} held by a worker that stopped; of the rest, {counted}" if in_flight else counted


def _counts(parts: list[tuple[int, str]]) -> str:
    """Counts in words, those of 0 left out: "5 past their deadline, 192 waiting"."""
    return ", ".join(f"{n} {what}" for n, what in parts if n)


def _requests(count: int) -> str:
    """A count of requests in words: "1 request", "20 requests"."""
    return f"{count} request{'' if count == 1 else 's'}"


def partly_refused(stamped: list[GenerationRequest], refusals: dict[str, list[int]]) -> QueueBusy:
    """QueueBusy for a ``submit_many`` some of whose requests were refused, naming which."""
    refused_numbers = sorted(n for numbers in refusals.values() for n in numbers)
    refused = [stamped[n - 1] for n in refused_numbers]
    queued = [request for n, request in enumerate(stamped, 1) if n not in set(refused_numbers)]
    why = "".join(f"\n  {_numbered(numbers)}: {reason}" for reason, numbers in refusals.items())
    return QueueBusy(
        f"{len(queued)} of {len(stamped)} requests were queued and {len(refused)} refused (QueueBusy.queued "
        f"lists those to wait for; submit QueueBusy.refused again in a moment):{why}",
        queued=queued, refused=refused,
    )


def in_use_in_batch(stamped: list[GenerationRequest], in_use: list[int], refusals: dict[str, list[int]]) -> InvalidRequest:
    """InvalidRequest for a ``submit_many`` some of whose requests' ids other requests hold
    (``in_use``: their numbers, from 1), naming which were queued and which were refused busy."""
    queued = len(stamped) - len(in_use) - sum(len(numbers) for numbers in refusals.values())
    said = "".join(f"\n  request {n} (id {stamped[n - 1].id}): {id_in_use(stamped[n - 1].id)}" for n in in_use)
    said += "".join(f"\n  {_numbered(numbers)}: {reason} (submit those again in a moment)"
                    for reason, numbers in refusals.items())
    return InvalidRequest(f"{queued} of {len(stamped)} requests were queued; these were not:{said}")


def _numbered(numbers: list[int]) -> str:
    """Request numbers as runs: "request 3", "requests 2-4, 7"."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    said = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return f"request{'s' if len(numbers) > 1 else ''} {said}"
