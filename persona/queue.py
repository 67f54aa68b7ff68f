"""The Redis Streams queue between callers and workers.

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

Workers (``WorkQueue``) read both streams through one consumer group, interactive first,
and answer through a script that delivers a reply at most once per request id, counts
it, and acknowledges and deletes the entry in the same step. Entries held by a dead
worker (no heartbeat) or held past the visibility timeout are claimed by another;
after ``max_deliveries`` a request is moved to the dead-letter stream and its caller is
told so. A worker that leaves hands its unfinished entries back first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import redis.asyncio
from hiredis import pack_command

from persona import constants as keys
from persona.connection import retrying_until
from persona.contract import ErrorKind, GenerationReply, GenerationRequest, Priority
from persona.errors import InvalidRequest, QueueBusy, QueueError, ReplyTimeout
from persona.heartbeat import StartingWorker
from persona.queue_scripts import (
    DEAD_LETTER_SCRIPT,
    DELIVER_SCRIPT,
    KEEP_SCRIPT,
    RECORD_SCRIPT,
    REQUEUE_SCRIPT,
    SUBMIT_SCRIPT,
    WORKERS_SCRIPT,
)
from persona.settings import QueueSettings
from persona.telemetry import Tally
from persona.validation import check_request

__all__ = ["AsyncQueueClient", "Job", "QueueClient", "WorkQueue", "stream_for"]

log = logging.getLogger(__name__)

REQUEST_FIELD = b"r"
EPOCH_FIELD = b"e"
DUE_FIELD = b"d"  # when the deadline falls, by Redis's clock (entries from older clients lack it)
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
RECLAIM_BATCH = 100
# Read with every claim, after its entries: the cancel epoch and the active versions.
_READ_EPOCH = ("GET", keys.CANCEL_EPOCH_KEY)
_READ_ACTIVE = ("HGETALL", keys.ACTIVE_VERSIONS_KEY)


def _words(call: tuple) -> tuple:
    """A call as the words of its command: scripts by their hash (see ``WorkQueue._checked``)."""
    if isinstance(call[0], str):
        return call
    script, script_keys, args = call
    return ("EVALSHA", script.sha, len(script_keys), *script_keys, *args)


def _packed(calls: list[tuple]) -> list[bytes]:
    """Calls as one write: hiredis packs the words as redis-py would, without its Python loop."""
    return [b"".join([pack_command(_words(call)) for call in calls])]


def _read(connection) -> object:
    """One result from a connection: an error Redis answered is returned, not raised."""
    try:
        return connection.read_response()
    except redis.exceptions.ResponseError as exc:
        return exc


def stream_for(priority: Priority) -> str:
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
            f"the queue is busy ({settings.max_length} requests already waiting in "
            f"{stream_for(request.priority)}); please try again in a moment"
        )
    if outcome == "user_busy":
        raise QueueBusy(
            f"you already have {settings.max_pending_per_user} requests waiting; "
            "please wait for those answers first"
        )


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
            worker = StartingWorker.model_validate_json(info)
        except ValueError:  # written by another version: it still starts, but is not described
            continue
        worker.loading_s = round(max(0.0, float(now) - worker.since), 1)
        starting.append(worker)
    return int(live), sorted(starting, key=lambda w: (-w.loading_s, w.id))


def _pairs(flat: list | None, decode: bool = True) -> dict:
    """A flat [field, value, ...] reply as a dict (of str, unless ``decode`` is False)."""
    words = iter(flat or ())
    return {k.decode(): v.decode() for k, v in zip(words, words)} if decode else dict(zip(words, words))


def _stream_entries(got) -> list[tuple[str, list]]:
    """(stream, [(entry id, fields), ...]) pairs of an XREADGROUP reply (a RESP3 map or a RESP2 list)."""
    pairs = got.items() if isinstance(got, dict) else got or []
    return [(stream.decode() if isinstance(stream, bytes) else stream, found) for stream, found in pairs if found]


def _texts(mapping: dict | None) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (mapping or {}).items()}


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
    # When its deadline falls by Redis's clock (None: only the caller's clock says).
    due: float | None = None

    @classmethod
    def parse(cls, stream: str, entry_id: bytes | str, fields: dict) -> Job:
        entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        payload = fields.get(REQUEST_FIELD) or fields.get("r") or b""
        due = fields.get(DUE_FIELD) or fields.get("d")
        job = cls(stream=stream, entry_id=entry, payload=payload, epoch=fields.get(EPOCH_FIELD),
                  due=float(due) if due else None)
        try:
            job.request = GenerationRequest.from_json(payload)
        except ValueError as exc:
            job.problem = f"malformed request: {exc}".splitlines()[0]
        return job

    def expired(self, redis_now: float) -> bool:
        """Whether its deadline has passed: by Redis's clock (``redis_now``: the worker's
        estimate of it) when the entry says when it falls, else by the caller's deadline."""
        if self.due is not None:
            return redis_now > self.due
        return self.request is not None and self.request.expired()

    @property
    def request_id(self) -> str | None:
        if self.request is not None:
            return self.request.id
        try:
            value = json.loads(self.payload).get("id")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and value else None


