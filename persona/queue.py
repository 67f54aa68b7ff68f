"""The Redis Streams queue between callers and workers: the callers' side.

Callers (``QueueClient``, or ``AsyncQueueClient`` inside adapters) add a request to one
of two streams, interactive or batch, refused with ``QueueBusy`` once the stream holds
``max_length`` entries, then wait on the request's own reply list. A request is added
once however often its submission is sent (redis-py re-sends a call whose reply a
dropped connection lost), and a caller reads its reply without removing it (BLMOVE of
the list onto itself), so a reply lost on the way back is read again on the retry; the
caller deletes the lists it has read with its next call, and keeps the replies it has
read (the latest ``REPLIES_KEPT``), so waiting again for a request answered already
returns its reply at once. A wait rides out Redis restarting (its connection refused or
dropped) until the request's deadline, and no longer (redis-py's own reconnects end by
it too: ``connection.retrying_until``): the request is still queued, and its reply is
read once Redis is back. A wait that ends without a reply says why: no worker answered
in time (and whether workers run, are still starting, or none is there), the request is
not in the queue (never submitted, or lost with a Redis that keeps nothing over a
restart), or its reply was read already or expired unread.

Workers take requests and answer them through ``WorkQueue`` (in ``persona.work_queue``;
importable from here too, with ``Job``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis
import redis.asyncio

from persona import constants as keys
from persona.connection import retrying_until
from persona.contract import GenerationReply, GenerationRequest, Priority
from persona.errors import InvalidRequest, QueueBusy, ReplyTimeout
from persona.heartbeat import StartingWorker, longest_loading_first
from persona.queue_scripts import (
    CANCEL_SCRIPT,
    FULL_SCRIPT,
    HOLDER_SCRIPT,
    SUBMIT_SCRIPT,
    WORKERS_SCRIPT,
)
from persona.settings import QueueSettings
from persona.validation import check_request
from persona.work_queue import Job, WorkQueue

__all__ = ["AsyncQueueClient", "Job", "QueueClient", "WorkQueue", "stream_for"]

log = logging.getLogger(__name__)

WAIT_SLACK_S = 5.0
# A caller waits for its reply in slices shorter than any client's socket read timeout
# (redis-py 8 defaults to 5 s), so one long BLMOVE is never cut off as a dead socket.
WAIT_SLICE_S = 2.0
# BLMOVE treats 0 as "forever": the last slice is never shorter than this.
MIN_SLICE_S = 0.01
# While Redis cannot be reached (restarting), a wait tries again this often until its deadline.
OUTAGE_PAUSE_S = 1.0
# Error replies of a Redis that refuses writes for now (see ``_outage``), besides MISCONF's (a
# disk it cannot write), which redis-py gives no class of its own.
WRITES_REFUSED = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError)
# Replies a client keeps after reading them, for a second wait on the same request.
REPLIES_KEPT = 256
# A full stream's untaken entries that a refusal looks through for dead ones (FULL_SCRIPT):
# 6 ms of Redis's time for 200 of 6000 characters each (1000 took 32 ms, on every refusal).
FULL_SCAN_LIMIT = 200
# The entries in flight that an unanswered wait looks through for its own (HOLDER_SCRIPT).
HOLDER_SCAN_LIMIT = 1000
# How a request is given longer, for a caller that names none of its own (see ``_Caller``).
LONGER_WAIT = "a later deadline, or PERSONA_QUEUE__DEFAULT_DEADLINE_S for every caller"


def stream_for(priority: Priority) -> str:
    """The stream a request of this priority is queued on."""
    return keys.STREAM_INTERACTIVE if priority is Priority.interactive else keys.STREAM_BATCH


def _stamp(request: GenerationRequest, settings: QueueSettings) -> GenerationRequest:
    """Fill in the deadline if the caller left it to the queue."""
    if not request.deadline:
        request = request.model_copy(update={"deadline": request.created_at + settings.default_deadline_s})
    return request


def _submit_keys_args(
    request: GenerationRequest, settings: QueueSettings, waiting: bool = False
) -> tuple[list[str], list]:
    user_key = keys.user_pending_key(request.user) if request.user else ""
    hold_s = int(settings.default_deadline_s * 2) + 60  # a lost decrement heals itself
    allowance = request.deadline - request.created_at
    stream_keys = [
        stream_for(request.priority), user_key, keys.CANCEL_EPOCH_KEY, keys.cancel_key(request.id),
        keys.reply_key(request.id), keys.answered_key(request.id),
    ]
    return stream_keys, [
        settings.max_length, request.to_json(), settings.max_pending_per_user, hold_s, int(waiting),
        f"{allowance:.3f}",  # its allowance, timed from now by Redis
        max(hold_s, int(allowance) + 60),  # its mark outlives any re-sent submission
    ]


def _ask_pipeline(pipe, request: GenerationRequest, settings: QueueSettings, wait_s: float, spent: list[str]) -> None:
    """Submit and start waiting for the reply in one round trip (deleting ``spent`` lists).

    EVAL, not EVALSHA: in a pipeline a missing script would only show after the wait.
    """
    script_keys, args = _submit_keys_args(request, settings, waiting=True)
    pipe.eval(SUBMIT_SCRIPT, len(script_keys), *script_keys, *args)
    _take(pipe, keys.reply_key(request.id), wait_s, spent)


def _take(pipe, key: str, wait_s: float, spent: list[str]) -> None:
    """Queue on a pipeline: delete the reply lists already read (``spent``), then wait up to
    a slice of ``wait_s`` for the reply in list ``key`` and read it, leaving it there (a
    BLMOVE of the list onto itself): if the connection drops with the reply on its way,
    redis-py's retry reads it again. Its result is the pipeline's last."""
    if spent:
        pipe.unlink(*spent)
    pipe.blmove(key, key, _slice(wait_s), "LEFT", "LEFT")


def _full_stream(outcome: bytes | str | None, request: GenerationRequest) -> str | None:
    """The stream that refused a request as full, if it was refused so."""
    return stream_for(request.priority) if outcome in (b"busy", "busy") else None


def _check_submitted(
    outcome: bytes | str | None, request: GenerationRequest, settings: QueueSettings,
    full: dict[str, QueueBusy] | None = None,
) -> None:
    """Raise QueueBusy for a refusal (else the request is queued, now or before); ``full``
    holds the one for each stream that refused a request as full (see ``_full``)."""
    outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
    if outcome == "busy":
        stream = stream_for(request.priority)
        raise (full or {}).get(stream) or _full(stream, settings, None)
    if outcome == "user_busy":
        mine = settings.max_pending_per_user
        raise QueueBusy(
            f"you already have {_requests(mine)} waiting; please wait for "
            f"{'that answer' if mine == 1 else 'those answers'} first"
        )


def _looking_at(pipe, stream: str) -> None:
    """Queue on a pipeline the look at a stream that refused a request as full
    (``FULL_SCRIPT``, then ``WORKERS_SCRIPT``): what fills it, and who could clear it."""
    pipe.eval(FULL_SCRIPT, 3, stream, keys.CANCEL_EPOCH_KEY, keys.WORKER_INDEX_KEY,
              keys.CONSUMER_GROUP, keys.CANCEL_KEY_PREFIX, FULL_SCAN_LIMIT)
    pipe.eval(WORKERS_SCRIPT, 2, keys.WORKER_INDEX_KEY, keys.STARTING_INDEX_KEY, keys.STARTING_KEY_PREFIX)


def _full(stream: str, settings: QueueSettings, looked: list | None) -> QueueBusy:
    """QueueBusy for a stream that refused a request as full, saying what fills it and
    whether trying again can help (``looked``: ``_looking_at``'s answers; None if that
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
    parts = [(expired, "past their deadline"), (withdrawn, "withdrawn"),
             (in_flight, "held by a worker that stopped"),
             (length - expired - withdrawn - in_flight, "waiting")]
    counted = ", ".join(f"{n} {what}" for n, what in parts if n)
    if scanned < length - in_flight:
        counted += f" (of the oldest {scanned} untaken)"
    _, starting = _workers(workers)
    if starting:
        first = starting[0]
        why = (f"no worker serves yet to take them, or to clear away those nobody waits for (one is starting: "
               f"{first.doing()}, {first.loading_s:.0f} s so far): try again once `persona queue stats` lists it as live")
    else:
        why = ("no worker is running to take them, or to clear away those nobody waits for, so trying again will not "
               "help: start one (`persona worker`, or `persona up`), then try again")
    return QueueBusy(f"the queue is full: {stream} holds {_requests(length)} ({limit}): {counted}; {why}")


def _requests(count: int) -> str:
    """A count of requests in words: "1 request", "20 requests"."""
    return f"{count} request{'' if count == 1 else 's'}"


def _partly_refused(stamped: list[GenerationRequest], refusals: dict[str, list[int]]) -> QueueBusy:
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


def _wait_seconds(request: GenerationRequest, timeout: float | None, settings: QueueSettings) -> float:
    """How long to wait: ``timeout``, else until the deadline (the one the queue stamps, for
    a request as it was before ``submit``: a wait on that one used to give up after 1 s)."""
    if timeout is not None:
        return timeout
    deadline = request.deadline or request.created_at + settings.default_deadline_s
    return max(1.0, deadline - time.time() + WAIT_SLACK_S)


def _outage(exc: redis.exceptions.RedisError) -> bool:
    """Whether an error is Redis out of reach for now (restarting, loading its data), or
    refusing writes for now (a disk it cannot write, its memory full, a replica), which a wait
    rides out: a reply is read with BLMOVE, a write, and one waiting to be read is kept; not a
    refused password, which waiting cannot mend."""
    refused = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)
    if isinstance(exc, redis.exceptions.ResponseError):
        return isinstance(exc, WRITES_REFUSED) or "MISCONF " in str(exc)  # in a pipeline's error, after its command
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError) and not isinstance(exc, refused)


