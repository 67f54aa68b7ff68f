"""Entries claimed but not settled, from the worker's side (``WorkQueue`` has these
methods from ``PendingEntries``).

Entries held by a dead worker (no heartbeat) or held past the visibility timeout are
claimed by another (``reclaim``); a live worker keeps the entries it has in hand fresh
(``keep``). After ``max_deliveries`` a request is moved to the dead-letter stream and its
caller is told so (``dead_letter``); so is an entry that holds no valid request, at once.
A worker that leaves hands its unfinished entries back first (``hand_back``), and leaves
the consumer group; the consumers of workers that died without leaving are forgotten
while reclaiming (``forget_gone``). An entry the submit script did not add (written
straight onto the stream) whose request id another request holds is set aside, not
generated (``_unique``): its reply would have been dropped, and its caller left waiting.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import redis

from persona import constants as keys
from persona.busy import id_in_use
from persona.contract import ErrorKind, GenerationReply
from persona.errors import QueueError
from persona.jobs import Job
from persona.queue_scripts import payload_digest

if TYPE_CHECKING:
    from redis.commands.core import Script

    from persona.settings import QueueSettings

__all__ = ["PendingEntries", "answered_until"]

# Under the name these lines had before they moved here: the log format shows it.
log = logging.getLogger("persona.work_queue")

RECLAIM_BATCH = 100
# Who holds the id of an entry set aside by ``_unique``, by ``OWN_IDS_SCRIPT``'s verdict.
HELD_BY = {"waiting": "another request, still waiting for its answer",
           "answered": "another request, answered already"}
# How often one worker looks for the consumers of workers that are gone (``forget_gone``):
# each look reads every consumer of both streams, and a fleet has many workers reclaiming.
FORGET_EVERY_S = 30.0


def answered_until(jobs: Iterable[Job | None]) -> str:
    """Until when (Redis's time, as ``queue_scripts.ANSWERED_TTL`` reads it) the answered
    marks of these jobs' requests must last: a minute past the latest of their deadlines;
    '' where one's deadline is unknown (an older client's entry, a reply without its entry).

    What the mark guards is over by then. A submission sent again (redis-py re-sends a call
    whose answer a dropped connection lost; `ask` rides out an outage) comes before the
    deadline and its slack, and must find the mark, not queue the request a second time; a
    cancellation or a caller's last look, at the latest as its wait ends (5 s past the
    deadline), reads "answered" in it. A second worker holding the same entry (reclaimed
    from one that stalled, or whose heartbeat lapsed) answers by the deadline too: a row
    still decoding then is answered "late", one claimed past it "timed out", at once. The
    mark also outlives the reply's own TTL (``ANSWERED_TTL``), so no second reply lands in a
    list its caller may still read. It used to last a day whatever the deadline: about
    110 bytes a request, 1 GB of Redis at 100 requests a second. Only a worker stalled
    past all that that then delivers would answer twice, into a list nobody reads.
    """
    latest = 0.0
    for job in jobs:
        if job is None or job.due is None:
            return ""
        latest = max(latest, job.due)
    return f"{latest + keys.ANSWERED_PAST_DEADLINE_S:.3f}"


class PendingEntries:
    """Reclaiming, keeping fresh, dead-lettering and handing back claimed entries."""

    # Set by ``WorkQueue``: its client and settings, and the scripts it registers.
    redis: redis.Redis
    settings: QueueSettings
    _requeue: Script
    _keep_fresh: Script
    _set_aside: Script
    _forget: Script
    _own_ids: Script
    _forgot_at: float = -FORGET_EVERY_S  # monotonic time of the last look (none yet)

    def reclaim(
        self, consumer: str, live_consumers: set[str], *, holding: set[str], limit: int = RECLAIM_BATCH
    ) -> tuple[list[Job], list[tuple[Job, int]]]:
        """Take over entries a dead or stuck worker holds, up to ``limit`` of them.

        An entry is taken at once when its holder has no heartbeat, or after the
        visibility timeout otherwise (a live worker keeps the entries it has in hand
        fresh: see ``keep``). This consumer's own entries that it no longer has in hand
        (not in ``holding``: claimed by a turn that failed before it took them) are taken
        back at once. Returns the jobs to run now, and the jobs that have used up their
        deliveries (with their count), which the caller must dead-letter. Every
        ``FORGET_EVERY_S`` it also forgets the consumers of workers that are gone (``forget_gone``).
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
                    deliveries = job.deliveries = item["times_delivered"] + 1
                    if deliveries > self.settings.max_deliveries:
                        # Set aside, its mark lasts until a minute past its deadline, not a day.
                        exhausted.append((self._timed(job), deliveries - 1))
                        continue
                    jobs.append(job)
                    if job.request is not None:
                        log.warning("reclaimed %s from %s (delivery %d)", job.request_id, holder, deliveries)
                    else:  # the worker sets it aside as it processes it (it logged "reclaimed None")
                        log.warning(
                            "reclaimed malformed entry %s (%s) from %s (delivery %d): it is set aside as a dead "
                            "letter (see `persona queue dead`)", job.entry_id,
                            f"request {job.request_id}" if job.request_id else "no readable request id",
                            holder, deliveries,
                        )
        jobs = self._unique(jobs, consumer)
        if time.monotonic() - self._forgot_at >= FORGET_EVERY_S:
            try:
                self.forget_gone(consumer)
            except redis.exceptions.RedisError as exc:  # housekeeping: the entries claimed above go on
                log.warning("could not forget the consumers of workers that are gone (%s); trying again in %.0f s",
                            exc, FORGET_EVERY_S)
        return jobs, exhausted

    def _unique(self, jobs: list[Job], worker: str) -> list[Job]:
        """These jobs, less those whose request id another request holds, set aside (see
        ``dead_letter``) by ``worker``.

        Only entries the submit script did not add are looked at (no cancel epoch: written
        straight onto the stream, or a retried letter): it refuses a different request under
        an id in use, so the callers' entries cost no extra round trip. Each such entry's id
        is marked as its own (see ``OWN_IDS_SCRIPT``); one under an id answered already or
        held by another request waiting is set aside and answered ``invalid`` where its
        reply list is no other caller's. Generated, its reply was dropped as a second answer.
        One that repeats a request answered already, byte for byte, is dropped (``_drop_sent_again``).
        """
        foreign = [job for job in jobs if job.epoch is None and job.request is not None]
        if not foreign:
            return jobs
        args: list = [keys.ANSWERED_KEY_PREFIX, keys.DIGEST_KEY_PREFIX, self.settings.reply_ttl_s]
        timed = {job.entry_id: self._timed(job) for job in foreign}  # marks that last a day where it has no d
        for job in foreign:
            args += [job.request.id, payload_digest(job.payload), answered_until([timed[job.entry_id]])]
        verdicts = [v.decode() if isinstance(v, bytes) else v for v in self._own_ids(keys=[], args=args)]
        held = {job.entry_id: HELD_BY[v] for job, v in zip(foreign, verdicts, strict=True) if v in HELD_BY}
        again = [job for job, v in zip(foreign, verdicts, strict=True) if v == "duplicate"]
        if again:
            self._drop_sent_again(again)
        for job in jobs:
            if job.entry_id in held:
                why = id_in_use(job.request.id, held[job.entry_id])
                letter = self.dead_letter(timed[job.entry_id], why, job.deliveries, worker, kind=ErrorKind.invalid,
                                          message=f"{why}; it was not generated, and was set aside for an "
                                                  "operator to see (`persona queue dead`)")
                log.warning("set aside entry %s as dead letter %s, not generated: %s", job.entry_id, letter, why)
        dropped = held.keys() | {job.entry_id for job in again}
        return [job for job in jobs if job.entry_id not in dropped]

    def _drop_sent_again(self, jobs: list[Job]) -> None:
        """Acknowledge and delete entries that repeat, byte for byte, a request answered
        already (a direct writer sent it again): no letter, no second reply. Set aside as
        "in use by another request", they pushed an ``invalid`` reply into the list the
        writer reads, after or instead of its answer."""
        pipe = self.redis.pipeline(transaction=True)
        for job in jobs:
            pipe.xack(job.stream, keys.CONSUMER_GROUP, job.entry_id)
            pipe.xdel(job.stream, job.entry_id)
        pipe.execute()
        for job in jobs:
            log.info("dropped entry %s: request %s sent again, answered already", job.entry_id, job.request.id)

    def _timed(self, job: Job) -> Job:
        """A copy of a job that says when its deadline falls where its entry does not, as a
        worker times it (``Job.time_by_default``), for its answered mark to last until then.

        The copy is timed with no clock offset (a caller's deadline read on Redis's clock):
        a skew between clocks moves the mark's end by as much, within its minute of slack.
        The job itself is left for the worker to time with the offset it measured.
        """
        timed = dataclasses.replace(job)
        timed.time_by_default(self.settings.default_deadline_s, 0.0)
        return timed

    def forget_gone(self, consumer: str) -> list[str]:
        """Delete the consumers of workers that are gone (see ``FORGET_SCRIPT``): none holds
        an entry, none has done anything for the visibility timeout, and none has a live
        heartbeat (``consumer``, the one looking, is never forgotten). Returns their names.
        A worker killed with kill -9 never leaves the group itself, and each start is a new
        consumer: they piled up in `XINFO CONSUMERS`."""
        self._forgot_at = time.monotonic()
        idle_ms = int(self.settings.visibility_timeout_s * 1000)
        forgotten = []
        for stream in keys.STREAMS_BY_PRIORITY:
            names = self._forget(keys=[stream, keys.WORKER_INDEX_KEY], args=[keys.CONSUMER_GROUP, idle_ms, consumer])
            forgotten += [n.decode() if isinstance(n, bytes) else n for n in names]
        if forgotten:
            log.info("forgot the consumers of %d worker(s) that are gone: %s",
                     len(set(forgotten)), ", ".join(sorted(set(forgotten))))
        return forgotten

    def keep(self, consumer: str, jobs: list[Job]) -> None:
        """These entries are still in this consumer's hand (rows decoding, however long):
        their idle time starts again, so no worker reclaims them as stalled."""
        by_stream: dict[str, list[str]] = {}
        for job in jobs:
            by_stream.setdefault(job.stream, []).append(job.entry_id)
        for stream, ids in by_stream.items():
            for start in range(0, len(ids), RECLAIM_BATCH):
                self._keep_fresh(keys=[stream], args=[keys.CONSUMER_GROUP, consumer, *ids[start : start + RECLAIM_BATCH]])

    def dead_letter(
        self, job: Job, reason: str, deliveries: int, worker: str, *,
        kind: ErrorKind = ErrorKind.dead_letter, message: str | None = None,
    ) -> str | None:
        """Move a job to the dead-letter stream, settle its entry, count it and tell its
        caller (where its id can be read, a malformed request's too), in one atomic step
        (see ``DEAD_LETTER_SCRIPT``). The caller hears ``kind`` and ``message`` (by default:
        it failed ``deliveries`` times, and why). Returns the letter's id; None if the entry
        was no longer pending (set aside or answered already): nothing is added or counted."""
        request_id = job.request_id
        reply = ""
        if request_id:
            reply = GenerationReply.failure(
                request_id, kind, message or f"this request failed {deliveries} times and was set aside: {reason}",
                persona=job.request.persona if job.request else "", worker=worker,
            ).to_json()
        user = job.user
        script_keys = [
            keys.STATS_KEY, keys.STREAM_DEAD, job.stream,
            keys.answered_key(request_id) if request_id else keys.NO_KEY,
            keys.reply_key(request_id) if request_id else keys.NO_KEY,
            keys.user_pending_key(user) if request_id and user else keys.NO_KEY,
            keys.digest_key(request_id) if request_id else keys.NO_KEY,
        ]
        args = [
            keys.CONSUMER_GROUP, job.entry_id, keys.DEAD_STREAM_MAX_LEN,
            job.payload, reason, deliveries, worker, time.time(),
            reply, self.settings.reply_ttl_s, answered_until([job]), f"failed:{kind}", payload_digest(job.payload),
        ]
        letter = self._set_aside(keys=script_keys, args=args)
        return letter.decode() if isinstance(letter, bytes) else (letter or None)

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
