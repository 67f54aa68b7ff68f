"""The Redis Streams queue between callers and workers: the callers' side.

Callers (``QueueClient``, or ``AsyncQueueClient`` inside adapters) add a request to one
of two streams, interactive or batch, refused with ``QueueBusy`` once the stream holds
``max_length`` entries, then wait on the request's own reply list. A request is added
once however often its submission is sent (redis-py re-sends a call whose reply a
dropped connection lost), and a different request under an id in use is refused
(``InvalidRequest``: an id names its reply list, so ids must be unique for 24 h). A
caller reads its reply without removing it (BLMOVE of the list onto itself), so a reply
lost on the way back is read again on the retry; the caller deletes the lists it has
read with its next call, and keeps the replies it has read (the latest ``REPLIES_KEPT``),
so waiting again for a request answered already returns its reply at once. A wait rides out Redis restarting (its connection refused or
dropped) until the request's deadline, and no longer (redis-py's own reconnects end by
it too: ``connection.retrying_until``): the request is still queued, and its reply is
read once Redis is back. A wait that ends without a reply says why: no worker answered
in time (and whether workers run, are still starting, or none is there), the request is
not in the queue (never submitted, or lost with a Redis that keeps nothing over a
restart), or its reply was read already or expired unread.

This module submits, waits and reads; the rules both clients share live beside it:
``persona.waiting`` (how long a wait lasts, in what slices, and which Redis errors it
rides out), ``persona.unanswered`` (the last look, and the ``ReplyTimeout`` saying why no
reply came) and ``persona.busy`` (the look at a full stream, and the ``QueueBusy`` saying
why a request was refused).

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
from persona.busy import (
    check_submitted,
    full_ones,
    in_use_in_batch,
    look_at_full,
    partly_refused,
    refused_as_full,
)
from persona.connection import retrying_until
from persona.contract import GenerationReply, GenerationRequest, Priority
from persona.errors import InvalidRequest, QueueBusy
from persona.queue_scripts import CANCEL_SCRIPT, SUBMIT_SCRIPT, payload_digest
from persona.redis_refusals import too_few_replicas
from persona.settings import QueueSettings
from persona.unanswered import LONGER_WAIT, last_look, no_reply
from persona.validation import check_request
from persona.waiting import no_connection_free, outage_pause, wait_seconds, wait_slice
from persona.work_queue import Job, WorkQueue

__all__ = ["AsyncQueueClient", "Job", "QueueClient", "WorkQueue", "stream_for"]

log = logging.getLogger(__name__)

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
    user_key = keys.user_pending_key(request.user) if request.user else keys.NO_KEY
    hold_s = int(settings.default_deadline_s * 2) + 60  # a lost decrement heals itself
    allowance = request.deadline - request.created_at
    payload = request.to_json()
    stream_keys = [
        stream_for(request.priority), user_key, keys.CANCEL_EPOCH_KEY, keys.cancel_key(request.id),
        keys.reply_key(request.id), keys.answered_key(request.id), keys.STATS_KEY,  # where a refusal is counted
        keys.refused_key(request.id),  # so that it is counted once
        keys.digest_key(request.id),  # the same request sent again, or another under its id
    ]
    return stream_keys, [
        settings.max_length, payload, settings.max_pending_per_user, hold_s, int(waiting),
        f"{allowance:.3f}",  # its allowance, timed from now by Redis
        max(hold_s, int(allowance) + 60),  # its mark outlives any re-sent submission
        payload_digest(payload),
    ]


def _one_request_an_id(requests: list[GenerationRequest]) -> None:
    """InvalidRequest, naming them, if two different requests of a batch share an id (the
    second would be refused as the id is in use; the same request twice is queued once)."""
    first: dict[str, int] = {}
    for number, request in enumerate(requests):
        seen = first.setdefault(request.id, number)
        if seen != number and requests[seen].to_json() != request.to_json():
            raise InvalidRequest(
                f"requests {seen + 1} and {number + 1} of {len(requests)} are different requests that share id "
                f"{request.id} (ids must be unique for 24 h): make a new id for one; none of them was queued"
            )


def _ask_pipeline(pipe, request: GenerationRequest, settings: QueueSettings, wait_s: float, spent: list[str]) -> None:
    """Submit and start waiting for the reply in one round trip (deleting ``spent`` lists).

    EVAL, not EVALSHA: in a pipeline a missing script would only show after the wait.
    A request refused as its id is in use is told so after that first slice (WAIT_SLICE_S
    at most): the reply list waited on is the other request's, so nothing is pushed there
    to end the wait, and what it reads is not this request's reply (``check_submitted``
    raises first).
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
    pipe.blmove(key, key, wait_slice(wait_s), "LEFT", "LEFT")


def _cancel_keys_args(request_id: str, settings: QueueSettings) -> tuple[list[str], list]:
    """``CANCEL_SCRIPT``'s keys and arguments: the request's mark (see ``_withdrew``), its
    flag, and the epoch workers compare. The flag is set whatever the mark says: a request
    whose submission is still on its way is withdrawn as it is added."""
    return [keys.answered_key(request_id), keys.cancel_key(request_id), keys.CANCEL_EPOCH_KEY], [settings.reply_ttl_s]


