"""The daily scheduler: posts each persona's due slots, and rides out Redis restarts.

Every ``tick_s`` it looks at each persona whose file enables the schedule (and lists
``scheduler`` among its adapters), finds the slots due since it last looked, applies
the persona's missed-slot policy, and asks the ``Poster`` for the one slot to post.
Any number of schedulers may run, on machines whose clocks disagree: each takes its
``now`` from Redis's clock, the ledger's claim lets one of them post a slot, and the
others see it taken or done. The first look at a persona starts its clock (nothing
before it counts as missed), and so does the first look after a scheduler saw its
schedule go off (``enabled = false``, its file invalid, or ``scheduler`` not among its
adapters): the time it was off is not downtime.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis

from adapters.posting.poster import Poster
from adapters.posting.publishing import PostOutcome
from adapters.posting.slots import (
    SlotPlan,
    next_slot,
    plan_slots,
    slot_id,
    slots_between,
)
from persona import constants as keys
from persona.errors import PersonaError, QueueError
from persona.heartbeat import redis_now
from persona.ledger import OPEN_STATES
from persona.personas import Persona, unscheduled_reason
from persona.redis_refusals import refusal_text

__all__ = ["Scheduler", "scheduled_personas"]

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
# How many of the latest due slots are looked up for one a dead scheduler began.
MAX_BEGUN_LOOKBACK = 48

# A persona's checked mark only moves forward: a scheduler a tick behind another (or given
# an earlier ``now``) set it back, and the slots between were then due again, a posted
# one logged "skipped missed slot" at every tick.
CHECKED_FORWARD_SCRIPT = """
local was = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if was == nil or tonumber(ARGV[2]) > was then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""


# A persona's standing with the scheduler, as ``_standing`` gives it (any other: why its
# enabled schedule is not posted on), and one whose file is gone or cannot be read.
SCHEDULED, OFF, GONE = "", "off", "gone"


def _refusal(exc: Exception) -> str | None:
    """What Redis refusing a change means (full, unable to save to disk, a read-only replica, a
    user its ACL denies), in words to act on; None for any other failure."""
    return refusal_text(exc) if isinstance(exc, redis.exceptions.ResponseError) else None


def _kind(refusal: str) -> str:
    """A refusal's kind: its words before Redis's own, which it quotes in brackets (those vary:
    a script's error quotes them with its name)."""
    return refusal.split(" (", 1)[0]


def scheduled_personas(personas: dict[str, Persona]) -> list[Persona]:
    """The personas that post on their own: schedule enabled, scheduler adapter on, sinks set."""
    return [p for p in personas.values() if p.schedule.enabled and not unscheduled_reason(p)]


def _standing(persona: Persona) -> str:
    """SCHEDULED, OFF (``schedule.enabled`` is false), or why an enabled schedule is not posted on."""
    return unscheduled_reason(persona) if persona.schedule.enabled else OFF


