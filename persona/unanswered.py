"""Why a wait ended without a reply: the ``ReplyTimeout`` a caller hears.

A last look (``last_look``) reads the request's mark (see ``constants``), its reply if it
came after all, who could have answered it (``WORKERS_SCRIPT``) and who holds it
(``HOLDER_SCRIPT``). From those, ``no_reply`` says which it is: no worker answered in time
(and whether workers run, one is still starting and for how long, or none is there), a
worker took it and is still answering or stopped with it (its heartbeat lapsed), the
request is not in the queue (never submitted, or lost with a Redis that keeps nothing
over a restart), or its reply was read already or expired unread.

``persona.queue``'s clients, sync and async, wait and take the look; the wording is here.
"""

from __future__ import annotations

from persona import constants as keys
from persona.contract import GenerationRequest
from persona.errors import ReplyTimeout
from persona.heartbeat import StartingWorker, longest_loading_first
from persona.queue_scripts import HOLDER_SCRIPT, WORKERS_SCRIPT
from persona.settings import QueueSettings

__all__ = ["last_look", "live_and_starting", "no_reply"]

# The entries in flight that an unanswered wait looks through for its own (HOLDER_SCRIPT).
HOLDER_SCAN_LIMIT = 1000
# How a request is given longer, for a caller that names none of its own (a client's ``longer_wait``).
LONGER_WAIT = "a later deadline, or PERSONA_QUEUE__DEFAULT_DEADLINE_S for every caller"


def last_look(pipe, request: GenerationRequest, stream: str) -> None:
    """Queue on a pipeline the look at a request gone unanswered on ``stream``: its mark,
    its reply if it is there after all, who could have answered it (``WORKERS_SCRIPT``),
    and who holds it (``HOLDER_SCRIPT``)."""
    pipe.get(keys.answered_key(request.id))
    pipe.lindex(keys.reply_key(request.id), 0)
    pipe.eval(WORKERS_SCRIPT, 2, keys.WORKER_INDEX_KEY, keys.STARTING_INDEX_KEY, keys.STARTING_KEY_PREFIX)
    pipe.eval(HOLDER_SCRIPT, 2, stream, keys.WORKER_INDEX_KEY, keys.CONSUMER_GROUP, request.id, HOLDER_SCAN_LIMIT)


def no_reply(
    request: GenerationRequest, mark: bytes | str | None, settings: QueueSettings, workers: list | None = None,
    holder: list | None = None, longer: str = LONGER_WAIT,
) -> ReplyTimeout:
    """Why a wait ended without a reply, from the request's mark (see ``constants``): queued
    and not answered yet (''), answered by the worker it names, or not in the queue (None).
    For one not answered yet, ``holder`` (``HOLDER_SCRIPT``'s answer) says which worker has
    it in hand, if one took it, else ``workers`` (``WORKERS_SCRIPT``'s) says who could have;
    ``longer`` is how the caller gives a request longer."""
    if mark is None:
        return ReplyTimeout(
            f"request {request.id} for persona {request.persona!r} is not in the queue: it was never "
            "submitted (submit it, or use ask), or Redis lost it (a Redis that keeps nothing over a "
            "restart), or it was answered over a day ago. Submit it again to have it answered"
        )
    if mark:
        worker = mark.decode(errors="replace") if isinstance(mark, bytes) else mark
        return ReplyTimeout(
            f"request {request.id} was answered (by worker {worker}), but its reply is "
            f"gone: it was read already, by another client (keep the reply wait returns), or it waited "
            f"unread past {settings.reply_ttl_s} s. Submit it again with a new id for a new answer"
        )
    if holder:
        return ReplyTimeout(f"request {request.id} for persona {request.persona!r} was not answered in time: "
                            + _held(*holder, longer=longer))
    return ReplyTimeout(f"no worker answered request {request.id} for persona {request.persona!r} in time; "
                        + _who_could(*live_and_starting(workers), longer=longer))


def _held(worker: bytes | str, held_ms: int, deliveries: int, live: int, longer: str) -> str:
    """What a caller should know of the worker holding its unanswered request (``HOLDER_SCRIPT``):
    "did not reach it" was said of a request a worker had taken and was still answering."""
    worker = worker.decode(errors="replace") if isinstance(worker, bytes) else worker
    taken = f"worker {worker} took it {int(held_ms) / 1000:.1f} s ago"
    again = f", for the {_ordinal(int(deliveries))} time" if int(deliveries) > 1 else ""
    if int(live):
        return (f"{taken}{again} and is still answering it (a long message or reply takes longer); give it "
                f"longer ({longer})")
    return (f"{taken}{again}, but its heartbeat has lapsed: it stopped with the request unfinished, and the "
            "next live worker takes it over (is one running? See `persona queue stats`)")


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _who_could(live: int, starting: list[StartingWorker], longer: str = LONGER_WAIT) -> str:
    """What a caller whose request went unanswered should know about the workers, and do."""
    if live:
        return (f"{live} worker{'s are' if live > 1 else ' is'} running, but none took it before its deadline "
                f"(see `persona queue stats` for the queue's depth); try again, or give it longer ({longer})")
    if starting:
        first = starting[0]
        others = f" (and {len(starting) - 1} more)" if len(starting) > 1 else ""
        return (f"a worker is still starting{others}: {first.doing()}, {first.loading_s:.0f} s so far, and it answers "
                f"nothing until it has loaded. Wait until `persona queue stats` lists it as live and try again, or "
                f"give the request longer ({longer})")
    return "is a worker running (`persona worker`, or `persona up`)? See `persona queue stats`"


def live_and_starting(found: list | None) -> tuple[int, list[StartingWorker]]:
    """The live workers' count and the starting workers (longest first) from ``WORKERS_SCRIPT``."""
    if not found:
        return 0, []
    now, live, *infos = found
    starting = []
    for info in infos:
        try:
            starting.append(StartingWorker.model_validate_json(info))
        except ValueError:  # written by another version: it still starts, but is not described
            continue
    return int(live), longest_loading_first(float(now), starting)
