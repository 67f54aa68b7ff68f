"""Slot arithmetic: when a persona's cron schedule falls due, in its own time zone.

A *slot* is one scheduled time, named by its UTC instant (``2026-03-29T08:00:00Z``) so
every scheduler, in any zone, names it the same. The cron expression is read in the
persona's time zone, so ``0 9 * * *`` in Europe/London is 09:00 local in winter and in
summer. Around daylight-saving changes it behaves as classic cron does: a local time
skipped when clocks go forward fires once, at the first valid moment after the gap; a
local time that happens twice when clocks go back fires once, the first time.

A person names a slot (``persona post --slot``, ``persona posts settle``) the way they
read the schedule: ``resolve_slot`` turns a local time, an instant with its offset, or a
date into the scheduler's name for it, so a slot posted by hand is never posted again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from persona.errors import ConfigError, PostingError
from persona.ledger import (
    MANUAL_SLOT_PREFIX,  # a post made by hand with no slot named: one slot of its own
)
from persona.personas import cron_problem, zone_problem

__all__ = [
    "MANUAL_SLOT_PREFIX", "SLOT_FORMS", "SlotPlan", "catching_up", "check_catching_up", "check_schedule", "is_late",
    "manual_slot", "next_slot", "plan_slots", "resolve_slot", "slot_id", "slots_between",
]

log = logging.getLogger(__name__)

MAX_SLOTS_SCANNED = 10_000  # after a long outage, older slots than this are not listed


def slot_id(when: datetime) -> str:
    """The slot's name: its UTC instant, to the second."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


SLOT_FORMS = (
    "2026-11-27T18:00 (a time in the persona's schedule.timezone), 2026-11-27T18:00Z or "
    "2026-11-27T19:00+01:00 (that instant), or 2026-11-27 (that day's slot, if the schedule has one that day)"
)


def manual_slot(now: datetime | None = None) -> str:
    """A fresh slot name for a post made by hand."""
    return (now or datetime.now(UTC)).strftime(MANUAL_SLOT_PREFIX + "%Y-%m-%dT%H:%M:%S.%fZ")


def resolve_slot(name: str, cron: str, timezone: str, now: datetime | None = None) -> str:
    """The slot a person named, as the scheduler names it (its UTC instant).

    A time with a zone is that instant: ``2026-11-25T10:00+01:00`` is the scheduler's
    ``2026-11-25T09:00:00Z`` (one slot under two spellings would be posted twice). A time
    without one is read in the persona's time zone, as its cron is. A date alone is the
    day's scheduled slot; a day with several (``0 9,18 * * *``) needs the time. Anything
    else is a PostingError that names the forms accepted, as is a time that is not one of
    the schedule's slots (see ``_scheduled``). Whether the slot may be posted now is
    ``check_catching_up``'s to say.
    """
    text = name.strip()
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise PostingError(f"slot {name!r} is not a slot time; write {SLOT_FORMS}") from None
    zone = check_schedule(cron, timezone)
    if when.tzinfo is not None:
        return slot_id(_scheduled(name, when.astimezone(UTC), cron, timezone, zone, now))
    if _is_date(text):
        return slot_id(_scheduled(name, _day_slot(name, when, cron, timezone, zone), cron, timezone, zone, now))
    local = when.replace(tzinfo=zone)  # fold 0: a time that happens twice is the first, as cron fires
    if local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != when:
        slots = ", ".join(_local_time(slot, zone) for slot in _slots_on(when, cron, timezone, zone)) or "none"
        raise PostingError(
            f"slot {name!r}: {when:%Y-%m-%dT%H:%M} does not happen in {timezone} (the clocks go forward then); "
            f"the schedule's slots that day: {slots}"
        )
    return slot_id(_scheduled(name, local.astimezone(UTC), cron, timezone, zone, now))


def _scheduled(name: str, slot: datetime, cron: str, timezone: str, zone: ZoneInfo, now: datetime | None) -> datetime:
    """``slot`` (UTC) if it is one of the schedule's slots; else PostingError naming the slots
    nearest it. A time off the schedule is no slot of its, and is posted by hand without --slot."""
    if slots_between(cron, timezone, slot - timedelta(seconds=1), slot) != [slot]:
        now = now or datetime.now(UTC)
        nearest = [found for found in (_slot_before(cron, timezone, slot), next_slot(cron, timezone, slot)) if found]
        named = ", ".join(_local_time(found, zone) + (" (yet to come)" if found > now else "") for found in nearest)
        raise PostingError(f"slot {name!r}: {_local_time(slot, zone)} is not one of the schedule's slots ({cron!r}, "
                           f"{timezone}); the nearest: {named or 'none'}; a post of your own needs no --slot")
    return slot


def is_late(slot: datetime, now: datetime, grace_s: float) -> bool:
    """Whether ``slot`` is past the missed-slot grace period at ``now`` (the scheduler's "late")."""
    return (now - slot).total_seconds() > grace_s


