"""Slot arithmetic: when a persona's cron schedule falls due, in its own time zone.

A *slot* is one scheduled time, named by its UTC instant (``2026-03-29T08:00:00Z``) so
every scheduler, in any zone, names it the same. The cron expression is read in the
persona's time zone, so ``0 9 * * *`` in Europe/London is 09:00 local in winter and in
summer. Around daylight-saving changes it behaves as classic cron does: a local time
skipped when clocks go forward fires once, at the first valid moment after the gap; a
local time that happens twice when clocks go back fires once, the first time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from persona.errors import ConfigError, PostingError
from persona.personas import cron_problem

__all__ = ["SlotPlan", "check_schedule", "next_slot", "parse_slot", "plan_slots", "slot_id", "slots_between"]

log = logging.getLogger(__name__)

MAX_SLOTS_SCANNED = 10_000  # after a long outage, older slots than this are not listed


def slot_id(when: datetime) -> str:
    """The slot's name: its UTC instant, to the second."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_slot(name: str) -> str:
    """A slot named by hand, in its canonical form: a time with its zone becomes its UTC name.

    ``2026-11-25T10:00+01:00`` is the scheduler's ``2026-11-25T09:00:00Z``: one slot
    under two spellings would be posted twice. A name that is not a time stays as it is.
    """
    try:
        when = datetime.fromisoformat(name)
    except ValueError:
        return name
    if when.tzinfo is None:
        if len(name) <= len("2026-11-25"):  # a date alone names a day, not a time
            return name
        raise PostingError(f"slot {name!r} has no time zone: write {name}Z for UTC, or add the offset (e.g. +01:00)")
    return slot_id(when)


def check_schedule(cron: str, timezone: str) -> ZoneInfo:
    """The schedule's time zone, or ConfigError naming what is wrong."""
    problem = cron_problem(cron)
    if problem:
        raise ConfigError(f"schedule.cron: {problem}")
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"schedule.timezone: unknown time zone {timezone!r} (e.g. 'Europe/London', 'UTC')") from None
    return zone


def _second_occurrence(when: datetime, zone: ZoneInfo) -> bool:
    """Whether ``when`` is the repeat of a local time that happens twice (clocks went back)."""
    first = when.replace(tzinfo=None).replace(tzinfo=zone, fold=0)
    return first.utcoffset() != when.utcoffset()


def slots_between(cron: str, timezone: str, after: datetime, until: datetime) -> list[datetime]:
    """Every slot in ``(after, until]``, oldest first, as aware UTC datetimes."""
    zone = check_schedule(cron, timezone)
    found: list[datetime] = []
    times = croniter(cron, after.astimezone(zone))
    while len(found) < MAX_SLOTS_SCANNED:
        local = times.get_next(datetime)
        if local > until:
            break
        if not _second_occurrence(local, zone):
            found.append(local.astimezone(UTC))
    else:
        log.warning("more than %d slots between %s and %s; listing the first only", MAX_SLOTS_SCANNED, after, until)
    return found


def next_slot(cron: str, timezone: str, after: datetime) -> datetime:
    """The first slot after ``after`` (UTC)."""
    zone = check_schedule(cron, timezone)
    times = croniter(cron, after.astimezone(zone))
    while True:
        local = times.get_next(datetime)
        if not _second_occurrence(local, zone):
            return local.astimezone(UTC)


@dataclass
class SlotPlan:
    """What to do with the slots that fell due: post one (or none), skip the rest."""

    post: datetime | None = None
    skipped: list[datetime] = field(default_factory=list)
    late: bool = False


def plan_slots(due: list[datetime], now: datetime, policy: str, grace_s: float) -> SlotPlan:
    """Apply the missed-slot policy to the slots due since the scheduler last looked.

    ``skip``: post the newest slot only if it is within ``grace_s`` of now; older ones
    are skipped. ``latest``: post the newest slot however late, skip the older ones.
    """
    if not due:
        return SlotPlan()
    newest = due[-1]
    late = (now - newest).total_seconds() > grace_s
    if late and policy == "skip":
        return SlotPlan(post=None, skipped=list(due))
    return SlotPlan(post=newest, skipped=list(due[:-1]), late=late)
