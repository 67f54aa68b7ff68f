"""Making one post: generate candidates, curate, hold for approval or publish.

``Poster.post`` claims the (persona, slot) in the ledger, asks its candidate source
(``adapters.posting.candidates``) for N candidates, keeps the best that passes the
filters, and stores it in the slot's record *before* publishing, so a retry after a
crash publishes the same text; ``adapters.posting.publishing`` sends it to each sink
exactly once. With approval on, the post waits in the approval queue instead.

The text is checked against the persona's other posts (recent, waiting for approval, or
open in another slot) and saved in one hold of the persona's text choice
(``PostLedger.choosing``): two posters at one moment cannot both find a text new. An
approver's edit is checked and saved so too (``Poster.approve``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import redis

from adapters.posting.candidates import CandidateSource
from adapters.posting.publishing import PostOutcome, Publisher
from adapters.posting.sinks import Sink, make_sink, one_place_twice, platform_of
from adapters.posting.slots import (
    MANUAL_SLOT_PREFIX,
    check_catching_up,
    manual_slot,
    resolve_slot,
    slot_id,
)
from persona.approvals import Approval, ApprovalQueue
from persona.curation import (
    FLAW_WORDS,
    Curated,
    curate,
    is_near_repeat,
    limit_for,
    load_corpus,
    over_limits,
)
from persona.errors import ConfigError, PostingError
from persona.ledger import FINAL_STATES, ClaimResult, PostLedger
from persona.originality import CopyIndex, words
from persona.personas import Persona, PersonaRegistry
from persona.settings import Settings

__all__ = ["Poster"]

SEED_RANGE = 2**31 - 1024
# A `posts approve` of a post that another approval or rejection of it is deciding waits this long
# for that one (deciding takes milliseconds; one stopped mid-way holds the slot for posting.lease_s).
APPROVER_WAIT_S = 5.0
APPROVER_POLL_S = 0.1


class Poster:
    """Makes posts for personas: generate, curate, hold for approval or publish."""

    def __init__(
        self, settings: Settings, client: redis.Redis, candidates: CandidateSource, *,
        registry: PersonaRegistry | None = None, owner: str | None = None,
        sink_factory: Callable[[str, Settings], Sink] = make_sink,
        on_publish: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        # Told (persona, slot) as a slot's text is about to go out: from here on, a stop
        # leaves a slot begun that `persona post NAME --slot SLOT` finishes.
        self.on_publish = on_publish
        self.sink_factory = sink_factory
        self.candidates = candidates
        self.registry = registry or PersonaRegistry.from_settings(settings)
        self.ledger = PostLedger(client, lease_s=settings.posting.lease_s, owner=owner, grace_s=settings.posting.grace_s)
        self.approvals = ApprovalQueue(client)
        self.publisher = Publisher(self.ledger, recent_kept=settings.posting.recent_posts)
        self._corpora: dict[tuple[Path, int], CopyIndex] = {}

    def sinks_for(self, persona: Persona, specs: list[str] | None) -> list[Sink]:
        """The sinks named (or the persona's own), built now so bad credentials fail early."""
        built: list[Sink] = []
        problems: list[str] = []
        for spec in dict.fromkeys(specs or persona.schedule.sinks):  # a spec listed twice is one sink
            try:
                built.append(self.sink_factory(spec, self.settings))
            except ConfigError as exc:  # every missing setting at once, not one per attempt
                problems.append(str(exc))
        if len(problems) > 1:
            raise ConfigError(f"{len(problems)} sinks cannot post:\n  " + "\n  ".join(problems))
        if problems:
            raise ConfigError(problems[0])
        if twice := one_place_twice([sink.spec for sink in built], self.settings):
            # Each sink's post is its own: "discord:1", "Discord:1" and "discord: 1" sent every
            # post to that channel three times. (`persona personas validate` says so too.)
            raise ConfigError(
                f"sinks {twice[0]!r} and {twice[1]!r} post to the same place, which would get each post twice; "
                f"list it once (schedule.sinks in the persona's file, or --sink)"
            )
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
        return self._curate(persona, platforms, n, self._generate(persona, n))

    def _generate(self, persona: Persona, n: int) -> list[str]:
        self.corpus_index(persona)  # an unreadable corpus is said before the workers spend a batch
        return self.candidates(persona, n, secrets.randbelow(SEED_RANGE))

    def _curate(self, persona: Persona, platforms: list[str], n: int, raws: list[str], slot: str = "") -> Curated:
        """The candidates judged; a near copy of a recent post, of one waiting for approval (approved
        a week later, two near copies would both go out) or of another open slot's text is rejected."""
        waiting = [a.text for a in self.approvals.pending() if a.persona == persona.name]
        others = [text for begun, text in self.ledger.open_texts(persona.name).items() if begun != slot]
        curated = curate(
            raws,
            max_chars=limit_for(platforms, persona.filters.max_chars),
            min_chars=persona.filters.min_chars,
            blocklist=persona.filters.blocklist,
            recent=self.ledger.recent_texts(persona.name, self.settings.posting.recent_posts) + waiting + others,
            corpus=self.corpus_index(persona),
            platforms=platforms,
        )
        missing = n - len(raws)
        if missing:
            curated.rejected["generation_failed"] = missing
        return curated

    def post(
        self, name: str, *, slot: str | None = None, sinks: list[str] | None = None, dry_run: bool = False,
        n: int | None = None, approval: bool | None = None, text: str | None = None, by_hand: bool = False,
    ) -> PostOutcome:
        """Make the post for one slot (a fresh manual slot if none is named): generated and
        curated, or ``text``, a person's own words, posted as written (see ``_own_text``).

        ``by_hand``: a person named the slot, so a slot not begun must be one the scheduler
        would still post now (``slots.check_catching_up``).
        """
        persona = self.registry.get(name)
        count = n or persona.schedule.candidates
        slot = self.slot_named(persona, slot, by_hand=by_hand) if slot else ""
        if text is not None:
            chosen = self._chosen_sinks(persona.name, slot) if slot else None  # begun: its text is checked when claimed
            text = self._own_text(persona.name, text, sinks or chosen or persona.schedule.sinks, repeat_ok=chosen is not None)
        if dry_run:
            return self._dry_run(persona, slot, sinks or persona.schedule.sinks, count, text)
        slot = slot or manual_slot()
        built = self.sinks_for(persona, sinks or self._chosen_sinks(persona.name, slot))
        if not built:
            raise PostingError(f"persona {name!r} has no sinks: add schedule.sinks to its file, or pass --sink")
        claim = self.ledger.claim(persona.name, slot)
        if not claim.claimed:
            return self._unclaimed(persona.name, slot, claim.outcome, claim.state, by_hand=by_hand)
        try:
            approve = persona.schedule.approval if approval is None else approval
            outcome = self._post_claimed(persona, slot, built, count, approve, text)
        finally:
            self.ledger.release(persona.name, slot)  # a no-op once finished
        if outcome.status == "failed" and not outcome.retry_later:  # refused: nobody retries it unasked
            outcome.advise(f"once that is fixed, `persona post {persona.name} --slot {slot}` posts the same text "
                           f"where it failed (never twice)")
        return outcome

    def _own_text(self, name: str, text: str, specs: list[str], *, repeat_ok: bool = False) -> str:
        """A person's text for a post, trimmed, if every platform will take it and it is not
        one of the persona's recent posts; else PostingError.

        No filter judges a person's words, but a text too long for one platform would go
        out on the others only, and the same command run twice would post it twice.
        """
        posted = text.strip()
        if not posted:
            raise PostingError("--text is empty (with --text -: nothing came in on standard input); give the post's words")
        if over := over_limits(posted, [platform_of(spec) for spec in specs]):
            raise PostingError(f"the text is too long ({'; '.join(over)} characters); shorten it, nothing was posted")
        if not repeat_ok:  # said before anything is built; checked again as it is saved (``_post_claimed``)
            self._check_new(name, posted)
        return posted

    def _check_new(self, name: str, text: str, slot: str = "") -> None:
        """PostingError if ``text`` is one of the persona's recent posts, waits for approval, or is
        held by one of its open slots other than ``slot``."""
        same = " ".join(text.split())
        if begun := [s for s, held in self.ledger.open_texts(name).items() if s != slot and " ".join(held.split()) == same]:
            raise PostingError(self._begun_with_text(name, begun[0]))
        recent = self.ledger.recent_texts(name, self.settings.posting.recent_posts)
        waiting = [a.text for a in self.approvals.pending() if a.persona == name]
        if same in {" ".join(t.split()) for t in recent + waiting}:
            raise PostingError(
                f"{name} posted this text already, or it waits for approval (`persona posts history --persona {name}`, "
                f"`persona posts pending`); to finish a post that failed somewhere: `persona post {name} --slot SLOT`, "
                f"which never posts twice"
            )

    def _begun_with_text(self, name: str, slot: str) -> str:
        """Why a text that an open slot holds is not posted in a new one, and how to finish that slot."""
        finish = f"`persona post {name} --slot {slot}` finishes it (it never posts twice)"
        if held_s := self.ledger.held_s(name, slot):
            finish = (f"its poster is still at work or stopped mid-post, and holds it {held_s} s more "
                      f"(posting.lease_s); then {finish}")
        return (
            f"slot {slot} of {name} holds this text already and is not finished: it may be out on some "
            f"sinks (`persona posts uncertain --persona {name}`); {finish}, or once you have looked: "
            f"`persona posts settle {name} {slot} --posted LINK` (or `--not-posted`); nothing was posted now"
        )

    def slot_named(self, persona: Persona, name: str, *, by_hand: bool = False) -> str:
        """The slot a person named, as the ledger knows it (see ``slots.resolve_slot`` for the forms).

        A name ``persona post`` made up (``manual-...``), or one the ledger already holds, is
        taken as it is. ``by_hand`` (a post, not a settle): a slot the ledger does not hold
        must be one the scheduler would still post now; a slot begun is finished whatever its age.
        """
        if name.startswith(MANUAL_SLOT_PREFIX) or self.ledger.record(persona.name, name):
            return name
        schedule = persona.schedule
        slot = resolve_slot(name, schedule.cron, schedule.timezone)
        if by_hand and not self.ledger.record(persona.name, slot):
            check_catching_up(name, slot, schedule.cron, schedule.timezone, schedule.missed,
                              self.settings.posting.grace_s)
        return slot

    def _chosen_sinks(self, name: str, slot: str) -> list[str] | None:
        """The sinks a slot's text was chosen for, if it was (None for a slot not begun)."""
        # A retry by hand of `persona post --sink x` goes on to X alone, not to every sink in the file.
        record = self.ledger.record(name, slot)
        return json.loads(record["sinks"]) if record.get("text") and record.get("sinks") else None

    def _post_claimed(
        self, persona: Persona, slot: str, sinks: list[Sink], n: int, approval: bool, text: str | None = None,
    ) -> PostOutcome:
        record = self.ledger.record(persona.name, slot)
        if record.get("text"):  # a retry: publish what was chosen before, never a new text
            if text is not None and text != record["text"]:
                raise PostingError(
                    f"slot {slot} of {persona.name} has its text already ({record['text']!r}); to finish posting "
                    f"it: `persona post {persona.name} --slot {slot}` (without --text); a new text needs a new slot"
                )
            outcome = PostOutcome(persona.name, slot, "posted", text=record["text"],
                                  candidates=int(record.get("candidates", 0)), rejected=json.loads(record.get("rejected", "{}")))
            return self._publish(persona.name, slot, sinks, outcome)
        raws = self._generate(persona, n) if text is None else []  # outside the hold: it takes seconds
        with self.ledger.choosing(persona.name) as choosing:
            if text is not None:  # a person's own words: nothing to generate or choose
                self._check_new(persona.name, text, slot)
                outcome = PostOutcome(persona.name, slot, "posted", text=text)
            else:
                curated = self._curate(persona, [s.platform for s in sinks], n, raws, slot)
                outcome = self._outcome(persona, slot, "posted", curated)
                if curated.best is None:
                    self.ledger.save(persona.name, slot, candidates=str(outcome.candidates), rejected=json.dumps(outcome.rejected))
                    self.ledger.finish(persona.name, slot, "failed")
                    outcome.status = "no_candidate"
                    return outcome
            self.ledger.save(
                persona.name, slot, choosing=choosing, text=outcome.text, candidates=str(outcome.candidates),
                rejected=json.dumps(outcome.rejected), sinks=json.dumps([s.spec for s in sinks]),
            )
        if approval:
            waiting = self.approvals.add(persona.name, slot, outcome.text, [s.spec for s in sinks], outcome.passed[1:])
            self.ledger.save(persona.name, slot, approval=waiting.id)
            self.ledger.finish(persona.name, slot, "pending")
            outcome.status, outcome.approval_id = "pending", waiting.id
            outcome.message = _joined(f"waiting for approval: `persona posts approve {waiting.id}`", outcome.message)
            return outcome
        return self._publish(persona.name, slot, sinks, outcome)

    def _publish(self, name: str, slot: str, sinks: list[Sink], outcome: PostOutcome) -> PostOutcome:
        if self.on_publish is not None:
            self.on_publish(name, slot)
        return self.publisher.publish(name, slot, sinks, outcome)

    def settle(self, name: str, slot: str, *, posted: str | None, sink: str | None = None) -> PostOutcome:
        """Record what a person found of a post that got no answer (see ``Publisher.settle``)."""
        try:
            persona = self.registry.get(name)
        except ConfigError:  # its file deleted, renamed or broken: the ledger still holds its posts
            found = self._ledger_slot(name, slot)
            if found is None:
                raise
            return self.publisher.settle(name, found, posted=posted, sink=sink)
        return self.publisher.settle(persona.name, self.slot_named(persona, slot), posted=posted, sink=sink)

    def _ledger_slot(self, name: str, slot: str) -> str | None:
        """The slot a person named, read without the persona's file: as the ledger names it, or an
        exact instant (``…Z``, ``+01:00``); None if the ledger holds no post of ``name`` there.

        A time without a zone is read in the persona's time zone, which only its file knows:
        such a name is a PostingError that asks for the slot as `persona posts uncertain` shows it.
        """
        if self.ledger.sink_entries(name, slot):
            return slot
        try:
            when = datetime.fromisoformat(slot.strip())
        except ValueError:
            when = None
        if when is not None and when.tzinfo is not None:
            return slot_id(when) if self.ledger.sink_entries(name, slot_id(when)) else None
        if any(item["persona"] == name for item in self.ledger.unsettled(name)):
            raise PostingError(
                f"persona {name!r} has no file any more, so {slot!r} cannot be read in its time zone; name the slot "
                f"as `persona posts uncertain --persona {name}` shows it (e.g. 2026-11-27T09:00:00Z)"
            )
        return None

    def approve(self, approval_id: str, text: str | None = None) -> PostOutcome:
        """Publish a waiting post (optionally with edited text) to its sinks.

        An edit is refused (the post still waits) if it says nearly what another of the persona's
        posts says (``_check_edit_new``). Approving it again retries the sinks that a refusal, a
        rate limit or a crash left out (the slot's ledger keeps those already posted from a second post).
        Found held by another approval or rejection of it (two people at once), it waits a few
        seconds for that one (``_wait_for_approver``), then reads the post again and answers as it stands.
        """
        waited = False
        while True:
            waiting, retry, text = self._approvable(approval_id, text)
            persona = self.registry.get(waiting.persona)
            sinks = self.sinks_for(persona, waiting.sinks)
            claim = self.ledger.claim(persona.name, waiting.slot, approving=True)
            if claim.claimed:
                break
            if claim.outcome == "busy" and not waited:
                waited = True
                self._wait_for_approver(approval_id, persona.name, waiting.slot)
                continue
            return self._unclaimed_approval(approval_id, persona.name, waiting.slot, claim)
        try:
            # The edit is checked and shown to the others (the slot's record) in one hold of the
            # persona's text choice, as a generated text is (``_post_claimed``).
            with self.ledger.choosing(persona.name) as choosing:
                if retry:  # its record says approved already, unless an older approver stopped between the two writes
                    self.ledger.save(persona.name, waiting.slot, choosing=choosing, text=waiting.text, state="approved")
                else:
                    if text is not None and text != waiting.text:
                        self._check_edit_new(waiting, text)
                    waiting = self.approvals.approve(waiting, text or "", owner=self.ledger.owner, choosing=choosing)
            outcome = PostOutcome(persona.name, waiting.slot, "posted", text=waiting.text, approval_id=approval_id)
            outcome = self.publisher.publish(persona.name, waiting.slot, sinks, outcome)
            if outcome.status == "failed":
                outcome.advise(f"to try again: `persona posts approve {approval_id}`")
            return outcome
        finally:
            self.ledger.release(persona.name, waiting.slot)

    def _approvable(self, approval_id: str, text: str | None) -> tuple[Approval, bool, str | None]:
        """The waiting post, whether approving it is a retry (it was approved already), and the edit
        trimmed; PostingError where it cannot be approved (decided otherwise, or an edit now too late)."""
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
        return waiting, retry, text

    def _wait_for_approver(self, approval_id: str, name: str, slot: str) -> None:
        """Wait (APPROVER_WAIT_S at most) while the slot is held and the post is still undecided:
        the holder is then another approval or rejection of it (a scheduler takes no slot that
        waits for approval), deciding, which takes milliseconds. An approved post's holder may be
        publishing for minutes, or have stopped mid-post: that is said at once, not waited for."""
        deadline = time.monotonic() + APPROVER_WAIT_S
        while time.monotonic() < deadline and self.ledger.held_s(name, slot):
            if self.approvals.get(approval_id).state != "pending":
                return
            time.sleep(APPROVER_POLL_S)

    def _unclaimed_approval(self, approval_id: str, name: str, slot: str, claim: ClaimResult) -> PostOutcome:
        """Why an approval cannot go ahead, read after the claim failed (and any wait): the post as it
        stands now, not as it was when the command started."""
        now = self.approvals.get(approval_id)
        if now.state not in ("pending", "approved"):  # a rejection (or expiry) won the race
            raise PostingError(f"post {approval_id} was already {now.state}")
        outcome = self._unclaimed(name, slot, claim.outcome, claim.state, by_hand=True)
        if claim.outcome == "busy" and now.state == "approved":
            # Approved, and its slot held: another approver is publishing it (to a slow platform), or
            # one stopped mid-post; the slot's claim cannot tell which. Still "busy" (exit 1): it is
            # not known to be out, and approving again is safe (never twice) and says when it is.
            outcome.message = (f"another `persona posts approve {approval_id}` is publishing post {approval_id} "
                               f"right now; `persona posts history {name}` shows how it went in a moment. "
                               f"Should that one have stopped instead: {outcome.message}")
        return outcome

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

    def _check_edit_new(self, waiting: Approval, text: str) -> None:
        """PostingError if an approver's edit says (nearly) what one of the persona's recent posts,
        another post waiting for approval or another open slot says: the near-repeat check a
        generated text gets (``_curate``). The post still waits."""
        name = waiting.persona
        # Read in the order a post moves (waiting, open, recent): one that moves on between two
        # reads is met in the next. (Held here, the choosing lock stops waiting -> open; a
        # publisher finishing moves open -> recent at any moment.)
        others = [(f"post {a.id} of {name}, waiting for approval", a.text)
                  for a in self.approvals.pending() if a.persona == name and a.id != waiting.id]
        others += [(f"the text of {name}'s slot {s}, being posted", t)
                   for s, t in self.ledger.open_texts(name).items() if s != waiting.slot]
        others += [(f"one of {name}'s recent posts", t) for t in self.ledger.recent_texts(name, self.settings.posting.recent_posts)]
        same = " ".join(text.split())
        for where, other in others:
            exact = same == " ".join(other.split())
            if exact or (words(text) and is_near_repeat(text, [other])):  # no words (emoji alone): only the same text
                raise PostingError(
                    f"the edited text is {'the same as' if exact else 'nearly the same as'} {where} ({other!r}); "
                    f"nothing was posted and post {waiting.id} still waits: edit it again "
                    f"(`persona posts approve {waiting.id} --text ...`), approve it as it was chosen "
                    f"(`persona posts approve {waiting.id}` without --text), or drop it (`persona posts reject {waiting.id}`)"
                )

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

    def _dry_run(self, persona: Persona, slot: str, specs: list[str], n: int, text: str | None = None) -> PostOutcome:
        """The candidates and their verdicts for these sinks, posting nothing; for a slot
        named, first what a real post would do there (nothing, if it was posted already).
        With a person's ``text`` (checked already), that text instead of candidates.

        A preview needs no credentials (only each sink's platform, for its limit): a
        sink that could not post yet is named in the message, not a reason to show nothing.
        """
        if slot and (known := self._dry_run_of_begun_slot(persona.name, slot)) is not None:
            return known
        try:
            problem = "" if self.sinks_for(persona, specs) else "a real post would fail: no sinks (schedule.sinks, or --sink)"
        except ConfigError as exc:
            problem = f"a real post would fail: {exc}"
        if text is not None:
            return PostOutcome(persona.name, slot, "dry_run", text=text, message=problem)
        curated = self.choose(persona, [platform_of(spec) for spec in specs], n)
        outcome = self._outcome(persona, slot, "dry_run" if curated.best else "no_candidate", curated)
        outcome.message = _joined(outcome.message, problem)
        return outcome

    def _dry_run_of_begun_slot(self, name: str, slot: str) -> PostOutcome | None:
        """What a real post would do with a slot already begun, or None for one it would generate for."""
        peeked = self.ledger.peek(name, slot)
        if peeked.outcome != "free":  # posted, closed, waiting for approval, or being posted now
            outcome = self._unclaimed(name, slot, peeked.outcome, peeked.state, by_hand=True)
            outcome.message += f"; to preview new candidates, leave out --slot: `persona post {name} --dry-run`"
            return outcome
        record = self.ledger.record(name, slot)
        if not record.get("text"):
            return None
        return PostOutcome(
            name, slot, "dry_run", text=record["text"], candidates=int(record.get("candidates", 0)),
            rejected=json.loads(record.get("rejected", "{}")),
            message=f"this slot's text was chosen before: a real post would finish posting it to "
                    f"{', '.join(json.loads(record.get('sinks') or '[]')) or 'its sinks'}, with no new candidates",
        )

    def _outcome(self, persona: Persona, slot: str, status: str, curated: Curated) -> PostOutcome:
        """The outcome of a curation; its message says why nothing passed, or what is wrong with the best."""
        best = curated.best
        if best is None:
            message = "no candidate passed the filters (" + ", ".join(
                f"{reason} {count}" for reason, count in sorted(curated.rejected.items())) + ")"
            if curated.rejected.get("cut_off"):
                message += (f"; cut_off: the model reached its token limit mid-text: raise sampling.max_new_tokens "
                            f"(now {persona.sampling.max_new_tokens}) in the persona's file")
        elif best.flaws:
            message = ("no candidate was free of flaws; the best one " + " and ".join(FLAW_WORDS[f] for f in best.flaws)
                       + " (more candidates, -n or schedule.candidates, make a clean one likelier)")
        else:
            message = ""
        return PostOutcome(
            persona.name, slot, status, text=best.text if best else "",
            candidates=len(curated.candidates) + curated.rejected.get("generation_failed", 0),
            rejected=dict(curated.rejected), passed=[c.text for c in curated.passed],
            # "trimmed": what was cut from a candidate the model was cut off in, back to its last finished sentence.
            verdicts=[{"text": c.text, "rejected": c.rejected or "", "flaws": c.flaws, "trimmed": c.trimmed}
                      for c in curated.candidates],
            message=message,
        )

    def _unclaimed(self, name: str, slot: str, outcome: str, state: str, *, by_hand: bool = False) -> PostOutcome:
        record = self.ledger.record(name, slot)
        messages = {
            "done": f"slot {slot} of {name} was already {state}; nothing to do" if state != "expired"
            else f"slot {slot} of {name} waited for an approval that expired unanswered; nothing to do",
            "busy": self._held(name, slot, record, by_hand=by_hand),
            "pending": f"slot {slot} of {name} is waiting for approval ({record.get('approval', '?')})",
        }
        return PostOutcome(
            name, slot, "done" if outcome == "done" else outcome, text=record.get("text", ""),
            approval_id=record.get("approval", ""), message=messages.get(outcome, outcome),
        )

    def _held(self, name: str, slot: str, record: dict[str, str], *, by_hand: bool) -> str:
        """Why a slot cannot be taken now: another poster holds it, perhaps one that was killed
        mid-post (it holds the slot until its claim runs out); when that is, and what to run then."""
        held_s = self.ledger.held_s(name, slot)
        if not by_hand:  # the scheduler: it looks again at every tick
            then = "the scheduler takes it at its first tick after that"
        elif record.get("approval") and record.get("state") in ("pending", "approved"):
            then = f"then run `persona posts approve {record['approval']}` again (it never posts twice)"
        else:
            then = f"then run `persona post {name} --slot {slot}` (it never posts twice)"
        runs_out = f"its claim runs out in {held_s} s (posting.lease_s)" if held_s else "its claim has just run out"
        # Waiting for approval, the slot is taken by nobody but an approval or rejection of its post.
        holder = (f"another `persona posts approve` or `persona posts reject` of post {record['approval']}"
                  if record.get("state") == "pending" and record.get("approval") else
                  "another poster (a scheduler, `persona post` or `persona posts approve`)")
        return f"slot {slot} of {name} is held by {holder}, at work or stopped mid-post; {runs_out}; {then}"


def _joined(*messages: str) -> str:
    return "; ".join(m for m in messages if m)