def catching_up(cron: str, timezone: str, missed: str, grace_s: float, now: datetime, most: int = 3) -> list[datetime]:
    """The slots the scheduler would still post at ``now`` (at most ``most``), newest first.

    The missed-slot rule of ``plan_slots``: a slot is on time until ``grace_s`` after it,
    and with ``missed = "latest"`` the newest slot that has come is posted however late.
    A slot yet to come, or one past both, the scheduler does not post now.
    """
    newest = _slot_before(cron, timezone, now + timedelta(seconds=1))
    found: list[datetime] = []
    slot = newest
    while slot is not None and len(found) < most and (
            not is_late(slot, now, grace_s) or (missed == "latest" and slot == newest)):
        found.append(slot)
        slot = _slot_before(cron, timezone, slot)
    return found


def check_catching_up(name: str, slot: str, cron: str, timezone: str, missed: str, grace_s: float,
                      now: datetime | None = None) -> None:
    """Nothing if the scheduler would still post ``slot`` (see ``catching_up``); else PostingError
    naming the slots it would, and what to do.

    A person naming a slot by hand takes it from the scheduler: one yet to come, posted
    early, is marked done and the scheduler skips it; one past the scheduler's catch-up
    (``--slot 1900-01-01``) the scheduler never posts, so a post now needs no slot name.
    """
    zone = check_schedule(cron, timezone)
    now = now or datetime.now(UTC)
    when = datetime.fromisoformat(slot).astimezone(UTC)
    allowed = catching_up(cron, timezone, missed, grace_s, now)
    if when <= now and (not is_late(when, now, grace_s) or (missed == "latest" and allowed[:1] == [when])):
        return
    can = ", ".join(_local_time(found, zone) for found in allowed)
    upcoming = _local_time(next_slot(cron, timezone, now), zone)
    nearest = (f"the slot{'s' if len(allowed) > 1 else ''} you can name now: {can}" if allowed
               else f"no slot can be named now (the next: {upcoming})")
    if when > now:
        raise PostingError(
            f"slot {name!r}: {_local_time(when, zone)} has not come yet (it is {_local_time(now, zone)} in {timezone}); "
            f"the scheduler posts it when it comes; {nearest}; a post of your own now needs no --slot")
    window = f"schedule.missed = {missed!r} posts only the newest slot late" if missed == "latest" else (
        f"schedule.missed = {missed!r}: a slot more than posting.grace_s ({grace_s:g} s) late is skipped")
    raise PostingError(
        f"slot {name!r}: {_local_time(when, zone)} is past the scheduler's catch-up ({window}), so it is never "
        f"posted on schedule now; {nearest}; a post of your own now needs no --slot")


def _slot_before(cron: str, timezone: str, before: datetime) -> datetime | None:
    """The last slot before ``before`` (UTC), if the schedule has one."""
    zone = check_schedule(cron, timezone)
    times = croniter(cron, before.astimezone(zone))
    for _ in range(MAX_SLOTS_SCANNED):
        try:
            local = times.get_prev(datetime)
        except (CroniterBadDateError, OverflowError, ValueError):  # nothing earlier (a date that never came)
            return None
        if not _second_occurrence(local, zone):
            return local.astimezone(UTC)
    return None


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _local_time(when: datetime, zone: ZoneInfo) -> str:
    """``when`` as the schedule reads it, local; with its UTC offset in the hour that happens
    twice (clocks go back), where the time alone names two instants."""
    local = when.astimezone(zone)
    said = local.strftime("%Y-%m-%dT%H:%M")
    if local.replace(fold=1 - local.fold).utcoffset() != local.utcoffset():
        said += local.isoformat(timespec="minutes")[len(said):]  # "+02:00"
    return said


def _slots_on(day: datetime, cron: str, timezone: str, zone: ZoneInfo) -> list[datetime]:
    """The schedule's slots on the local calendar day of ``day``."""
    midnight = day.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=zone)
    return slots_between(cron, timezone, midnight - timedelta(seconds=1), midnight + timedelta(days=1) - timedelta(seconds=1))


def _day_slot(name: str, day: datetime, cron: str, timezone: str, zone: ZoneInfo) -> datetime:
    """The one slot the schedule has on this local day; PostingError if it has none or several."""
    found = _slots_on(day, cron, timezone, zone)
    if len(found) == 1:
        return found[0]
    if not found:
        following = _local_time(next_slot(cron, timezone, day.replace(tzinfo=zone)), zone)
        raise PostingError(
            f"slot {name!r}: the schedule ({cron!r}, {timezone}) has no slot that day (the next is {following}); "
            f"a post of your own needs no --slot"
        )
    times = ", ".join(_local_time(slot, zone) for slot in found)
    raise PostingError(
        f"slot {name!r}: the schedule ({cron!r}, {timezone}) has {len(found)} slots that day ({times}); "
        f"name one, e.g. --slot {_local_time(found[-1], zone)}"
    )


def check_schedule(cron: str, timezone: str) -> ZoneInfo:
    """The schedule's time zone, or ConfigError naming what is wrong."""
    problem = cron_problem(cron)
    if problem:
        raise ConfigError(f"schedule.cron: {problem}")
    problem = zone_problem(timezone)
    if problem:
        raise ConfigError(f"schedule.timezone: {problem}")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):  # listed, yet its file cannot be read
        raise ConfigError(f"schedule.timezone: {timezone!r} cannot be read from this machine's time zone "
                          "database; install the tzdata package (pip install tzdata)") from None


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
    late = is_late(newest, now, grace_s)
    if late and policy == "skip":
        return SlotPlan(post=None, skipped=list(due))
    return SlotPlan(post=newest, skipped=list(due[:-1]), late=late)
