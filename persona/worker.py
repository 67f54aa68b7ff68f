"""The inference worker: claim → group by model → decode → reply → ack.

One loop of short turns. Each turn claims new work (without waiting while rows are
decoding, and only as much as the batch has room for), lets it join the running
batch of its model, decodes one token for every row, and delivers the rows that
finished, so a request that arrives while a long one decodes starts at the next step
and leaves as soon as it is done (continuous batching). An engine that can only run
whole batches (``Generator.generate``) is served a round at a time instead.

One place where a job's failure is caught: every request gets a reply (text or an
error saying why), and the worker keeps going; a reply that cannot be delivered (Redis
down) is kept and sent again. A heartbeat thread keeps the worker visible while it
decodes. On stop (SIGTERM or Ctrl-C) it finishes the rows in hand, hands back
whatever it still holds, and leaves the consumer group.

The worker's parts: ``model_groups`` (jobs grouped per model, as rows),
``row_decoding`` (rows through their engines), ``answering`` (the replies, text or
error, that jobs are answered with) and ``reply_delivery`` (settled replies sent, with
their telemetry and log lines).
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import threading
import time
from pathlib import Path

import redis

from persona import heartbeat
from persona.answering import Answering
from persona.contract import ErrorKind, GenerationReply
from persona.engine import ContinuousGenerator
from persona.errors import ModelError, PersonaError
from persona.heartbeat import new_worker_id
from persona.model_groups import ModelGroups, _Row
from persona.personas import Persona, PersonaRegistry
from persona.pool import ModelPool
from persona.queue import Job, WorkQueue
from persona.reply_delivery import RECORD_EVERY_S, ReplyDelivery
from persona.row_decoding import RowDecoding
from persona.settings import Settings
from persona.swapper import Swapper

__all__ = ["Worker", "freeze_heap", "new_worker_id"]

log = logging.getLogger(__name__)

RECLAIM_EVERY_S = 1.0
# Rows in hand are marked fresh in Redis this often (a fraction of the visibility timeout),
# so a reply that takes longer than the timeout is never taken as stalled.
KEEP_EVERY = 0.25
MAX_RECONNECT_PAUSE_S = 5.0


def _longer(pause_s: float) -> float:
    """The next pause before retrying after a failed turn: doubling, 0.1 s to 5 s."""
    return min(MAX_RECONNECT_PAUSE_S, max(0.1, pause_s * 2))


def _failed_turn(exc: Exception) -> tuple[int, str, bool]:
    """How to log a turn that failed: the level, what happened, and whether with a traceback.

    Whatever it was, the worker goes on after a pause: replies in hand are kept and sent
    again, and work it claimed but did not admit stays pending in Redis (delivered again
    after the visibility timeout, dead-lettered if it keeps failing).
    """
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return logging.WARNING, f"Redis unavailable ({exc})", False  # restarting: its disk keeps the queue
    if isinstance(exc, redis.exceptions.ResponseError):
        return logging.ERROR, f"Redis refused a command ({exc})", False  # out of memory, a read-only replica...
    return logging.ERROR, "unexpected error in the worker loop", True  # a bug must not take every row down


# A turn holds its whole batch (requests, prompts, replies: thousands of containers) until
# the batch is answered, and then they die together. At CPython's default, a young
# collection every 700 new containers, each turn of a full batch paid several collections
# that traversed and promoted objects about to die, and older collections traversed them
# again: about a tenth of a worker's CPU per request at full load. A young collection
# still comes once this many more containers live than at the last one, which only
# lasting growth reaches.
YOUNG_COLLECTION_THRESHOLD = 20_000


def freeze_heap() -> None:
    """Set the cyclic collector for serving: what is loaded so far is never scanned again,
    and young objects are collected rarely (see ``YOUNG_COLLECTION_THRESHOLD``).

    Libraries and models live as long as the worker, and scanning them again at every
    collection is most of the cost of a collection during work. Called by the worker
    process once its models are loaded; a swap unfreezes to free the old weights.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


