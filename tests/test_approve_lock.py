"""`persona posts approve ID [--text NEW]` against the persona's other posts: an edit is checked as a
generated text is (recent posts, other posts waiting, open slots), under the persona's text-choice
hold, and the approval and its slot's record change in one step."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import redis

from adapters.posting.poster import Poster
from persona.approvals import ApprovalQueue
from persona.errors import PostingError
from persona.ledger import PostLedger
from persona.settings import Settings
from tests.conftest import read_jsonl

TEXTS = [
    "Patience is the slow river that carves the canyon of a life.",
    "Attend to the small things; the large ones are made of them.",
    "A quiet mind hears what a loud one only guesses at.",
]


def poster_for(settings: Settings, texts: list[str], **kwargs) -> Poster:
    return Poster(settings, redis.Redis.from_url(settings.redis_url.get_secret_value()),
                  lambda persona, n, seed: texts[:n], **kwargs)


@pytest.fixture
def careful(settings: Settings, write_persona, redis_client):
    """A persona whose posts wait for approval, posting to a file; returns that file."""
    write_persona("careful", base="unused", schedule={"sinks": ["file:careful.jsonl"], "approval": True, "candidates": 1})
    return settings.data_dir / "posts" / "careful.jsonl"


def waiting_post(settings: Settings, slot: str, text: str) -> str:
    """A post of careful's with ``text``, waiting for approval; its id."""
    outcome = poster_for(settings, [text]).post("careful", slot=slot)
    assert (outcome.status, outcome.text) == ("pending", text)
    return outcome.approval_id


def pending_ids(client: redis.Redis) -> list[str]:
    return [a.id for a in ApprovalQueue(client).pending()]


