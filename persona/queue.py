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
from persona.queue_scripts import SUBMIT_SCRIPT, WORKERS_SCRIPT
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
# Replies a client keeps after reading them, for a second wait on the same request.
REPLIES_KEPT = 256


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


def _check_submitted(outcome: bytes | str | None, request: GenerationRequest, settings: QueueSettings) -> None:
    """Raise QueueBusy for a refusal (else the request is queued, now or before)."""
    outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
    if outcome == "busy":
        raise QueueBusy(
            f"the queue is busy ({_requests(settings.max_length)} already waiting in "
            f"{stream_for(request.priority)}); please try again in a moment"
        )
    if outcome == "user_busy":
        mine = settings.max_pending_per_user
        raise QueueBusy(
            f"you already have {_requests(mine)} waiting; please wait for "
            f"{'that answer' if mine == 1 else 'those answers'} first"
        )


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
    """Whether an error is Redis out of reach for now (restarting, loading its data), which a
    wait rides out; not a refused password, which waiting cannot mend."""
    refused = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError) and not isinstance(exc, refused)


def _slice(left_s: float) -> float:
    return min(max(left_s, MIN_SLICE_S), WAIT_SLICE_S)


def _cancel(pipe, request_id: str, settings: QueueSettings) -> None:
    """Queue a cancellation on a MULTI pipeline: the request's mark (see ``_withdrew``), the
    flag, and the epoch workers compare. The flag is set whatever the mark says: a request
    whose submission is still on its way is withdrawn as it is added."""
    pipe.get(keys.answered_key(request_id))
    pipe.set(keys.cancel_key(request_id), 1, ex=settings.reply_ttl_s)
    pipe.incr(keys.CANCEL_EPOCH_KEY)


def _withdrew(results: list) -> bool:
    """Whether a cancellation found its request waiting or running (its mark '': queued, not
    answered), rather than answered already or not in the queue (an unknown id)."""
    mark = results[0]
    return mark is not None and not mark


def _no_reply(
    request: GenerationRequest, mark: bytes | str | None, settings: QueueSettings, workers: list | None = None
) -> ReplyTimeout:
    """Why a wait ended without a reply, from the request's mark (see ``constants``): queued
    and not answered yet (''), answered by the worker it names, or not in the queue (None).
    For one not answered yet, ``workers`` (``WORKERS_SCRIPT``'s answer) says who could have."""
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
    return ReplyTimeout(f"no worker answered request {request.id} for persona {request.persona!r} in time; "
                        + _who_could(*_workers(workers)))


_LONGER_WAIT = "`persona ask --timeout SECONDS`, or PERSONA_QUEUE__DEFAULT_DEADLINE_S for every caller"


