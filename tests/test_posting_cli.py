"""`persona post`, `persona posts ...` as a user runs them: real processes, a real worker, real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
from pydantic import SecretStr

from adapters.posting.poster import Poster
from persona import constants as keys
from persona import heartbeat
from persona.contract import Priority
from persona.curation import Draft, is_finished
from persona.errors import PostingError
from persona.ledger import PostLedger, SinkEntry
from persona.settings import LONGEST_GRACE_S, Settings
from tests.conftest import free_port, read_jsonl

TEXTS = [
    "Patience is the slow river that carves the canyon of a life.",
    "Attend to the small things; the large ones are made of them.",
]


def persona(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "persona", *args], check=False, env=env, capture_output=True, text=True, timeout=timeout
    )


# The tests name slots of fixed dates by hand (`--slot 2026-03-20T09:00Z`); `persona post`
# takes only a slot the scheduler would still post, one within posting.grace_s of its time.
# Here every past slot is (the longest grace the settings take); a test of the real window
# leaves this out.
EVERY_PAST_SLOT_GRACE_S = str(int(LONGEST_GRACE_S))


def recent_slot(days_ago: int) -> str:
    """The 09:00 UTC slot (a daily schedule's) of ``days_ago`` days back: one within that grace."""
    return (datetime.now(UTC) - timedelta(days=days_ago)).strftime("%Y-%m-%dT09:00:00Z")


@pytest.fixture
def env(settings: Settings, personas_dir: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return clean | {
        "PERSONA_DATA_DIR": str(settings.data_dir),
        "PERSONA_REDIS_URL": settings.redis_url.get_secret_value(),
        "PERSONA_PERSONAS_DIRS": json.dumps([str(personas_dir)]),
        "PERSONA_POSTING__GRACE_S": EVERY_PAST_SLOT_GRACE_S,
        "COLUMNS": "200",
    }


@pytest.fixture
def tiny_poster(write_persona, tiny_llama_dir, running_worker) -> str:
    """A persona on the tiny random Llama, with a worker serving it: it never finishes a
    text (a random model all but never picks its end token), so each stops at 12 tokens."""
    write_persona("tinypost", base=str(tiny_llama_dir), filters={"min_chars": 1},
                  sampling={"max_new_tokens": 12}, schedule={"sinks": ["file:tinypost.jsonl"], "candidates": 3})
    running_worker()
    return "tinypost"


def test_post_json_end_to_end(write_persona, env, settings, redis_client):
    from tests.fakes.scripted_worker import scripted_worker

    write_persona("scripted", base="unused", schedule={"sinks": ["file:scripted.jsonl"], "candidates": 3})
    slot = recent_slot(1)
    drafts = iter(TEXTS + ["wait wait wait wait", "Small steps."])
    with scripted_worker(settings, lambda request: next(drafts)) as seen:
        result = persona("post", "scripted", "--json", "-n", "4", "--slot", slot, env=env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ok"] is True and "error" not in out
    assert out["status"] == "posted" and out["text"] == TEXTS[0]
    assert out["candidates"] == 4 and out["rejected"] == {"degenerate": 1} and len(out["passed"]) == 3
    [line] = read_jsonl(settings.data_dir / "posts" / "scripted.jsonl")
    assert line["text"] == out["text"] and out["sinks"]["file:scripted.jsonl"]["id"] == line["id"]
    # The candidates went through the batch stream, each with its own seed.
    assert [r.priority for r in seen] == [Priority.batch] * 4
    assert len({r.sampling.seed for r in seen}) == 4

    again = persona("post", "scripted", "--slot", slot, env=env)
    assert again.returncode == 0 and "already posted" in again.stdout
    assert len(read_jsonl(settings.data_dir / "posts" / "scripted.jsonl")) == 1

    history = persona("posts", "history", "--json", env=env)
    assert [h["text"] for h in json.loads(history.stdout)] == [out["text"]]


def test_a_candidate_cut_off_at_the_token_limit_is_rejected(tiny_poster, env, settings, redis_client):
    """A candidate the worker stopped at max_new_tokens mid-sentence could win and go out
    half written: its reply's finish_reason was never looked at."""
    result = persona("post", tiny_poster, "--dry-run", "--json", "-n", "2", env=env)
    out = json.loads(result.stdout)
    assert out["candidates"] == 2 and all(v["text"] for v in out["verdicts"]), result.stdout + result.stderr
    # Random gibberish all but never holds a finished sentence worth keeping; one that
    # did is trimmed back to it. Nothing passes as the model left it.
    for verdict in out["verdicts"]:
        assert verdict["rejected"] == "cut_off" or (verdict["trimmed"] and is_finished(verdict["text"])), verdict
    if out["rejected"] == {"cut_off": 2}:
        assert result.returncode == 1 and out["status"] == "no_candidate" and out["text"] == ""
        assert "raise sampling.max_new_tokens (now 12)" in out["message"]
        assert out["ok"] is False and out["error"] == {"kind": "PostingError", "message": out["message"]}
    # A dry run posts and records nothing.
    assert redis_client.hget("persona:stats", "completed") == b"2"
    assert not (settings.data_dir / "posts").exists()
    assert PostLedger(redis_client).history() == []


def test_a_cut_off_candidate_posts_its_finished_sentences(settings, write_persona, redis_client):
    """With the bundled persona's 64 tokens, a candidate cut off mid-second-sentence was
    thrown away whole, though its first sentence was a fine post."""
    write_persona("cut", base="unused", schedule={"sinks": ["file:cut.jsonl"], "candidates": 2})
    drafts = [Draft(f"{TEXTS[0]} And the river, when", "length"), Draft("Attend to the small", "length")]
    outcome = Poster(settings, redis_client, lambda p, n, seed: drafts[:n]).post("cut", dry_run=True)
    out = outcome.to_dict()
    assert (out["status"], out["text"], out["rejected"]) == ("dry_run", TEXTS[0], {"cut_off": 1})
    assert [(v["text"], v["rejected"], v["trimmed"]) for v in out["verdicts"]] == [
        (TEXTS[0], "", "And the river, when"), ("Attend to the small", "cut_off", "")]


def pending_post(settings: Settings, write_persona, slot: str) -> str:
    write_persona("careful", base="unused", schedule={"sinks": ["file:careful.jsonl"], "approval": True, "candidates": 2})
    poster = Poster(settings, redis.Redis.from_url(settings.redis_url.get_secret_value()), lambda p, n, seed: TEXTS[:n])
    outcome = poster.post("careful", slot=slot)
    assert outcome.status == "pending" and outcome.text == TEXTS[0]
    return outcome.approval_id


def test_approval_flow(settings, write_persona, env, redis_client):
    first = pending_post(settings, write_persona, "2026-03-01T09:00:00Z")
    second = Poster(settings, redis_client, lambda p, n, seed: TEXTS[::-1][:n]).post("careful", slot="2026-03-02T09:00:00Z").approval_id
    archive = settings.data_dir / "posts" / "careful.jsonl"
    assert not archive.exists()

    listed = json.loads(persona("posts", "pending", "--json", env=env).stdout)
    # The second's runner-up is the first's text, waiting too: not offered twice.
    assert [(p["id"], p["text"], p["alternatives"]) for p in listed] == [(first, TEXTS[0], [TEXTS[1]]), (second, TEXTS[1], [])]
    table = persona("posts", "pending", env=env)
    assert first in table.stdout and "careful" in table.stdout

    approved = persona("posts", "approve", first, "--text", "Patience, edited by a person.", env=env)
    assert approved.returncode == 0, approved.stderr
    assert [line["text"] for line in read_jsonl(archive)] == ["Patience, edited by a person."]
    rejected = persona("posts", "reject", second, env=env)
    assert rejected.returncode == 0 and f"rejected {second}" in rejected.stdout
    assert json.loads(persona("posts", "pending", "--json", env=env).stdout) == []

    twice = persona("posts", "approve", second, env=env)
    assert twice.returncode == 1 and "already rejected" in twice.stderr
    assert len(read_jsonl(archive)) == 1
    # The slot of a pending post is not regenerated; a rejected slot stays closed.
    assert persona("post", "careful", "--slot", "2026-03-02T09:00:00Z", env=env).stdout.count("already rejected") == 1

    history = persona("posts", "history", env=env)
    assert "Patience, edited by a person." in history.stdout and "file:careful.jsonl" in history.stdout
    # A misspelt name said "nothing posted yet", as if that persona had never posted.
    misspelt = persona("posts", "history", "--persona", "carefull", env=env)
    assert misspelt.returncode == 1 and "unknown persona 'carefull'" in misspelt.stderr


def test_posts_reject_json_prints_the_rejected_post_and_a_refusal_as_the_json_failure(settings, write_persona, env,
                                                                                         redis_client):
    """`posts approve` had --json and `posts reject` did not: a script read "rejected ID (...)"."""
    waiting = pending_post(settings, write_persona, "2026-03-01T09:00:00Z")
    rejected = persona("posts", "reject", waiting, "--json", env=env)
    assert rejected.returncode == 0, rejected.stderr
    shown = json.loads(rejected.stdout)
    assert (shown["ok"], shown["id"], shown["persona"], shown["state"]) == (True, waiting, "careful", "rejected")
    assert shown["text"] == TEXTS[0] and shown["slot"] == "2026-03-01T09:00:00Z"
    again = persona("posts", "reject", waiting, "--json", env=env)
    assert (again.returncode, again.stderr) == (1, "")
    assert json.loads(again.stdout) == {"ok": False, "error": {"kind": "PostingError",
                                                               "message": f"post {waiting} was already rejected"}}


def test_posts_pending_lists_one_personas_posts_with_persona(settings, write_persona, env, redis_client):
    """`posts history` and `posts uncertain` took --persona and `posts pending` did not."""
    careful = pending_post(settings, write_persona, "2026-03-01T09:00:00Z")
    write_persona("wary", base="unused", schedule={"sinks": ["file:wary.jsonl"], "approval": True, "candidates": 1})
    wary = Poster(settings, redis_client, lambda p, n, seed: TEXTS[1:][:n]).post("wary", slot="2026-03-01T09:00:00Z")
    assert [p["id"] for p in json.loads(persona("posts", "pending", "--json", env=env).stdout)] == [careful, wary.approval_id]
    only = json.loads(persona("posts", "pending", "--persona", "wary", "--json", env=env).stdout)
    assert [(p["id"], p["persona"]) for p in only] == [(wary.approval_id, "wary")]
    listed = persona("posts", "pending", "--persona", "careful", env=env)
    assert careful in listed.stdout and wary.approval_id not in listed.stdout
    none_yet = persona("posts", "pending", "--persona", "sage", env=env)  # a known persona with nothing waiting
    assert (none_yet.returncode, none_yet.stdout) == (0, "no posts by sage waiting for approval\n")


def test_posts_pending_says_how_long_each_has_waited_and_when_it_lapses(settings, write_persona, env, redis_client):
    """A post left waiting 30 days lapses, never posted; the listing said neither its age nor
    when it would lapse (a post hours from lapsing read like a new one), and gave its slot only
    as a UTC instant, while --slot and the schedule read the persona's own zone."""
    write_persona("careful", base="unused", schedule={
        "sinks": ["file:careful.jsonl"], "approval": True, "candidates": 1, "timezone": "Europe/Berlin"})
    waiting = Poster(settings, redis_client, lambda p, n, seed: TEXTS[:n]).post("careful", slot="2026-03-01T08:00:00Z")
    now = heartbeat.redis_now(redis_client)
    redis_client.hset(keys.approval_key(waiting.approval_id), "created", now - 29.9 * 86400)  # as if made 29.9 days ago
    redis_client.pexpire(keys.approval_key(waiting.approval_id), int(0.1 * 86400 * 1000))

    [listed] = json.loads(persona("posts", "pending", "--json", env=env).stdout)
    assert listed["created"] == pytest.approx(now - 29.9 * 86400)
    assert listed["waiting_s"] == pytest.approx(29.9 * 86400, abs=30)
    assert listed["expires"] == pytest.approx(now + 0.1 * 86400, abs=30)
    table = persona("posts", "pending", env=env | {"COLUMNS": "400"})
    header, row = table.stdout.splitlines()
    assert header.split() == ["id", "persona", "slot", "waiting", "lapses", "(UTC)", "sinks", "text"]
    lapses = datetime.fromtimestamp(now + 0.1 * 86400, UTC)
    assert "2026-03-01T08:00:00Z (09:00 Europe/Berlin)" in row and "29 d 21 h" in row, row
    assert f"{lapses:%Y-%m-%d} " in row and "(in 2 h 2" in row, row


def test_a_post_waiting_for_approval_is_not_proposed_again(settings, write_persona, redis_client):
    """Two days' posts waiting for one approver were the same text: approving both posted it twice."""
    first = pending_post(settings, write_persona, "2026-03-10T09:00:00Z")
    second = Poster(settings, redis_client, lambda p, n, seed: TEXTS[:n]).post("careful", slot="2026-03-11T09:00:00Z")
    assert (second.status, second.text, second.rejected) == ("pending", TEXTS[1], {"near_repeat": 1})
    poster = Poster(settings, redis_client, lambda p, n, seed: TEXTS[:n])
    assert poster.approve(first).status == poster.approve(second.approval_id).status == "posted"
    assert [line["text"] for line in read_jsonl(settings.data_dir / "posts" / "careful.jsonl")] == TEXTS


def test_pending_slot_is_reported_not_reposted(settings, write_persona, env, redis_client):
    approval_id = pending_post(settings, write_persona, "2026-03-03T09:00:00Z")
    result = persona("post", "careful", "--slot", "2026-03-03T09:00:00Z", "--json", env=env)
    out = json.loads(result.stdout)
    assert out["status"] == "pending" and out["approval_id"] == approval_id


def test_a_slot_whose_approval_expired_is_closed_not_left_pending(settings, write_persona, redis_client):
    """Approvals expire unanswered (after 30 days); their slot used to say "waiting for
    approval" forever, naming an id that `persona posts approve` no longer knew."""
    approval_id = pending_post(settings, write_persona, "2026-03-04T09:00:00Z")
    redis_client.pexpire(f"persona:approval:{approval_id}", 1)
    time.sleep(0.05)
    poster = Poster(settings, redis_client, lambda p, n, seed: TEXTS[:n])
    again = poster.post("careful", slot="2026-03-04T09:00:00Z")
    assert again.status == "done" and "approval that expired" in again.message
    assert PostLedger(redis_client).record("careful", "2026-03-04T09:00:00Z")["state"] == "expired"
    assert not (settings.data_dir / "posts" / "careful.jsonl").exists()  # never posted unapproved
    with pytest.raises(PostingError, match="a post left waiting 30 days expires"):  # not just "no post waiting"
        poster.approve(approval_id)


def test_a_post_by_hand_that_got_no_answer_says_how_to_try_again(settings, write_persona, env):
    write_persona("masto", base="unused", schedule={"sinks": ["mastodon"], "candidates": 1})
    down = f"http://127.0.0.1:{free_port()}"  # the server is down
    env = env | {"PERSONA_POSTING__MASTODON_API_URL": down, "PERSONA_POSTING__MASTODON_ACCESS_TOKEN": "t"}
    settings.posting = settings.posting.model_copy(update={"mastodon_api_url": down, "mastodon_access_token": SecretStr("t")})
    slot = "2026-03-06T09:00:00Z"
    first = Poster(settings, redis.Redis.from_url(settings.redis_url.get_secret_value()), lambda p, n, seed: TEXTS[:n]).post("masto", slot=slot)
    assert first.status == "failed" and first.retry_later
    again = persona("post", "masto", "--slot", slot, env=env)  # its text is chosen: no worker needed
    assert again.returncode == 1 and "mastodon: unreachable, nothing sent" in again.stderr and again.stdout == ""
    assert f"to try again later: `persona post masto --slot {slot}` (it never posts twice)" in again.stderr
    assert "nothing went out" not in again.stderr  # said of the slot, it could be wrong where an answer was lost


def test_a_slot_written_another_way_is_the_same_slot(settings, write_persona, env):
    write_persona("punctual", base="unused", schedule={"sinks": ["file:punctual.jsonl"], "candidates": 1})
    Poster(settings, redis.Redis.from_url(settings.redis_url.get_secret_value()), lambda p, n, seed: TEXTS[:n]).post(
        "punctual", slot="2026-03-05T09:00:00Z")
    quick = env | {"PERSONA_POSTING__WAIT_S": "2"}  # no worker runs: a new slot would fail fast
    for same in ("2026-03-05T09:00:00+00:00", "2026-03-05T10:00+01:00", "2026-03-05 04:00:00-05:00"):
        result = persona("post", "punctual", "--slot", same, env=quick)
        assert result.returncode == 0 and "already posted" in result.stdout, (same, result.stdout, result.stderr)
    # Without a zone, a time is read in the persona's (UTC here); a date alone is the day's one slot.
    for same in ("2026-03-05T09:00:00", "2026-03-05T09:00", "2026-03-05"):
        result = persona("post", "punctual", "--slot", same, env=quick)
        assert result.returncode == 0 and "already posted" in result.stdout, (same, result.stdout, result.stderr)
    assert len(read_jsonl(settings.data_dir / "posts" / "punctual.jsonl")) == 1


def test_a_slot_time_is_read_in_the_personas_time_zone_and_a_day_of_two_slots_needs_the_time(settings, write_persona, env):
    """`--slot 2026-07-27T18:00` was refused ("no time zone"), and a date became a slot of
    its own: a persona posting at 9 and 18 had no way to name its evening slot."""
    from tests.fakes.scripted_worker import scripted_worker

    write_persona("twice", base="unused", schedule={
        "cron": "0 9,18 * * *", "timezone": "Europe/London", "sinks": ["file:twice.jsonl"], "candidates": 1})
    with scripted_worker(settings, lambda request: TEXTS[0]):
        evening = persona("post", "twice", "--slot", "2026-07-27T18:00", "--json", env=env)
    assert evening.returncode == 0, evening.stderr
    assert json.loads(evening.stdout)["slot"] == "2026-07-27T17:00:00Z"  # 18:00 in London's summer time
    again = persona("post", "twice", "--slot", "2026-07-27T17:00Z", env=env)
    assert again.returncode == 0 and "already posted" in again.stdout

    day = persona("post", "twice", "--slot", "2026-07-27", env=env)
    assert day.returncode == 1 and "2 slots that day (2026-07-27T09:00, 2026-07-27T18:00)" in day.stderr, day.stderr
    for wrong in ("tomorrow", "18:00"):
        refused = persona("post", "twice", "--slot", wrong, env=env)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "2026-11-27T18:00 (a time in the persona's schedule.timezone)" in refused.stderr, refused.stderr
    assert len(read_jsonl(settings.data_dir / "posts" / "twice.jsonl")) == 1
    helped = persona("post", "--help", env=env | {"COLUMNS": "400"})
    assert "2026-11-27T18:00 (in the persona's schedule.timezone)" in helped.stdout, helped.stdout


def test_a_day_posted_by_hand_is_that_days_scheduled_slot(settings, write_persona, redis_client, env):
    """`persona post daily --slot 2026-03-12` filled a slot named "2026-03-12": the
    scheduler's 09:00 slot that day was still due, and the persona posted twice."""
    from adapters.scheduler import Scheduler
    from tests.fakes.scripted_worker import scripted_worker

    write_persona("daily", base="unused", adapters=["cli", "scheduler"], schedule={
        "enabled": True, "cron": "0 9 * * *", "timezone": "Europe/London", "sinks": ["file:daily.jsonl"], "candidates": 1})
    poster = Poster(settings, redis_client, lambda p, n, seed: TEXTS[:n])
    scheduler = Scheduler(poster, redis_client)
    scheduler.tick(datetime(2026, 3, 12, 8, 0, tzinfo=UTC))  # starts its clock
    with scripted_worker(settings, lambda request: TEXTS[1]):
        by_hand = persona("post", "daily", "--slot", "2026-03-12", env=env)
    assert by_hand.returncode == 0 and "posted daily 2026-03-12T09:00:00Z" in by_hand.stdout, by_hand.stdout + by_hand.stderr
    [outcome] = scheduler.tick(datetime(2026, 3, 12, 9, 0, 30, tzinfo=UTC))
    assert outcome.status == "done" and "already posted" in outcome.message
    assert len(read_jsonl(settings.data_dir / "posts" / "daily.jsonl")) == 1


def test_clear_errors(write_persona, env):
    write_persona("nosinks", base="unused")
    no_sinks = persona("post", "nosinks", env=env)
    assert no_sinks.returncode == 1 and "--sink" in no_sinks.stderr and "Traceback" not in no_sinks.stderr
    unknown = persona("posts", "approve", "deadbeef", env=env)
    assert unknown.returncode == 1 and "persona posts pending" in unknown.stderr
    bad_sink = persona("post", "nosinks", "--sink", "myspace", env=env)
    assert bad_sink.returncode == 1 and "unknown sink" in bad_sink.stderr
    missing = persona("post", "nosinks", "--sink", "x", env=env)
    assert missing.returncode == 1 and "PERSONA_POSTING__X_BEARER_TOKEN" in missing.stderr


def test_a_persona_filter_that_names_no_persona_is_refused_with_the_name_meant(settings, write_persona, env, personas_dir):
    """`posts history --persona sgae --json` printed [] (exit 0) where plain mode said "unknown
    persona", and `posts uncertain --persona sgae` said "no post is uncertain" in both modes:
    a typo read as a persona with nothing to show."""
    write_persona("sage", base="unused", schedule={"sinks": ["file:sage.jsonl"], "candidates": 1})
    for listing in ("history", "uncertain", "pending"):
        plain = persona("posts", listing, "--persona", "sgae", env=env)
        assert (plain.returncode, plain.stdout) == (1, ""), plain.stdout + plain.stderr
        assert "unknown persona 'sgae'" in plain.stderr and "Did you mean 'sage'?" in plain.stderr, plain.stderr
        as_json = persona("posts", listing, "--persona", "sgae", "--json", env=env)
        refused = json.loads(as_json.stdout)
        assert (as_json.returncode, refused["ok"], refused["error"]["kind"]) == (1, False, "UnknownPersona"), refused
        assert "Did you mean 'sage'?" in refused["error"]["message"]
        assert persona("posts", listing, "--persona", "sage", "--json", env=env).stdout.strip() == "[]"  # known, none yet
    # A persona whose file is gone since is known by what it posted: still listed, not refused.
    Poster(settings, redis.Redis.from_url(settings.redis_url.get_secret_value()),
           lambda p, n, seed: TEXTS[:n]).post("sage", slot="2026-03-05T09:00:00Z")
    (personas_dir / "sage.toml").unlink()
    [listed] = json.loads(persona("posts", "history", "--persona", "sage", "--json", env=env).stdout)
    assert listed["text"] == TEXTS[0]


def test_up_starts_the_scheduler(settings):
    from persona.supervisor import services_for_up

    assert "scheduler" in [s.name for s in services_for_up(settings)]
    assert ["scheduler"] in [s.args for s in services_for_up(settings)]


def test_posts_are_shown_exactly_as_they_will_go_out(settings, write_persona, env, redis_client):
    """A text with "[brackets]" or ":100:" was read as rich markup and emoji codes: the
    approver saw a different post from the one approving it sent (or a crash, for "[/]")."""
    text = "Wear [red]courage[/red] today; 100:100: and the rest [/] is patience."
    write_persona("exact", base="unused", schedule={"sinks": ["file:exact.jsonl"], "approval": True, "candidates": 1})
    waiting = Poster(settings, redis_client, lambda p, n, seed: [text]).post("exact", slot="2026-03-07T09:00:00Z")
    listed = persona("posts", "pending", env=env)
    assert listed.returncode == 0 and text in listed.stdout, listed.stdout + listed.stderr
    approved = persona("posts", "approve", waiting.approval_id, env=env)
    assert approved.returncode == 0 and text in approved.stdout, approved.stdout + approved.stderr
    history = persona("posts", "history", env=env | {"COLUMNS": "400"})
    assert history.returncode == 0 and text in history.stdout, history.stdout + history.stderr
    assert (settings.data_dir / "posts" / "exact.jsonl").as_uri() in history.stdout
    narrow = persona("posts", "history", env=env | {"COLUMNS": "100"})
    assert narrow.returncode == 0 and "…" not in narrow.stdout  # long cells fold onto more lines, never cut short


def test_scheduler_says_at_start_why_an_enabled_persona_will_not_post(write_persona, env):
    """`enabled = true` without "scheduler" in adapters (the default adapters lack it) was
    passed over, and the scheduler said "no persona has schedule.enabled = true"."""
    write_persona("eager", base="unused", schedule={"enabled": True, "sinks": ["file:eager.jsonl"]})
    started = subprocess.Popen([sys.executable, "-m", "persona", "scheduler"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stop = threading.Timer(60, started.terminate)  # a scheduler that never says it would hang the test
    stop.start()
    try:
        said = ""
        while "waits for one" not in said and (line := started.stdout.readline()):
            said += line
    finally:
        stop.cancel()
        started.terminate()
        started.wait(30)
    assert 'eager: schedule.enabled is true, but adapters does not list "scheduler"' in said, said
    assert "no persona has schedule.enabled = true" not in said


def test_the_scheduler_says_an_invalid_persona_file_once_and_again_when_it_changes(personas_dir, env):
    """Every tick looked at the persona files and logged each invalid one's problem again:
    under `persona up` the same block filled the log every 30 s, forever."""
    broken = personas_dir / "broken.toml"
    broken.write_text('[sampling]\ntop_p = 3\n[model]\nbsae = "gpt2"\n')
    started = subprocess.Popen([sys.executable, "-m", "persona", "scheduler"], env=env | {"PERSONA_POSTING__TICK_S": "0.05"},
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(started.stdout), daemon=True)
    reader.start()

    def said_once_then_ticked(problem: str) -> None:
        deadline = time.monotonic() + 60
        while not any(problem in line for line in lines) and time.monotonic() < deadline and started.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)  # some ten ticks

    try:
        said_once_then_ticked("sampling.top_p")
        broken.write_text('[sampling]\ntop_p = 4\n')
        said_once_then_ticked("(got 4)")
    finally:
        started.terminate()
        started.wait(30)
        reader.join(10)
    said = "".join(lines)
    assert said.count(f"skipping invalid persona file: {broken}: 2 problem(s)") == 1, said
    assert said.count("model.bsae: unknown field") == 1 and said.count("top_p: Input should be less than or equal to 1 (got 3)") == 1
    assert said.count(f"skipping invalid persona file: {broken}: 1 problem(s)") == 1, said  # changed: said again, once


def test_a_candidate_that_failed_is_said_in_words(write_persona, tiny_llama_dir, running_worker, env):
    """A persona whose checkpoint cannot load: each candidate was logged with the reply's repr,
    "failed: kind=<ErrorKind.model: 'model'> message='cannot load…'"."""
    write_persona("unloadable", base=str(tiny_llama_dir), model={"checkpoint": "v404"},
                  schedule={"sinks": ["file:unloadable.jsonl"]})
    running_worker()
    tried = persona("post", "unloadable", "--dry-run", "-n", "2", env=env)
    assert tried.returncode == 1
    failed = [line for line in tried.stderr.splitlines() if " failed: " in line]
    assert len(failed) == 2, tried.stderr
    assert all("unloadable failed: " in line and "ErrorKind" not in line and "kind=" not in line for line in failed), failed


def test_a_slot_that_is_not_one_of_the_schedules_or_is_yet_to_come_is_refused(settings, write_persona, env, redis_client):
    """`persona post london --text … --slot 2030-01-01` posted now and marked the 2030 slot done, so
    the scheduler would skip it; a time off the schedule's cron was taken as a slot too."""
    write_persona("london", base="unused", schedule={"cron": "30 18 * * *", "timezone": "Europe/London",
                                                    "sinks": ["file:london.jsonl"]})
    ahead = persona("post", "london", "--text", "Patience.", "--slot", "2030-01-01", env=env)
    assert ahead.returncode == 1, ahead.stdout
    said = " ".join(ahead.stderr.split())
    assert "slot '2030-01-01': 2030-01-01T18:30 has not come yet" in said and "the scheduler posts it when it comes" in said, said
    off = persona("post", "london", "--text", "Patience.", "--slot", "2026-07-27T18:00", env=env)
    assert off.returncode == 1, off.stdout
    said = " ".join(off.stderr.split())
    assert ("slot '2026-07-27T18:00': 2026-07-27T18:00 is not one of the schedule's slots ('30 18 * * *', "
            "Europe/London); the nearest: 2026-07-26T18:30, 2026-07-27T18:30") in said, said
    assert not (settings.data_dir / "posts" / "london.jsonl").exists()
    assert not redis_client.keys("*london*2030*") and not redis_client.keys("*london*2026-07-27*")
    on_time = persona("post", "london", "--text", "Patience.", "--slot", "2026-07-27T18:30", env=env)
    assert on_time.returncode == 0 and "2026-07-27T17:30:00Z" in on_time.stdout, on_time.stderr


def where_it_is_noon() -> str:
    """A time zone where it is about noon now (Etc/GMT-3 is UTC+3), so its 23:00 is later today."""
    hours_ahead = (12 - datetime.now(UTC).hour + 12) % 24 - 12
    return f"Etc/GMT{-hours_ahead:+d}"


def test_a_slot_named_by_hand_is_one_the_scheduler_would_still_post(settings, write_persona, env, redis_client):
    """`--slot 1900-01-01` posted now and marked a 1900 slot done, and a slot later today was
    posted before its time and marked done, so the scheduler skipped it: a slot named by hand
    must have come, and be one the scheduler still catches up on (schedule.missed, posting.grace_s)."""
    zone = where_it_is_noon()
    today = datetime.now(ZoneInfo(zone)).date()
    yesterday, before = today - timedelta(days=1), today - timedelta(days=2)
    env = {k: v for k, v in env.items() if k != "PERSONA_POSTING__GRACE_S"}  # the real window: 15 minutes
    write_persona("noon", base="unused", schedule={"cron": "0 23 * * *", "timezone": zone, "sinks": ["file:noon.jsonl"]})

    later_today = persona("post", "noon", "--text", "Patience.", "--slot", f"{today}T23:00", env=env)
    said = " ".join(later_today.stderr.split())
    assert later_today.returncode == 1, later_today.stdout
    assert f"slot '{today}T23:00': {today}T23:00 has not come yet" in said, said
    assert f"the scheduler posts it when it comes; no slot can be named now (the next: {today}T23:00)" in said, said
    assert "a post of your own now needs no --slot" in said, said
    long_ago = persona("post", "noon", "--text", "Patience.", "--slot", "1900-01-01", env=env)
    said = " ".join(long_ago.stderr.split())
    assert long_ago.returncode == 1, long_ago.stdout
    assert ("slot '1900-01-01': 1900-01-01T23:00 is past the scheduler's catch-up (schedule.missed = 'skip': a slot "
            "more than posting.grace_s (900 s) late is skipped)") in said, said
    assert not (settings.data_dir / "posts" / "noon.jsonl").exists() and not redis_client.keys("*noon*")

    # A slot begun already is finished whatever its age: here it waits for approval.
    Poster(settings, redis_client, lambda p, n, seed: TEXTS[:n]).post("noon", slot=f"{before}T23:00", approval=True)
    waiting = persona("post", "noon", "--slot", f"{before}T23:00", env=env)
    assert waiting.returncode == 0 and "is waiting for approval" in waiting.stdout, waiting.stdout + waiting.stderr

    # With missed = "latest" the scheduler posts the newest slot however late: so may a person.
    write_persona("noon", base="unused", schedule={"cron": "0 23 * * *", "timezone": zone, "missed": "latest",
                                                   "sinks": ["file:noon.jsonl"]})
    older = persona("post", "noon", "--text", "Patience.", "--slot", f"{before - timedelta(days=1)}", env=env)
    said = " ".join(older.stderr.split())
    assert older.returncode == 1 and "schedule.missed = 'latest' posts only the newest slot late" in said, said
    assert f"the slot you can name now: {yesterday}T23:00" in said, said
    newest = persona("post", "noon", "--text", "Patience.", "--slot", f"{yesterday}", env=env)
    assert newest.returncode == 0 and "posted noon" in newest.stdout, newest.stdout + newest.stderr
    assert [line["text"] for line in read_jsonl(settings.data_dir / "posts" / "noon.jsonl")] == ["Patience."]


def test_an_edit_that_a_platform_would_refuse_is_refused_before_anything_goes_out(settings, write_persona, env, redis_client):
    """`approve --text` skipped every check: a text over X's 280 went out to the file (and
    any other sink) and X refused it, half posted; a blank one was posted blank."""
    write_persona("edited", base="unused", schedule={"sinks": ["file:edited.jsonl", "x"], "approval": True, "candidates": 1})
    settings.posting.x_bearer_token = SecretStr("user-token")
    env = env | {"PERSONA_POSTING__X_BEARER_TOKEN": "user-token", "PERSONA_POSTING__X_API_URL": f"http://127.0.0.1:{free_port()}"}
    waiting = Poster(settings, redis_client, lambda p, n, seed: TEXTS[:n]).post("edited", slot="2026-03-08T09:00:00Z")
    too_long = persona("posts", "approve", waiting.approval_id, "--text", "忍耐" * 71, env=env)  # 142 characters, 284 on X
    assert too_long.returncode == 1 and "x: 284 of 280" in too_long.stderr and "still waits" in too_long.stderr
    blank = persona("posts", "approve", waiting.approval_id, "--text", "  ", env=env)
    assert blank.returncode == 1 and f"persona posts reject {waiting.approval_id}" in blank.stderr
    assert not (settings.data_dir / "posts" / "edited.jsonl").exists()
    assert [p["id"] for p in json.loads(persona("posts", "pending", "--json", env=env).stdout)] == [waiting.approval_id]

    done = pending_post(settings, write_persona, "2026-03-09T09:00:00Z")
    assert persona("posts", "approve", done, env=env).returncode == 0
    late_edit = persona("posts", "approve", done, "--text", "Second thoughts.", env=env)
    assert late_edit.returncode == 1 and "is posted already" in late_edit.stderr and "finish posting" not in late_edit.stderr


def test_dry_run_shows_each_candidate_and_its_verdict_without_credentials(settings, write_persona, env):
    """The dry run refused to preview anything until every sink had its credentials, and
    showed only counts of rejections, not which candidate failed which filter."""
    from tests.fakes.scripted_worker import scripted_worker

    write_persona("preview", base="unused", filters={"min_chars": 1},
                  schedule={"sinks": ["x", "file:preview.jsonl"], "candidates": 3})
    drafts = iter(["忍耐" * 71, TEXTS[0], "wait wait wait wait"])  # 284 on X's count
    with scripted_worker(settings, lambda request: next(drafts)):
        result = persona("post", "preview", "--dry-run", "--json", env=env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["status"], out["text"]) == ("dry_run", TEXTS[0])
    assert sorted((v["text"], v["rejected"]) for v in out["verdicts"]) == sorted(
        [("忍耐" * 71, "too_long"), (TEXTS[0], ""), ("wait wait wait wait", "degenerate")])
    assert "a real post would fail" in out["message"] and "PERSONA_POSTING__X_BEARER_TOKEN" in out["message"]
    assert not (settings.data_dir / "posts").exists()

    drafts = iter(["wait wait wait wait"] * 3)
    with scripted_worker(settings, lambda request: next(drafts)):
        shown = persona("post", "preview", "--dry-run", env=env)
    assert shown.returncode == 1 and "degenerate: wait wait wait wait" in shown.stderr and shown.stdout == "", shown.stdout


@pytest.fixture
def teller(settings, write_persona, env, redis_client):
    """A persona posting to a file and to X, where X is the fake platform; its CLI environment."""
    from tests.fakes.social_api import serve, settings_env

    write_persona("teller", base="unused", schedule={"sinks": ["file:teller.jsonl", "x"], "candidates": 1})
    with serve() as fake:
        yield fake, env | settings_env(fake.url)


def _tweets(fake) -> list[str]:
    return [seen["json"]["text"] for seen in fake.seen if seen["path"] == "/2/tweets"]


def test_an_uncertain_post_is_settled_as_posted_by_a_person(settings, teller):
    """X took the request and hung up: the slot stayed "uncertain" for ever, every retry
    said so again, and no command could say what a person found on X."""
    from tests.fakes.scripted_worker import scripted_worker

    fake, env = teller
    slot = recent_slot(1)
    fake.drop_next(1, "/2/tweets")
    with scripted_worker(settings, lambda request: TEXTS[0]):
        first = persona("post", "teller", "--slot", slot, env=env)
    assert first.returncode == 1 and "x: no answer, it may have posted" in first.stderr, first.stdout + first.stderr
    assert "Traceback" not in first.stderr and "the connection broke before X answered" in first.stderr
    assert f"`persona posts settle teller {slot} --posted LINK` (or `--not-posted`)" in first.stderr
    listed = json.loads(persona("posts", "uncertain", "--json", env=env).stdout)
    assert [(u["persona"], u["slot"], u["sink"], u["text"]) for u in listed] == [("teller", slot, "x", TEXTS[0])]
    assert "teller" in persona("posts", "uncertain", env=env).stdout

    retried = persona("post", "teller", "--slot", slot, env=env)
    assert retried.returncode == 1 and "uncertain" in retried.stderr and _tweets(fake) == [TEXTS[0]]  # never twice

    neither = persona("posts", "settle", "teller", slot, env=env)
    assert neither.returncode != 0 and "--not-posted" in neither.stderr
    wrong_sink = persona("posts", "settle", "teller", slot, "--sink", "file:teller.jsonl", "--posted", "x", env=env)
    assert wrong_sink.returncode == 1 and "is posted" in wrong_sink.stderr, wrong_sink.stderr
    link = "https://x.com/teller/status/1790000000000000001"
    settled = persona("posts", "settle", "teller", slot, "--posted", link, env=env)
    assert settled.returncode == 0, settled.stdout + settled.stderr
    assert f"x: posted {link}" in settled.stdout
    assert json.loads(persona("posts", "uncertain", "--json", env=env).stdout) == []
    history = json.loads(persona("posts", "history", "--json", env=env).stdout)
    assert (history[0]["sink"], history[0]["url"]) == ("x", link)
    done = persona("post", "teller", "--slot", slot, env=env)
    assert done.returncode == 0 and "already posted" in done.stdout and _tweets(fake) == [TEXTS[0]]
    again = persona("posts", "settle", "teller", slot, "--not-posted", env=env)
    assert again.returncode == 1 and "nothing to settle" in again.stderr


def test_an_uncertain_post_settled_as_not_posted_goes_out_once_more_where_it_was_missing(settings, teller):
    from tests.fakes.scripted_worker import scripted_worker

    fake, env = teller
    slot = recent_slot(1)
    fake.drop_next(1, "/2/tweets")
    with scripted_worker(settings, lambda request: TEXTS[1]):
        assert persona("post", "teller", "--slot", slot, env=env).returncode == 1
    settled = persona("posts", "settle", "teller", slot, "--not-posted", env=env)
    assert settled.returncode == 0, settled.stdout + settled.stderr
    assert f"to post it now: `persona post teller --slot {slot}`" in settled.stdout
    assert _tweets(fake) == [TEXTS[1]]  # settling posts nothing by itself
    posted = persona("post", "teller", "--slot", slot, env=env)  # its text is chosen: no worker needed
    assert posted.returncode == 0 and f"posted teller {slot}" in posted.stdout, posted.stdout + posted.stderr
    assert _tweets(fake) == [TEXTS[1], TEXTS[1]]
    assert [line["text"] for line in read_jsonl(settings.data_dir / "posts" / "teller.jsonl")] == [TEXTS[1]]


def test_a_post_of_a_persona_whose_file_is_gone_can_still_be_settled(settings, teller, personas_dir, redis_client):
    """`persona posts uncertain` listed the post of a persona whose file was deleted, with a
    settle command that answered "unknown persona": nothing could take it off the list."""
    from tests.fakes.scripted_worker import scripted_worker

    fake, env = teller
    fake.drop_next(1, "/2/tweets")
    with scripted_worker(settings, lambda request: TEXTS[0]):
        assert persona("post", "teller", "--slot", "2026-03-25T09:00Z", env=env).returncode == 1
    (personas_dir / "teller.toml").unlink()
    local = persona("posts", "settle", "teller", "2026-03-25T09:00", "--not-posted", env=env)
    assert local.returncode == 1 and "`persona posts uncertain --persona teller`" in local.stderr, local.stderr
    typo = persona("posts", "settle", "telller", "2026-03-25T09:00:00Z", "--not-posted", env=env)
    assert typo.returncode == 1 and "unknown persona 'telller'" in typo.stderr, typo.stderr
    settled = persona("posts", "settle", "teller", "2026-03-25T10:00+01:00", "--posted", "https://x.com/t/status/9", env=env)
    assert settled.returncode == 0 and "x: recorded as posted (https://x.com/t/status/9); slot posted" in settled.stdout, (
        settled.stdout + settled.stderr)
    assert PostLedger(redis_client).unsettled() == []


def test_a_retry_by_hand_goes_to_the_sinks_the_post_was_made_for(settings, teller):
    """`persona post teller --sink x` rate-limited, retried as told with `persona post
    teller --slot SLOT`, went out to every sink in the persona's file as well."""
    from tests.fakes.scripted_worker import scripted_worker

    fake, env = teller
    fake.fail_with = 429
    with scripted_worker(settings, lambda request: TEXTS[0]):
        limited = persona("post", "teller", "--sink", "x", "--slot", "2026-03-22T09:00Z", env=env)
    assert limited.returncode == 1 and "to try again later: `persona post teller --slot 2026-03-22T09:00:00Z`" in limited.stderr
    fake.fail_with = None
    retried = persona("post", "teller", "--slot", "2026-03-22T09:00:00Z", env=env)
    assert retried.returncode == 0 and "x: posted" in retried.stdout, retried.stdout + retried.stderr
    assert not (settings.data_dir / "posts" / "teller.jsonl").exists()


def test_a_lost_answer_from_discord_or_telegram_is_one_line_and_telegram_is_left_for_a_person(settings, write_persona, env, redis_client):
    """Discord and Telegram took the post and hung up: `persona post` printed two tracebacks
    (discord.py's ServerDisconnectedError, python-telegram-bot's NetworkError) on its terminal."""
    from tests.fakes.scripted_worker import scripted_worker
    from tests.fakes.social_api import serve, settings_env

    write_persona("chatty", base="unused", schedule={"sinks": ["discord:1234", "telegram:@sagechannel"], "candidates": 1})
    slot = recent_slot(1)
    with serve() as fake:
        env = env | settings_env(fake.url) | {"PERSONA_DISCORD__TOKEN": "d", "PERSONA_TELEGRAM__TOKEN": "123456:t"}
        fake.drop_next(2)  # each platform's post
        with scripted_worker(settings, lambda request: TEXTS[0]):
            first = persona("post", "chatty", "--slot", slot, env=env)
        assert len(fake.dropped) == 2, first.stdout + first.stderr
        assert first.returncode == 1 and "Traceback" not in first.stderr and first.stdout == "", first.stderr
        assert "discord:1234: no answer (safe to retry): the connection broke before Discord answered" in first.stderr, first.stderr
        assert "telegram:@sagechannel: no answer, it may have posted: the connection broke before Telegram answered" in first.stderr
        assert f"`persona posts settle chatty {slot} --posted LINK` (or `--not-posted`)" in first.stderr
        listed = json.loads(persona("posts", "uncertain", "--json", env=env).stdout)
        assert [(u["sink"], u["command"]) for u in listed] == [
            ("discord:1234", f"persona post chatty --slot {slot}"),  # safe to retry: the nonce
            ("telegram:@sagechannel", f"persona posts settle chatty {slot} --sink telegram:@sagechannel --posted LINK"),
        ]
        retried = persona("post", "chatty", "--slot", slot, env=env)  # its text is chosen: no worker needed
        assert "discord:1234: posted" in retried.stderr and "telegram:@sagechannel: no answer, it may have posted" in retried.stderr, retried.stderr
        assert len(fake.discord_messages) == 1  # the retry's nonce got the first message back
        assert len(fake.telegram_messages) == 1  # Telegram: never sent again by itself


def test_a_lost_answer_where_a_retry_is_safe_is_listed_with_the_command_that_finishes_it(settings, write_persona, env, redis_client):
    """Mastodon and Bluesky took the post and hung up: the slot closed as failed, and neither
    `persona posts uncertain` nor the history showed it; once the scheduler's grace period
    had passed nothing retried it, and nothing said it needed `persona post --slot`."""
    from tests.fakes.scripted_worker import scripted_worker
    from tests.fakes.social_api import serve, settings_env

    write_persona("safe", base="unused", schedule={"sinks": ["mastodon", "bluesky"], "candidates": 1})
    slot = recent_slot(1)
    with serve() as fake:
        env = env | settings_env(fake.url)
        fake.drop_next(2)  # each platform's post
        with scripted_worker(settings, lambda request: TEXTS[1]):
            first = persona("post", "safe", "--slot", slot, env=env)
        assert first.returncode == 1 and len(fake.dropped) == 2, first.stdout + first.stderr
        listed = json.loads(persona("posts", "uncertain", "--json", env=env).stdout)
        assert [(u["sink"], u["state"], u["command"]) for u in listed] == [
            ("mastodon", "intent", f"persona post safe --slot {slot}"),
            ("bluesky", "intent", f"persona post safe --slot {slot}"),
        ]
        shown = persona("posts", "uncertain", env=env)
        assert shown.returncode == 0 and f"`persona post safe --slot {slot}`" in shown.stdout, shown.stdout
        assert "safe to retry" in shown.stdout
        finished = persona("post", "safe", "--slot", slot, env=env)  # its text is chosen: no worker needed
        assert finished.returncode == 0 and "posted safe" in finished.stdout, finished.stdout + finished.stderr
        assert len(fake.statuses) == 1 and len(fake.records) == 1  # the same posts: deduplicated, or found
        assert json.loads(persona("posts", "uncertain", "--json", env=env).stdout) == []


TRAIL = "...when you finally rise, with each step anew..."
GARBLED = "The simplestenbod's: Patience, Attention, Tone-Breathless Faithfulness.\""


def test_a_post_ends_as_a_finished_sentence_unless_no_candidate_does_and_then_it_says_so(settings, write_persona, env):
    """A candidate trailing off in "..." (counted as a finished sentence) or garbled with a
    stray quote won over clean ones; nothing said when every candidate had such a flaw."""
    from tests.fakes.scripted_worker import scripted_worker

    write_persona("tidy", base="unused", schedule={"sinks": ["file:tidy.jsonl"], "candidates": 3})
    drafts = iter([TRAIL, GARBLED, "It is what it is."])
    with scripted_worker(settings, lambda request: next(drafts)):
        result = persona("post", "tidy", "--dry-run", "--json", env=env)
    out = json.loads(result.stdout)
    assert (result.returncode, out["status"], out["text"], out["message"]) == (0, "dry_run", "It is what it is.", ""), result.stdout
    assert sorted((v["text"], v["rejected"], v["flaws"]) for v in out["verdicts"]) == sorted(
        [(TRAIL, "", ["unfinished"]), (GARBLED, "", ["open_quote"]), ("It is what it is.", "", [])])

    drafts = iter([TRAIL, "Attention is a lamp; tend its wick each morning"])
    with scripted_worker(settings, lambda request: next(drafts)):
        shown = persona("post", "tidy", "--dry-run", "-n", "2", env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "passed (unfinished): Attention is a lamp" in shown.stdout
    assert "no candidate was free of flaws; the best one does not end as a finished sentence" in " ".join(shown.stdout.split())

    drafts = iter([("It is what it is. And the river, when", "length")])  # cut off: trimmed, and says so
    with scripted_worker(settings, lambda request: next(drafts)):
        shown = persona("post", "tidy", "--dry-run", "-n", "1", env=env)
    assert "passed: It is what it is.  (cut off; left out: And the river, when)" in " ".join(shown.stdout.split("\n")), shown.stdout


def test_a_dry_run_of_a_slot_already_posted_says_so(settings, write_persona, env, redis_client):
    """`persona post sage --slot 2026-11-26 --dry-run` showed fresh candidates for a slot that
    was posted already, as if a real post would post them."""
    write_persona("again", base="unused", schedule={"sinks": ["file:again.jsonl"], "candidates": 1, "approval": False})
    poster = Poster(settings, redis_client, lambda p, n, seed: TEXTS[:n])
    assert poster.post("again", slot="2026-11-26T09:00:00Z").status == "posted"
    env = env | {"PERSONA_POSTING__WAIT_S": "3"}  # no worker runs: a dry run that asked for candidates would wait
    shown = persona("post", "again", "--slot", "2026-11-26", "--dry-run", env=env)
    assert shown.returncode == 0 and "slot 2026-11-26T09:00:00Z of again was already posted; nothing to do" in shown.stdout, shown.stdout + shown.stderr
    out = json.loads(persona("post", "again", "--slot", "2026-11-26", "--dry-run", "--json", env=env).stdout)
    assert (out["status"], out["text"], out["verdicts"]) == ("done", TEXTS[0], [])
    assert "persona post again --dry-run" in out["message"]  # how to preview new candidates after all

    write_persona("held", base="unused", schedule={"sinks": ["file:held.jsonl"], "candidates": 1, "approval": True})
    waiting = poster.post("held", slot="2026-11-26T09:00:00Z")
    held = json.loads(persona("post", "held", "--slot", "2026-11-26", "--dry-run", "--json", env=env).stdout)
    assert (held["status"], held["approval_id"]) == ("pending", waiting.approval_id)
    assert len(read_jsonl(settings.data_dir / "posts" / "again.jsonl")) == 1


def test_history_piped_is_one_whole_line_a_post(settings, write_persona, env, redis_client):
    """`persona posts history | less` at 80 columns squeezed the table into a word or two a line."""
    long_text = "Attend to the small things; the large ones are made of them, and the day is made of small things too."
    write_persona("piped", base="unused", schedule={"sinks": ["file:piped.jsonl"], "candidates": 1})
    Poster(settings, redis_client, lambda p, n, seed: [long_text]).post("piped", slot="2026-11-26T09:00:00Z")
    shown = persona("posts", "history", env=env | {"COLUMNS": "80"})
    header, line = shown.stdout.splitlines()
    assert header.split() == ["when", "(UTC)", "persona", "slot", "sink", "post", "slot", "state", "text"]
    assert line.split()[2:5] == ["piped", "2026-11-26T09:00:00Z", "file:piped.jsonl"], line
    assert line.split()[5:7] == [(settings.data_dir / "posts" / "piped.jsonl").as_uri(), "posted"], line
    assert line.endswith("  " + long_text), line


def test_a_post_some_sinks_took_says_partly_posted_and_is_finished_where_it_failed(settings, write_persona, env, redis_client):
    """A post that went out on one sink and was turned away by another read "failed", in
    `persona post`, its --json and the history alike, as if it had gone out nowhere."""
    write_persona("split", base="unused", schedule={"sinks": ["file:split.jsonl", "file:blocked.jsonl"], "candidates": 1})
    blocked = settings.data_dir / "posts" / "blocked.jsonl"
    blocked.mkdir(parents=True)  # that sink cannot write: a refusal
    shown = persona("post", "split", "--text", "Patience is a slow river.", env=env)
    began, said = shown.stderr.split("\n", 1)
    slot = began.split()[3]  # "posting split slot SLOT (if this stops: ...)", said as it began
    assert shown.returncode == 1 and said.startswith(f"partly posted: 1 of 2 split {slot}"), shown.stderr
    assert "file:blocked.jsonl: not posted: cannot write" in shown.stderr and shown.stdout == ""
    out = json.loads(persona("post", "split", "--slot", slot, "--json", env=env).stdout)  # still refused
    assert (out["status"], out["headline"], out["retry_later"]) == ("failed", "partly posted: 1 of 2", False)
    assert out["ok"] is False and out["error"] == {"kind": "SinkError", "message": out["message"]}
    [listed] = json.loads(persona("posts", "history", "--json", env=env).stdout)
    assert (listed["sink"], listed["slot_state"]) == ("file:split.jsonl", "partly posted: 1 of 2")
    blocked.rmdir()
    done = persona("post", "split", "--slot", slot, env=env)
    assert done.returncode == 0 and done.stdout.startswith(f"posted split {slot}"), done.stdout
    assert [len(read_jsonl(settings.data_dir / "posts" / name)) for name in ("split.jsonl", "blocked.jsonl")] == [1, 1]
    assert [item["slot_state"] for item in json.loads(persona("posts", "history", "--json", env=env).stdout)] == ["posted"] * 2


def persona_with_input(*args: str, stdin: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona", *args], check=False, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_a_text_piped_in_with_text_dash_is_one_post_with_its_line_breaks(settings, write_persona, env, redis_client):
    """`echo ... | persona post` ignored what was piped in and posted the model's text instead;
    `--text -` posts it, all of it one post, line breaks kept, and the same text is not posted twice."""
    write_persona("own", base="unused", schedule={"sinks": ["file:own.jsonl"], "candidates": 1, "approval": False})
    archive = settings.data_dir / "posts" / "own.jsonl"
    poem = "Be still.\nThe water clears.\n"
    done = persona_with_input("post", "own", "--text", "-", "--json", stdin=poem, env=env)  # no worker: nothing generated
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["status"], out["text"], out["candidates"]) == ("posted", "Be still.\nThe water clears.", 0)
    assert [line["text"] for line in read_jsonl(archive)] == ["Be still.\nThe water clears."]
    # The same command again (say, after a timeout) would post it twice: refused, with what to do.
    again = persona_with_input("post", "own", "--text", "-", stdin=poem, env=env)
    assert again.returncode == 1 and "posted this text already" in again.stderr and "--slot" in again.stderr
    assert len(read_jsonl(archive)) == 1
    empty = persona_with_input("post", "own", "--text", "-", stdin="\n", env=env)
    assert empty.returncode == 1 and "nothing came in on standard input" in empty.stderr
    too_long = persona("post", "own", "--text", "word " * 60, "--sink", "x", "--dry-run", env=env)
    assert too_long.returncode == 1 and "x: 299 of 280" in too_long.stderr  # its last space trimmed
    # Held for approval, it is listed on one line.
    held = json.loads(persona_with_input("post", "own", "--approval", "--json", "--text", "-",
                                         stdin="Wait.\nThen go.", env=env).stdout)
    assert held["status"] == "pending"
    assert persona("posts", "pending", env=env).stdout.splitlines()[1].endswith("  Wait.\\nThen go.")
    # A slot whose text failed to go out is retried with that text, not swapped for another.
    (settings.data_dir / "posts" / "blocked.jsonl").mkdir()
    failed = json.loads(persona("post", "own", "--sink", "file:blocked.jsonl", "--json", "--text", "First.", env=env).stdout)
    assert failed["status"] == "failed"
    swapped = persona("post", "own", "--slot", failed["slot"], "--text", "Second.", env=env)
    assert swapped.returncode == 1 and "has its text already ('First.')" in swapped.stderr, swapped.stderr
    (settings.data_dir / "posts" / "blocked.jsonl").rmdir()
    retried = json.loads(persona("post", "own", "--slot", failed["slot"], "--json", env=env).stdout)
    assert (retried["status"], retried["text"]) == ("posted", "First.")


def test_a_piped_listing_keeps_a_post_with_a_line_break_on_one_line(settings, write_persona, env, redis_client):
    """A post with a line break in it (an approver's edit) came out of `persona posts history | ...`
    as two lines, its second looking like a post of its own."""
    approval_id = pending_post(settings, write_persona, "2026-11-20T09:00:00Z")
    approved = persona("posts", "approve", approval_id, "--text", "Be still.\nThe water clears.", env=env)
    assert approved.returncode == 0, approved.stderr
    lines = persona("posts", "history", env=env).stdout.splitlines()
    assert len(lines) == 2 and lines[1].endswith("  Be still.\\nThe water clears."), lines
    shown = json.loads(persona("posts", "history", "--json", env=env).stdout)
    assert [item["text"] for item in shown] == ["Be still.\nThe water clears."]


def test_a_post_with_no_worker_running_says_so_at_once(write_persona, env, redis_client):
    """With no worker, `persona post` showed its spinner for posting.wait_s (5 minutes) and only
    then said that no worker answered."""
    write_persona("alone", base="unused", schedule={"sinks": ["file:alone.jsonl"], "candidates": 1})
    short = env | {"PERSONA_POSTING__WAIT_S": "20"}  # were it silent, readline would wait that long, not 5 minutes
    process = subprocess.Popen([sys.executable, "-m", "persona", "post", "alone"], env=short, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        said = process.stderr.readline()
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C withdraws its requests
        process.communicate(timeout=30)
    assert said.startswith("no worker is running yet; this waits in the queue for one, up to 20 s"), said


def test_a_post_into_a_full_queue_with_no_worker_is_refused_without_saying_it_waits(write_persona, env, redis_client):
    """`persona post` said "no worker is running yet; this waits in the queue for one" before it
    sent its candidates, and then was refused as busy: they never waited anywhere."""
    from persona.contract import GenerationRequest
    from persona.queue import QueueClient
    from persona.settings import QueueSettings

    write_persona("alone", base="unused", schedule={"sinks": ["file:alone.jsonl"], "candidates": 1})
    QueueClient(redis_client, QueueSettings(max_length=1)).submit(
        GenerationRequest(persona="alone", mode="complete", priority=Priority.batch))
    refused = persona("post", "alone", env=env | {"PERSONA_QUEUE__MAX_LENGTH": "1"})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "the queue is full: persona:q:batch holds 1 request" in refused.stderr, refused.stderr
    assert "waits in the queue" not in refused.stderr and "no worker is running yet" not in refused.stderr
    assert redis_client.xlen(keys.STREAM_BATCH) == 1


@pytest.mark.parametrize(("as_json", "stop", "status"), [
    (False, signal.SIGINT, 130), (True, signal.SIGINT, 130), (False, signal.SIGTERM, 143),
], ids=["ctrl-c", "ctrl-c-json", "sigterm"])
def test_ctrl_c_while_candidates_are_written_says_they_were_withdrawn(settings, write_persona, env, redis_client, as_json,
                                                                      stop, status):
    """Ctrl-C while `persona post -n 3` waited for its candidates withdrew them, and said
    nothing at all (exit 130): not whether anything went out, nor, with --json, a line to read.
    SIGTERM (or SIGHUP) killed it and left them queued for a worker to write for nobody."""
    from persona.work_queue import WorkQueue

    write_persona("patient", base="unused", schedule={"sinks": ["file:patient.jsonl"]})
    process = subprocess.Popen([sys.executable, "-m", "persona", "post", "patient", "-n", "3", *(["--json"] * as_json)],
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while redis_client.xlen(keys.STREAM_BATCH) < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        ids = [json.loads(entry[b"r"])["id"] for _, entry in redis_client.xrange(keys.STREAM_BATCH)]
    finally:
        process.send_signal(stop)
        out, err = process.communicate(timeout=30)
    assert process.returncode == status, err
    said = "stopped: the 3 candidates asked for were withdrawn (no worker will write them); nothing was posted"
    assert said in " ".join(err.split()), err
    if as_json:
        assert json.loads(out) == {"ok": False, "error": {"kind": "PostingError", "message": said}}
    else:
        assert out == ""
    assert len(ids) == 3 and WorkQueue(redis_client, settings.queue).is_cancelled(ids) == set(ids)


def test_a_dry_run_with_no_worker_says_so_within_seconds_and_what_to_run(write_persona, env, redis_client):
    """With no worker, `persona post --dry-run` said it would wait for one, then waited
    posting.wait_s (5 minutes) to fail with "no worker answered"."""
    write_persona("alone", base="unused", schedule={"sinks": ["file:alone.jsonl"], "candidates": 2})
    started = time.monotonic()
    result = persona("post", "alone", "--dry-run", env=env, timeout=60)  # not minutes
    assert result.returncode == 1, result.stderr
    assert ("no worker serves persona 'alone' (none is running or starting), so nothing can write its candidates: "
            "start one with `persona worker` (or `persona up`), then run this again") in " ".join(result.stderr.split())
    assert time.monotonic() - started < 45
    assert redis_client.xlen(keys.STREAM_BATCH) == 0  # nothing left queued for a worker started later


def test_a_dry_run_waits_for_a_worker_that_is_starting(write_persona, env, redis_client):
    """A worker still loading its models will serve: the dry run says so and waits for it, as `persona ask` does."""
    write_persona("alone", base="unused", schedule={"sinks": ["file:alone.jsonl"], "candidates": 1})
    starting = heartbeat.StartingWorker(id="w-loading", persona="alone", model="smollm2")
    heartbeat.announce_starting(redis_client, starting, ttl_s=60)
    result = persona("post", "alone", "--dry-run", env=env | {"PERSONA_POSTING__WAIT_S": "2"}, timeout=60)
    assert result.returncode == 1
    said = " ".join(result.stderr.split())
    assert "a worker is starting (loading smollm2 for alone" in said and "no worker serves" not in said, said


def _lines_with(text: str, said: str) -> list[str]:
    return [line for line in said.splitlines() if text in line]


def test_a_sink_that_cannot_be_reached_is_said_once_in_a_line_with_what_to_do_next(write_persona, env):
    """A Mastodon that was down was said three times: its sink's line ("unreachable cannot
    reach…", with urllib3's "HTTPConnectionPool(…): Max retries exceeded … NewConnectionError(…)"),
    the message again, and a log line on stderr."""
    write_persona("masto", base="unused", schedule={"sinks": ["mastodon"], "candidates": 1})
    down = f"http://127.0.0.1:{free_port()}"
    env = env | {"PERSONA_POSTING__MASTODON_API_URL": down, "PERSONA_POSTING__MASTODON_ACCESS_TOKEN": "t"}
    result = persona("post", "masto", "--text", "Tend the garden daily.", env=env)
    assert (result.returncode, result.stdout) == (1, ""), result.stdout + result.stderr
    assert _lines_with("Mastodon", result.stderr) == [
        f"  mastodon: unreachable, nothing sent: cannot reach Mastodon at {down} (connection refused)"], result.stderr
    slot = result.stderr.split()[3]  # "posting masto slot SLOT (if this stops: ...)", said as it began
    assert _lines_with("try again", result.stderr) == [
        f"to try again later: `persona post masto --slot {slot}` (it never posts twice)"], result.stderr
    # --json has the whole story in the message.
    out = json.loads(persona("post", "masto", "--slot", slot, "--json", env=env).stdout)
    assert out["message"] == (f"mastodon: unreachable, nothing sent: cannot reach Mastodon at {down} (connection refused); "
                              f"to try again later: `persona post masto --slot {slot}` (it never posts twice)")


@pytest.mark.parametrize(("status", "said", "next_step"), [
    (401, ("  x: not posted: X refused the credentials (401 Unauthorized); check PERSONA_POSTING__X_BEARER_TOKEN in .env or "
           "the environment (an OAuth 2 user token, which expires 2 hours after it is made: for posts day after day, set "
           "the four OAuth 1.0a user keys instead, PERSONA_POSTING__X_CONSUMER_KEY, PERSONA_POSTING__X_CONSUMER_SECRET, "
           "PERSONA_POSTING__X_ACCESS_TOKEN, PERSONA_POSTING__X_ACCESS_TOKEN_SECRET, which do not expire)"),
     "once that is fixed, `persona post teller --slot {slot}` posts the same text where it failed (never twice)"),
    (429, "  x: rate-limited, nothing sent: X is rate-limiting posts: 429 Too Many Requests",
     "to try again later: `persona post teller --slot {slot}` (it never posts twice)"),
])
def test_a_refusal_or_a_rate_limit_beside_a_post_that_went_out_is_said_once(teller, status, said, next_step):
    """A refused token or a rate limit, with the post out on another sink, was said three times
    too: "x: failed X refused…" (no separator), the message again, and a log line on stderr."""
    fake, env = teller
    fake.fail_with = status
    result = persona("post", "teller", "--text", TEXTS[1], env=env)
    assert (result.returncode, result.stdout) == (1, ""), result.stdout + result.stderr
    began, *lines = result.stderr.splitlines()
    slot = began.split()[3]
    assert began == f"posting teller slot {slot} (if this stops: `persona post teller --slot {slot}` finishes it, never twice)"
    assert lines[0].startswith(f"partly posted: 1 of 2 teller {slot}"), result.stderr
    assert lines[2:] == [f"  file:teller.jsonl: posted {_lines_with('file://', result.stderr)[0].split()[-1]}",
                         said, next_step.format(slot=slot)], result.stderr


def test_an_approval_that_a_sink_turned_away_is_said_once(teller):
    """`persona posts approve` said a sink's failure three times, as `persona post` did."""
    fake, env = teller
    waiting = json.loads(persona("post", "teller", "--text", TEXTS[1], "--approval", "--json", env=env).stdout)
    fake.fail_with = 429
    result = persona("posts", "approve", waiting["approval_id"], env=env)
    assert (result.returncode, result.stdout) == (1, ""), result.stdout + result.stderr
    assert len(_lines_with("rate-limiting", result.stderr)) == 1, result.stderr
    assert result.stderr.splitlines()[-1] == f"to try again: `persona posts approve {waiting['approval_id']}`", result.stderr
    again = json.loads(persona("posts", "approve", waiting["approval_id"], "--json", env=env).stdout)  # still limited
    assert again["ok"] is False and again["error"] == {"kind": "SinkError", "message": again["message"]}, again


def test_approve_help_says_it_reads_the_edited_text_from_standard_input(env):
    """`persona posts approve --help` said "`-` reads them from standard input" of one edited text."""
    shown = persona("posts", "approve", "--help", env=env).stdout
    assert "`-` reads it from standard input" in " ".join(shown.replace("│", " ").split()), shown
    assert "reads them" not in shown


QUIET = "Quiet hands, quiet mind, number four."


def _until(done, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _stopped_mid_post(fake, args: list[str], env: dict[str, str], stop: signal.Signals) -> tuple[int, str]:
    """Run `persona ARGS` against a Mastodon that answers slowly; stop it once Mastodon has the post."""
    fake.slow_s = 3.0  # the post is made at once, its answer comes 3 s later
    process = subprocess.Popen([sys.executable, "-m", "persona", *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _until(lambda: fake.statuses or process.poll() is not None)
    finally:
        process.send_signal(stop)
        _, err = process.communicate(timeout=30)
    fake.slow_s = 0.0
    assert len(fake.statuses) == 1, err
    return process.returncode, err


@pytest.fixture
def hands(write_persona, env):
    """A persona posting to Mastodon, where Mastodon is the fake platform; its CLI environment."""
    from tests.fakes.social_api import serve, settings_env

    write_persona("hands", base="unused", schedule={"sinks": ["mastodon"], "candidates": 1})
    with serve() as fake:
        yield fake, env | settings_env(fake.url)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_post_stopped_mid_publish_names_its_slot_and_is_finished_never_posted_twice(hands, redis_client, stop):
    """Ctrl-C (or kill -9) while Mastodon was answering: the stop message said `--slot SLOT`
    but no command ever printed the slot, `posts uncertain` listed nothing, and the same
    command run again posted the text a second time."""
    fake, env = hands
    # A killed poster holds its slot this long: longer than two commands take to start on a loaded machine.
    env = env | {"PERSONA_POSTING__LEASE_S": "12"}
    status, err = _stopped_mid_post(fake, ["post", "hands", "--text", QUIET], env, stop)
    listed = json.loads(persona("posts", "uncertain", "--json", env=env).stdout)
    assert [(u["sink"], u["state"], u["text"]) for u in listed] == [("mastodon", "intent", QUIET)], listed
    slot = listed[0]["slot"]
    finish = f"persona post hands --slot {slot}"
    # Said as soon as the post began, before the platform answered (a kill -9 says nothing after).
    assert err.splitlines()[0] == f"posting hands slot {slot} (if this stops: `{finish}` finishes it, never twice)"
    if stop == signal.SIGINT:
        assert status == 130 and f"stopped while posting slot {slot}" in err and f"`{finish}` finishes it" in err, err
        assert listed[0]["command"] == finish and listed[0]["held_s"] == "0"
    else:  # its claim is left held until the lease runs out: said, with when
        assert status == -signal.SIGKILL and int(listed[0]["held_s"]) > 0
        shown = persona("posts", "uncertain", env=env).stdout
        assert "its claim runs out in" in shown and f"after that, `{finish}`" in shown, shown

    again = persona("post", "hands", "--text", QUIET, env=env)
    assert again.returncode == 1 and f"slot {slot} of hands holds this text already" in again.stderr, again.stderr
    assert f"`{finish}` finishes it" in again.stderr and f"`persona posts settle hands {slot} --posted LINK`" in again.stderr
    assert len(fake.statuses) == 1

    _until(lambda: not redis_client.exists(keys.post_lock_key("hands", slot)), timeout_s=20)
    finished = persona("post", "hands", "--slot", slot, env=env)
    assert finished.returncode == 0 and f"posted hands {slot}" in finished.stdout, finished.stdout + finished.stderr
    assert len(fake.statuses) == 1  # found (its idempotency key), not posted again
    assert json.loads(persona("posts", "uncertain", "--json", env=env).stdout) == []
    assert [h["text"] for h in json.loads(persona("posts", "history", "--json", env=env).stdout)] == [QUIET]


def test_an_approval_killed_mid_post_says_when_its_claim_runs_out_and_is_listed_until_finished(hands, redis_client):
    """`posts approve ID` killed mid-post, then run again, said the slot "is being posted by
    another scheduler right now" for posting.lease_s (10 minutes), and meanwhile the post was
    neither pending nor uncertain."""
    fake, env = hands
    # A lease that outlasts the next command's start on a loaded machine (it is waited out below).
    env = env | {"PERSONA_POSTING__LEASE_S": "12"}
    waiting = json.loads(persona("post", "hands", "--text", QUIET, "--approval", "--json", env=env).stdout)
    approval, slot = waiting["approval_id"], waiting["slot"]
    status, _ = _stopped_mid_post(fake, ["posts", "approve", approval], env, signal.SIGKILL)
    assert status == -signal.SIGKILL

    held = persona("posts", "approve", approval, env=env)
    assert held.returncode == 1 and "another scheduler" not in held.stderr, held.stderr
    said = " ".join(held.stderr.split())
    assert f"slot {slot} of hands is held by another poster" in said and "stopped mid-post" in said, said
    assert "its claim runs out in" in said and f"then run `persona posts approve {approval}` again" in said, said
    listed = json.loads(persona("posts", "uncertain", "--json", env=env).stdout)
    assert [(u["slot"], u["sink"], u["state"], u["command"]) for u in listed] == [
        (slot, "mastodon", "intent", f"persona posts approve {approval}")]
    assert int(listed[0]["held_s"]) > 0

    _until(lambda: not redis_client.exists(keys.post_lock_key("hands", slot)), timeout_s=20)
    approved = persona("posts", "approve", approval, env=env)
    assert approved.returncode == 0 and f"posted hands {slot}" in approved.stdout, approved.stdout + approved.stderr
    assert len(fake.statuses) == 1
    assert json.loads(persona("posts", "uncertain", "--json", env=env).stdout) == []


def test_a_post_stopped_mid_publish_and_settled_as_posted_is_not_posted_again(settings, write_persona, redis_client):
    """Settled as posted, the stopped post's slot closed with its text nowhere among the recent
    posts: the same --text then went out a second time."""
    write_persona("calm", base="unused", schedule={"sinks": ["file:calm.jsonl"], "candidates": 1})
    slot = "manual-2026-03-01T09:00:00.000000Z"
    stopped = PostLedger(redis_client)  # what a `persona post` stopped mid-post (Ctrl-C) leaves behind
    assert stopped.claim("calm", slot).claimed
    stopped.save("calm", slot, text=QUIET, sinks='["file:calm.jsonl"]')
    stopped.set_sink("calm", slot, "file:calm.jsonl", SinkEntry(state="intent", marker=f"calm:{slot}:file:calm.jsonl"))
    stopped.release("calm", slot)
    poster = Poster(settings, redis_client, lambda p, n, seed: TEXTS[:n])
    with pytest.raises(PostingError, match=f"slot {slot} of calm holds this text already"):
        poster.post("calm", text=QUIET)
    assert poster.settle("calm", slot, posted="https://example.test/calm/1").status == "posted"
    with pytest.raises(PostingError, match="calm posted this text already"):
        poster.post("calm", text=QUIET)
    assert not (settings.data_dir / "posts" / "calm.jsonl").exists()
