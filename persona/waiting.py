"""How long a caller waits for its reply, in what slices, and which Redis errors it rides out.

A wait lasts until the request's deadline (the one the queue stamps, if the caller left
it to the queue) and a little slack, or the caller's own timeout. It reads in slices
shorter than any socket read timeout, and rides out Redis out of reach (restarting,
loading its data) or refusing writes for now, pausing between tries, until that time is
up; a refused password ends it at once. A client with none of its connections left (more
callers share it than it may open: Redis itself is fine) refuses a request "busy" at once,
as it is submitted; a wait for one queued already rides it out, as other callers' slices
end and free their connections.

``persona.queue``'s clients, sync and async, wait by these rules.
"""

from __future__ import annotations

import time

import redis

from persona.contract import GenerationRequest
from persona.errors import QueueBusy, ReplyTimeout
from persona.redis_refusals import too_few_replicas
from persona.settings import QueueSettings

__all__ = ["no_connection_free", "outage", "outage_pause", "wait_seconds", "wait_slice"]

WAIT_SLACK_S = 5.0
# A caller waits for its reply in slices shorter than any client's socket read timeout
# (redis-py 8 defaults to 5 s), so one long BLMOVE is never cut off as a dead socket.
WAIT_SLICE_S = 2.0
# BLMOVE treats 0 as "forever": the last slice is never shorter than this.
MIN_SLICE_S = 0.01
# While Redis cannot be reached (restarting), a wait tries again this often until its deadline.
OUTAGE_PAUSE_S = 1.0
# Error replies of a Redis that refuses writes for now (see ``outage``), besides MISCONF's (a
# disk it cannot write), which redis-py gives no class of its own.
WRITES_REFUSED = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError)
OUT_OF_CONNECTIONS_TEXT = (
    "the queue is busy here: every connection this program may open to Redis is in use, each by a "
    "caller waiting for its reply; please try again in a moment"
)


def wait_seconds(request: GenerationRequest, timeout: float | None, settings: QueueSettings) -> float:
    """How long to wait: ``timeout``, else until the deadline (the one the queue stamps, for
    a request as it was before ``submit``: a wait on that one used to give up after 1 s)."""
    if timeout is not None:
        return timeout
    deadline = request.deadline or request.created_at + settings.default_deadline_s
    return max(1.0, deadline - time.time() + WAIT_SLACK_S)


def outage(exc: redis.exceptions.RedisError) -> bool:
    """Whether an error is Redis out of reach for now (restarting, loading its data), or
    refusing writes for now (a disk it cannot write, its memory full, a replica, too few
    replicas in step with a primary that asks for them: NOREPLICAS), which a wait
    rides out: a reply is read with BLMOVE, a write, and one waiting to be read is kept; not a
    refused password, which waiting cannot mend, nor a client out of connections (redis-py's
    MaxConnectionsError, a ConnectionError though none failed), which is "busy"."""
    refused = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError, redis.exceptions.MaxConnectionsError)
    if isinstance(exc, redis.exceptions.ResponseError):
        # MISCONF and NOREPLICAS are quoted in a pipeline's or a script's error, after its command.
        return isinstance(exc, WRITES_REFUSED) or "MISCONF " in str(exc) or too_few_replicas(exc)
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError) and not isinstance(exc, refused)


def outage_pause(exc: redis.exceptions.RedisError, left_s: float, *, queued: bool = False) -> float:
    """How long to pause before trying again a wait that ``exc`` cut short, with ``left_s``
    of its time left; re-raises ``exc`` if that time is up or the error is not an outage.

    A client out of connections raises QueueBusy at once for a request not ``queued`` yet (it
    was ridden out as "Redis cannot be reached", then raised as redis-py's MaxConnectionsError,
    the caller's whole deadline later). For one queued it is ridden out: that request may be
    answered, and was, unread, while its caller heard "busy" and asked again. Its time up, the
    pause is 0, and the wait ends with its last look (``no_connection_free`` if that finds none).
    """
    if isinstance(exc, redis.exceptions.MaxConnectionsError):
        if not queued:
            raise QueueBusy(OUT_OF_CONNECTIONS_TEXT) from exc
        return min(OUTAGE_PAUSE_S, max(0.0, left_s))
    if left_s <= 0 or not outage(exc):
        raise exc
    return min(OUTAGE_PAUSE_S, left_s)


def no_connection_free(request: GenerationRequest) -> ReplyTimeout:
    """The ReplyTimeout of a wait whose last look found every connection of its client in use."""
    return ReplyTimeout(
        f"no reply to request {request.id} for persona {request.persona!r} was read in time: every "
        "connection this program may open to Redis was in use, each by a caller waiting for its reply. "
        "The request is still queued and may yet be answered: wait for it again in a moment"
    )


def wait_slice(left_s: float) -> float:
    """The seconds one BLMOVE waits, of ``left_s`` left: at most a slice, never 0 ("forever")."""
    return min(max(left_s, MIN_SLICE_S), WAIT_SLICE_S)
