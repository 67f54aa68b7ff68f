"""A worker's side of checkpoint swaps, run between batches.

Each time round the loop the worker reads the active versions (one Redis call), so
every batch uses the version active when it started. For each open proposal it has
not answered, it loads the new weights beside the serving ones, checks them, and
votes. After a flip it switches and frees the weights no persona uses any more, so it
never holds more than two versions of a persona (the serving one and a candidate).
"""

from __future__ import annotations

import gc
import logging
import time

import redis

from persona import constants as keys
from persona import swap
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


class Swapper:
    """Follows the active versions in Redis and answers swap proposals for one worker."""

    def __init__(
        self, client: redis.Redis, pool: ModelPool, registry: PersonaRegistry, info: WorkerInfo
    ) -> None:
        self.redis = client
        self.pool = pool
        self.registry = registry
        self.info = info
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

    # -- phase one: prepare and vote ------------------------------------------------

    def _answer(self, proposals: list[swap.SwapProposal], redis_now: float) -> None:
        """Prepare and vote on each open proposal not answered yet (and not lapsed by
        Redis's clock, ``redis_now``)."""
        proposals = [p for p in proposals if not p.expired(redis_now)]
        open_ids = {p.id for p in proposals}
        self._answered &= open_ids
        self._ready = {i: k for i, k in self._ready.items() if i in open_ids}
        for proposal in proposals:
            if proposal.id not in self._answered:
                self._answered.add(proposal.id)
                self._prepare(proposal)

    def _prepare(self, proposal: swap.SwapProposal) -> None:
        started = time.perf_counter()
        previous_state, self.info.state = self.info.state, f"preparing {proposal.persona}@{proposal.target}"
        try:
            key = load_and_check(self.pool, self.registry.get(proposal.persona), self.version_for(proposal.persona), proposal.target)
        except PersonaError as exc:
            reason = str(exc)
        except Exception as exc:  # a worker must answer every proposal, whatever broke
            log.exception("preparing swap %s failed", proposal.id)
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = ""
            self._ready[proposal.id] = key
        finally:
            self.info.state = previous_state
        seconds = time.perf_counter() - started
        vote = swap.Vote(worker=self.info.id, ready=not reason, reason=reason, seconds=seconds)
        swap.cast_vote(self.redis, proposal.id, vote)
        if reason:
            log.warning("refused swap of %s to %s: %s", proposal.persona, proposal.target, reason)
        else:
            log.info("ready to swap %s to %s (loaded and checked in %.1f s)", proposal.persona, proposal.target, seconds)

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
                problems[name] = f"cannot switch {name} to {self.version_for(name)}: {exc}"
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
        freed = [key for key in self.pool.loaded_keys() if key not in wanted]
        for key in freed:
            self.pool.release(key)
            log.info("freed weights %s", key[1] if key[1] != BASE_VERSION else f"{key[0]} (base)")
        if freed:
            _free_memory()


def _texts(mapping: dict) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in mapping.items()}


def _free_memory() -> None:
    """Give released weights back now rather than at some later collection."""
    frozen = gc.get_freeze_count() > 0  # the worker froze what it held when it started
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # a worker without torch holds no weights to free
        pass