@dataclass
class Scheduler:
    """Looks for due slots and posts them, tick after tick."""

    poster: Poster
    client: redis.Redis
    # None: Redis's clock, which every scheduler shares; by its own machine's clock, one
    # running fast posted early, and slots were due at different times on each machine.
    clock: Callable[[], datetime] | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._forward = self.client.register_script(CHECKED_FORWARD_SCRIPT)
        # Each persona's standing as last said (``_standing``), so that an edit that stops or
        # restarts its posts is logged once, when it happens, not at every tick.
        self._said: dict[str, str] = {}
        # The personas this scheduler found scheduled at its last tick: only one it saw go
        # off has its checked mark dropped (``_forget_unscheduled``).
        self._scheduled: set[str] = set()

    def now(self) -> datetime:
        """The time the scheduler goes by: Redis's (or the ``clock`` it was given)."""
        return self.clock() if self.clock else datetime.fromtimestamp(redis_now(self.client), UTC)

    def tick(self, now: datetime | None = None) -> list[PostOutcome]:
        """One look at every scheduled persona; returns the posts attempted."""
        now = now or self.now()
        personas = self.poster.registry.all()
        self._say_changes(personas)
        scheduled = scheduled_personas(personas)
        self._forget_unscheduled({persona.name for persona in scheduled})
        done: list[PostOutcome] = []
        for persona in scheduled:
            if self.stopping.is_set():
                break
            try:
                outcome = self._tick_persona(persona, now)
            except (QueueError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                raise  # the caller backs off; the slot stays due
            except PersonaError as exc:
                log.error("%s: %s", persona.name, exc)
                continue
            except Exception as exc:  # a bug with one persona (or its sink) must not keep the others from posting
                if _refusal(exc) is not None:
                    raise  # Redis refuses every change: the caller says so once, and backs off; the slot stays due
                log.exception("%s: posting failed; its slot stays due and is tried again at the next tick", persona.name)
                continue
            if outcome is not None:
                done.append(outcome)
        return done

    def _tick_persona(self, persona: Persona, now: datetime) -> PostOutcome | None:
        schedule = persona.schedule
        raw = self.client.hget(keys.SCHEDULER_CHECKED_KEY, persona.name)
        if raw is None:
            self._checked(persona, now)
            log.info("%s: schedule %r (%s) starts now", persona.name, schedule.cron, schedule.timezone)
            return None
        since = datetime.fromtimestamp(float(raw), UTC)
        due = slots_between(schedule.cron, schedule.timezone, since, now)
        # A scheduler that chose a slot's text on time and died mid-post left it begun; its
        # lease may outlast the grace period, and newer slots may fall due meanwhile. It is
        # finished first, however late (the sinks not reached get the same text); the slots
        # after it stay due for the next tick, when the missed-slot policy applies to them.
        begun = next((slot for slot in due[-MAX_BEGUN_LOOKBACK:] if self._begun(persona, slot)), None)
        if begun is not None:
            plan = SlotPlan(post=begun, late=True)
        else:
            plan = plan_slots(due, now, schedule.missed, self.poster.settings.posting.grace_s)
        self._log_skipped(persona, plan.skipped)
        outcome = None
        if plan.post is not None:
            slot = slot_id(plan.post)
            log.info("%s: slot %s is due%s", persona.name, slot, " (late)" if plan.late else "")
            outcome = self.poster.post(persona.name, slot=slot)
            self._log_outcome(persona, slot, outcome)
            if outcome.status == "busy" or outcome.retry_later or (begun is not None and begun != due[-1]):
                # Another scheduler holds it, a dead one's lease has not yet run out, or a
                # platform rate-limited the post: look again next tick (the missed-slot
                # policy and its grace period still apply) rather than let the slot fall through.
                # After a begun slot, the newer ones due stay due for the next tick too.
                return outcome
        # Only now: a crash before this line leaves the slot due, and the ledger makes the retry safe.
        self._checked(persona, now)
        return outcome

    def preflight(self) -> list[str]:
        """What would keep a persona from posting on schedule, found now rather than at its first slot.

        A persona that enables its schedule but will never be posted on, one whose
        schedule has no next time, sinks that lack a setting and a corpus that cannot be
        read are each named, with what to change.
        """
        problems: list[str] = []
        # Only for the next slot's name in the log: this machine's clock will do, and with
        # Redis not up yet the scheduler still starts (its ticks back off until it is).
        now = self.clock() if self.clock else datetime.now(UTC)
        for persona in self.poster.registry.all().values():
            self._said[persona.name] = _standing(persona)  # said here: the first tick need not again
            if reason := unscheduled_reason(persona):
                problems.append(f"{persona.name}: schedule.enabled is true, but {reason}")
                continue
            if not persona.schedule.enabled:
                continue
            try:
                upcoming = slot_id(next_slot(persona.schedule.cron, persona.schedule.timezone, now))
                self.poster.sinks_for(persona, None)
                self.poster.corpus_index(persona)
            except PersonaError as exc:
                problems.append(f"{persona.name}: {exc}")
                continue
            log.info("%s posts on %r (%s) to %s; next slot %s", persona.name, persona.schedule.cron,
                     persona.schedule.timezone, ", ".join(persona.schedule.sinks), upcoming)
        return problems

    def _say_changes(self, personas: dict[str, Persona]) -> None:
        """Log each persona whose file was edited so that it stops posting on schedule (why, and
        what to change), or posts again, once, at the tick that finds it. Only ``preflight`` said
        so, at start; the tick after an edit dropped the persona in silence."""
        for name in sorted(self._said.keys() | personas.keys()):
            was = self._said.get(name)
            now = _standing(personas[name]) if name in personas else GONE
            if now == was:
                continue
            if now not in (SCHEDULED, OFF, GONE):
                log.warning("%s: not posted on schedule: schedule.enabled is true, but %s", name, now)
            elif now == GONE and was == SCHEDULED:
                log.warning("%s: not posted on schedule: its persona file is gone or cannot be read "
                            "(`persona personas validate` says why)", name)
            elif now == OFF and was is not None:
                log.info("%s: not posted on schedule: schedule.enabled is false now", name)
            elif now == SCHEDULED and was not in (None, OFF):
                log.info("%s: posted on schedule again", name)
            if now == GONE and was in (None, OFF, GONE):
                self._said.pop(name, None)  # nothing to say if it comes back: forget it
            else:
                self._said[name] = now

    def _begun(self, persona: Persona, slot: datetime) -> bool:
        """Whether the slot's text was chosen but the slot never closed (its poster died).

        A slot closed by a living poster is not begun, even when it may be tried again
        (a rate limit, no answer): that retry keeps to the missed-slot policy, so one
        post that a platform keeps turning away cannot hold back the slots after it.
        """
        record = self.poster.ledger.record(persona.name, slot_id(slot))
        return bool(record.get("text")) and record.get("state", "") in OPEN_STATES

    def _log_skipped(self, persona: Persona, skipped: list[datetime]) -> None:
        """Say the missed slots skipped, in one line; each tried already whose answers were lost, in its own,
        with how to finish it.

        A post that got no answer where a retry is safe (Mastodon, Bluesky, Discord) is
        retried only within the grace period: past it, the slot is skipped with a post that
        may or may not be out, and only a person can finish it. Only the latest slots are
        looked up: after a long outage, thousands may be skipped at once (and were said a
        line each, a month of hourly slots 720 lines).
        """
        plain: list[str] = []
        for n, missed in enumerate(skipped):
            slot = slot_id(missed)
            looked = n >= len(skipped) - MAX_BEGUN_LOOKBACK
            entries = self.poster.ledger.sink_entries(persona.name, slot) if looked else {}
            unanswered = [spec for spec, entry in entries.items() if entry.state == "intent"]
            if not unanswered:
                plain.append(slot)
                continue
            log.warning(
                "%s: slot %s got no answer from %s and is past its retries (policy %s); it may not be posted there: "
                "`persona post %s --slot %s` finishes it safely (`persona posts uncertain` lists such posts)",
                persona.name, slot, ", ".join(unanswered), persona.schedule.missed, persona.name, slot,
            )
        if len(plain) == 1:
            log.warning("%s: skipped missed slot %s (policy %s)", persona.name, plain[0], persona.schedule.missed)
        elif plain:
            log.warning("%s: skipped %d missed slots, %s to %s (policy %s)", persona.name, len(plain), plain[0], plain[-1],
                        persona.schedule.missed)

    @staticmethod
    def _log_outcome(persona: Persona, slot: str, outcome: PostOutcome) -> None:
        """One line on what became of the slot, and what to do next.

        Each sink's failure was logged by the publisher as it happened: said again here, a
        long-running service's log had every failure twice.
        """
        level = logging.INFO if outcome.status in ("posted", "pending", "done", "busy") else logging.WARNING
        said = outcome.besides_sinks() or ("it is tried again at the next tick" if outcome.retry_later else "")
        log.log(level, "%s: slot %s %s%s", persona.name, slot, outcome.headline, f"; {said}" if said else "")

    def _checked(self, persona: Persona, now: datetime) -> None:
        """Mark the persona looked at up to ``now``; never earlier than another scheduler marked it."""
        self._forward(keys=[keys.SCHEDULER_CHECKED_KEY], args=[persona.name, repr(now.timestamp())])

    def _forget_unscheduled(self, scheduled: set[str]) -> None:
        """Drop the checked mark of each persona this scheduler saw go from scheduled (at its
        last tick) to not scheduled now, so that when its schedule is back on, its first look
        starts its clock afresh.

        Kept, the mark dated from before it was turned off: a month off with
        ``missed = "latest"`` posted that day's slot the moment it was back on, hours late,
        and with "skip" logged a month of slots as missed that were never due. Only a change
        seen here counts: dropping every mark of a persona missing from this machine's folder,
        a scheduler elsewhere (a rolling deploy, a file half-saved) restarted the clock of a
        persona another one posts at every tick, and it never posted again.
        """
        if stopped := sorted(self._scheduled - scheduled):
            self.client.hdel(keys.SCHEDULER_CHECKED_KEY, *stopped)
        self._scheduled = scheduled  # only once dropped: with Redis down, the next tick drops them

    def run(self) -> None:
        """Tick until stopped; when Redis or the queue fails, wait longer each time and retry."""
        tick_s = self.poster.settings.posting.tick_s
        backoff_s = 0.0
        refused = ""  # the kind of Redis's refusal said last: said once while it lasts, not at every tick
        while not self.stopping.is_set():
            try:
                self.tick()
                backoff_s = 0.0
                if refused:
                    log.info("Redis takes changes again: the scheduler posts again")
                refused = ""
            except (QueueError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                backoff_s = min(MAX_BACKOFF_S, max(1.0, backoff_s * 2))
                log.warning("scheduler tick failed (%s); retrying in %.0f s", exc, backoff_s)
            except Exception as exc:
                backoff_s = min(MAX_BACKOFF_S, max(1.0, backoff_s * 2))
                said = _refusal(exc)
                if said is None:
                    log.exception("scheduler tick failed")
                elif _kind(said) != refused:
                    refused = _kind(said)
                    log.warning("scheduler tick failed, as Redis refuses writes: %s. Nothing is posted meanwhile; "
                                "due slots stay due, tried again every %.0f s at most", said, MAX_BACKOFF_S)
            self.stopping.wait(backoff_s or tick_s)

    def stop(self) -> None:
        self.stopping.set()
