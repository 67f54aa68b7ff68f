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
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from persona import heartbeat
from persona.contract import ErrorKind, GenerationReply
from persona.endings import end_cut_off
from persona.engine import Completion, ContinuousGenerator, Work
from persona.errors import ConfigError, ModelError, PersonaError
from persona.heartbeat import new_worker_id
from persona.personas import Persona, PersonaRegistry
from persona.pool import ModelPool, Served
from persona.prompting import build_prompts
from persona.queue import Job, WorkQueue
from persona.settings import Settings
from persona.swapper import Swapper
from persona.telemetry import Tally
from persona.validation import request_problem

__all__ = ["Worker", "freeze_heap", "new_worker_id"]

log = logging.getLogger(__name__)

RECLAIM_EVERY_S = 1.0
# Rows in hand are marked fresh in Redis this often (a fraction of the visibility timeout),
# so a reply that takes longer than the timeout is never taken as stalled.
KEEP_EVERY = 0.25
# A persona file is re-read at most this often: edits apply within a second, and a
# round of one request does not pay for reading and validating TOML.
PERSONA_REFRESH_S = 1.0
MAX_RECONNECT_PAUSE_S = 5.0
# With work waiting, replies carry their telemetry in the round trip that delivers them;
# an idle worker's (and any a dropped connection lost) goes with a claim this long after
# the last recording: a quarter second late at most, and never in the way of a reply.
RECORD_EVERY_S = 0.25
# What a row still decoding at its deadline is answered: its caller stops waiting then.
LATE = "the reply was not finished by its deadline; please ask again"


@dataclass(frozen=True)
class _Row:
    """What the worker keeps about a row an engine is decoding, to answer it."""

    job: Job
    persona: Persona
    served: Served


def _queued_at(job: Job) -> float:
    """When a job's request was queued, by Redis's clock, in seconds.

    The entry's deadline ``d`` is Redis's time as it was queued plus the allowance its
    caller gave it (its deadline less its creation: a difference on one clock, which no
    skew between machines changes), so ``d`` less that allowance is when it was queued;
    a hand-back's new entry keeps ``d``, so its wait still counts from then. An entry
    without ``d`` (an older client's, a retried letter without a deadline) is timed from
    its id, whose milliseconds Redis set as it added it.
    """
    request = job.request
    if job.due is not None and request.deadline:
        return job.due - (request.deadline - request.created_at)
    return int(job.entry_id.partition("-")[0]) / 1000


def _waited_ms(job: Job, redis_offset: float) -> float:
    """How long a job's request waited before this worker took it, in ms, all by Redis's
    clock: from its queueing to its claim (the claim by this machine's clock plus
    ``redis_offset``, Redis's clock minus this one's). The caller's clock used to start it
    and this machine's to end it, so a worker 30 s fast reported 30 s waits for instant
    replies (and one slow, none). Never below 0, where the offset learnt is a little off.
    One that expired waiting counts all of it, though its caller gave up at its deadline:
    that is how long the queue held it."""
    return max(0.0, (job.claimed_at + redis_offset - _queued_at(job)) * 1000)


def _answered_line(rows: Sequence[_Row], completions: Sequence[Completion], seconds: float, batch: int) -> tuple:
    """The log line (format and arguments) of rows answered together, the same from either
    kind of engine: who, which version, how many tokens, how long, in how big a batch.
    One line per batch, not per request: at thousands of replies a second, logging is the cost."""
    return (
        "answered %d request(s) for %s version=%s tokens=%d in %.0f ms (batch of %d)",
        len(rows), ",".join(sorted({row.persona.name for row in rows})),
        ",".join(sorted({row.served.version for row in rows})),
        sum(c.new_tokens for c in completions), seconds * 1000, batch,
    )


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


