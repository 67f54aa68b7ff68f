"""A worker's side of checkpoint swaps, run between batches.

Each time round the loop the worker reads the active versions (one Redis call), so
every batch uses the version active when it started. For each open proposal of a
persona it serves and has not answered, it loads the new weights beside the serving
ones, checks them, and votes: on a CPU in a thread of its own, one proposal at a time,
while the worker goes on decoding (loading a checkpoint takes seconds to tens of
seconds, and every request waited for it). After a flip it switches and frees the
weights no persona uses any more, so it never holds more than two versions of a
persona (the serving one and a candidate).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import redis

from persona import constants as keys
from persona import heartbeat, swap
from persona.checkpoint_checks import loaded_problem, static_problem
from persona.checkpoints import BASE_VERSION, resolve_checkpoint
from persona.errors import PersonaError, SwapRefused, UnknownPersona
from persona.heartbeat import WorkerInfo, redis_time
from persona.personas import Persona, PersonaRegistry
from persona.pool import ModelPool, Served

__all__ = ["Swapper", "load_and_check"]

log = logging.getLogger(__name__)

FOLLOW_EVERY_S = 1.0
CHECK_EVERY_S = 0.25
# How far below decoding a swap's preparation runs (nice steps), with the threads torch and
# llama.cpp start from it: on a machine with few cores it takes what decoding leaves.
PREPARE_NICENESS = 10


def load_and_check(pool: ModelPool, persona: Persona, serving: str | None, target: str) -> tuple[str, str]:
    """Load ``target`` beside the serving weights and check it; SwapRefused naming any problem.

    Returns the candidate's weights key (it stays loaded in ``pool``).
    """
    label, folder = resolve_checkpoint(persona, pool.settings, target)
    if folder is not None:
        problem = static_problem(persona, folder)
        if problem:
            raise SwapRefused(problem)
    current = _serving_weights(pool, persona, serving, target)
    candidate = pool.serve(persona, target)
    fresh = current is None or candidate.key != current.key
    reference = current.loaded if current is not None and fresh else None
    problem = loaded_problem(candidate.loaded, reference, label)
    if problem:
        if fresh:
            pool.release(candidate.key)
        raise SwapRefused(problem)
    return candidate.key


def _serving_weights(pool: ModelPool, persona: Persona, serving: str | None, target: str) -> Served | None:
    """The weights serving now, to compare a candidate with; None if they cannot be loaded."""
    try:
        return pool.serve(persona, serving)
    except PersonaError as exc:
        # Its folder was removed, say: that must not stop a swap or rollback away from
        # it, so the candidate is checked on its own.
        log.warning("cannot load %s at %s to compare with (%s); checking %s alone", persona.name, serving, exc, target)
        return None


@dataclass
class _Preparation:
    """One proposal's candidate being loaded and checked, and how that ended."""

    proposal: swap.SwapProposal
    persona: Persona
    serving: str | None
    state: str  # what the worker's state says while it prepares
    state_before: str
    started: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    key: tuple[str, str] | None = None  # the candidate's weights, loaded and checked
    voted: bool = False


