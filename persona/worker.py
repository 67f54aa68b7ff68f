"""The inference worker: claim → group by model → batched generate → reply → ack.

One loop, one place where a job's failure is caught: every request gets a reply (text
or an error saying why), and the worker keeps going. A heartbeat thread keeps the
worker visible while a long batch runs. On stop (SIGTERM or Ctrl-C) it finishes the
batch in hand, hands back whatever it still holds, and leaves the consumer group.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator

import redis

from persona import heartbeat
from persona.contract import ErrorKind, GenerationReply, GenerationRequest, Timings
from persona.engine import Work
from persona.errors import ConfigError, ModelError, PersonaError
from persona.personas import Persona, PersonaRegistry
from persona.pool import ModelPool, Served
from persona.prompting import build_prompts
from persona.queue import Job, WorkQueue
from persona.settings import Settings
from persona.swapper import Swapper
from persona.validation import request_problem

__all__ = ["Worker", "new_worker_id"]

log = logging.getLogger(__name__)

RECLAIM_EVERY_S = 1.0
# A persona file is re-read at most this often: edits apply within a second, and a
# round of one request does not pay for reading and validating TOML.
PERSONA_REFRESH_S = 1.0
MAX_RECONNECT_PAUSE_S = 5.0


def new_worker_id() -> str:
    import socket

    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


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
        self.swaps = Swapper(client, pool, self.registry, self.info)
        self.stopping = threading.Event()
        self._last_reclaim = 0.0
        self._personas: dict[str, tuple[float, Persona]] = {}

    # -- life cycle -------------------------------------------------------------

    def preload(self, names: list[str] | None = None) -> None:
        """Load the models of these personas (default: all) before taking work."""
        personas = self.registry.all()
        self.swaps.refresh_active()
        for name in names or sorted(personas):
            persona = personas.get(name) or self.registry.get(name)
            served = self.pool.serve(persona, self.swaps.version_for(persona.name))
            self.info.personas[persona.name] = served.version

    def run(self) -> None:
        """Take work until ``stop()``; then hand back what is held and leave."""
        self.info.state = "serving"
        heartbeat.publish(self.redis, self.info, self.settings.worker.heartbeat_ttl_s)
        beat = threading.Thread(target=self._beat, name=f"heartbeat-{self.id}", daemon=True)
        beat.start()
        log.info("worker %s serving on %s", self.id, self.pool.device)
        pause_s = 0.0
        try:
            while not self.stopping.is_set():
                try:
                    self.step()
                    pause_s = 0.0
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError) as exc:
                    # Redis restarting: wait and retry; queued requests are kept on its disk.
                    pause_s = min(MAX_RECONNECT_PAUSE_S, max(0.1, pause_s * 2))
                    log.warning("Redis unavailable (%s); retrying in %.1f s", exc, pause_s)
                    self.stopping.wait(pause_s)
                except redis.exceptions.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("the consumer group is gone (Redis lost its data?); recreating it")
                    self.queue.ensure_groups()
        finally:
            self._leave(beat)

    def _leave(self, beat: threading.Thread) -> None:
        """Hand back what is held and disappear from the group and the heartbeats."""
        self.info.state = "leaving"
        self.stopping.set()
        beat.join(timeout=5)
        try:
            moved = self.queue.hand_back(self.id)
            heartbeat.withdraw(self.redis, self.id)
        except redis.exceptions.RedisError as exc:
            # Without Redis nothing can be handed back; the entries stay pending and
            # another worker reclaims them once this one's heartbeat has lapsed.
            log.error("could not hand back work while leaving: %s", exc)
            return
        if moved:
            log.info("handed back %d unfinished request(s)", moved)
        log.info("worker %s stopped", self.id)

    def stop(self) -> None:
        """Finish the batch in hand, then leave."""
        self.stopping.set()

    def _beat(self) -> None:
        while not self.stopping.wait(self.settings.worker.heartbeat_s):
            self.info.memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            try:
                heartbeat.publish(self.redis, self.info, self.settings.worker.heartbeat_ttl_s)
            except redis.exceptions.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                # The heartbeat must outlive any surprise: without it, others reclaim our work.
                log.exception("heartbeat failed unexpectedly; still beating")

    # -- one step ---------------------------------------------------------------

    def step(self, block_ms: int = 1000) -> int:
        """Claim and answer one round of work; return how many jobs it handled."""
        jobs = self.queue.claim(self.id, self.settings.worker.max_batch, block_ms=block_ms)
        self.swaps.refresh_active(self.queue.active_versions)  # read with the claim: as this batch starts
        now = time.monotonic()
        if now - self._last_reclaim >= RECLAIM_EVERY_S:
            self._last_reclaim = now
            jobs.extend(self._reclaim())
        if jobs:
            self.process(jobs)
        self.swaps.between_batches()  # swaps are prepared and switched only here
        return len(jobs)

    def _reclaim(self) -> list[Job]:
        live = {w.id for w in heartbeat.live_workers(self.redis)}
        jobs, exhausted = self.queue.reclaim(self.id, live)
        for job, deliveries in exhausted:
            log.error("dead-lettering %s after %d deliveries", job.request_id, deliveries)
            self.queue.dead_letter(job, "it was delivered to workers that died or stalled", deliveries, self.id)
        return jobs

    def process(self, jobs: list[Job]) -> None:
        """Answer every job: with text, or with an error that says why not."""
        runnable: list[Job] = []
        early: list[tuple[Job, GenerationReply]] = []
        for job in jobs:
            refusal = self._refusal(job)
            if refusal is None:
                runnable.append(job)
            elif refusal.id:
                early.append((job, refusal))
            else:
                log.error("dropping unanswerable entry %s: %s", job.entry_id, job.problem)
                self.queue.settle_without_reply(job)
        cancelled = self.queue.cancelled(runnable)
        for job in [j for j in runnable if j.request.id in cancelled]:
            early.append((job, self._failure(job.request, ErrorKind.cancelled, "the request was withdrawn")))
        runnable = [j for j in runnable if j.request.id not in cancelled]
        # Timings are recorded in the delivery's own call, so a caller who has its reply sees it counted.
        self.queue.deliver(early, self.id, record=True)
        for group in self._groups(runnable):
            batch_size = len(group) if any(reply.ok for _, reply in group) else 0
            self.queue.deliver(group, self.id, record=True, batch_size=batch_size)

    def _refusal(self, job: Job) -> GenerationReply | None:
        """An error reply for a job that must not be generated, else None."""
        request = job.request
        if request is None:
            return GenerationReply.failure(job.request_id or "", ErrorKind.invalid, job.problem or "malformed", worker=self.id)
        if request.expired():
            return self._failure(request, ErrorKind.timeout, "the request waited past its deadline; please ask again")
        problem = request_problem(request, self.settings.queue)
        if problem:
            return self._failure(request, ErrorKind.invalid, problem)
        return None

    def _groups(self, runnable: list[Job]) -> Iterator[list[tuple[Job, GenerationReply]]]:
        """Generate runnable jobs batched per set of weights, yielding each settled group."""
        by_model: dict[tuple, list[tuple[Job, Persona, Served]]] = defaultdict(list)
        # Each persona is read (and its model found) once per round, not once per job;
        # an edited persona file still takes effect on the next round.
        found: dict[str, tuple[Persona, Served] | tuple[ErrorKind, str]] = {}
        for job in runnable:
            name = job.request.persona
            if name not in found:
                found[name] = self._serve(name)
            persona, served = found[name]
            if isinstance(persona, ErrorKind):
                yield [(job, self._failure(job.request, persona, served))]
                continue
            self.info.personas[persona.name] = served.version
            by_model[served.key].append((job, persona, served))
        size = self.settings.worker.max_batch
        for members in by_model.values():
            for start in range(0, len(members), size):
                yield self._generate(members[start : start + size])

    def _serve(self, name: str) -> tuple[Persona, Served] | tuple[ErrorKind, str]:
        """A persona and what answers for it, or why it cannot answer."""
        try:
            persona = self._persona(name)
            return persona, self.pool.serve(persona, self.swaps.version_for(persona.name))
        except ConfigError as exc:
            return ErrorKind.invalid, str(exc)
        except ModelError as exc:
            return ErrorKind.model, str(exc)

    def _persona(self, name: str) -> Persona:
        now = time.monotonic()
        cached = self._personas.get(name)
        if cached is not None and now - cached[0] < PERSONA_REFRESH_S:
            return cached[1]
        persona = self.registry.get(name)
        self._personas[name] = (now, persona)
        return persona

    def _generate(self, members: list[tuple[Job, Persona, Served]]) -> list[tuple[Job, GenerationReply]]:
        """One batched generate; a failure answers each member with the error."""
        started = time.perf_counter()
        served = members[0][2]
        try:
            items = [(persona, job.request, persona.sampling.merged(job.request.sampling)) for job, persona, _ in members]
            prompts = build_prompts(items, served.loaded)
            batch = [Work(p.token_ids, sampling, p.stop) for p, (_, _, sampling) in zip(prompts, items, strict=True)]
            completions = served.engine.generate(batch)
        except Exception as exc:  # the one place a batch's failure is caught
            log.exception("batch of %d for %s failed", len(members), served.loaded.name)
            kind = ErrorKind.model if isinstance(exc, PersonaError) else ErrorKind.internal
            return [(job, self._failure(job.request, kind, f"generation failed: {exc}")) for job, _, _ in members]
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.info.batches += 1
        self.info.requests += len(members)
        settled = []
        for (job, persona, _), completion in zip(members, completions, strict=True):
            request = job.request
            reply = GenerationReply(
                id=request.id,
                ok=True,
                text=completion.text,
                persona=persona.name,
                version=served.version,
                worker=self.id,
                finish_reason=completion.finish_reason,
                new_tokens=completion.new_tokens,
                timings=Timings(queue_ms=max(0.0, (job.claimed_at - request.created_at) * 1000), generate_ms=elapsed_ms),
            )
            settled.append((job, reply))
            log.debug("answered %s persona=%s tokens=%d", request.id, persona.name, completion.new_tokens)
        # One line per batch, not per request: at thousands of replies a second, logging is the cost.
        log.info(
            "answered %d request(s) for %s version=%s tokens=%d in %.0f ms",
            len(members), served.loaded.name, served.version, sum(c.new_tokens for c in completions), elapsed_ms,
        )
        return settled

    def _failure(self, request: GenerationRequest, kind: ErrorKind, message: str) -> GenerationReply:
        return GenerationReply.failure(request.id, kind, message, persona=request.persona, worker=self.id)