def _why_not_now(exc: redis.exceptions.RedisError) -> str:
    """What cut a wait short, for its log line."""
    if isinstance(exc, redis.exceptions.MaxConnectionsError):
        return "every connection this program may open to Redis is in use"
    if too_few_replicas(exc):
        return "Redis refuses writes until enough of its replicas are in step with it (min-replicas-to-write)"
    if isinstance(exc, redis.exceptions.ResponseError):
        return "Redis refuses writes for now"
    return "Redis cannot be reached"


def _withdrew(mark: bytes | str | None) -> bool:
    """Whether a cancellation found its request waiting or running (its mark '': queued, not
    answered), rather than answered already or not in the queue (an unknown id)."""
    return mark is not None and not mark


def _asked(answers: list) -> tuple[bytes | str | None, bytes | redis.exceptions.RedisError | None]:
    """The submission's outcome and the first slice's read, from an ask pipeline's answers.

    A submission Redis refused (writes refused: nothing was queued) is raised, as ``submit``
    raises it. A slice refused after its submission went through (a request queued already,
    whose ask was sent again) is returned, for the wait to ride out as it rides out any
    slice's: raised, its caller heard Redis's error while the request was answered, for nobody.
    """
    outcome, got = answers[0], answers[-1]
    if isinstance(outcome, redis.exceptions.RedisError):
        raise outcome
    return outcome, got


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
        """A pipeline that takes the last look at a request gone unanswered (see ``unanswered.last_look``)."""
        pipe = self.redis.pipeline(transaction=False)
        last_look(pipe, request, stream_for(request.priority))
        return pipe

    def _found(self, request: GenerationRequest, looked: list) -> GenerationReply:
        """The reply a last look found (``_looking``), else ReplyTimeout saying why there is none."""
        mark, got, workers, holder = looked
        reply = self._read(request, got)
        if reply is None:
            raise no_reply(request, mark, self.settings, workers, holder, self.longer_wait)
        return reply

    def _looking_at_full(self, outcomes: list[tuple[GenerationRequest, bytes | str | None]]):
        """A pipeline that looks at each stream that refused one of these requests as full
        (see ``busy.look_at_full``), and the streams in its order; None if none did."""
        streams = list(dict.fromkeys(stream_for(request.priority) for request, outcome in outcomes
                                     if refused_as_full(outcome)))
        if not streams:
            return None, []
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            look_at_full(pipe, stream, self.settings.default_deadline_s)
        return pipe, streams

    def _full_ones(self, streams: list[str], looked: list | BaseException) -> dict[str, QueueBusy]:
        """QueueBusy for each stream that refused a request as full, from ``_looking_at_full``'s
        answers (a look that failed leaves the plain "busy")."""
        if isinstance(looked, BaseException):
            log.warning("could not look at the full queue: %s", looked)
            looked = None
        return full_ones(streams, looked, self.settings)

    def _outage_left(self, request: GenerationRequest, exc: redis.exceptions.RedisError, give_up: float,
                     first: bool, *, queued: bool = False) -> float:
        """How long to pause before trying a wait again that Redis being out of reach cut
        short; re-raises ``exc`` if the wait's time is up or the error is not an outage (see
        ``outage_pause``; ``queued``: whether the request is). Said once a wait (``first``):
        every second, it filled the terminal of a `persona ask`. A primary refusing writes
        until its replicas catch up (NOREPLICAS) is ridden out as one unable to save is
        (MISCONF): the slice's BLMOVE is a write, and the request stays queued meanwhile."""
        left = give_up - time.monotonic()
        pause = outage_pause(exc, left, queued=queued)
        if first:
            log.warning("waiting for request %s: %s (%s); trying again until its deadline, %.0f s from now",
                        request.id, _why_not_now(exc), str(exc).rstrip("."), left)
        return pause

    def _asking(self, request: GenerationRequest, give_up: float):
        """A pipeline that submits the request and starts waiting (see ``_ask_pipeline``);
        run it with ``raise_on_error=False`` and hand its answers to ``_asked``."""
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
        check_submitted(outcome, stream_for(request.priority), self.settings, self._full_of([(request, outcome)]),
                        request_id=request.id)
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
        safe, if a connection dropped before the answer: it is queued once. Two different
        requests under one id are refused before any is sent; one whose id another request
        holds already is refused with InvalidRequest, naming which were queued.
        """
        stamped = []
        for number, request in enumerate(requests, 1):
            try:
                check_request(request, self.settings)
            except InvalidRequest as exc:
                raise InvalidRequest(f"request {number} of {len(requests)} (id {request.id}): {exc}; "
                                     "none of them was queued") from None
            stamped.append(_stamp(request, self.settings))
        _one_request_an_id(stamped)
        pipe = self.redis.pipeline(transaction=False)
        for request in stamped:
            script_keys, args = _submit_keys_args(request, self.settings)
            pipe.eval(SUBMIT_SCRIPT, len(script_keys), *script_keys, *args)
        refusals: dict[str, list[int]] = {}  # why -> the refused requests' numbers (from 1)
        in_use: list[int] = []
        outcomes = list(zip(stamped, pipe.execute(), strict=True))
        full = self._full_of(outcomes)
        for number, (request, outcome) in enumerate(outcomes, 1):
            try:
                check_submitted(outcome, stream_for(request.priority), self.settings, full, request_id=request.id)
            except QueueBusy as exc:
                refusals.setdefault(str(exc), []).append(number)
            except InvalidRequest:
                in_use.append(number)
        if in_use:
            raise in_use_in_batch(stamped, in_use, refusals)
        if refusals:
            raise partly_refused(stamped, refusals)
        return stamped

    def wait(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        """Block until the request's reply arrives (at once for one this client has read
        already), riding out Redis restarting; ReplyTimeout, saying why, if none does."""
        return self._wait(request, time.monotonic() + wait_seconds(request, timeout, self.settings))

    def _wait(self, request: GenerationRequest, give_up: float, got=None, outages: int = 0) -> GenerationReply:
        """Wait until ``give_up``; ``got`` and ``outages``: what an ask's first slice read (the
        reply, None, or the error that cut it short), and the outages its submission rode out."""
        reply = self._replies.get(request.id)
        with retrying_until(give_up):
            if isinstance(got, redis.exceptions.RedisError):
                time.sleep(self._outage_left(request, got, give_up, first=not outages, queued=True))
                outages += 1
            elif got is not None:
                reply = self._read(request, got)
            while reply is None and (left := give_up - time.monotonic()) > 0:
                try:
                    reply = self._read(request, self._waiting(request, left).execute()[-1])
                except redis.exceptions.RedisError as exc:
                    time.sleep(self._outage_left(request, exc, give_up, first=not outages, queued=True))
                    outages += 1
            if reply is None:
                try:
                    looked = self._looking(request).execute()
                except redis.exceptions.MaxConnectionsError as exc:
                    raise no_connection_free(request) from exc
                reply = self._found(request, looked)
            return reply

    def ask(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        """Submit and wait: one round trip through the queue (one to Redis, too)."""
        check_request(request, self.settings)
        request = _stamp(request, self.settings)
        give_up = time.monotonic() + wait_seconds(request, timeout, self.settings)
        with retrying_until(give_up):
            outages = 0
            while True:
                try:  # Redis's refusals come back as answers; a lost connection raises
                    answers = self._asking(request, give_up).execute(raise_on_error=False)
                    break
                except redis.exceptions.RedisError as exc:  # queued or not, sent again it is queued once
                    time.sleep(self._outage_left(request, exc, give_up, first=not outages))
                    outages += 1
        outcome, got = _asked(answers)
        check_submitted(outcome, stream_for(request.priority), self.settings, self._full_of([(request, outcome)]),
                        request_id=request.id)
        return self._wait(request, give_up, got, outages)

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
        check_submitted(outcome, stream_for(request.priority), self.settings, await self._full_of([(request, outcome)]),
                        request_id=request.id)
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
        return await self._wait(request, time.monotonic() + wait_seconds(request, timeout, self.settings))

    async def _wait(self, request: GenerationRequest, give_up: float, got=None, outages: int = 0) -> GenerationReply:
        reply = self._replies.get(request.id)
        with retrying_until(give_up):
            if isinstance(got, redis.exceptions.RedisError):
                await asyncio.sleep(self._outage_left(request, got, give_up, first=not outages, queued=True))
                outages += 1
            elif got is not None:
                reply = self._read(request, got)
            while reply is None and (left := give_up - time.monotonic()) > 0:
                try:
                    reply = self._read(request, (await self._waiting(request, left).execute())[-1])
                except redis.exceptions.RedisError as exc:
                    await asyncio.sleep(self._outage_left(request, exc, give_up, first=not outages, queued=True))
                    outages += 1
            if reply is None:
                try:
                    looked = await self._looking(request).execute()
                except redis.exceptions.MaxConnectionsError as exc:
                    raise no_connection_free(request) from exc
                reply = self._found(request, looked)
            return reply

    async def ask(self, request: GenerationRequest, timeout: float | None = None) -> GenerationReply:
        check_request(request, self.settings)
        request = _stamp(request, self.settings)
        give_up = time.monotonic() + wait_seconds(request, timeout, self.settings)
        with retrying_until(give_up):
            outages = 0
            while True:
                try:
                    answers = await self._asking(request, give_up).execute(raise_on_error=False)
                    break
                except redis.exceptions.RedisError as exc:
                    await asyncio.sleep(self._outage_left(request, exc, give_up, first=not outages))
                    outages += 1
        outcome, got = _asked(answers)
        check_submitted(outcome, stream_for(request.priority), self.settings, await self._full_of([(request, outcome)]),
                        request_id=request.id)
        return await self._wait(request, give_up, got, outages)

    async def cancel(self, request_id: str) -> bool:
        script_keys, args = _cancel_keys_args(request_id, self.settings)
        return _withdrew(await self._cancel(keys=script_keys, args=args))