def test_an_edit_that_nearly_repeats_a_recent_post_is_refused_and_says_what_to_do(settings, careful, personas_dir):
    """`approve --text` was checked against nothing: an edit that said what the persona posted
    yesterday went out, where a generated text that close is rejected as a near repeat."""
    posted = waiting_post(settings, "2026-03-01T09:00:00Z", TEXTS[0])
    assert poster_for(settings, []).approve(posted).status == "posted"
    waiting = waiting_post(settings, "2026-03-02T09:00:00Z", TEXTS[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
        "PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_REDIS_URL": settings.redis_url.get_secret_value(),
        "PERSONA_PERSONAS_DIRS": json.dumps([str(personas_dir)]), "COLUMNS": "200"}
    near = "Patience is the slow river that carves the canyon of a whole life."
    refused = subprocess.run([sys.executable, "-m", "persona", "posts", "approve", waiting, "--text", near],
                             env=env, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    said = " ".join(refused.stderr.split())
    assert f"nearly the same as one of careful's recent posts ({TEXTS[0]!r})" in said, said
    assert f"post {waiting} still waits" in said and f"edit it again (`persona posts approve {waiting} --text" in said, said
    assert f"`persona posts approve {waiting}` without --text" in said, said
    assert [line["text"] for line in read_jsonl(careful)] == [TEXTS[0]]
    assert waiting in pending_ids(redis.Redis.from_url(env["PERSONA_REDIS_URL"]))

    fresh = poster_for(settings, []).approve(waiting, TEXTS[2])
    assert (fresh.status, fresh.text) == ("posted", TEXTS[2])


def test_an_edit_that_says_what_another_waiting_post_says_is_refused(settings, careful, redis_client):
    """Two waiting posts, the second edited into the first's words: approving both posted it twice."""
    first = waiting_post(settings, "2026-03-01T09:00:00Z", TEXTS[0])
    second = waiting_post(settings, "2026-03-02T09:00:00Z", TEXTS[1])
    poster = poster_for(settings, [])
    with pytest.raises(PostingError, match=f"the same as post {first} of careful, waiting for approval"):
        poster.approve(second, "  " + TEXTS[0].replace(" ", "  "))
    assert pending_ids(redis_client) == [first, second] and not careful.exists()
    assert poster.approve(first).status == "posted"
    # Edited back to its own words, a post is not refused as a repeat of itself.
    assert poster.approve(second, TEXTS[1] + " ").text == TEXTS[1]


def test_two_approvals_edited_to_the_same_words_at_one_moment_post_them_once(settings, careful, redis_client):
    """Each edit was judged (had it been) before either went out: both found the words new."""
    ids = [waiting_post(settings, f"2026-03-0{day}T09:00:00Z", text) for day, text in ((1, TEXTS[0]), (2, TEXTS[1]))]
    words = "One text, edited into two posts at once."
    start = threading.Barrier(2)
    results: list = [None, None]

    def approve(i: int) -> None:
        poster = poster_for(settings, [])
        start.wait()
        try:
            results[i] = poster.approve(ids[i], words)
        except PostingError as exc:
            results[i] = exc

    threads = [threading.Thread(target=approve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [line["text"] for line in read_jsonl(careful)] == [words]
    [refused] = [r for r in results if isinstance(r, PostingError)]
    assert "the same as" in str(refused) and "still waits" in str(refused)
    assert len(pending_ids(redis_client)) == 1


def test_an_approval_waits_while_another_poster_chooses_the_personas_text(settings, careful, redis_client):
    """`posts approve` took no part in the persona's text-choice hold: it made its edit visible to the
    others while a scheduled post was checking its own text against them."""
    waiting = waiting_post(settings, "2026-03-01T09:00:00Z", TEXTS[0])
    done = threading.Event()
    approving = threading.Thread(target=lambda: (poster_for(settings, []).approve(waiting, TEXTS[1]), done.set()))
    with PostLedger(redis_client).choosing("careful"):
        approving.start()
        time.sleep(0.3)
        assert not done.is_set() and not careful.exists()
        assert pending_ids(redis_client) == [waiting]  # nothing decided while the other chooses
    approving.join(10)
    assert done.is_set() and [line["text"] for line in read_jsonl(careful)] == [TEXTS[1]]


def test_an_approval_that_lost_its_slot_is_left_waiting_not_half_approved(settings, careful, redis_client):
    """The approval was marked approved, then the slot's record was written: an approver that
    failed between the two (its claim ran out, a crash) left a post approved that no list showed
    (not waiting, not unfinished) and whose edit no later post was checked against."""
    waiting = waiting_post(settings, "2026-03-01T09:00:00Z", TEXTS[0])
    settings.posting.lease_s = 0.2
    with PostLedger(redis_client).choosing("careful"):
        failed: list[BaseException] = []

        def approve() -> None:
            try:
                poster_for(settings, []).approve(waiting, TEXTS[1])
            except PostingError as exc:
                failed.append(exc)

        late = threading.Thread(target=approve)
        late.start()
        time.sleep(0.5)  # its claim on the slot runs out while it waits for the hold
    late.join(10)
    [lost] = failed
    assert "nothing was posted" in str(lost) and f"post {waiting} still waits" in str(lost), lost
    assert pending_ids(redis_client) == [waiting] and not careful.exists()
    record = PostLedger(redis_client).record("careful", "2026-03-01T09:00:00Z")
    assert (record["state"], record["text"]) == ("pending", TEXTS[0])
    settings.posting.lease_s = 600
    again = poster_for(settings, []).approve(waiting, TEXTS[1])
    assert (again.status, again.text) == ("posted", TEXTS[1])


def _approve_in_background(settings: Settings, approval_id: str) -> tuple[threading.Thread, list]:
    """`posts approve ID` run in a thread; its outcome (or PostingError) lands in the list."""
    said: list = []

    def approve() -> None:
        try:
            said.append(poster_for(settings, []).approve(approval_id))
        except PostingError as exc:
            said.append(exc)

    thread = threading.Thread(target=approve)
    thread.start()
    return thread, said


def test_a_second_approval_while_the_first_publishes_says_so(settings, careful):
    """The loser of two approvals was told the slot was held by another poster for about 10 minutes
    (exit 1) while the first approval's post went out seconds later."""
    waiting = waiting_post(settings, "2026-03-01T09:00:00Z", TEXTS[0])
    careful.parent.mkdir(parents=True, exist_ok=True)
    with open(careful, "a") as slow_platform:
        fcntl.flock(slow_platform, fcntl.LOCK_EX)  # the file sink waits for it, as a slow platform keeps one waiting
        first, first_said = _approve_in_background(settings, waiting)
        time.sleep(0.3)
        second = poster_for(settings, []).approve(waiting)
        fcntl.flock(slow_platform, fcntl.LOCK_UN)
    first.join(10)
    assert first_said[0].status == "posted" and second.status == "busy"  # not known to be out yet: exit 1
    assert second.message.startswith(f"another `persona posts approve {waiting}` is publishing post {waiting} right now; "
                                     "`persona posts history careful` shows how it went in a moment. Should that one "
                                     "have stopped instead: slot 2026-03-01T09:00:00Z of careful is held"), second.message
    assert [line["text"] for line in read_jsonl(careful)] == [TEXTS[0]]


def test_an_approval_that_loses_to_a_rejection_says_it_was_rejected(settings, careful, redis_client):
    """Once in 40 approve/reject races, the approval found the rejection's hold just let go and told
    the operator to `persona post careful --slot ...` into the slot just rejected."""
    slot = "2026-03-01T09:00:00Z"
    waiting = waiting_post(settings, slot, TEXTS[0])
    rejecter = PostLedger(redis_client)
    assert rejecter.claim("careful", slot, approving=True).claimed  # `posts reject` holds the slot, deciding
    approval, said = _approve_in_background(settings, waiting)
    time.sleep(0.3)
    ApprovalQueue(redis_client).decide(waiting, "rejected")
    rejecter.finish("careful", slot, "rejected")
    rejecter.release("careful", slot)
    approval.join(10)
    [refused] = said
    assert isinstance(refused, PostingError) and str(refused) == f"post {waiting} was already rejected"
    assert not careful.exists()