class Worker(RowDecoding, ModelGroups, Answering, ReplyDelivery):
    """Serves requests from the queue until told to stop."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        pool: ModelPool,
        *,
        registry: PersonaRegistry | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = client
        self.queue = WorkQueue(client, settings.queue)
        self.pool = pool
        self.registry = registry or PersonaRegistry.from_settings(settings)
        self.id = worker_id or new_worker_id()
        self.info = heartbeat.WorkerInfo(id=self.id, device=pool.device)
        self.stopping = threading.Event()
        # A worker that is stopping starts no swap preparation and casts no vote.
        self.swaps = Swapper(client, pool, self.registry, self.info, stopping=self.stopping)
        # Set as the worker leaves, not when told to stop: it beats while it finishes the
        # rows in hand, or others would take them as a dead worker's and decode them again.
        self._leaving = threading.Event()
        self._last_reclaim = 0.0
        self._last_cancel_check = 0.0
        self._last_keep = 0.0
        # Redis's clock minus this machine's, learnt at every heartbeat: deadlines are kept
        # by Redis's clock, so callers and workers whose clocks disagree agree on them.
        self._redis_offset = 0.0
        self._in_flight: dict[str, _Row] = {}  # request id -> its row in an engine
        self._personas: dict[str, tuple[float, Persona]] = {}
        self._decoding: dict[int, ContinuousGenerator] = {}  # engines with rows, by id
        # Settled, not yet delivered: (replies, batch size) groups, sent with the next claim;
        # and those sent with the last claim, until the next one confirms them.
        self._outbox: list[tuple[list[tuple[Job, GenerationReply]], int]] = []
        self._sending: list[tuple[list[tuple[Job, GenerationReply]], int]] = []
        # Settled, not yet counted: (replies, batch size), recorded in the round trip that
        # delivers them while work is waiting (a worker killed under load used to lose a
        # quarter second of timings for good), within RECORD_EVERY_S while idle. Each decode
        # step's batch size is counted once: with the replies it ended, or with none ([]).
        self._unrecorded: list[tuple[list[GenerationReply], int]] = []
        self._last_record = 0.0
        # Log lines of settled replies (format and arguments), written once the replies
        # are on their way: a caller's answer never waits for a log line.
        self._answered: list[tuple] = []

    # -- life cycle -------------------------------------------------------------

    def preload(self, names: list[str] | None = None, starting: heartbeat.StartingBeat | None = None) -> None:
        """Load the models of these personas (default: all) before taking work.

        A persona named here that cannot be loaded stops the worker (ModelError,
        ConfigError); by default one that cannot is skipped with a warning, and its
        requests are answered with why: one broken persona file used to keep every
        worker from starting. ``starting``: where to say which model it is loading.
        """
        personas = self.registry.all()
        self.swaps.refresh_active()
        wanted = names or sorted(personas)
        for name in wanted:
            if self.stopping.is_set():  # told to stop while an earlier one loaded
                return
            persona = personas.get(name) or self.registry.get(name)
            if starting is not None:
                starting.loading(self._sharing(persona, wanted, personas), Path(persona.model.base).name or persona.model.base)
            try:
                served = self.pool.serve(persona, self.swaps.version_for(persona.name))
            except PersonaError as exc:
                if names:
                    raise
                swapped = self.swaps.version_for(persona.name) is not None and isinstance(exc, ModelError)
                log.log(logging.ERROR if swapped else logging.WARNING, "not preloading persona %s: %s",
                        persona.name, self._cannot_serve(persona.name, exc))
                continue
            self.info.personas[persona.name] = served.version

    def _sharing(self, persona: Persona, names: list[str], personas: dict[str, Persona]) -> str:
        """The personas of ``names`` that speak with ``persona``'s weights, ``persona`` first:
        while sage's chat waited, the starting worker said it was loading "for bofh", the
        first of the two to share the bundled model."""
        try:
            key = self.pool.key_for(persona, self.swaps.version_for(persona.name))
            others = [n for n in names if n != persona.name and n in personas
                      and self.pool.key_for(personas[n], self.swaps.version_for(n)) == key]
        except PersonaError:  # a checkpoint that cannot be found: loading it says why
            others = []
        return ", ".join([persona.name, *others])

    def run(self) -> None:
        """Take work until ``stop()``; then hand back what is held and leave."""
        self.info.state = "serving"
        self._publish_heartbeat()
        beat = threading.Thread(target=self._beat, name=f"heartbeat-{self.id}", daemon=True)
        beat.start()
        if self.pool.device == "cpu":  # how many cores it decodes on: `--threads`, PERSONA_WORKER__THREADS
            threads = self.settings.worker.threads or os.cpu_count() or 1
            log.info("worker %s serving on cpu (%d thread%s)", self.id, threads, "" if threads == 1 else "s")
        else:
            log.info("worker %s serving on %s", self.id, self.pool.device)
        pause_s = 0.0
        try:
            # After stop() the rows in hand are finished (and delivered if Redis allows).
            while not self.stopping.is_set() or self._decoding:
                try:
                    self.turn()
                    pause_s = 0.0
                except Exception as exc:
                    if isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP" in str(exc):
                        log.warning("the consumer group is gone (Redis lost its data?); recreating it")
                        self.queue.ensure_groups()
                        continue
                    level, what, traceback = _failed_turn(exc)
                    if self.stopping.is_set():
                        # The entries in hand stay pending in Redis, and another worker takes
                        # them once this one's heartbeat lapses.
                        log.error("%s while stopping; leaving %d row(s) to other workers", what, self.decoding, exc_info=traceback)
                        break
                    pause_s = _longer(pause_s)
                    log.log(level, "%s; retrying in %.1f s", what, pause_s, exc_info=traceback)
                    self.stopping.wait(pause_s)
        finally:
            self._leave(beat)

    def _leave(self, beat: threading.Thread) -> None:
        """Hand back what is held and disappear from the group and the heartbeats."""
        self.info.state = "leaving"
        self.stopping.set()
        self._leaving.set()
        beat.join(timeout=5)
        try:
            self.flush()
            self.record_telemetry()
            moved = self.queue.hand_back(self.id)
            heartbeat.withdraw(self.redis, self.id)
        except redis.exceptions.RedisError as exc:
            # Without Redis nothing can be handed back; the entries stay pending and
            # another worker reclaims them once this one's heartbeat has lapsed.
            log.error("could not hand back work while leaving: %s", exc)
            return
        finally:
            self.queue.release()
        if moved:
            log.info("handed back %d unfinished request(s)", moved)
        log.info("worker %s stopped", self.id)

    @property
    def decoding(self) -> int:
        """Rows in this worker's engines now (decoding, or waiting to join)."""
        return sum(engine.active for engine in self._decoding.values())

    def stop(self) -> None:
        """Finish the rows in hand, then leave."""
        self.stopping.set()

    def _publish_heartbeat(self) -> None:
        self.info.memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the first beat's too
        before = time.time()
        redis_now = heartbeat.publish(self.redis, self.info, self.settings.worker.heartbeat_ttl_s)
        self._redis_offset = redis_now - (before + time.time()) / 2

    def _beat(self) -> None:
        while not self._leaving.wait(self.settings.worker.heartbeat_s):
            try:
                self._publish_heartbeat()
            except redis.exceptions.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                # The heartbeat must outlive any surprise: without it, others reclaim our work.
                log.exception("heartbeat failed unexpectedly; still beating")

    # -- one step ---------------------------------------------------------------

    def turn(self, block_ms: int = 1000) -> int:
        """One turn of the loop: deliver and claim, decode one step; return jobs claimed.

        Replies settled in the last turn ride with this turn's claim, one round trip for
        both: before an idle wait they go first (none waits behind the wait); otherwise
        they follow the claim, and the next turn confirms them.
        """
        busy = bool(self._decoding)
        room = self.settings.worker.max_batch - self.decoding
        jobs = []
        claiming = room > 0 and not self.stopping.is_set()
        self._confirm()
        # While rows decode, only look: new work joins them at the next step. With work
        # waiting, replies carry their telemetry (in a write right behind them); before an
        # idle wait it goes with the first claim once due (so the wait ends then): a
        # recording costs Redis as much for one reply as for hundreds.
        now = time.monotonic()
        outbox, self._outbox = self._outbox, []
        block_ms = block_ms if claiming and not busy else 0
        record = self._to_record(now, due=bool(outbox) and not (block_ms and self.queue.drained))
        if self._unrecorded:
            block_ms = min(block_ms, max(1, int((self._last_record + RECORD_EVERY_S - now) * 1000)))
        settled = [pair for group, _ in outbox for pair in group]
        try:
            if claiming:
                jobs = self.queue.claim(
                    self.id, room, block_ms=block_ms, deliver=settled, record=record, meanwhile=self._log_answered
                )
                # Read with the claim: new rows use the versions active as they are claimed.
                self.swaps.refresh_active(self.queue.active_versions)
            else:
                self.queue.deliver(settled, self.id, record=record)
                self._log_answered()
        except redis.exceptions.RedisError as exc:
            self._unsent(outbox, record, exc)
            raise
        # Sent behind the claim: Redis delivers them while this turn works; confirmed next turn.
        self._sending = outbox if self.queue.awaiting else []
        now = time.monotonic()
        if now - self._last_reclaim >= RECLAIM_EVERY_S and not self.stopping.is_set():
            self._last_reclaim = now
            jobs.extend(self._reclaim(jobs, room - len(jobs)))
        if jobs:
            self.process(jobs)
        if self._in_flight and now - self._last_keep >= self.settings.queue.visibility_timeout_s * KEEP_EVERY:
            self._last_keep = now
            self.queue.keep(self.id, [row.job for row in self._in_flight.values()])
        if self._decoding and now - self._last_cancel_check >= self.settings.worker.cancel_check_s:
            self._last_cancel_check = now
            self._drop_withdrawn()
        if self._decoding:
            self._decode_step()
        # Swaps are prepared and switched here (the swapper reads proposals at most every
        # 0.25 s); rows already decoding finish on the weights they started with.
        self.swaps.between_batches()
        return len(jobs)

    def step(self, block_ms: int = 1000) -> int:
        """Claim one round of work and answer all of it; return how many jobs it claimed."""
        claimed = self.turn(block_ms)
        while self._decoding:
            self._decode_step()
        self.flush()
        return claimed

    def _reclaim(self, claimed: list[Job], room: int) -> list[Job]:
        """Up to ``room`` entries that dead or stalled workers held, or that this one lost
        (claimed by a turn that failed before it took them in hand)."""
        if room <= 0:
            return []
        live = heartbeat.live_worker_ids(self.redis)  # a heartbeat it cannot read still says alive
        jobs, exhausted = self.queue.reclaim(self.id, live, holding=self._holding(claimed), limit=room)
        for job, deliveries in exhausted:
            if job.request is None:  # never a request: it could not have been what stalled them
                self._set_aside(job, deliveries)
                continue
            log.error("dead-lettering %s after %d deliveries", job.request_id, deliveries)
            self.queue.dead_letter(job, "it was delivered to workers that died or stalled", deliveries, self.id)
        return jobs

    def _holding(self, claimed: list[Job]) -> set[str]:
        """The entries this worker has in hand: just claimed, decoding or waiting to join,
        or answered and not yet delivered (an entry stays pending until its reply is)."""
        held = {job.entry_id for job in claimed}
        held.update(row.job.entry_id for row in self._in_flight.values())
        held.update(job.entry_id for group, _ in self._outbox + self._sending for job, _ in group if job is not None)
        return held

    def process(self, jobs: list[Job]) -> None:
        """Answer every job: withdrawn ones and refusals at once, the rest by their model's engine.

        A withdrawn request is answered so whatever its deadline, as ``_drop_withdrawn``
        answers a row and `persona queue stats` counts those waiting: one withdrawn and then
        reached late was answered as timed out, and counted expired."""
        requested: list[Job] = []
        for job in jobs:
            if job.request is None:
                self._set_aside(job)
            else:
                requested.append(job)
        cancelled = self.queue.cancelled(requested)
        runnable: list[Job] = []
        early: list[tuple[Job, GenerationReply]] = []
        for job in requested:
            if job.request.id in cancelled:
                early.append((job, self._failure(job, ErrorKind.cancelled, "the request was withdrawn")))
            elif (refusal := self._refusal(job)) is not None:
                early.append((job, refusal))
            else:
                runnable.append(job)
        self._send(early)
        for members in self._groups(runnable):
            if isinstance(members[0], tuple):  # settled already (the persona could not be served)
                self._send(members)
            elif hasattr(members[0].served.engine, "add"):
                self._admit(members)
            else:
                self._send(self._generate(members), batch_size=len(members))
