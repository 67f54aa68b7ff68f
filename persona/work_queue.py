"""The worker's side of the Redis Streams queue (``persona.queue`` is the callers' side).

Workers (``WorkQueue``) read both streams through one consumer group, interactive first,
and answer through a script that delivers a reply at most once per request id, counts
it, and acknowledges and deletes the entry in the same step. Entries held by a dead
worker (no heartbeat) or held past the visibility timeout are claimed by another;
after ``max_deliveries`` a request is moved to the dead-letter stream and its caller is
told so. A worker that leaves hands its unfinished entries back first. (Those entries'
side is ``PendingEntries``, in ``persona.pending_entries``; a claimed entry is a ``Job``,
in ``persona.jobs``: both importable from here too.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import redis
from hiredis import pack_command

from persona import constants as keys
from persona.contract import GenerationReply
from persona.jobs import DUE_FIELD, EPOCH_FIELD, REQUEST_FIELD, Job  # noqa: F401 - still importable from here
from persona.pending_entries import RECLAIM_BATCH, PendingEntries, answered_until  # noqa: F401 - still importable from here
from persona.queue_scripts import (
    DEAD_LETTER_SCRIPT,
    DELIVER_SCRIPT,
    FORGET_SCRIPT,
    KEEP_SCRIPT,
    OWN_IDS_SCRIPT,
    RECORD_SCRIPT,
    REQUEUE_SCRIPT,
)
from persona.settings import QueueSettings
from persona.telemetry import Tally, outcome_counter

__all__ = ["Job", "WorkQueue"]

log = logging.getLogger(__name__)

# Replies to record the telemetry of, as ``Tally.of_batches`` takes them: (replies, batch size or 0) each.
Batches = list[tuple[Sequence[GenerationReply], int]]

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


class WorkQueue(PendingEntries):
    """The worker's side of the queue (reclaiming, keeping, dead-lettering and handing
    back claimed entries: see ``PendingEntries``)."""

    def __init__(self, client: redis.Redis, settings: QueueSettings) -> None:
        self.redis = client
        self.settings = settings
        self._deliver = client.register_script(DELIVER_SCRIPT)
        self._requeue = client.register_script(REQUEUE_SCRIPT)
        self._keep_fresh = client.register_script(KEEP_SCRIPT)
        self._record = client.register_script(RECORD_SCRIPT)
        self._set_aside = client.register_script(DEAD_LETTER_SCRIPT)
        self._forget = client.register_script(FORGET_SCRIPT)
        self._own_ids = client.register_script(OWN_IDS_SCRIPT)
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
        record: Batches | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Job]:
        """New entries for this consumer: interactive ones first, then batch work.

        The same round trip delivers ``deliver`` (replies the consumer settled since its
        last claim, as ``deliver()`` would) and records ``record`` (their telemetry: the
        ``Tally`` of these batches, made once the replies are on their way), and
        reads the active versions (``active_versions``, as this claim returned) and the
        cancel epoch, which spares ``cancelled`` a read for requests submitted since the
        last cancellation. Before a wait the replies go first and are confirmed at once.
        Without a wait the claim goes first and the replies right behind it: Redis
        delivers them while the consumer works on what it claimed, and ``awaiting`` says
        that their outcome is read by the next ``confirm`` (which every claim calls first).
        ``meanwhile`` is called once the replies are on their way, before the claim's
        results are read (and before any wait): the consumer's work that must not hold
        its replies back, such as logging them. An entry the submit script did not add
        whose id another request holds is set aside, not returned (see ``_unique``).
        """
        self.confirm()

        def delivery() -> list[tuple]:
            return [(self._deliver, *self._delivery(deliver, consumer))] if deliver else []

        def recording() -> list[tuple]:
            return [(self._record, *Tally.of_batches(record).script_keys_args())] if record else []

        entries: list[tuple[str, list]] = []
        waits_first = bool(block_ms and self._drained)
        if not waits_first:
            # Plain reads, not a script: Redis copies each entry into Lua and back out again,
            # which doubled its time per claimed entry. Interactive work first; batch work
            # fills what room is left, in a second round trip only when there is room.
            # The riders are built while Redis serves the read, and sent right behind it: the
            # replies first, their telemetry in a write of its own (never holding them back).
            calls = [self._read_new(consumer, count, keys.STREAM_INTERACTIVE),
                     _READ_EPOCH, _READ_ACTIVE]
            got, epoch, active = self._exchange(calls, now=len(calls), behind=(delivery, recording), meanwhile=meanwhile)
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
            ahead = [*delivery(), *recording()] if waits_first else []  # else they went with the first read
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
        return self._unique(jobs, consumer)

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
        behind: Sequence[Callable[[], list[tuple]]] = (),
        meanwhile: Callable[[], None] | None = None,
    ) -> list:
        """Send calls in one write; read the first ``now`` results, leave the rest to ``confirm``.

        A call is a tuple of words, or (script, keys, args) for a registered script,
        sent by its hash. Each of ``behind`` builds more calls once those before are sent
        (while Redis works on them); they follow, a write each, and are left to ``confirm`` too.
        ``meanwhile`` runs once everything is sent, before any result is read.
        """
        connection = self._connection()
        try:
            connection.send_packed_command(_packed(calls))
            for build in behind:
                more = build()
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

    def deliver(
        self, settled: list[tuple[Job | None, GenerationReply]], worker: str, *, record: Batches | None = None
    ) -> int:
        """Send each reply (at most once per request id) and settle its entry; with
        ``record``, record the telemetry of those batches in the same round trip (see ``claim``).

        Returns how many replies were new; a duplicate is dropped silently because its
        caller has already been answered. A recording that fails is logged, not raised.
        """
        if not settled and not record:
            return 0
        if record is None:
            script_keys, args = self._delivery(settled, worker)
            return int(self._deliver(keys=script_keys, args=args))
        pipe = self.redis.pipeline(transaction=False)
        if settled:
            script_keys, args = self._delivery(settled, worker)
            self._deliver(keys=script_keys, args=args, client=pipe)
        record_keys, record_args = Tally.of_batches(record).script_keys_args()
        self._record(keys=record_keys, args=record_args, client=pipe)
        results = pipe.execute(raise_on_error=False)
        if isinstance(results[-1], Exception):
            log.warning("could not record reply timings: %s", results[-1])
        if settled and isinstance(results[0], Exception):
            raise results[0]
        return int(results[0]) if settled else 0

    def _delivery(self, settled: list[tuple[Job | None, GenerationReply]], worker: str) -> tuple[list[str], list]:
        """The delivery script's keys and arguments for these replies (see ``DELIVER_SCRIPT``)."""
        runs: dict[str, list] = {}  # counter -> request id, reply, sender of each reply it counts
        entries: dict[str, list[str]] = {}  # stream -> ids of the entries to settle
        for job, reply in settled:
            counter = outcome_counter(reply)  # completed, withdrawn, expired or failed:<kind>
            request = job.request if job else None
            runs.setdefault(counter, []).extend((reply.id, reply.to_json(), (request.user if request else None) or ""))
            if job:
                entries.setdefault(job.stream, []).append(job.entry_id)
        args: list = [
            self.settings.reply_ttl_s, answered_until(job for job, _ in settled), keys.CONSUMER_GROUP, worker,
            keys.ANSWERED_KEY_PREFIX, keys.REPLY_KEY_PREFIX, keys.USER_PENDING_KEY_PREFIX, keys.DIGEST_KEY_PREFIX, len(runs),
        ]
        for counter, values in runs.items():
            args += [counter, len(values) // 3, *values]
        args.append(len(entries))
        for stream, ids in entries.items():
            args += [stream, len(ids), *ids]
        return [keys.STATS_KEY], args

    def is_cancelled(self, request_ids: list[str]) -> set[str]:
        """Which of these requests their callers have withdrawn."""
        if not request_ids:
            return set()
        flags = self.redis.mget([keys.cancel_key(i) for i in request_ids])
        return {i for i, flag in zip(request_ids, flags, strict=True) if flag is not None}