class Worker:
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

    def _unsent(self, outbox: list[tuple[list[tuple[Job, GenerationReply]], int]],
                record: list[tuple[list[GenerationReply], int]] | None, exc: Exception) -> None:
        """Keep what a failed exchange was to deliver and record, to send again."""
        self._outbox[:0] = outbox  # sent again: a reply is delivered at most once anyway
        if record and isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            self._unrecorded[:0] = record  # not sent, most likely: counted once Redis is back

    def _to_record(self, now: float, due: bool = False) -> list[tuple[list[GenerationReply], int]] | None:
        """The batches settled and not yet counted, if it is time to record them (``due``:
        with replies on their way, at once)."""
        if not self._unrecorded or not (due or now - self._last_record >= RECORD_EVERY_S):
            return None
        self._last_record = now
        batches, self._unrecorded = self._unrecorded, []
        return batches

    def record_telemetry(self) -> None:
        """Record what was settled and not yet counted, now."""
        batches = self._to_record(time.monotonic(), due=True)
        if batches:
            self.queue.record(Tally.of_batches(batches))

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

    def _send(self, settled: list[tuple[Job, GenerationReply]], batch_size: int = 0) -> None:
        """Settle replies: they are delivered with the next claim, or by ``flush``.

        Their timings follow in the same round trip, right behind them, while work is
        waiting (before an idle wait, within ``RECORD_EVERY_S``), so counting never holds a
        caller's reply back.
        """
        if settled:
            batch_size = batch_size if any(reply.ok for _, reply in settled) else 0
            self._outbox.append((settled, batch_size))
            self._unrecorded.append(([reply for _, reply in settled], batch_size))

    def _confirm(self) -> None:
        """Learn what became of the replies sent with the last claim; keep them if they failed."""
        sending, self._sending = self._sending, []
        try:
            self.queue.confirm()
        except redis.exceptions.RedisError:
            self._outbox[:0] = sending  # their telemetry was sent with them: not counted twice
            raise

    def flush(self) -> None:
        """Deliver the settled replies now, with their telemetry; what Redis cannot take is
        kept and sent again."""
        self._confirm()
        outbox, self._outbox = self._outbox, []
        record = self._to_record(time.monotonic(), due=bool(outbox))
        if outbox or record is not None:
            try:
                self.queue.deliver([pair for group, _ in outbox for pair in group], self.id, record=record)
            except redis.exceptions.RedisError as exc:
                self._unsent(outbox, record, exc)
                raise
        self._log_answered()

    def _log_answered(self) -> None:
        """Write the log lines of the replies just sent (one per batch, not one per request)."""
        lines, self._answered = self._answered, []
        for line in lines:
            log.info(*line)

    def _set_aside(self, job: Job, deliveries: int | None = None) -> None:
        """Set an entry that holds no valid request aside as a dead letter, payload and all,
        and answer its caller with why where the payload names one. Such an entry used to
        be deleted, its payload in no log line, and not one command could show it."""
        problem = job.problem or "malformed request"
        letter = self.queue.dead_letter(
            job, problem, deliveries or job.deliveries, self.id, kind=ErrorKind.invalid,
            message=f"{problem}; it was set aside for an operator to see (`persona queue dead`)",
        )
        if letter:
            log.error("set aside malformed entry %s (request %s) as dead letter %s: %s; see `persona queue show %s`",
                      job.entry_id, job.request_id or "unknown", letter, problem, letter)

    def _refusal(self, job: Job) -> GenerationReply | None:
        """An error reply for a job with a request that must not be generated, else None."""
        request = job.request
        if job.expired(time.time() + self._redis_offset):
            return self._failure(job, ErrorKind.timeout, "the request waited past its deadline; please ask again")
        problem = request_problem(request, self.settings.queue)
        if problem:
            return self._failure(job, ErrorKind.invalid, problem)
        return None

    def _groups(self, runnable: list[Job]) -> Iterator[list[_Row] | list[tuple[Job, GenerationReply]]]:
        """Runnable jobs grouped per set of weights (as rows), or settled with why not."""
        by_model: dict[tuple, list[_Row]] = defaultdict(list)
        # Each persona is read (and its model found) once per round, not once per job;
        # an edited persona file still takes effect on the next round.
        found: dict[str, tuple[Persona, Served] | tuple[ErrorKind, str]] = {}
        for job in runnable:
            name = job.request.persona
            if name not in found:
                found[name] = self._serve(name)
            persona, served = found[name]
            if isinstance(persona, ErrorKind):
                yield [(job, self._failure(job, persona, served))]
                continue
            self.info.personas[persona.name] = served.version
            by_model[served.key].append(_Row(job, persona, served))
        size = self.settings.worker.max_batch
        for members in by_model.values():
            for start in range(0, len(members), size):
                yield members[start : start + size]

    def _serve(self, name: str) -> tuple[Persona, Served] | tuple[ErrorKind, str]:
        """A persona and what answers for it, or why it cannot answer."""
        try:
            persona = self._persona(name)
            return persona, self.pool.serve(persona, self.swaps.version_for(persona.name))
        except ConfigError as exc:
            return ErrorKind.invalid, str(exc)
        except ModelError as exc:
            return ErrorKind.model, self._cannot_serve(name, exc)
        except Exception as exc:  # out of memory, a bug in an engine: this persona fails, others go on
            log.exception("cannot serve persona %s", name)
            return ErrorKind.model, f"cannot load the model: {type(exc).__name__}: {exc}"

    def _cannot_serve(self, name: str, exc: PersonaError) -> str:
        """Why a persona's model cannot load here, and, for a version an operator swapped
        to, what to do: the fleet agreed on it, but this worker (started since, or on a
        machine whose copy differs) cannot load it, and it answered every request for the
        persona with the load error alone, naming neither the swap nor the worker."""
        version = self.swaps.version_for(name)
        if version is None or not isinstance(exc, ModelError):  # a persona file's error is the file's
            return str(exc)
        return (
            f"{exc}; {name!r} was swapped to {version}, which worker {self.id} cannot load: fix that checkpoint "
            f"on its machine, or move every worker off it with `persona rollback {name}` or `persona swap {name} VERSION`"
        )

    def _persona(self, name: str) -> Persona:
        now = time.monotonic()
        cached = self._personas.get(name)
        if cached is not None and now - cached[0] < PERSONA_REFRESH_S:
            return cached[1]
        persona = self.registry.get(name)
        self._personas[name] = (now, persona)
        return persona

    def _works(self, members: list[_Row]) -> list[Work]:
        items = [(r.persona, r.job.request, r.persona.sampling.merged(r.job.request.sampling)) for r in members]
        served = members[0].served
        prompts = build_prompts(items, served.loaded, getattr(served.engine, "context_tokens", None))
        return [Work(p.token_ids, sampling, p.stop) for p, (_, _, sampling) in zip(prompts, items, strict=True)]

    def _prompted(self, members: list[_Row]) -> tuple[list[_Row], list[Work]]:
        """The rows whose prompts could be built, and their work; the others are answered
        with why, alone: a chat template that refuses one conversation ("roles must
        alternate", on Llama-2 or Mistral) used to fail every request beside it."""
        try:
            return members, self._works(members)
        except Exception as exc:
            if len(members) == 1:
                self._send(self._failed(members, exc))
                return [], []
        kept, works = [], []
        for row in members:
            try:
                works += self._works([row])
            except Exception as exc:
                self._send(self._failed([row], exc))
            else:
                kept.append(row)
        return kept, works

    def _admit(self, members: list[_Row]) -> None:
        """Hand rows to their model's engine; they join its batch at the next step."""
        engine = members[0].served.engine
        members, works = self._prompted(members)
        if not members:
            return
        for row, work in zip(members, works, strict=True):
            engine.add(work, row)
            self._in_flight[row.job.request.id] = row
        self._decoding[id(engine)] = engine
        self.info.batches += 1

    def _decode_step(self) -> None:
        """One step of every engine with rows; deliver the rows that finished."""
        for key, engine in list(self._decoding.items()):
            batch = engine.active
            try:
                done = engine.step()
            except Exception as exc:  # the one place a decode's failure is caught
                done, settled = [], self._failed(engine.abandon(), exc)
            else:
                settled = [(row.job, self._reply(row, completion, batch)) for row, completion in done]
                if not done:  # a step is one batch generated together, whether or not a row ended in it
                    self._unrecorded.append(([], batch))
            for job, _ in settled:
                self._in_flight.pop(job.request.id, None)
            if done:
                rows, completions = zip(*done, strict=True)
                self._answered.append(_answered_line(rows, completions, max(c.seconds for c in completions), batch))
            if not engine.active:
                del self._decoding[key]
            self.info.requests += sum(1 for _, reply in settled if reply.ok)
            self._send(settled, batch_size=batch)

    def _drop_withdrawn(self) -> None:
        """Rows whose callers withdrew them, or whose deadline passed (their callers stop
        waiting then), leave their batch now and are answered so."""
        withdrawn = self.queue.is_cancelled(list(self._in_flight))
        now = time.time() + self._redis_offset
        late = {i for i, row in self._in_flight.items() if i not in withdrawn and row.job.expired(now)}
        if not withdrawn and not late:
            return
        rows = [self._in_flight.pop(request_id) for request_id in [*withdrawn, *late]]
        dropped = {id(row) for row in rows}
        for key, engine in list(self._decoding.items()):
            engine.remove(lambda tag: id(tag) in dropped)
            if not engine.active:
                del self._decoding[key]
        if withdrawn:
            log.info("stopped %d withdrawn request(s) mid-generation", len(withdrawn))
        if late:
            log.warning("stopped %d request(s) mid-generation at their deadline", len(late))
        self._send(
            [(r.job, self._failure(r.job, ErrorKind.cancelled, "the request was withdrawn")) for r in rows[: len(withdrawn)]]
            + [(r.job, self._failure(r.job, ErrorKind.timeout, LATE)) for r in rows[len(withdrawn) :]]
        )

    def _generate(self, members: list[_Row]) -> list[tuple[Job, GenerationReply]]:
        """One whole batch through an engine that cannot take rows while decoding."""
        started = time.perf_counter()
        members, works = self._prompted(members)
        if not members:
            return []
        try:
            completions = members[0].served.engine.generate(works)
        except Exception as exc:
            return self._failed(members, exc)
        elapsed = time.perf_counter() - started
        self.info.batches += 1
        self.info.requests += len(members)
        self._answered.append(_answered_line(members, completions, elapsed, len(members)))
        return [
            (row.job, self._reply(row, c, len(members), c.seconds or elapsed))
            for row, c in zip(members, completions, strict=True)
        ]

    def _reply(self, row: _Row, completion: Completion, batch: int, seconds: float | None = None) -> GenerationReply:
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
        request = job.request
        return GenerationReply.failure(
            request.id, kind, message, persona=request.persona, worker=self.id,
            queue_ms=_waited_ms(job, self._redis_offset),
        )