class WorkQueue:
    """The worker's side of the queue."""

    def __init__(self, client: redis.Redis, settings: QueueSettings) -> None:
        self.redis = client
        self.settings = settings
        self._deliver = client.register_script(DELIVER_SCRIPT)
        self._requeue = client.register_script(REQUEUE_SCRIPT)
        self._keep_fresh = client.register_script(KEEP_SCRIPT)
        self._record = client.register_script(RECORD_SCRIPT)
        self._set_aside = client.register_script(DEAD_LETTER_SCRIPT)
        self.active_versions: dict[str, str] = {}
        self._drained = False  # whether the last claim left the streams empty
        # Riders sent with the last claim whose results are still to be read, and the
        # connection they will arrive on (held until ``confirm`` reads them).
        self._awaiting: tuple[redis.connection.AbstractConnection, list[tuple]] | None = None
        # The connection of the last exchange, kept for the next one: taking one from the
        # pool and giving it back costs redis-py a lock, a poll of the socket and its
        # bookkeeping every time, on the way to every reply.
        self._kept: redis.connection.AbstractConnection | None = None
        self.ensure_groups()

    def ensure_groups(self) -> None:
        """Create the consumer group on both streams (and the streams) if missing."""
        for stream in keys.STREAMS_BY_PRIORITY:
            try:
                self.redis.xgroup_create(stream, keys.CONSUMER_GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def claim(
        self,
        consumer: str,
        count: int,
        block_ms: int = keys.BLOCK_MS,
        *,
        deliver: list[tuple[Job | None, GenerationReply]] | None = None,
        record: Tally | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Job]:
        """New entries for this consumer: interactive ones first, then batch work.

        The same round trip delivers ``deliver`` (replies the consumer settled since its
        last claim, as ``deliver()`` would) and records ``record`` (its telemetry), and
        reads the active versions (``active_versions``, as this claim returned) and the
        cancel epoch, which spares ``cancelled`` a read for requests submitted since the
        last cancellation. Before a wait the replies go first and are confirmed at once.
        Without a wait the claim goes first and the replies right behind it: Redis
        delivers them while the consumer works on what it claimed, and ``awaiting`` says
        that their outcome is read by the next ``confirm`` (which every claim calls first).
        ``meanwhile`` is called once the replies are on their way, before the claim's
        results are read (and before any wait): the consumer's work that must not hold
        its replies back, such as logging them.
        """
        self.confirm()

        def riders() -> list[tuple]:
            built = []
            if deliver:
                built.append((self._deliver, *self._delivery(deliver, consumer)))
            if record:
                built.append((self._record, *record.script_keys_args()))
            return built

        entries: list[tuple[str, list]] = []
        waits_first = bool(block_ms and self._drained)
        if not waits_first:
            # Plain reads, not a script: Redis copies each entry into Lua and back out again,
            # which doubled its time per claimed entry. Interactive work first; batch work
            # fills what room is left, in a second round trip only when there is room.
            # The riders are built while Redis serves the read, and sent right behind it.
            calls = [self._read_new(consumer, count, keys.STREAM_INTERACTIVE),
                     _READ_EPOCH, _READ_ACTIVE]
            got, epoch, active = self._exchange(calls, now=len(calls), behind=riders, meanwhile=meanwhile)
            entries = _stream_entries(got)
            room = count - sum(len(found) for _, found in entries)
            if room > 0:
                # The epoch is read again after these entries: one cancelled since the first
                # read must not pass as unchanged (reading it after the entries is what is safe).
                calls = [self._read_new(consumer, room, keys.STREAM_BATCH), _READ_EPOCH]
                got, epoch = self._exchange(calls, now=len(calls))
                entries += _stream_entries(got)
        # After a claim that emptied the streams, go straight to the blocking read (it
        # returns at once if work came in meanwhile): an idle worker's round costs one
        # round trip less.
        if not entries and block_ms:
            self.confirm()
            # Nothing waiting: block on both streams, with the same reads behind the wait.
            ahead = riders() if waits_first else []  # else they went with the first read
            calls = [*ahead, (
                "XREADGROUP", "GROUP", keys.CONSUMER_GROUP, consumer, "COUNT", count, "BLOCK", block_ms,
                "STREAMS", *keys.STREAMS_BY_PRIORITY, ">", ">",
            ), _READ_EPOCH, _READ_ACTIVE]
            got, epoch, active = self._exchange(
                calls, now=len(calls), meanwhile=meanwhile if waits_first else None
            )[len(ahead):]
            entries = self._within(_stream_entries(got), count)
        epoch = epoch or b"0"
        self.active_versions = _pairs(active) if isinstance(active, list) else _texts(active)
        jobs = []
        for name, found in entries:
            for entry_id, fields in found:
                job = Job.parse(name, entry_id, _pairs(fields, decode=False) if isinstance(fields, list) else fields)
                job.not_cancelled = job.epoch == epoch
                jobs.append(job)
        self._drained = len(jobs) < count
        return jobs

    def _within(self, entries: list[tuple[str, list]], count: int) -> list[tuple[str, list]]:
        """At most ``count`` of these entries, interactive ones first; the rest go back to
        the end of their stream. (A blocking read of both streams counts per stream, so
        it can return twice the room.)"""
        kept: list[tuple[str, list]] = []
        for stream, found in entries:
            room = count - sum(len(f) for _, f in kept)
            if room > 0:
                kept.append((stream, found[:room]))
            for entry_id, _fields in found[max(room, 0) :]:
                self._requeue(keys=[stream], args=[keys.CONSUMER_GROUP, entry_id])
        return kept

    @staticmethod
    def _read_new(consumer: str, count: int, stream: str) -> tuple:
        """XREADGROUP of up to ``count`` new entries of one stream, without waiting."""
        return ("XREADGROUP", "GROUP", keys.CONSUMER_GROUP, consumer, "COUNT", count, "STREAMS", stream, ">")

    @property
    def drained(self) -> bool:
        """Whether the last claim left nothing waiting (so the next one would wait)."""
        return self._drained

    @property
    def awaiting(self) -> bool:
        """Whether the last claim's deliveries are still to be confirmed."""
        return self._awaiting is not None

    def confirm(self) -> None:
        """Read what became of the deliveries and recordings sent with the last claim.

        Raises what a delivery met (the caller keeps those replies to send again: a
        reply is delivered at most once, so sending one twice is safe).
        """
        if self._awaiting is None:
            return
        connection, calls = self._awaiting
        self._awaiting = None
        try:
            results = [_read(connection) for _ in calls]
        except BaseException:
            self._drop(connection)
            raise
        self._keep(connection)
        self._checked(calls, results)

    def _connection(self) -> redis.connection.AbstractConnection:
        """The kept connection while it is open, else one from the pool."""
        connection, self._kept = self._kept, None
        if connection is not None:
            try:
                usable = not connection.can_read(timeout=0)  # nothing to read: open, and owing nothing
            except (redis.exceptions.ConnectionError, OSError):
                usable = False
            if usable:
                return connection
            self._drop(connection)  # closed by Redis meanwhile (a restart, an idle timeout)
        return self.redis.connection_pool.get_connection()

    def _keep(self, connection: redis.connection.AbstractConnection) -> None:
        """Keep a connection whose results are all read for the next exchange (one is kept)."""
        if self._kept is None:
            self._kept = connection
        else:
            self.redis.connection_pool.release(connection)

    def release(self) -> None:
        """Give back the connection kept between exchanges (the worker is leaving)."""
        connection, self._kept = self._kept, None
        if connection is not None:
            self.redis.connection_pool.release(connection)

    def _drop(self, connection: redis.connection.AbstractConnection) -> None:
        """Close a connection that failed or went stale (what it still owes is lost) and return it to the pool."""
        connection.disconnect()
        self.redis.connection_pool.release(connection)

    def _exchange(
        self,
        calls: list[tuple],
        now: int,
        behind: Callable[[], list[tuple]] | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> list:
        """Send calls in one write; read the first ``now`` results, leave the rest to ``confirm``.

        A call is a tuple of words, or (script, keys, args) for a registered script,
        sent by its hash. ``behind`` builds more calls once the first are sent (while Redis
        works on them); they follow in a second write and are left to ``confirm`` too.
        ``meanwhile`` runs once everything is sent, before any result is read.
        """
        connection = self._connection()
        try:
            connection.send_packed_command(_packed(calls))
            more = behind() if behind else []
            if more:
                connection.send_packed_command(_packed(more))
                calls = [*calls, *more]
            if meanwhile:
                meanwhile()
            results = [_read(connection) for _ in calls[:now]]
        except BaseException:
            self._drop(connection)
            raise
        if now < len(calls):
            self._awaiting = (connection, calls[now:])
        else:
            self._keep(connection)
        return self._checked(calls[:now], results)

    def _checked(self, calls: list[tuple], results: list) -> list:
        """The results, once each call has succeeded.

        A script that Redis has forgotten (after a restart) is loaded and run again on
        its own, which is right because a command that failed did nothing. A recording
        that fails is logged, not raised: counting never costs a claim or a reply.
        """
        for at, call in enumerate(calls):
            if isinstance(results[at], redis.exceptions.NoScriptError) and not isinstance(call[0], str):
                script, script_keys, args = call
                results[at] = script(keys=script_keys, args=args)
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, Exception):
                if call[0] is self._record:
                    log.warning("could not record reply timings: %s", result)
                else:
                    raise result
        return results

    def record(self, tally: Tally) -> None:
        """Record a tally of replies now, in its own round trip."""
        if tally:
            self._exchange([(self._record, *tally.script_keys_args())], now=1)

    def cancelled(self, jobs: list[Job]) -> set[str]:
        """The request ids among these jobs that their callers have withdrawn."""
        return self.is_cancelled([job.request.id for job in jobs if job.request and not job.not_cancelled])

    def deliver(self, settled: list[tuple[Job | None, GenerationReply]], worker: str) -> int:
        """Send each reply (at most once per request id) and settle its entry.

        Returns how many replies were new; a duplicate is dropped silently because its
        caller has already been answered. Their telemetry is recorded separately
        (``record``, or with a later claim), so it never holds a caller's reply back.
        """
        if not settled:
            return 0
        script_keys, args = self._delivery(settled, worker)
        return int(self._deliver(keys=script_keys, args=args))

    def _delivery(self, settled: list[tuple[Job | None, GenerationReply]], worker: str) -> tuple[list[str], list]:
        """The delivery script's keys and arguments for these replies (see ``DELIVER_SCRIPT``)."""
        runs: dict[str, list] = {}  # counter -> request id, reply, sender of each reply it counts
        entries: dict[str, list[str]] = {}  # stream -> ids of the entries to settle
        for job, reply in settled:
            counter = "completed" if reply.ok else f"failed:{reply.error.kind if reply.error else 'internal'}"
            request = job.request if job else None
            runs.setdefault(counter, []).extend((reply.id, reply.to_json(), (request.user if request else None) or ""))
            if job:
                entries.setdefault(job.stream, []).append(job.entry_id)
        args: list = [
            self.settings.reply_ttl_s, keys.ANSWERED_TTL_S, keys.CONSUMER_GROUP, worker,
            keys.ANSWERED_KEY_PREFIX, keys.REPLY_KEY_PREFIX, keys.USER_PENDING_KEY_PREFIX, len(runs),
        ]
        for counter, values in runs.items():
            args += [counter, len(values) // 3, *values]
        args.append(len(entries))
        for stream, ids in entries.items():
            args += [stream, len(ids), *ids]
        return [keys.STATS_KEY], args

    def settle_without_reply(self, job: Job) -> None:
        """Acknowledge and drop an entry that has nobody to answer."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(job.stream, keys.CONSUMER_GROUP, job.entry_id)
        pipe.xdel(job.stream, job.entry_id)
        pipe.hincrby(keys.STATS_KEY, "failed:unanswerable", 1)
        pipe.execute()

    def is_cancelled(self, request_ids: list[str]) -> set[str]:
        """Which of these requests their callers have withdrawn."""
        if not request_ids:
            return set()
        flags = self.redis.mget([keys.cancel_key(i) for i in request_ids])
        return {i for i, flag in zip(request_ids, flags, strict=True) if flag is not None}

    def reclaim(
        self, consumer: str, live_consumers: set[str], *, holding: set[str], limit: int = RECLAIM_BATCH
    ) -> tuple[list[Job], list[tuple[Job, int]]]:
        """Take over entries a dead or stuck worker holds, up to ``limit`` of them.

        An entry is taken at once when its holder has no heartbeat, or after the
        visibility timeout otherwise (a live worker keeps the entries it has in hand
        fresh: see ``keep``). This consumer's own entries that it no longer has in hand
        (not in ``holding``: claimed by a turn that failed before it took them) are taken
        back at once. Returns the jobs to run now, and the jobs that have used up their
        deliveries (with their count), which the caller must dead-letter.
        """
        timeout_ms = int(self.settings.visibility_timeout_s * 1000)
        jobs: list[Job] = []
        exhausted: list[tuple[Job, int]] = []
        for stream in keys.STREAMS_BY_PRIORITY:
            if len(jobs) >= limit:
                break
            pending = self.redis.xpending_range(stream, keys.CONSUMER_GROUP, "-", "+", RECLAIM_BATCH)
            for item in pending:
                if len(jobs) >= limit:
                    break
                holder = item["consumer"].decode() if isinstance(item["consumer"], bytes) else item["consumer"]
                entry_id = item["message_id"]
                if holder == consumer:
                    if (entry_id.decode() if isinstance(entry_id, bytes) else entry_id) in holding:
                        continue  # in hand, however long it takes
                    lost = True
                else:
                    lost = holder not in live_consumers
                if not lost and item["time_since_delivered"] < timeout_ms:
                    continue
                min_idle = 0 if lost else timeout_ms
                claimed = self.redis.xclaim(stream, keys.CONSUMER_GROUP, consumer, min_idle, [entry_id])
                for claimed_id, fields in claimed:
                    if fields is None:  # deleted meanwhile
                        continue
                    job = Job.parse(stream, claimed_id, fields)
                    deliveries = item["times_delivered"] + 1
                    if deliveries > self.settings.max_deliveries:
                        exhausted.append((job, deliveries - 1))
                    else:
                        log.warning("reclaimed %s from %s (delivery %d)", job.request_id, holder, deliveries)
                        jobs.append(job)
        return jobs, exhausted

    def keep(self, consumer: str, jobs: list[Job]) -> None:
        """These entries are still in this consumer's hand (rows decoding, however long):
        their idle time starts again, so no worker reclaims them as stalled."""
        by_stream: dict[str, list[str]] = {}
        for job in jobs:
            by_stream.setdefault(job.stream, []).append(job.entry_id)
        for stream, ids in by_stream.items():
            for start in range(0, len(ids), RECLAIM_BATCH):
                self._keep_fresh(keys=[stream], args=[keys.CONSUMER_GROUP, consumer, *ids[start : start + RECLAIM_BATCH]])

    def dead_letter(self, job: Job, reason: str, deliveries: int, worker: str) -> bool:
        """Move a job to the dead-letter stream, settle its entry, count it and tell its
        caller, in one atomic step (see ``DEAD_LETTER_SCRIPT``). False if the entry was no
        longer pending (set aside or answered already): nothing is added or counted."""
        request_id = job.request_id
        reply = ""
        if request_id:
            reply = GenerationReply.failure(
                request_id, ErrorKind.dead_letter, f"this request failed {deliveries} times and was set aside: {reason}",
                persona=job.request.persona if job.request else "", worker=worker,
            ).to_json()
        user = (job.request.user if job.request else None) or ""
        script_keys = [
            keys.STATS_KEY, keys.STREAM_DEAD, job.stream,
            keys.answered_key(request_id) if request_id else "",
            keys.reply_key(request_id) if request_id else "",
            keys.user_pending_key(user) if request_id and user else "",
        ]
        args = [
            keys.CONSUMER_GROUP, job.entry_id, keys.DEAD_STREAM_MAX_LEN,
            job.payload, reason, deliveries, worker, time.time(),
            reply, self.settings.reply_ttl_s, keys.ANSWERED_TTL_S, f"failed:{ErrorKind.dead_letter}",
        ]
        return bool(self._set_aside(keys=script_keys, args=args))

    def hand_back(self, consumer: str) -> int:
        """Requeue every entry this consumer still holds, then leave the group."""
        moved = 0
        for stream in keys.STREAMS_BY_PRIORITY:
            while True:
                pending = self.redis.xpending_range(
                    stream, keys.CONSUMER_GROUP, "-", "+", RECLAIM_BATCH, consumername=consumer
                )
                if not pending:
                    break
                for item in pending:
                    self._requeue(keys=[stream], args=[keys.CONSUMER_GROUP, item["message_id"]])
                    moved += 1
            left = self.redis.xpending_range(stream, keys.CONSUMER_GROUP, "-", "+", 1, consumername=consumer)
            if not left:
                try:
                    self.redis.xgroup_delconsumer(stream, keys.CONSUMER_GROUP, consumer)
                except redis.exceptions.ResponseError as exc:
                    raise QueueError(f"cannot leave the consumer group: {exc}") from exc
        return moved
