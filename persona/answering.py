"""How the worker answers a job: with its text, or with an error reply saying why not.

A finished row is answered with its text (``_reply``: a chat reply cut off by its token
limit ends at its last whole sentence or word), or, where its deadline passed while its
long prompt was being read, with a timeout (``PROMPT_LATE``). A job is refused before
any decoding when it waited past its deadline or its request is invalid (``_refusal``); a
batch that fails answers each of its rows with the error (``_failed``); an entry that
holds no valid request is set aside as a dead letter, its caller told why where it can
be (``_set_aside``).
Every reply, text or error, says how long its request waited, all by Redis's clock
(``_waited_ms``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from persona.contract import ErrorKind, GenerationReply
from persona.endings import end_cut_off
from persona.engine import Completion
from persona.errors import PersonaError
from persona.jobs import Job
from persona.validation import request_problem

if TYPE_CHECKING:
    from persona.model_groups import _Row

__all__ = ["Answering"]

# Under the name these lines had before they moved here: the log format shows it.
log = logging.getLogger("persona.worker")

# What a row whose deadline passed while its prompt was read is answered (the engine
# stopped reading it then: its caller stops waiting at its deadline).
PROMPT_LATE = (
    "the reply was not finished by its deadline: its conversation was still being read; "
    "please ask again with a later deadline or a shorter conversation"
)


def _queued_at(job: Job) -> float:
    """When a job's request was queued, by Redis's clock, in seconds.

    The entry's deadline ``d`` is Redis's time as it was queued plus the allowance its
    caller gave it (its deadline less its creation: a difference on one clock, which no
    skew between machines changes), so ``d`` less that allowance is when it was queued;
    a hand-back's new entry keeps ``d``, so its wait still counts from then. An entry
    without ``d`` (a direct writer's, a retried letter without a deadline) is timed from
    its id, whose milliseconds Redis set as it added it.
    """
    request = job.request
    if job.due_given and request.deadline:
        return job.due - (request.deadline - request.created_at)
    return job.arrived_at


def _waited_ms(job: Job, redis_offset: float) -> float:
    """How long a job's request waited before this worker took it, in ms, all by Redis's
    clock: from its queueing to its claim (the claim by this machine's clock plus
    ``redis_offset``, Redis's clock minus this one's). The caller's clock used to start it
    and this machine's to end it, so a worker 30 s fast reported 30 s waits for instant
    replies (and one slow, none). Never below 0, where the offset learnt is a little off.
    One that expired waiting counts all of it, though its caller gave up at its deadline:
    that is how long the queue held it."""
    return max(0.0, (job.claimed_at + redis_offset - _queued_at(job)) * 1000)


class Answering:
    """The replies the worker answers jobs with.

    A mixin: the worker's ``__init__`` sets what these read (``settings``, ``queue``,
    ``id``, and ``_redis_offset``, Redis's clock minus this machine's).
    """

    def _set_aside(self, job: Job, deliveries: int | None = None) -> None:
        """Set an entry that holds no valid request aside as a dead letter, payload and all,
        and answer its caller with why where the payload names one. Such an entry used to
        be deleted, its payload in no log line, and not one command could show it."""
        self._time(job)
        problem = job.problem or "malformed request"
        letter = self.queue.dead_letter(
            job, problem, deliveries or job.deliveries, self.id, kind=ErrorKind.invalid,
            message=f"{problem}; it was set aside for an operator to see (`persona queue dead`)",
        )
        if letter:
            log.error("set aside malformed entry %s (request %s) as dead letter %s: %s; see `persona queue show %s`",
                      job.entry_id, job.request_id or "unknown", letter, problem, letter)

    def _refusal(self, job: Job) -> GenerationReply | None:
        """An error reply for a job with a request that must not be generated, else None.
        One that is invalid is refused so whatever its deadline: a deadline of 30 (meant as
        30 s) was answered "waited past its deadline; please ask again", again and again."""
        self._time(job)
        problem = request_problem(job.request, self.settings.queue)
        if problem:
            return self._failure(job, ErrorKind.invalid, problem)
        if job.expired(time.time() + self._redis_offset):
            return self._failure(job, ErrorKind.timeout, "the request waited past its deadline; please ask again")
        return None

    def _time(self, job: Job) -> None:
        """Say when a job's deadline falls where its entry does not (``Job.time_by_default``)."""
        job.time_by_default(self.settings.queue.default_deadline_s, self._redis_offset)

    def _reply(self, row: _Row, completion: Completion, batch: int, seconds: float | None = None) -> GenerationReply:
        """The reply to a finished row: its text, or a timeout where its deadline came first."""
        if completion.finish_reason == "deadline":
            return self._failure(row.job, ErrorKind.timeout, PROMPT_LATE)
        request = row.job.request
        seconds = completion.seconds if seconds is None else seconds
        log.debug(
            "answered %s persona=%s version=%s tokens=%d batch=%d in %.0f ms",
            request.id, row.persona.name, row.served.version, completion.new_tokens, batch, seconds * 1000,
        )
        # A continuation of a prefix keeps its leading space ("Life is" + " often"); a reply
        # starts at its first word.
        text = completion.text if request.mode == "complete" and request.prefix else completion.text.lstrip()
        if completion.finish_reason == "length" and request.mode == "chat":
            # Cut off by its token limit, often mid-word: a chat reply ends at its last finished
            # sentence or whole word. finish_reason stays "length" and new_tokens counts every
            # token generated. Completions (generate, post candidates) keep the raw text: curation
            # trims a post itself and records what it dropped.
            text = end_cut_off(text)
        # Validated from one dict: half the cost of building Timings and then the reply.
        return GenerationReply.model_validate({
            "id": request.id,
            "ok": True,
            "text": text,
            "persona": row.persona.name,
            "version": row.served.version,
            "worker": self.id,
            "finish_reason": completion.finish_reason,
            "new_tokens": completion.new_tokens,
            "message_chars": row.message_chars,
            "timings": {
                "queue_ms": _waited_ms(row.job, self._redis_offset),
                "generate_ms": seconds * 1000,
                "queue_measured": True,
            },
        })

    def _failed(self, members: list[_Row], exc: Exception) -> list[tuple[Job, GenerationReply]]:
        """Every row answered with the error that stopped its batch."""
        log.error("batch of %d for %s failed", len(members), members[0].served.loaded.name if members else "?", exc_info=exc)
        kind = ErrorKind.model if isinstance(exc, PersonaError) else ErrorKind.internal
        return [(r.job, self._failure(r.job, kind, f"generation failed: {exc}")) for r in members]

    def _failure(self, job: Job, kind: ErrorKind, message: str) -> GenerationReply:
        """An error reply for a job with a readable request, saying how long it waited: the
        worst waits end as timeouts, and percentiles of text replies alone hid them."""
        self._time(job)  # its answered mark lasts until its deadline (a withdrawn one's too)
        request = job.request
        return GenerationReply.failure(
            request.id, kind, message, persona=request.persona, worker=self.id,
            queue_ms=_waited_ms(job, self._redis_offset),
        )
