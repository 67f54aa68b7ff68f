"""Making one post: generate candidates through the queue, curate, publish exactly once.

``Poster.post`` claims the (persona, slot) in the ledger, generates N candidates at
batch priority (each with its own seed), keeps the best that passes the filters, and
stores it in the slot's record *before* publishing, so a retry after a crash publishes
the same text. Each sink gets an intent record first, then the platform call, then the
post id; see ``adapters.posting.sinks`` for how each sink makes a retry safe. With
approval on, the post waits in the approval queue instead of going out.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import redis

from adapters.posting.sinks import (
    Sink,
    SinkRateLimited,
    SinkUnreachable,
    make_sink,
    platform_of,
)
from adapters.posting.slots import parse_slot
from persona.approvals import Approval, ApprovalQueue
from persona.contract import (
    GenerationReply,
    GenerationRequest,
    Priority,
    SamplingOverrides,
)
from persona.curation import Curated, curate, limit_for, load_corpus, over_limits
from persona.errors import ConfigError, PostingError, ReplyTimeout, SinkError
from persona.ledger import FINAL_STATES, PostLedger, SinkEntry
from persona.originality import CopyIndex
from persona.personas import Persona, PersonaRegistry
from persona.queue import QueueClient
from persona.settings import Settings

__all__ = ["CandidateSource", "PostOutcome", "Poster", "QueueCandidates", "manual_slot"]

log = logging.getLogger(__name__)

SEED_RANGE = 2**31 - 1024
# Sink states after which trying the slot again is safe and may succeed.
RETRY_LATER_STATES = ("rate_limited", "unreachable", "intent")
# How a sink's state reads in a message (an intent left behind means the call got no answer).
STATE_WORDS = {"intent": "no answer (safe to retry)", "rate_limited": "rate-limited", "unreachable": "unreachable, nothing sent:"}
POLL_S = 2.0
WAIT_SLACK_S = 5.0


class CandidateSource(Protocol):
    """Whatever writes the raw candidates for a post."""

    def __call__(self, persona: Persona, n: int, seed: int) -> list[str]: ...


class QueueCandidates:
    """Candidates from the workers: N requests at batch priority, seeds ``seed .. seed+N-1``."""

    def __init__(
        self, queue: QueueClient, wait_s: float, source: str = "scheduler", stopping: threading.Event | None = None
    ) -> None:
        self.queue = queue
        self.wait_s = wait_s
        self.source = source
        self.stopping = stopping or threading.Event()
        self.failures = 0

    def __call__(self, persona: Persona, n: int, seed: int) -> list[str]:
        deadline = time.time() + self.wait_s
        requests: list[GenerationRequest] = []
        texts: list[str] = []
        try:
            # Submit them all before waiting on any, so a worker generates them as one batch.
            # A full queue may refuse the fifth after taking four: those four are cancelled below.
            for i in range(n):
                requests.append(self.queue.submit(GenerationRequest(
                    persona=persona.name, mode="complete", priority=Priority.batch, source=self.source,
                    sampling=SamplingOverrides(seed=seed + i), deadline=deadline,
                )))
            for request in requests:
                reply = self._wait(request)
                if reply.ok:
                    texts.append(reply.text)
                else:
                    self.failures += 1
                    log.warning("candidate %s for %s failed: %s", request.id, persona.name, reply.error)
        except BaseException:
            for request in requests:  # nobody will read them: spare the workers
                self.queue.cancel(request.id)
            raise
        return texts


    def _wait(self, request: GenerationRequest) -> GenerationReply:
        # Short waits in a loop, so a stop (SIGTERM) takes effect while a cold worker
        # spends minutes loading its model.
        while True:
            if self.stopping.is_set():
                raise PostingError("stopped while waiting for candidates; the slot stays due")
            remaining = request.deadline + WAIT_SLACK_S - time.time()
            try:
                return self.queue.wait(request, timeout=max(0.1, min(POLL_S, remaining)))
            except ReplyTimeout:
                if remaining <= POLL_S:
                    raise


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
    # Every candidate as curation saw it, in order: {"text": ..., "rejected": reason, or "" if it passed}.
    verdicts: list[dict[str, str]] = field(default_factory=list)
    sinks: dict[str, dict] = field(default_factory=dict)
    approval_id: str = ""
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def manual_slot(now: datetime | None = None) -> str:
    """A fresh slot name for a post made by hand."""
    return (now or datetime.now(UTC)).strftime("manual-%Y-%m-%dT%H:%M:%S.%fZ")


class Poster:
    """Makes posts for personas: generate, curate, hold for approval or publish."""

    def __init__(
        self, settings: Settings, client: redis.Redis, candidates: CandidateSource, *,
        registry: PersonaRegistry | None = None, owner: str | None = None,
        sink_factory: Callable[[str, Settings], Sink] = make_sink,
    ) -> None:
        self.settings = settings
        self.sink_factory = sink_factory
        self.candidates = candidates
        self.registry = registry or PersonaRegistry.from_settings(settings)
        self.ledger = PostLedger(client, lease_s=settings.posting.lease_s, owner=owner)
        self.approvals = ApprovalQueue(client)
        self._corpora: dict[tuple[Path, int], CopyIndex] = {}

    def sinks_for(self, persona: Persona, specs: list[str] | None) -> list[Sink]:
        """The sinks named (or the persona's own), built now so bad credentials fail early."""
        built: list[Sink] = []
        problems: list[str] = []
        for spec in specs or persona.schedule.sinks:
            try:
                built.append(self.sink_factory(spec, self.settings))
            except ConfigError as exc:  # every missing setting at once, not one per attempt
                problems.append(str(exc))
        if len(problems) > 1:
            raise ConfigError(f"{len(problems)} sinks cannot post:\n  " + "\n  ".join(problems))
        if problems:
            raise ConfigError(problems[0])
        return built

    def corpus_index(self, persona: Persona) -> CopyIndex | None:
        """The persona's corpus as a copy index (cached), if its file names one."""
        if not persona.filters.corpus:
            return None
        path = Path(persona.filters.corpus).expanduser()
        if not path.is_absolute():
            base = persona.source.parent if persona.source else self.settings.data_dir
            path = base / path
        key = (path, persona.filters.max_copied_words)
        if key not in self._corpora:
            self._corpora[key] = load_corpus(path, persona.filters.max_copied_words)
        return self._corpora[key]

    def choose(self, persona: Persona, platforms: list[str], n: int) -> Curated:
        """Generate ``n`` candidates and curate them for these platforms."""
        corpus = self.corpus_index(persona)  # an unreadable corpus is said before the workers spend a batch
        raws = self.candidates(persona, n, secrets.randbelow(SEED_RANGE))
        # Posts still waiting for approval count as recent: approved a week later, two near
        # copies would both go out.
        waiting = [a.text for a in self.approvals.pending() if a.persona == persona.name]
        curated = curate(
            raws,
            max_chars=limit_for(platforms, persona.filters.max_chars),
            min_chars=persona.filters.min_chars,
            blocklist=persona.filters.blocklist,
            recent=self.ledger.recent_texts(persona.name, self.settings.posting.recent_posts) + waiting,
            corpus=corpus,
            platforms=platforms,
        )
        missing = n - len(raws)
        if missing:
            curated.rejected["generation_failed"] = missing
        return curated

    def post(
        self, name: str, *, slot: str | None = None, sinks: list[str] | None = None, dry_run: bool = False,
        n: int | None = None, approval: bool | None = None,
    ) -> PostOutcome:
        """Make the post for one slot (a fresh manual slot if none is named)."""
        persona = self.registry.get(name)
        count = n or persona.schedule.candidates
        if dry_run:
            return self._dry_run(persona, slot or "", sinks or persona.schedule.sinks, count)
        built = self.sinks_for(persona, sinks)
        if not built:
            raise PostingError(f"persona {name!r} has no sinks: add schedule.sinks to its file, or pass --sink")
        slot = parse_slot(slot) if slot else manual_slot()
        claim = self.ledger.claim(persona.name, slot)
        if not claim.claimed:
            return self._unclaimed(persona.name, slot, claim.outcome, claim.state)
        try:
            return self._post_claimed(persona, slot, built, count, persona.schedule.approval if approval is None else approval)
        finally:
            self.ledger.release(persona.name, slot)  # a no-op once finished

    def _post_claimed(self, persona: Persona, slot: str, sinks: list[Sink], n: int, approval: bool) -> PostOutcome:
        record = self.ledger.record(persona.name, slot)
        if record.get("text"):  # a retry: publish what was chosen before, never a new text
            outcome = PostOutcome(persona.name, slot, "posted", text=record["text"],
                                  candidates=int(record.get("candidates", 0)), rejected=json.loads(record.get("rejected", "{}")))
            return self._publish(persona, slot, sinks, outcome)
        curated = self.choose(persona, [s.platform for s in sinks], n)
        outcome = self._outcome(persona.name, slot, "posted", curated)
        if curated.best is None:
            self.ledger.save(persona.name, slot, candidates=str(outcome.candidates), rejected=json.dumps(outcome.rejected))
            self.ledger.finish(persona.name, slot, "failed")
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(outcome.rejected.items()))
            outcome.status, outcome.message = "no_candidate", f"no candidate passed the filters ({reasons})"
            return outcome
        self.ledger.save(
            persona.name, slot, text=curated.best.text, candidates=str(outcome.candidates),
            rejected=json.dumps(outcome.rejected), sinks=json.dumps([s.spec for s in sinks]),
        )
        if approval:
            waiting = self.approvals.add(persona.name, slot, curated.best.text, [s.spec for s in sinks], outcome.passed[1:])
            self.ledger.save(persona.name, slot, approval=waiting.id)
            self.ledger.finish(persona.name, slot, "pending")
            outcome.status, outcome.approval_id = "pending", waiting.id
            outcome.message = f"waiting for approval: `persona posts approve {waiting.id}`"
            return outcome
        return self._publish(persona, slot, sinks, outcome)

    def _publish(self, persona: Persona, slot: str, sinks: list[Sink], outcome: PostOutcome) -> PostOutcome:
        """Send the slot's text to every sink not yet done, then close the slot."""
        for sink in sinks:
            entry = self._publish_one(persona.name, slot, sink, outcome.text)
            outcome.sinks[sink.spec] = {k: v for k, v in asdict(entry).items() if k != "marker"}
        states = {s["state"] for s in outcome.sinks.values()}
        outcome.status = "posted" if states == {"posted"} else "uncertain" if "uncertain" in states else "failed"
        # Nothing was refused outright: a rate limit, or no answer from a sink that makes a
        # retry safe (its entry stays an intent). A later try may get through.
        outcome.retry_later = outcome.status == "failed" and states <= {"posted", *RETRY_LATER_STATES}
        # A text that went out anywhere (or may have) is a recent post: tomorrow's must not repeat
        # it, even if another sink turned it away today.
        went_out = outcome.text if states & {"posted", "uncertain", "intent"} else ""
        self.ledger.finish(persona.name, slot, outcome.status, went_out, recent_kept=max(1, self.settings.posting.recent_posts))
        if outcome.status != "posted":
            outcome.message = "; ".join(
                f"{spec}: {STATE_WORDS.get(s['state'], s['state'])} {s['error']}".strip()
                for spec, s in outcome.sinks.items() if s["state"] != "posted"
            )
        return outcome

    def _publish_one(self, name: str, slot: str, sink: Sink, text: str) -> SinkEntry:
        marker = f"{name}:{slot}:{sink.spec}"
        entry = self.ledger.sink_entry(name, slot, sink.spec)
        if entry is not None and entry.state == "posted":
            return entry
        if entry is not None and entry.state in ("intent", "uncertain"):
            # An earlier attempt died or lost its answer after the intent: did it post?
            found = sink.find(marker, text) if sink.retry == "check" else None
            if found is not None:
                entry.id, entry.url = found.id, found.url
                self.ledger.record_post(name, slot, sink.spec, entry, text)
                log.info("%s slot %s: found the earlier post on %s (%s); not posting again", name, slot, sink.spec, found.id)
                return entry
            if sink.retry == "none":
                entry.state = "uncertain"
                entry.error = entry.error or "an earlier attempt may have posted; check the platform"
                self.ledger.set_sink(name, slot, sink.spec, entry)
                return entry
        entry = SinkEntry(state="intent", marker=marker)
        self.ledger.extend(name, slot)
        self.ledger.set_sink(name, slot, sink.spec, entry)
        try:
            posted = sink.post(text, marker)
        except (SinkRateLimited, SinkUnreachable) as exc:  # nothing went out: the next tick tries again
            log.warning("%s slot %s: %s", name, slot, exc)
            entry.state = "rate_limited" if isinstance(exc, SinkRateLimited) else "unreachable"
            entry.error = str(exc)
            self.ledger.set_sink(name, slot, sink.spec, entry)
            return entry
        except SinkError as exc:  # the platform said no: nothing went out, a retry is safe
            log.warning("%s slot %s: %s", name, slot, exc)
            entry.state, entry.error = "failed", str(exc)
            self.ledger.set_sink(name, slot, sink.spec, entry)
            return entry
        except Exception as exc:  # no answer: it may have gone out
            log.exception("%s slot %s: posting to %s failed midway", name, slot, sink.spec)
            entry.state = "uncertain" if sink.retry == "none" else "intent"
            entry.error = f"{type(exc).__name__}: {exc}"
            self.ledger.set_sink(name, slot, sink.spec, entry)
            return entry
        entry.id, entry.url = posted.id, posted.url
        self.ledger.record_post(name, slot, sink.spec, entry, text)
        log.info("%s slot %s: posted to %s as %s", name, slot, sink.spec, posted.id)
        return entry

    def approve(self, approval_id: str, text: str | None = None) -> PostOutcome:
        """Publish a waiting post (optionally with edited text) to its sinks.

        Approving it again retries the sinks that a refusal, a rate limit or a crash
        left out (the slot's ledger keeps those already posted from a second post).
        """
        waiting = self.approvals.get(approval_id)
        retry = waiting.state == "approved"
        if not retry and waiting.state != "pending":
            raise PostingError(f"post {approval_id} was already {waiting.state}")
        if text is not None:
            text = self._check_edit(approval_id, text, waiting.sinks)
        if retry and text and text != waiting.text:
            state = self.ledger.record(waiting.persona, waiting.slot).get("state", "")
            if state in FINAL_STATES:
                raise PostingError(f"post {approval_id} was approved and is {state} already; its text cannot change now")
            raise PostingError(
                f"post {approval_id} was approved already with its text; run `persona posts approve {approval_id}` without --text to finish posting it"
            )
        persona = self.registry.get(waiting.persona)
        sinks = self.sinks_for(persona, waiting.sinks)
        claim = self.ledger.claim(persona.name, waiting.slot, approving=True)
        if not claim.claimed:
            return self._unclaimed(persona.name, waiting.slot, claim.outcome, claim.state)
        try:
            if not retry:
                waiting = self.approvals.decide(approval_id, "approved", text or "")
            self.ledger.save(persona.name, waiting.slot, text=waiting.text, state="approved")
            outcome = PostOutcome(persona.name, waiting.slot, "posted", text=waiting.text, approval_id=approval_id)
            outcome = self._publish(persona, waiting.slot, sinks, outcome)
            if outcome.status == "failed":
                outcome.message += f"; to try again: `persona posts approve {approval_id}`"
            return outcome
        finally:
            self.ledger.release(persona.name, waiting.slot)

    @staticmethod
    def _check_edit(approval_id: str, text: str, sinks: list[str]) -> str:
        """A person's edit, trimmed, if every platform will take it; else PostingError (the post still waits).

        No filter judges a person's words, but a text too long for one platform would go
        out on the others and not there.
        """
        edited = text.strip()
        if not edited:
            raise PostingError(f"--text is empty; to drop the post instead: `persona posts reject {approval_id}`")
        if over := over_limits(edited, [platform_of(spec) for spec in sinks]):
            raise PostingError(
                f"the edited text is too long ({'; '.join(over)} characters); shorten it and approve again "
                f"(post {approval_id} still waits)"
            )
        return edited

    def reject(self, approval_id: str) -> Approval:
        """Drop a waiting post; its slot is closed as rejected."""
        waiting = self.approvals.get(approval_id)
        claim = self.ledger.claim(waiting.persona, waiting.slot, approving=True)
        try:
            decided = self.approvals.decide(approval_id, "rejected")
            if claim.claimed:
                self.ledger.finish(waiting.persona, waiting.slot, "rejected")
        finally:
            self.ledger.release(waiting.persona, waiting.slot)  # too late to reject: the slot is not left held
        return decided

    def _dry_run(self, persona: Persona, slot: str, specs: list[str], n: int) -> PostOutcome:
        """The candidates and their verdicts for these sinks, posting nothing.

        A preview needs no credentials (only each sink's platform, for its limit): a
        sink that could not post yet is named in the message, not a reason to show nothing.
        """
        try:
            problem = "" if self.sinks_for(persona, specs) else "a real post would fail: no sinks (schedule.sinks, or --sink)"
        except ConfigError as exc:
            problem = f"a real post would fail: {exc}"
        curated = self.choose(persona, [platform_of(spec) for spec in specs], n)
        outcome = self._outcome(persona.name, slot, "dry_run" if curated.best else "no_candidate", curated)
        outcome.message = problem
        return outcome

    def _outcome(self, name: str, slot: str, status: str, curated: Curated) -> PostOutcome:
        return PostOutcome(
            name, slot, status, text=curated.best.text if curated.best else "",
            candidates=len(curated.candidates) + curated.rejected.get("generation_failed", 0),
            rejected=dict(curated.rejected), passed=[c.text for c in curated.passed],
            verdicts=[{"text": c.text, "rejected": c.rejected or ""} for c in curated.candidates],
        )

    def _unclaimed(self, name: str, slot: str, outcome: str, state: str) -> PostOutcome:
        record = self.ledger.record(name, slot)
        messages = {
            "done": f"slot {slot} of {name} was already {state}; nothing to do" if state != "expired"
            else f"slot {slot} of {name} waited for an approval that expired unanswered; nothing to do",
            "busy": f"slot {slot} of {name} is being posted by another scheduler right now",
            "pending": f"slot {slot} of {name} is waiting for approval ({record.get('approval', '?')})",
        }
        return PostOutcome(
            name, slot, "done" if outcome == "done" else outcome, text=record.get("text", ""),
            approval_id=record.get("approval", ""), message=messages.get(outcome, outcome),
        )
