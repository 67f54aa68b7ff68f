"""Publishing a slot's chosen text to its sinks exactly once, and settling what cannot be known.

Each sink gets an intent record in the ledger first, then the platform call, then the
post id; a retry that finds an intent asks the sink whether it posted (see
``adapters.posting.sinks`` for how each sink makes a retry safe). A sink that took the
request, never answered and cannot be asked (X, Telegram) is left ``uncertain``: it is
never posted to again by itself, and ``Publisher.settle`` records what a person found.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from adapters.posting.sinks import (
    Sink,
    SinkNoAnswer,
    SinkRateLimited,
    SinkUnreachable,
    one_line,
)
from persona.errors import PostingError, SinkError
from persona.ledger import (
    UNSETTLED_STATES,
    PostLedger,
    SinkEntry,
    slot_state,
    slot_summary,
)

__all__ = ["PostOutcome", "Publisher", "sink_said"]

log = logging.getLogger(__name__)

# Sink states after which trying the slot again is safe and may succeed.
RETRY_LATER_STATES = ("rate_limited", "unreachable", "intent")
# How a sink's state reads in a message (an intent left behind means the call got no answer).
STATE_WORDS = {
    "failed": "not posted:", "intent": "no answer (safe to retry):", "rate_limited": "rate-limited, nothing sent:",
    "unreachable": "unreachable, nothing sent:", "uncertain": "no answer, it may have posted:",
}


@dataclass
class PostOutcome:
    """What became of one post attempt (printed by ``persona post --json``)."""

    persona: str
    slot: str
    status: str  # posted | dry_run | pending | done | busy | no_candidate | failed | uncertain
    # Failed only because a platform asked us to slow down (nothing went out there): try again later.
    retry_later: bool = False
    text: str = ""
    candidates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)
    # Every candidate as curation saw it, in order: {"text": ..., "rejected": reason, or "" if it passed,
    # "flaws": what a passing one loses to a clean one for, as ``curation.flaws`` names them,
    # "trimmed": what was left out of one the model cut off, back to its last finished sentence}.
    verdicts: list[dict] = field(default_factory=list)
    sinks: dict[str, dict] = field(default_factory=dict)
    approval_id: str = ""
    message: str = ""  # what happened and what to do next, whole: each failed sink's line first, then next_step
    next_step: str = ""  # what to do next alone, for a view that shows each sink's line itself

    @property
    def headline(self) -> str:
        """The status as a person reads it: ``partly posted: 2 of 3`` for a ``failed`` post that some
        sinks took (the status stays ``failed``: a retry posts where it failed, and only there)."""
        return slot_summary(self.status, [shown["state"] for shown in self.sinks.values()])

    def to_dict(self) -> dict:
        return asdict(self) | {"headline": self.headline}

    def besides_sinks(self) -> str:
        """What the message says besides each sink's line, for a view that shows those lines itself
        (or a log that said each failure as it happened): what to do next, or a note on the text."""
        return self.next_step if any(shown["state"] != "posted" for shown in self.sinks.values()) else self.message

    def advise(self, step: str) -> None:
        """Add what to do next, to ``next_step`` and to the end of ``message``."""
        self.next_step = "; ".join(part for part in (self.next_step, step) if part)
        self.message = "; ".join(part for part in (self.message, step) if part)


class Publisher:
    """Sends a slot's text to its sinks through the ledger, so that no sink posts it twice."""

    def __init__(self, ledger: PostLedger, *, recent_kept: int) -> None:
        self.ledger = ledger
        self.recent_kept = max(1, recent_kept)

    def publish(self, name: str, slot: str, sinks: list[Sink], outcome: PostOutcome) -> PostOutcome:
        """Send the slot's text to every sink not yet done, then close the slot."""
        for sink in sinks:
            entry = self._publish_one(name, slot, sink, outcome.text)
            outcome.sinks[sink.spec] = _shown(entry)
        states = {s["state"] for s in outcome.sinks.values()}
        outcome.status = slot_state(states)
        # Nothing was refused outright: a rate limit, or no answer from a sink that makes a
        # retry safe (its entry stays an intent). A later try may get through.
        outcome.retry_later = outcome.status == "failed" and states <= {"posted", *RETRY_LATER_STATES}
        # A text that went out anywhere (or may have) is a recent post: tomorrow's must not repeat
        # it, even if another sink turned it away today.
        went_out = outcome.text if states & {"posted", "uncertain", "intent"} else ""
        self.ledger.finish(name, slot, outcome.status, went_out, recent_kept=self.recent_kept)
        if outcome.status != "posted":
            outcome.message = "; ".join(sink_said(spec, s) for spec, s in outcome.sinks.items() if s["state"] != "posted")
        if outcome.status == "uncertain":
            outcome.advise(_settle_hint(name, slot, [spec for spec, s in outcome.sinks.items() if s["state"] == "uncertain"]))
        return outcome

    def _publish_one(self, name: str, slot: str, sink: Sink, text: str) -> SinkEntry:
        marker = f"{name}:{slot}:{sink.spec}"
        entry = self.ledger.sink_entry(name, slot, sink.spec)
        if entry is not None and entry.state == "posted":
            return entry
        if entry is not None and entry.state in ("intent", "uncertain"):
            # An earlier attempt died or lost its answer after the intent: did it post?
            try:
                found = sink.find(marker, text) if sink.retry == "check" else None
            except (SinkError, SinkNoAnswer) as exc:  # nobody can say: never post blind, look again at a later try
                return self._said(name, slot, sink, self._not_looked(name, slot, sink, entry, exc))
            except Exception as exc:  # not a failure the sink knows: the traceback is worth having
                log.exception("%s slot %s: looking on %s for the earlier post failed", name, slot, sink.spec)
                return self._not_looked(name, slot, sink, entry, exc)
            if found is not None:
                entry.id, entry.url = found.id, found.url
                self.ledger.record_post(name, slot, sink.spec, entry, text)
                log.info("%s slot %s: found the earlier post on %s (%s); not posting again", name, slot, sink.spec, found.id)
                return entry
            if sink.retry == "none":
                entry.state = "uncertain"
                entry.error = entry.error or "an earlier attempt may have posted; check the platform"
                self.ledger.set_sink(name, slot, sink.spec, entry)
                return self._said(name, slot, sink, entry)
        entry = SinkEntry(state="intent", marker=marker)
        self.ledger.extend(name, slot)
        self.ledger.set_sink(name, slot, sink.spec, entry)
        try:
            posted = sink.post(text, marker)
        except (SinkRateLimited, SinkUnreachable) as exc:  # nothing went out: the next tick tries again
            entry.state = "rate_limited" if isinstance(exc, SinkRateLimited) else "unreachable"
            entry.error = str(exc)
            self.ledger.set_sink(name, slot, sink.spec, entry)
            return self._said(name, slot, sink, entry)
        except SinkError as exc:  # the platform said no: nothing went out, a retry is safe
            entry.state, entry.error = "failed", str(exc)
            self.ledger.set_sink(name, slot, sink.spec, entry)
            return self._said(name, slot, sink, entry)
        except Exception as exc:  # no answer: it may have gone out
            entry.state = "uncertain" if sink.retry == "none" else "intent"
            if isinstance(exc, SinkNoAnswer):
                entry.error = str(exc)
                self.ledger.set_sink(name, slot, sink.spec, entry)
                return self._said(name, slot, sink, entry)
            # Not a failure the sink knows: the traceback is worth having.
            log.exception("%s slot %s: posting to %s failed midway", name, slot, sink.spec)
            entry.error = f"{type(exc).__name__}: {exc}"
            self.ledger.set_sink(name, slot, sink.spec, entry)
            return entry
        entry.id, entry.url = posted.id, posted.url
        self.ledger.record_post(name, slot, sink.spec, entry, text)
        log.info("%s slot %s: posted to %s as %s", name, slot, sink.spec, posted.url or posted.id)
        return entry

    @staticmethod
    def _said(name: str, slot: str, sink: Sink, entry: SinkEntry) -> SinkEntry:
        """Log a sink's failure as its outcome shows it, named by its spec (``discord:123: rate-limited, …``):
        the platform's words alone ("Discord is rate-limiting posts") cannot tell two channels apart."""
        log.warning("%s slot %s: %s", name, slot, sink_said(sink.spec, _shown(entry)))
        return entry

    def _not_looked(self, name: str, slot: str, sink: Sink, entry: SinkEntry, exc: Exception) -> SinkEntry:
        """An earlier post that could not be looked for (the platform down, say): the entry stays as it was."""
        entry.error = f"could not look for the earlier post, so nothing was sent: {one_line(exc)}"
        self.ledger.set_sink(name, slot, sink.spec, entry)
        return entry

    def settle(self, name: str, slot: str, *, posted: str | None, sink: str | None = None) -> PostOutcome:
        """Record what a person found of a post that got no answer: ``posted`` (its link or id there), or None: not there.

        A sink that took the request and never answered (X, Telegram) cannot be asked
        whether it posted, so the slot stays uncertain until someone looks. Posted, the
        link joins the history and the slot is done once every sink is; not posted, the
        sink is failed, and `persona post NAME --slot SLOT` posts it there.
        """
        if posted is not None and not posted.strip():
            raise PostingError("--posted needs the post's link (or its id on the platform)")
        spec = self._unsettled_sink(name, slot, sink)
        claim = self.ledger.claim(name, slot, approving=True)
        if not claim.claimed:
            if claim.outcome == "busy":
                raise PostingError(
                    f"slot {slot} of {name} is held by another poster, at work or stopped mid-post; its claim runs "
                    f"out in {max(1, self.ledger.held_s(name, slot))} s (posting.lease_s): settle it then"
                )
            raise PostingError(f"slot {slot} of {name} is {claim.state or claim.outcome}; nothing to settle")
        try:
            entry = self.ledger.sink_entry(name, slot, spec)
            if entry is None or entry.state not in UNSETTLED_STATES:  # settled or retried meanwhile
                raise PostingError(f"{spec} in slot {slot} of {name} is {entry.state if entry else 'gone'} now; nothing to settle")
            record = self.ledger.record(name, slot)
            if posted is not None:
                entry.id, entry.url = _post_reference(posted)
                entry.error = ""
                self.ledger.record_post(name, slot, spec, entry, record.get("text", ""))
            else:
                entry.state, entry.error = "failed", "a person found it missing (safe to post again)"
                self.ledger.set_sink(name, slot, spec, entry)
            entries = self.ledger.sink_entries(name, slot)
            state = slot_state({entry.state for entry in entries.values()})
            # Out somewhere (or maybe): a recent post, so that the same words are not posted again.
            went_out = record.get("text", "") if {e.state for e in entries.values()} & {"posted", *UNSETTLED_STATES} else ""
            self.ledger.finish(name, slot, state, went_out, recent_kept=self.recent_kept)
        finally:
            self.ledger.release(name, slot)
        outcome = PostOutcome(
            name, slot, state, text=record.get("text", ""), approval_id=record.get("approval", ""),
            sinks={s: _shown(e) for s, e in entries.items()},
        )
        if posted is not None:
            outcome.message = f"{spec}: recorded as posted ({entry.url or entry.id}); slot {outcome.headline}"
        else:
            outcome.message = f"{spec}: recorded as not posted; to post it now: `persona post {name} --slot {slot}`"
        if state == "uncertain":
            outcome.advise(_settle_hint(name, slot, [s for s, e in entries.items() if e.state == "uncertain"]))
        return outcome

    def _unsettled_sink(self, name: str, slot: str, sink: str | None) -> str:
        """The sink to settle: the one named, or the slot's only unsettled one; else PostingError saying which."""
        entries = self.ledger.sink_entries(name, slot)
        if not entries:
            raise PostingError(f"{name} has no post in slot {slot}; `persona posts uncertain` lists the posts to settle")
        unsettled = [spec for spec, entry in entries.items() if entry.state in UNSETTLED_STATES]
        states = ", ".join(f"{spec} {entry.state}" for spec, entry in entries.items())
        if sink is None:
            if len(unsettled) == 1:
                return unsettled[0]
            if not unsettled:
                raise PostingError(f"slot {slot} of {name} has nothing to settle ({states})")
            raise PostingError(f"slot {slot} of {name} has {len(unsettled)} sinks to settle ({', '.join(unsettled)}); name one with --sink")
        if sink not in entries:
            raise PostingError(f"slot {slot} of {name} did not post to {sink!r}; its sinks: {states}")
        if sink not in unsettled:
            raise PostingError(f"{sink} in slot {slot} of {name} is {entries[sink].state}; only a post that got no answer can be settled")
        return sink


def sink_said(spec: str, shown: dict) -> str:
    """One sink's outcome on one line: ``x: posted https://…``, ``mastodon: unreachable, nothing sent: …``."""
    said = (shown.get("url") or shown.get("id")) if shown["state"] == "posted" else shown.get("error")
    return " ".join(part for part in (f"{spec}:", STATE_WORDS.get(shown["state"], shown["state"]), said) if part)


def _shown(entry: SinkEntry) -> dict:
    """A sink's entry as an outcome shows it (its marker is the ledger's own)."""
    return {k: v for k, v in asdict(entry).items() if k != "marker"}


def _settle_hint(name: str, slot: str, specs: list[str]) -> str:
    """What to do about sinks that may or may not hold the post."""
    which = f" --sink {specs[0]}" if len(specs) > 1 else ""
    return (
        f"look on {', '.join(specs)} for the post, then say what you found: "
        f"`persona posts settle {name} {slot}{which} --posted LINK` (or `--not-posted`)"
    )


def _post_reference(posted: str) -> tuple[str, str]:
    """(id, url) of a post a person names by its link or its id."""
    value = posted.strip()
    if "://" in value:
        return value.rstrip("/").rsplit("/", 1)[-1], value
    return value, ""