def _who_could(live: int, starting: list[StartingWorker]) -> str:
    """What a caller whose request went unanswered should know about the workers, and do."""
    if live:
        return (f"{live} worker{'s are' if live > 1 else ' is'} running, but did not reach it before its deadline "
                f"(see `persona queue stats` for the queue's depth); try again, or give it longer ({_LONGER_WAIT})")
    if starting:
        first = starting[0]
        others = f" (and {len(starting) - 1} more)" if len(starting) > 1 else ""
        return (f"a worker is still starting{others}: {first.doing()}, {first.loading_s:.0f} s so far, and it answers "
                f"nothing until it has loaded. Wait until `persona queue stats` lists it as live and try again, or "
                f"give the request longer ({_LONGER_WAIT})")
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

    def __init__(self, client: redis.Redis | redis.asyncio.Redis, settings: QueueSettings) -> None:
        self.redis = client
        self.settings = settings
        self._submit = client.register_script(SUBMIT_SCRIPT)
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
        """A pipeline that reads the request's mark, its reply if it is there after all, and
        who could have answered it (``WORKERS_SCRIPT``)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.answered_key(request.id))
        pipe.lindex(keys.reply_key(request.id), 0)
        pipe.eval(WORKERS_SCRIPT, 2, keys.WORKER_INDEX_KEY, keys.STARTING_INDEX_KEY, keys.STARTING_KEY_PREFIX)
        return pipe

    def _found(self, request: GenerationRequest, looked: list) -> GenerationReply:
        """The reply a last look found (``_looking``), else ReplyTimeout saying why there is none."""
        mark, got, workers = looked
        reply = self._read(request, got)
        if reply is None:
            raise _no_reply(request, mark, self.settings, workers)
        return reply

    def _outage_left(self, request: GenerationRequest, exc: redis.exceptions.RedisError, give_up: float) -> float:
        """How long to pause before trying a wait again that Redis being out of reach cut
        short; re-raises ``exc`` if the wait's time is up or the error is not an outage."""
        left = give_up - time.monotonic()
        if left <= 0 or not _outage(exc):
            raise exc
        log.warning("waiting for request %s: Redis cannot be reached (%s); trying again until its deadline",
                    request.id, exc)
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
        _check_submitted(self._submit(keys=script_keys, args=args), request, self.settings)
        return request

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
        for number, (request, outcome) in enumerate(zip(stamped, pipe.execute(), strict=True), 1):
            try:
                _check_submitted(outcome, request, self.settings)
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
            while reply is None and (left := give_up - time.monotonic()) > 0:
                try:
                    reply = self._read(request, self._waiting(request, left).execute()[-1])
                except redis.exceptions.RedisError as exc:
                    time.sleep(self._outage_left(request, exc, give_up))
            return reply if reply is not None else self._found(request, self._looking(request).execute())

    def ask(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        """Submit and wait: one round trip through the queue (one to Redis, too)."""
        check_request(request, self.settings)
        request = _stamp(request, self.settings)
        give_up = time.monotonic() + _wait_seconds(request, timeout, self.settings)
        with retrying_until(give_up):
            outcome, *_, got = self._asking(request, give_up).execute()
        _check_submitted(outcome, request, self.settings)
        return self._wait(request, give_up, got)

    def cancel(self, request_id: str) -> bool:
        """Withdraw a request that is still waiting or running (its caller is answered
        "cancelled"). False if there was none to withdraw: answered already, or not in the queue."""
        pipe = self.redis.pipeline(transaction=True)
        _cancel(pipe, request_id, self.settings)
        return _withdrew(pipe.execute())


class AsyncQueueClient(_Caller):
    """The same as QueueClient, for asyncio code (the chat adapters)."""

    async def submit(self, request: GenerationRequest) -> GenerationRequest:
        check_request(request, self.settings)
        request = _stamp(request, self.settings)
        script_keys, args = _submit_keys_args(request, self.settings)
        _check_submitted(await self._submit(keys=script_keys, args=args), request, self.settings)
        return request

    async def wait(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        return await self._wait(request, time.monotonic() + _wait_seconds(request, timeout, self.settings))

    async def _wait(self, request: GenerationRequest, give_up: float, got=None) -> GenerationReply:
        reply = self._read(request, got) if got is not None else self._replies.get(request.id)
        with retrying_until(give_up):
            while reply is None and (left := give_up - time.monotonic()) > 0:
                try:
                    reply = self._read(request, (await self._waiting(request, left).execute())[-1])
                except redis.exceptions.RedisError as exc:
                    await asyncio.sleep(self._outage_left(request, exc, give_up))
            return reply if reply is not None else self._found(request, await self._looking(request).execute())

    async def ask(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        check_request(request, self.settings)
        request = _stamp(request, self.settings)
        give_up = time.monotonic() + _wait_seconds(request, timeout, self.settings)
        with retrying_until(give_up):
            outcome, *_, got = await self._asking(request, give_up).execute()
        _check_submitted(outcome, request, self.settings)
        return await self._wait(request, give_up, got)

    async def cancel(self, request_id: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        _cancel(pipe, request_id, self.settings)
        return _withdrew(await pipe.execute())