class Swapper:
    """Follows the active versions in Redis and answers swap proposals for one worker."""

    def __init__(
        self, client: redis.Redis, pool: ModelPool, registry: PersonaRegistry, info: WorkerInfo,
        stopping: threading.Event,
    ) -> None:
        self.redis = client
        self.pool = pool
        self.registry = registry
        self.info = info
        # The worker's own stop signal: once set, no preparation starts, and one under way
        # casts no vote (the operator stops waiting for this worker once it has left).
        self.stopping = stopping
        self._preparing: _Preparation | None = None
        self._announced: set[str] = set()  # the personas its heartbeat names (see _say_what_it_serves)
        self.active: dict[str, str] = {}
        self._answered: set[str] = set()
        self._ready: dict[str, tuple[str, str]] = {}  # proposal id -> candidate weights key
        self._followed: tuple | None = None  # what the last follow saw
        self._followed_at = 0.0
        self._checked_at = float("-inf")  # when proposals were last read
        self._problems: dict[str, str] = {}  # persona -> why the last follow could not switch it

    def refresh_active(self, active: dict[str, str] | None = None) -> None:
        """Read which version each persona serves now (or take ``active``, read just before)."""
        fresh = swap.active_versions(self.redis) if active is None else dict(active)
        if fresh != self.active:
            self._log_flips(fresh)
        self.active = fresh

    def _log_flips(self, fresh: dict[str, str]) -> None:
        """Say when a flip reaches this worker, for each persona it serves: the log said
        "ready to swap" and then nothing until the old weights were freed (and a request
        for the persona in between hid the "switched" line), so when this worker began
        answering with the new version could not be read from it."""
        for name, shown in self.info.personas.items():
            version = fresh.get(name)
            if version is not None and version != self.active.get(name) and version != shown:
                log.info("%s serves %s from its next batch (was %s; rows decoding finish on it)", name, version, shown)

    def version_for(self, persona: str) -> str | None:
        """The active version of a persona (None: the persona file's own choice)."""
        return self.active.get(persona)

    def between_batches(self) -> None:
        """Follow flips, answer new proposals, free weights nobody needs."""
        # Proposals are read at most once a CHECK_EVERY_S, both reads in one round trip:
        # a busy worker finishes a batch every millisecond. A flip still counts at once:
        # the claim before each batch reads the active versions.
        self._collect()
        self._say_what_it_serves()
        now = time.monotonic()
        if now - self._checked_at >= CHECK_EVERY_S:
            self._checked_at = now
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(keys.ACTIVE_VERSIONS_KEY)
            pipe.hvals(keys.SWAPS_KEY)
            pipe.time()
            active, raw_proposals, now_there = pipe.execute()
            self.refresh_active(_texts(active))
            self._answer([swap.SwapProposal.model_validate_json(v) for v in raw_proposals], redis_time(now_there))
        # Following reads every served persona's file: do it at once when anything it
        # depends on in Redis or the pool changed, else at most once a FOLLOW_EVERY_S
        # (for edited persona files), not after every batch of a busy worker.
        state = (sorted(self.active.items()), sorted(self._ready.items()), self.pool.loaded_keys(), sorted(self.info.personas.items()))
        if state != self._followed or now - self._followed_at >= FOLLOW_EVERY_S:
            self._follow()
            self._followed_at = now
            self._followed = (state[0], state[1], self.pool.loaded_keys(), sorted(self.info.personas.items()))

    def _say_what_it_serves(self) -> None:
        """Beat at once when this worker begins serving another persona: an operator's swap
        waits only for the workers whose heartbeat names the persona (``swap.voters``), and
        one that committed before the next regular beat had this worker serve the new
        version unchecked."""
        serving = set(self.info.personas)
        if serving <= self._announced:
            self._announced = serving
            return
        heartbeat.publish(self.redis, self.info, self.pool.settings.worker.heartbeat_ttl_s)
        self._announced = serving

    # -- phase one: prepare and vote ------------------------------------------------

    def _answer(self, proposals: list[swap.SwapProposal], redis_now: float) -> None:
        """Start preparing the first open proposal not answered yet (and not lapsed by
        Redis's clock, ``redis_now``) of a persona this worker serves, unless one is under
        way: two candidates at once would hold three copies of the weights."""
        proposals = [p for p in proposals if not p.expired(redis_now)]
        open_ids = {p.id for p in proposals}
        self._answered &= open_ids
        self._ready = {i: k for i, k in self._ready.items() if i in open_ids}
        if self._preparing is not None or self.stopping.is_set():
            return
        for proposal in proposals:
            # A persona not served here is not voted on (``swap.voters`` leaves this worker
            # out): it used to load weights it would never serve. Should it start serving
            # the persona while the proposal is open, it votes then.
            if proposal.id not in self._answered and proposal.persona in self.info.personas:
                self._answered.add(proposal.id)
                self._start(proposal)
                return

    def _start(self, proposal: swap.SwapProposal) -> None:
        """Prepare a proposal: on a CPU in a thread, the worker decoding meanwhile; on a GPU here.

        A GPU worker prepares in the foreground, as it always did: decoding captures CUDA
        graphs as it meets new batch sizes (``LlamaDecoder._graph_for``), and a capture fails
        when another thread allocates or copies on the device meanwhile, which loading
        weights does (``load_model`` reads and merges them straight onto the device). Moving
        only the reading and merging into the thread needs ``load_model`` to load onto the
        CPU first, with the move, engine build and warm-up left to the worker's thread.
        """
        try:
            persona = self.registry.get(proposal.persona)
        except PersonaError as exc:  # its file was removed or broken since it was served
            self._vote(proposal, reason=str(exc), seconds=0.0)
            return
        except Exception as exc:  # a worker must answer every proposal, whatever broke
            log.exception("preparing swap %s failed", proposal.id)
            self._vote(proposal, reason=f"{type(exc).__name__}: {exc}", seconds=0.0)
            return
        background = self.pool.device == "cpu"
        what = f"preparing {proposal.persona}@{proposal.target}"
        prep = _Preparation(proposal, persona, self.version_for(proposal.persona),
                            state=f"serving, {what}" if background else what, state_before=self.info.state)
        self.info.state = prep.state
        self._preparing = prep
        if background:
            threading.Thread(target=self._prepare, args=(prep, True), name=f"swap-{proposal.id}", daemon=True).start()
        else:
            self._prepare(prep, background=False)
            self._collect()

    def _prepare(self, prep: _Preparation, background: bool) -> None:
        """Load and check the candidate, then vote (unless the worker is stopping)."""
        if background:
            _yield_to_decoding()
        proposal = prep.proposal
        try:
            key = load_and_check(self.pool, prep.persona, prep.serving, proposal.target)
        except PersonaError as exc:
            reason = str(exc)
        except Exception as exc:  # a worker must answer every proposal, whatever broke
            log.exception("preparing swap %s failed", proposal.id)
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = ""
            prep.key = key
        try:
            if self.stopping.is_set():
                log.info("stopping: abandoned the swap of %s to %s", proposal.persona, proposal.target)
            else:
                prep.voted = self._vote(proposal, reason, time.perf_counter() - prep.started)
        finally:
            prep.done.set()

    def _vote(self, proposal: swap.SwapProposal, reason: str, seconds: float) -> bool:
        """Cast this worker's vote; whether it was cast (Redis may be out of reach)."""
        vote = swap.Vote(worker=self.info.id, ready=not reason, reason=reason, seconds=seconds)
        try:
            swap.cast_vote(self.redis, proposal.id, vote)
        except redis.exceptions.RedisError as exc:
            # Unanswered, the proposal lapses and nothing changes (the operator is told
            # which worker did not answer); this worker frees the candidate.
            log.error("could not vote on the swap of %s to %s: %s", proposal.persona, proposal.target, exc)
            return False
        if reason:
            log.warning("refused swap of %s to %s: %s", proposal.persona, proposal.target, reason)
        else:
            log.info("ready to swap %s to %s (loaded and checked in %.1f s)", proposal.persona, proposal.target, seconds)
        return True

    def _collect(self) -> None:
        """Take in a finished preparation: its candidate is kept until the proposal ends."""
        prep = self._preparing
        if prep is None or not prep.done.is_set():
            return
        self._preparing = None
        if self.info.state == prep.state:  # not "leaving", say
            self.info.state = prep.state_before
        if prep.key is not None and prep.voted:
            self._ready[prep.proposal.id] = prep.key

    # -- phase two: switch and free -------------------------------------------------

    def _follow(self) -> None:
        """Switch personas this worker serves to their active version; free the rest.

        A persona whose file was removed is no longer served (a request for it is
        answered "unknown persona"), so its weights are freed unless another persona
        speaks with them. Any other problem keeps every loaded model, and is logged once,
        not at every follow.
        """
        wanted = set(self._ready.values())
        problems: dict[str, str] = {}
        for name, shown in list(self.info.personas.items()):
            try:
                persona = self.registry.get(name)
                served = self.pool.serve(persona, self.version_for(name))
            except UnknownPersona:
                del self.info.personas[name]
                log.info("persona %s is gone (its file was removed); no longer serving it", name)
                continue
            except PersonaError as exc:
                version = self.version_for(name)  # None: the file's own, which nobody switched to
                doing = f"switch {name} to {version}" if version is not None else f"serve {name} (as its file says)"
                problems[name] = f"cannot {doing}: {exc}"
                continue
            wanted.add(served.key)
            if served.version != shown:
                log.info("switched %s from %s to %s", name, shown, served.version)
                self.info.personas[name] = served.version
        for name, problem in problems.items():
            if self._problems.get(name) != problem:
                log.error("%s", problem)
        self._problems = problems
        if problems:
            return  # keep every loaded model rather than free one still in use
        if self._preparing is not None:
            return  # the candidate it loads is in the pool before it is in _ready
        freed = [key for key in self.pool.loaded_keys() if key not in wanted]
        for key in freed:
            self.pool.release(key)
            log.info("freed weights %s", key[1] if key[1] != BASE_VERSION else f"{key[0]} (base)")
        if freed:
            _free_memory()


def _texts(mapping: dict) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in mapping.items()}


def _yield_to_decoding() -> None:
    """Lower this thread's priority (Linux sets it per thread; threads it starts inherit it)."""
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + PREPARE_NICENESS))
    except (AttributeError, OSError):  # no such call here, or not allowed: it competes as an equal
        pass


def _free_memory() -> None:
    """Give released weights back now rather than at some later collection."""
    frozen = gc.get_freeze_count() > 0  # the worker froze what it held when it started
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    torch = sys.modules.get("torch")  # never imported (llama.cpp serving): no torch memory to give back
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