def _slice(left_s: float) -> float:
    return min(max(left_s, MIN_SLICE_S), WAIT_SLICE_S)


def _cancel_keys_args(request_id: str, settings: QueueSettings) -> tuple[list[str], list]:
    """``CANCEL_SCRIPT``'s keys and arguments: the request's mark (see ``_withdrew``), its
    flag, and the epoch workers compare. The flag is set whatever the mark says: a request
    whose submission is still on its way is withdrawn as it is added."""
    return [keys.answered_key(request_id), keys.cancel_key(request_id), keys.CANCEL_EPOCH_KEY], [settings.reply_ttl_s]


def _withdrew(mark: bytes | str | None) -> bool:
    """Whether a cancellation found its request waiting or running (its mark '': queued, not
    answered), rather than answered already or not in the queue (an unknown id)."""
    return mark is not None and not mark


def _no_reply(
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
                        + _who_could(*_workers(workers), longer=longer))


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


def _workers(found: list | None) -> tuple[int, list[StartingWorker]]:
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


class _Caller:
    """What both clients keep: their Redis, settings, and the reply lists they have read."""

    def __init__(
        self, client: redis.Redis | redis.asyncio.Redis, settings: QueueSettings, *, longer_wait: str = LONGER_WAIT
    ) -> None:
        """``longer_wait``: how this client's caller gives a request longer, for a ReplyTimeout
        to name (a command's own option, say); the library names no command."""
        self.redis = client
        self.settings = settings
        self.longer_wait = longer_wait
        self._submit = client.register_script(SUBMIT_SCRIPT)
        self._cancel = client.register_script(CANCEL_SCRIPT)
        # Reply lists read and not yet deleted: the next wait or ask deletes them. (Each
        # also expires on its own, after the reply TTL: one noted by another thread just
        # as they are taken is left to that.)
        self._spent: list[str] = []
        # The replies read, by request id (the newest REPLIES_KEPT): a second wait for one
        # returns it, where its deleted list would have kept that wait to its deadline.
        self._replies: dict[str, GenerationReply] = {}

    def _take_spent(self) -> list[str]:
        spent, self._spent = self._spent, []
        return spent

    def _waiting(self, request: GenerationRequest, left: float):
        """A pipeline that waits a slice of ``left`` for the request's reply (see ``_take``)."""
        pipe = self.redis.pipeline(transaction=False)
        _take(pipe, keys.reply_key(request.id), left, self._take_spent())
        return pipe

    def _read(self, request: GenerationRequest, got: bytes | None) -> GenerationReply | None:
        """The reply read, if one came (its list noted as spent, the reply kept)."""
        if got is None:
            return None
        self._spent.append(keys.reply_key(request.id))
        reply = self._replies[request.id] = GenerationReply.from_json(got)
        if len(self._replies) > REPLIES_KEPT:
            with contextlib.suppress(StopIteration, RuntimeError, KeyError):  # another thread's turn
                del self._replies[next(iter(self._replies))]
        return reply

    def _looking(self, request: GenerationRequest):
        """A pipeline that reads the request's mark, its reply if it is there after all, who
        could have answered it (``WORKERS_SCRIPT``), and who holds it (``HOLDER_SCRIPT``)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.answered_key(request.id))
        pipe.lindex(keys.reply_key(request.id), 0)
        pipe.eval(WORKERS_SCRIPT, 2, keys.WORKER_INDEX_KEY, keys.STARTING_INDEX_KEY, keys.STARTING_KEY_PREFIX)
        pipe.eval(HOLDER_SCRIPT, 2, stream_for(request.priority), keys.WORKER_INDEX_KEY,
                  keys.CONSUMER_GROUP, request.id, HOLDER_SCAN_LIMIT)
        return pipe

    def _found(self, request: GenerationRequest, looked: list) -> GenerationReply:
        """The reply a last look found (``_looking``), else ReplyTimeout saying why there is none."""
        mark, got, workers, holder = looked
        reply = self._read(request, got)
        if reply is None:
            raise _no_reply(request, mark, self.settings, workers, holder, self.longer_wait)
        return reply

    def _looking_at_full(self, outcomes: list[tuple[GenerationRequest, bytes | str | None]]):
        """A pipeline that looks at each stream that refused one of these requests as full
        (see ``_full``), and the streams in its order; None if none did."""
        streams = list(dict.fromkeys(s for request, outcome in outcomes if (s := _full_stream(outcome, request))))
        if not streams:
            return None, []
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            _looking_at(pipe, stream)
        return pipe, streams

    def _full_ones(self, streams: list[str], looked: list | BaseException) -> dict[str, QueueBusy]:
        """QueueBusy for each stream that refused a request as full, from ``_looking_at_full``'s
        answers (a look that failed leaves the plain "busy")."""
        if isinstance(looked, BaseException):
            log.warning("could not look at the full queue: %s", looked)
            return {stream: _full(stream, self.settings, None) for stream in streams}
        return {stream: _full(stream, self.settings, looked[2 * n : 2 * n + 2]) for n, stream in enumerate(streams)}

    def _outage_left(self, request: GenerationRequest, exc: redis.exceptions.RedisError, give_up: float,
                     first: bool) -> float:
        """How long to pause before trying a wait again that Redis being out of reach cut
        short; re-raises ``exc`` if the wait's time is up or the error is not an outage. Said
        once a wait (``first``): every second, it filled the terminal of a `persona ask`."""
        left = give_up - time.monotonic()
        if left <= 0 or not _outage(exc):
            raise exc
        if first:
            why = "refuses writes for now" if isinstance(exc, redis.exceptions.ResponseError) else "cannot be reached"
            log.warning("waiting for request %s: Redis %s (%s); trying again until its deadline, %.0f s from now",
                        request.id, why, str(exc).rstrip("."), left)
        return min(OUTAGE_PAUSE_S, left)

    def _asking(self, request: GenerationRequest, give_up: float):
        """A pipeline that submits the request and starts waiting (see ``_ask_pipeline``)."""
        pipe = self.redis.pipeline(transaction=False)
        _ask_pipeline(pipe, request, self.settings, give_up - time.monotonic(), self._take_spent())
        return pipe


class QueueClient(_Caller):
    """Submit requests and wait for their replies (blocking)."""

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queue a request; InvalidRequest if it breaks the limits, QueueBusy if full."""
        check_request(request, self.settings)
        request = _stamp(request, self.settings)
        script_keys, args = _submit_keys_args(request, self.settings)
        outcome = self._submit(keys=script_keys, args=args)
        _check_submitted(outcome, request, self.settings, self._full_of([(request, outcome)]))
        return request

    def _full_of(self, outcomes: list[tuple[GenerationRequest, bytes | str | None]]) -> dict[str, QueueBusy]:
        """QueueBusy for each stream that refused one of these requests as full, saying what fills it."""
        pipe, streams = self._looking_at_full(outcomes)
        if pipe is None:
            return {}
        try:
            looked = pipe.execute()
        except redis.exceptions.RedisError as exc:  # the refusal stands, said plainly
            looked = exc
        return self._full_ones(streams, looked)

    def submit_many(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Queue many requests in one round trip; returns them (deadlines stamped) once all are queued.

        Every one is checked before any is sent: InvalidRequest names the first that breaks
        the limits, and nothing is queued. Each is then refused or queued on its own, as
        ``submit`` would (a worker may make room part-way; one sender may be over their
        share while others are not): if any was refused, QueueBusy lists exactly which were
        queued (``queued``) and which were not (``refused``). Sending a request again is
        safe, if a connection dropped before the answer: it is queued once.
        """
        stamped = []
        for number, request in enumerate(requests, 1):
            try:
                check_request(request, self.settings)
            except InvalidRequest as exc:
                raise InvalidRequest(f"request {number} of {len(requests)} (id {request.id}): {exc}; "
                                     "none of them was queued") from None
            stamped.append(_stamp(request, self.settings))
        pipe = self.redis.pipeline(transaction=False)
        for request in stamped:
            script_keys, args = _submit_keys_args(request, self.settings)
            pipe.eval(SUBMIT_SCRIPT, len(script_keys), *script_keys, *args)
        refusals: dict[str, list[int]] = {}  # why -> the refused requests' numbers (from 1)
        outcomes = list(zip(stamped, pipe.execute(), strict=True))
        full = self._full_of(outcomes)
        for number, (request, outcome) in enumerate(outcomes, 1):
            try:
                _check_submitted(outcome, request, self.settings, full)
            except QueueBusy as exc:
                refusals.setdefault(str(exc), []).append(number)
        if refusals:
            raise _partly_refused(stamped, refusals)
        return stamped

    def wait(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        """Block until the request's reply arrives (at once for one this client has read
        already), riding out Redis restarting; ReplyTimeout, saying why, if none does."""
        return self._wait(request, time.monotonic() + _wait_seconds(request, timeout, self.settings))

    def _wait(self, request: GenerationRequest, give_up: float, got=None) -> GenerationReply:
        reply = self._read(request, got) if got is not None else self._replies.get(request.id)
        with retrying_until(give_up):
            outages = 0
            while reply is None and (left := give_up - time.monotonic()) > 0:
                try:
                    reply = self._read(request, self._waiting(request, left).execute()[-1])
                except redis.exceptions.RedisError as exc:
                    time.sleep(self._outage_left(request, exc, give_up, first=not outages))
                    outages += 1
            return reply if reply is not None else self._found(request, self._looking(request).execute())

    def ask(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        """Submit and wait: one round trip through the queue (one to Redis, too)."""
        check_request(request, self.settings)
        request = _stamp(request, self.settings)
        give_up = time.monotonic() + _wait_seconds(request, timeout, self.settings)
        with retrying_until(give_up):
            outcome, *_, got = self._asking(request, give_up).execute()
        _check_submitted(outcome, request, self.settings, self._full_of([(request, outcome)]))
        return self._wait(request, give_up, got)

    def cancel(self, request_id: str) -> bool:
        """Withdraw a request that is still waiting or running (its caller is answered
        "cancelled"). False if there was none to withdraw: answered already, or not in the queue."""
        script_keys, args = _cancel_keys_args(request_id, self.settings)
        return _withdrew(self._cancel(keys=script_keys, args=args))


class AsyncQueueClient(_Caller):
    """The same as QueueClient, for asyncio code (the chat adapters)."""

    async def submit(self, request: GenerationRequest) -> GenerationRequest:
        check_request(request, self.settings)
        request = _stamp(request, self.settings)
        script_keys, args = _submit_keys_args(request, self.settings)
        outcome = await self._submit(keys=script_keys, args=args)
        _check_submitted(outcome, request, self.settings, await self._full_of([(request, outcome)]))
        return request

    async def _full_of(self, outcomes: list[tuple[GenerationRequest, bytes | str | None]]) -> dict[str, QueueBusy]:
        pipe, streams = self._looking_at_full(outcomes)
        if pipe is None:
            return {}
        try:
            looked = await pipe.execute()
        except redis.exceptions.RedisError as exc:  # the refusal stands, said plainly
            looked = exc
        return self._full_ones(streams, looked)

    async def wait(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        return await self._wait(request, time.monotonic() + _wait_seconds(request, timeout, self.settings))

    async def _wait(self, request: GenerationRequest, give_up: float, got=None) -> GenerationReply:
        reply = self._read(request, got) if got is not None else self._replies.get(request.id)
        with retrying_until(give_up):
            outages = 0
            while reply is None and (left := give_up - time.monotonic()) > 0:
                try:
                    reply = self._read(request, (await self._waiting(request, left).execute())[-1])
                except redis.exceptions.RedisError as exc:
                    await asyncio.sleep(self._outage_left(request, exc, give_up, first=not outages))
                    outages += 1
            return reply if reply is not None else self._found(request, await self._looking(request).execute())

    async def ask(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        check_request(request, self.settings)
        request = _stamp(request, self.settings)
        give_up = time.monotonic() + _wait_seconds(request, timeout, self.settings)
        with retrying_until(give_up):
            outcome, *_, got = await self._asking(request, give_up).execute()
        _check_submitted(outcome, request, self.settings, await self._full_of([(request, outcome)]))
        return await self._wait(request, give_up, got)

    async def cancel(self, request_id: str) -> bool:
        script_keys, args = _cancel_keys_args(request_id, self.settings)
        return _withdrew(await self._cancel(keys=script_keys, args=args))
