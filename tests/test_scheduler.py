"""The scheduler: slot arithmetic in time zones and across DST, missed-slot policies,
and exactly-once posting under concurrent schedulers and crashes."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from adapters.posting.poster import Poster
from adapters.posting.sinks import FileSink, Posted, make_sink
from adapters.posting.slots import next_slot, plan_slots, slot_id, slots_between
from adapters.scheduler import Scheduler
from persona import constants as keys
from persona.errors import ConfigError, PostingError, ReplyTimeout
from persona.ledger import PostLedger, SinkEntry
from persona.personas import BROKEN_SETTLE_S, PersonaRegistry
from persona.settings import Settings
from tests.conftest import read_jsonl
from tests.fakes.clocks import SteppedBack

TEXTS = [
    "Patience is the slow river that carves the canyon of a life.",
    "Attend to the small things; the large ones are made of them.",
    "wait wait wait wait",
]


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


# --- slot arithmetic -------------------------------------------------------------------


def test_slots_are_named_by_their_utc_instant():
    assert slot_id(datetime(2026, 7, 1, 9, tzinfo=UTC)) == "2026-07-01T09:00:00Z"


def test_local_time_holds_across_zones_and_seasons():
    winter = slots_between("0 9 * * *", "Europe/London", utc(2026, 1, 10), utc(2026, 1, 11))
    summer = slots_between("0 9 * * *", "Europe/London", utc(2026, 7, 10), utc(2026, 7, 11))
    tokyo = slots_between("0 9 * * *", "Asia/Tokyo", utc(2026, 7, 10), utc(2026, 7, 11))
    assert [slot_id(s) for s in winter] == ["2026-01-10T09:00:00Z"]
    assert [slot_id(s) for s in summer] == ["2026-07-10T08:00:00Z"]
    assert [slot_id(s) for s in tokyo] == ["2026-07-11T00:00:00Z"]


def test_spring_forward_fires_once_after_the_gap():
    # 01:30 does not exist in London on 2026-03-29 (clocks jump 01:00 -> 02:00).
    slots = slots_between("30 1 * * *", "Europe/London", utc(2026, 3, 28, 2), utc(2026, 3, 30, 2))
    assert [slot_id(s) for s in slots] == ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]


def test_fall_back_fires_once_not_twice():
    # 01:30 happens twice in London on 2026-10-25; a daily post goes out once.
    slots = slots_between("30 1 * * *", "Europe/London", utc(2026, 10, 24, 2), utc(2026, 10, 26, 3))
    assert [slot_id(s) for s in slots] == ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
    hourly = slots_between("0 * * * *", "Europe/London", utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 3, 30))
    assert [slot_id(s) for s in hourly] == [
        "2026-10-25T00:00:00Z",  # 01:00 BST
        "2026-10-25T02:00:00Z",  # 02:00 GMT (the repeated 01:00 GMT is not fired again)
        "2026-10-25T03:00:00Z",
    ]


def test_a_refused_slot_in_the_hour_that_happens_twice_is_named_with_its_offset():
    """Both 02:30s of Berlin's fall-back night read "02:30": the refusal said "2026-10-25T02:30
    is not one of the schedule's slots; the nearest: 2026-10-25T02:30"."""
    from adapters.posting.slots import resolve_slot

    with pytest.raises(PostingError) as refused:
        resolve_slot("2026-10-25T02:30+01:00", "30 2 * * *", "Europe/Berlin", utc(2026, 11, 28))
    assert ("2026-10-25T02:30+01:00 is not one of the schedule's slots ('30 2 * * *', Europe/Berlin); "
            "the nearest: 2026-10-25T02:30+02:00, 2026-10-26T02:30;") in str(refused.value)


def test_us_dst_and_weekday_schedules():
    # New York springs forward on 2026-03-08; weekdays only.
    slots = slots_between("0 8 * * 1-5", "America/New_York", utc(2026, 3, 6), utc(2026, 3, 10))
    assert [slot_id(s) for s in slots] == ["2026-03-06T13:00:00Z", "2026-03-09T12:00:00Z"]
    assert slot_id(next_slot("0 8 * * 1-5", "America/New_York", utc(2026, 3, 7))) == "2026-03-09T12:00:00Z"


def test_bad_schedules_are_clear_errors():
    with pytest.raises(ConfigError, match="not a cron expression"):
        slots_between("every day", "UTC", utc(2026, 1, 1), utc(2026, 1, 2))
    with pytest.raises(ConfigError, match="unknown time zone"):
        slots_between("0 9 * * *", "Mars/Olympus", utc(2026, 1, 1), utc(2026, 1, 2))
    with pytest.raises(ConfigError, match="schedule.timezone: 'localtime' is each machine's own zone"):
        slots_between("0 9 * * *", "localtime", utc(2026, 1, 1), utc(2026, 1, 2))


def test_cron_with_seconds_or_a_date_that_never_comes_is_refused():
    """croniter takes a sixth field as seconds: "0 0 9 * * *" (seconds first, as Quartz writes
    it) was every second of midnight on the 9th, a post each tick; Feb 30 raised croniter's
    own error from every tick, and the scheduler stopped for every persona."""
    with pytest.raises(ConfigError, match="has 6 fields; a schedule has 5"):
        slots_between("0 0 9 * * *", "UTC", utc(2026, 1, 8), utc(2026, 1, 10))
    with pytest.raises(ConfigError, match="never comes"):
        next_slot("0 9 30 2 *", "UTC", utc(2026, 1, 1))
    assert [slot_id(s) for s in slots_between("@daily", "UTC", utc(2026, 1, 8), utc(2026, 1, 9))] == ["2026-01-09T00:00:00Z"]
    assert slot_id(next_slot("0 9 29 2 *", "UTC", utc(2026, 3, 1))) == "2028-02-29T09:00:00Z"


def test_a_persona_with_an_impossible_schedule_does_not_stop_the_others(settings, scheduled, write_persona):
    write_persona("feb30", base="unused", adapters=["cli", "scheduler"],
                  schedule={"cron": "0 9 30 2 *", "enabled": True, "sinks": ["file:feb30.jsonl"]})
    runner = Scheduler(poster_for(settings), redis.Redis.from_url(settings.redis_url.get_secret_value()))
    runner.tick(utc(2026, 1, 5, 8))
    assert [(o.persona, o.status) for o in runner.tick(utc(2026, 1, 5, 9, 1))] == [("poet", "posted")]
    assert len(read_jsonl(scheduled)) == 1


def test_a_persona_whose_post_fails_unexpectedly_does_not_stop_the_others(settings, scheduled, write_persona, caplog):
    """One persona's sink raising what no sink expects ended the whole tick: every persona
    after it went unposted, tick after tick, for as long as the fault lasted."""
    write_persona("alpha", base="unused", adapters=["cli", "scheduler"], schedule={
        "cron": "0 9 * * *", "timezone": "Europe/London", "enabled": True, "sinks": ["file:alpha.jsonl"], "candidates": 1})
    broken = {"file:alpha.jsonl"}

    def sinks(spec: str, made: Settings):
        if spec in broken:
            raise RuntimeError("a bug in the sink")
        return make_sink(spec, made)

    runner = Scheduler(poster_for(settings, sink_factory=sinks), redis.Redis.from_url(settings.redis_url.get_secret_value()))
    runner.tick(utc(2026, 1, 5, 8))
    assert [(o.persona, o.status) for o in runner.tick(utc(2026, 1, 5, 9, 1))] == [("poet", "posted")]
    assert "alpha: posting failed; its slot stays due" in caplog.text and "RuntimeError: a bug in the sink" in caplog.text
    broken.clear()
    assert [(o.persona, o.status) for o in runner.tick(utc(2026, 1, 5, 9, 2))] == [("alpha", "posted")]


def test_a_corpus_not_in_utf8_is_named_at_start_and_the_others_post(settings, scheduled, write_persona, redis_client):
    """filters.corpus naming a text saved as Latin-1 stopped `persona scheduler` at start with
    a UnicodeDecodeError traceback: no persona posted at all."""
    latin = settings.data_dir / "wilde.txt"
    latin.write_bytes("Caf\xe9 society is a bore.\n".encode("latin-1"))
    write_persona("wilde", base="unused", adapters=["cli", "scheduler"], filters={"corpus": str(latin)},
                  schedule={"cron": "0 9 * * *", "timezone": "Europe/London", "enabled": True, "sinks": ["file:w.jsonl"]})
    runner = Scheduler(poster_for(settings), redis_client)
    [problem] = runner.preflight()
    assert problem.startswith(f"wilde: the corpus {latin} is not UTF-8 (byte 3: b'\\xe9')"), problem
    assert f"`persona corpus build {latin} -o corpus.jsonl`" in problem
    runner.tick(utc(2026, 1, 5, 8))
    assert [(o.persona, o.status) for o in runner.tick(utc(2026, 1, 5, 9, 1))] == [("poet", "posted")]


def test_preflight_names_what_keeps_each_persona_from_posting(settings, scheduled, write_persona, redis_client):
    """A file with `enabled = true` but no "scheduler" adapter (the default adapters lack it)
    or no sinks was passed over in silence, and the scheduler said "no persona has
    schedule.enabled = true"; missing credentials surfaced only at the first slot."""
    on = {"enabled": True, "sinks": ["file:p.jsonl"]}
    write_persona("noadapter", base="unused", schedule=on)
    write_persona("nosinks", base="unused", adapters=["cli", "scheduler"], schedule={"enabled": True})
    write_persona("nokeys", base="unused", adapters=["cli", "scheduler"], schedule={**on, "sinks": ["x", "file:p.jsonl"]})
    write_persona("nocorpus", base="unused", adapters=["cli", "scheduler"], schedule=on, filters={"corpus": "gone.jsonl"})
    write_persona("off", base="unused", schedule={"sinks": ["x"]})
    problems = Scheduler(poster_for(settings), redis_client).preflight()
    assert len(problems) == 4, problems
    by_name = {p.split(":", 1)[0]: p for p in problems}
    assert 'adapters does not list "scheduler"' in by_name["noadapter"]
    assert "schedule.sinks is empty" in by_name["nosinks"]
    assert "PERSONA_POSTING__X_BEARER_TOKEN" in by_name["nokeys"]
    assert "cannot read the corpus" in by_name["nocorpus"]


def test_an_unreadable_corpus_is_said_before_any_candidate_is_generated(settings, write_persona, redis_client):
    from persona.errors import CorpusError

    write_persona("nocorpus", base="unused", schedule={"sinks": ["file:p.jsonl"]}, filters={"corpus": "gone.jsonl"})
    asked: list[int] = []
    poster = Poster(settings, redis_client, lambda persona, n, seed: asked.append(n) or TEXTS[:n])
    with pytest.raises(CorpusError, match="gone.jsonl"):
        poster.post("nocorpus", slot="2026-01-01T09:00:00Z")
    assert asked == []  # no batch of generations thrown away


def test_persona_file_rejects_a_bad_schedule(write_persona):
    from persona.personas import load_persona_file

    path = write_persona("badtime", base="x", schedule={"cron": "0 9 * *", "timezone": "Nowhere/Else"})
    with pytest.raises(ConfigError) as caught:
        load_persona_file(path)
    assert "schedule.cron" in str(caught.value) and "schedule.timezone" in str(caught.value)



@pytest.mark.parametrize("cron, words", [("0 0 9 * * *", "has 6 fields"), ("0 9 30 2 *", "never comes")])
def test_persona_file_refuses_a_schedule_the_scheduler_would_refuse(write_persona, cron, words):
    """`persona personas validate` and every loader see what the scheduler sees: a cron with
    seconds would post every second, one that never fires would never post."""
    from persona.personas import load_persona_file

    with pytest.raises(ConfigError, match=words):
        load_persona_file(write_persona("sixfields", base="x", schedule={"cron": cron}))

# --- missed-slot policies ---------------------------------------------------------------


def test_policy_skip_posts_only_an_on_time_slot():
    due = [utc(2026, 1, d, 9) for d in (1, 2, 3)]
    on_time = plan_slots(due, utc(2026, 1, 3, 9, 5), "skip", grace_s=900)
    assert on_time.post == due[-1] and on_time.skipped == due[:2] and not on_time.late
    after_outage = plan_slots(due, utc(2026, 1, 3, 12), "skip", grace_s=900)
    assert after_outage.post is None and after_outage.skipped == due


def test_policy_latest_posts_the_newest_late():
    due = [utc(2026, 1, d, 9) for d in (1, 2, 3)]
    plan = plan_slots(due, utc(2026, 1, 3, 12), "latest", grace_s=900)
    assert plan.post == due[-1] and plan.skipped == due[:2] and plan.late
    assert plan_slots([], utc(2026, 1, 3), "latest", 900).post is None


# --- posting exactly once -----------------------------------------------------------------


def slow_candidates(persona, n, seed):
    time.sleep(0.2)  # widen the window in which two schedulers race
    return TEXTS[:n]


def poster_for(settings: Settings, **kwargs) -> Poster:
    return Poster(settings, redis.Redis.from_url(settings.redis_url.get_secret_value()), slow_candidates, **kwargs)


@pytest.fixture
def scheduled(write_persona, settings: Settings, redis_client) -> Path:
    """A persona that posts daily at 09:00 London time to a file; returns the file."""
    schedule = {"cron": "0 9 * * *", "timezone": "Europe/London", "missed": "skip", "enabled": True,
                "sinks": ["file:poet.jsonl"], "candidates": 3}
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule=schedule)
    return settings.data_dir / "posts" / "poet.jsonl"


def test_two_concurrent_posters_post_a_slot_once(settings, scheduled):
    outcomes = []
    start = threading.Barrier(2)

    def run():
        poster = poster_for(settings)
        start.wait()
        outcomes.append(poster.post("poet", slot="2026-01-05T09:00:00Z"))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(o.status for o in outcomes) == ["busy", "posted"]
    lines = read_jsonl(scheduled)
    assert [line["text"] for line in lines] == [TEXTS[0]]
    again = poster_for(settings).post("poet", slot="2026-01-05T09:00:00Z")
    assert again.status == "done" and "already posted" in again.message
    assert len(read_jsonl(scheduled)) == 1


def test_two_schedulers_ticking_together_post_once(settings, scheduled):
    schedulers = [Scheduler(poster_for(settings), redis.Redis.from_url(settings.redis_url.get_secret_value())) for _ in range(2)]
    schedulers[0].tick(utc(2026, 1, 5, 8))  # first look starts the clock
    results: list[list] = []
    start = threading.Barrier(2)

    def run(s: Scheduler):
        start.wait()
        results.append(s.tick(utc(2026, 1, 5, 9, 1)))

    threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    statuses = sorted(o.status for r in results for o in r)
    assert statuses.count("posted") == 1 and set(statuses) <= {"posted", "busy", "done"}
    assert len(read_jsonl(scheduled)) == 1
    history = PostLedger(schedulers[0].client).history()
    assert [(h["slot"], h["sink"]) for h in history] == [("2026-01-05T09:00:00Z", "file:poet.jsonl")]


def _together(*runs) -> list:
    """Run each in its own thread, all started at one moment; each one's result (or the PostingError it raised)."""
    start = threading.Barrier(len(runs))
    results: list = [None] * len(runs)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = runs[i]()
        except PostingError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return results


def test_the_same_text_posted_twice_at_one_moment_goes_out_once(settings, scheduled):
    """`persona post poet --text ...` run twice at once: each looked for the text among poet's
    posts before either had claimed a slot for it, found it new, and both posted it."""

    def slow_sinks(spec: str, made: Settings):
        time.sleep(0.3)  # both have looked before either claims
        return make_sink(spec, made)

    words = "The same words, twice at once."
    first, second = _together(*[lambda: poster_for(settings, sink_factory=slow_sinks).post("poet", text=words)] * 2)
    assert [line["text"] for line in read_jsonl(scheduled)] == [words]
    [refused] = [r for r in (first, second) if isinstance(r, PostingError)]
    [posted] = [r for r in (first, second) if not isinstance(r, PostingError)]
    assert posted.status == "posted" and "this text already" in str(refused)


class SlowFile(FileSink):
    """A file that takes its time, as a platform does: a post is a while under way."""

    def post(self, text: str, marker: str) -> Posted:
        time.sleep(0.3)
        return super().post(text, marker)


def test_a_scheduled_post_and_one_by_hand_at_one_moment_never_choose_the_same_text(settings, scheduled):
    """The scheduler's 09:00 slot and `persona post poet` at the same moment: each chose its text
    against the posts already out, neither saw the other's, and the same text went out twice."""
    runner = Scheduler(poster_for(settings, sink_factory=lambda spec, s: SlowFile(spec, scheduled)),
                       redis.Redis.from_url(settings.redis_url.get_secret_value()))
    runner.tick(utc(2026, 1, 5, 8))
    by_hand = poster_for(settings, sink_factory=lambda spec, s: SlowFile(spec, scheduled))
    ticked, posted = _together(lambda: runner.tick(utc(2026, 1, 5, 9, 1)), lambda: by_hand.post("poet"))
    assert [o.status for o in ticked] == ["posted"] and posted.status == "posted"
    assert sorted(line["text"] for line in read_jsonl(scheduled)) == sorted(TEXTS[:2])


def test_scheduler_after_downtime_follows_the_policy(settings, scheduled, write_persona):
    runner = Scheduler(poster_for(settings), redis.Redis.from_url(settings.redis_url.get_secret_value()))
    runner.tick(utc(2026, 1, 5, 8))
    assert runner.tick(utc(2026, 1, 8, 12)) == []  # three days down, policy skip: nothing late
    assert not scheduled.exists()
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={
        "cron": "0 9 * * *", "timezone": "Europe/London", "missed": "latest", "enabled": True,
        "sinks": ["file:poet.jsonl"], "candidates": 3})
    runner.tick(utc(2026, 1, 8, 13))
    [late] = runner.tick(utc(2026, 1, 11, 12))
    assert late.status == "posted" and late.slot == "2026-01-11T09:00:00Z"
    assert [line["marker"] for line in read_jsonl(scheduled)] == ["poet:2026-01-11T09:00:00Z:file:poet.jsonl"]


def test_slots_skipped_after_a_long_downtime_are_said_in_one_line(settings, scheduled, caplog):
    """A month down: the scheduler's first tick logged "skipped missed slot …" once a slot,
    30 lines for a daily post (720 for an hourly one)."""
    runner = Scheduler(poster_for(settings), redis.Redis.from_url(settings.redis_url.get_secret_value()))
    runner.tick(utc(2026, 1, 5, 8))
    with caplog.at_level(logging.WARNING, logger="adapters.scheduler"):
        assert runner.tick(utc(2026, 2, 4, 12)) == []
    assert [r.getMessage() for r in caplog.records if r.name == "adapters.scheduler"] == [
        "poet: skipped 31 missed slots, 2026-01-05T09:00:00Z to 2026-02-04T09:00:00Z (policy skip)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adapters.scheduler"):
        runner.tick(utc(2026, 2, 5, 12))
    assert [r.getMessage() for r in caplog.records if r.name == "adapters.scheduler"] == [
        "poet: skipped missed slot 2026-02-05T09:00:00Z (policy skip)"]


def test_disabled_schedules_never_post(settings, write_persona, redis_client):
    write_persona("quiet", base="unused", adapters=["cli", "scheduler"],
                  schedule={"cron": "* * * * *", "sinks": ["file:quiet.jsonl"]})
    runner = Scheduler(poster_for(settings), redis_client)
    runner.tick(utc(2026, 1, 5, 8))
    assert runner.tick(utc(2026, 1, 5, 9)) == []


POET_SCHEDULE = {"cron": "0 9 * * *", "timezone": "Europe/London", "missed": "latest", "enabled": True,
                 "sinks": ["file:poet.jsonl"], "candidates": 3}


def _disabled(write_persona):
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={**POET_SCHEDULE, "enabled": False})


def _scheduler_adapter_removed(write_persona):
    write_persona("poet", base="unused", adapters=["cli"], schedule=POET_SCHEDULE)


def _file_broken(write_persona):
    path = write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule=POET_SCHEDULE)
    path.write_text("name = ")
    # Left broken, not caught mid-save: a long-running reader keeps a file's last good read
    # until a broken one has stood unchanged this long (the scheduler ticks every 30 s).
    os.utime(path, (time.time() - BROKEN_SETTLE_S,) * 2)


@pytest.mark.parametrize("turn_off", [_disabled, _scheduler_adapter_removed, _file_broken])
def test_a_schedule_turned_back_on_starts_afresh(settings, write_persona, redis_client, caplog, turn_off):
    """The checked mark stayed as it was while the schedule was off: turned back on a month
    later, at 20:00, that day's 09:00 slot went out at once (policy latest), and 29 days
    were logged as missed slots that were never due."""
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule=POET_SCHEDULE)
    out = settings.data_dir / "posts" / "poet.jsonl"
    runner = Scheduler(poster_for(settings), redis_client)
    runner.tick(utc(2026, 1, 5, 8))
    assert [o.status for o in runner.tick(utc(2026, 1, 5, 9, 1))] == ["posted"]
    turn_off(write_persona)
    assert runner.tick(utc(2026, 1, 6, 12)) == []
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule=POET_SCHEDULE)
    caplog.clear()  # why it stopped, said when it did
    with caplog.at_level(logging.INFO, logger="adapters.scheduler"):
        assert runner.tick(utc(2026, 2, 4, 20)) == []
    assert [r.getMessage() for r in caplog.records if r.name == "adapters.scheduler"] == [
        *(["poet: posted on schedule again"] if turn_off is not _disabled else []),
        "poet: schedule '0 9 * * *' (Europe/London) starts now"]
    assert [o.slot for o in runner.tick(utc(2026, 2, 5, 9, 1))] == ["2026-02-05T09:00:00Z"]
    assert [line["marker"] for line in read_jsonl(out)] == [
        "poet:2026-01-05T09:00:00Z:file:poet.jsonl", "poet:2026-02-05T09:00:00Z:file:poet.jsonl"]


def _daily_slot_five_hours_ago(write_persona, missed: str) -> tuple[datetime, datetime, dict]:
    """poet posting daily at the minute five hours ago, by the real clock (a file's times are
    real): now (to the minute), that slot today, and the schedule."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    slot = now - timedelta(hours=5)
    schedule = {**POET_SCHEDULE, "cron": f"{slot.minute} {slot.hour} * * *", "timezone": "UTC", "missed": missed}
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule=schedule)
    return now, slot, schedule


def _scheduler_said(caplog, tick) -> tuple[object, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adapters.scheduler"):
        done = tick()
    return done, [r.getMessage() for r in caplog.records if r.name == "adapters.scheduler"]


def test_a_scheduler_down_while_the_schedule_stayed_on_counts_the_slots_it_missed(
    settings, write_persona, redis_client, caplog
):
    """A scheduler that comes back counts the slots that went by while it was down."""
    now, slot, _ = _daily_slot_five_hours_ago(write_persona, "latest")
    Scheduler(poster_for(settings), redis_client).tick(now + timedelta(minutes=5))
    restarted = Scheduler(poster_for(settings), redis_client)
    done, said = _scheduler_said(caplog, lambda: restarted.tick(slot + timedelta(days=3, hours=2)))
    assert [(o.slot, o.status) for o in done] == [(slot_id(slot + timedelta(days=3)), "posted")]
    assert said[0] == (f"poet: skipped 2 missed slots, {slot_id(slot + timedelta(days=1))} to "
                       f"{slot_id(slot + timedelta(days=2))} (policy latest)")


def test_persona_files_written_again_while_the_scheduler_was_down_do_not_hide_the_downtime(
    settings, write_persona, redis_client, caplog
):
    """A deploy writes the persona files again (the same bytes: a new image, a checkout, a config
    map) before the scheduler starts: a rule that took a file's change for its schedule perhaps
    turned back on dropped the outage's slots, today's late post among them, with one INFO line."""
    now, slot, _ = _daily_slot_five_hours_ago(write_persona, "latest")
    Scheduler(poster_for(settings), redis_client).tick(now - timedelta(days=3))
    path = settings.personas_dirs[-1] / "poet.toml"
    path.write_bytes(path.read_bytes())
    restarted = Scheduler(poster_for(settings), redis_client)
    done, said = _scheduler_said(caplog, lambda: restarted.tick(now + timedelta(minutes=5)))
    assert [(o.slot, o.status) for o in done] == [(slot_id(slot), "posted")]
    assert said[0] == (f"poet: skipped 2 missed slots, {slot_id(slot - timedelta(days=2))} to "
                       f"{slot_id(slot - timedelta(days=1))} (policy latest)")


def test_a_scheduler_whose_folder_lacks_a_persona_leaves_its_clock_alone(settings, scheduled, redis_client, tmp_path):
    """Two schedulers shared one Redis, and the second's folder lacked 'poet' (another machine,
    a rolling deploy): each of its ticks dropped poet's checked mark, the first scheduler
    started poet's clock afresh at every tick, and poet never posted again."""
    here = Scheduler(poster_for(settings), redis_client)
    elsewhere = tmp_path / "other-machine-personas"
    elsewhere.mkdir()
    there = Scheduler(poster_for(settings, registry=PersonaRegistry([elsewhere])), redis_client)
    here.tick(utc(2026, 1, 5, 8))
    there.tick(utc(2026, 1, 5, 8, 30))
    there.tick(utc(2026, 1, 5, 8, 45))
    assert [o.status for o in here.tick(utc(2026, 1, 5, 9, 1))] == ["posted"]
    there.tick(utc(2026, 1, 6, 8, 30))
    assert [o.slot for o in here.tick(utc(2026, 1, 6, 9, 1))] == ["2026-01-06T09:00:00Z"]
    assert len(read_jsonl(scheduled)) == 2


def test_an_edit_that_stops_or_restarts_scheduled_posts_is_logged_once_when_it_happens(
    settings, write_persona, redis_client, caplog
):
    """Edited to adapters = ["cli"] while the scheduler ran, a persona's posts stopped and nothing
    was logged: only the start (``preflight``) said why a persona is not posted on."""
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule=POET_SCHEDULE)
    runner = Scheduler(poster_for(settings), redis_client)
    assert runner.preflight() == []

    def said_at(when: datetime) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="adapters.scheduler"):
            runner.tick(when)
        return [r.getMessage() for r in caplog.records if r.name == "adapters.scheduler" and "starts now" not in r.getMessage()]

    assert said_at(utc(2026, 1, 5, 8)) == []
    _scheduler_adapter_removed(write_persona)
    assert said_at(utc(2026, 1, 5, 8, 1)) == [('poet: not posted on schedule: schedule.enabled is true, but adapters '
                                               'does not list "scheduler" (it lists cli); add it to post on schedule')]
    assert said_at(utc(2026, 1, 5, 8, 2)) == []  # not again at every tick
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={**POET_SCHEDULE, "sinks": []})
    assert said_at(utc(2026, 1, 5, 8, 3)) == [('poet: not posted on schedule: schedule.enabled is true, but schedule.sinks '
                                               'is empty; name where the posts go, e.g. sinks = ["file:posts.jsonl"]')]
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule=POET_SCHEDULE)
    assert said_at(utc(2026, 1, 5, 8, 4)) == ["poet: posted on schedule again"]
    assert said_at(utc(2026, 1, 5, 8, 5)) == []
    _disabled(write_persona)
    assert said_at(utc(2026, 1, 5, 8, 6)) == ["poet: not posted on schedule: schedule.enabled is false now"]
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule=POET_SCHEDULE)
    assert said_at(utc(2026, 1, 5, 8, 7)) == []  # turned on: its "schedule ... starts now" says so
    _file_broken(write_persona)
    assert said_at(utc(2026, 1, 5, 8, 8)) == [("poet: not posted on schedule: its persona file is gone or cannot be read "
                                               "(`persona personas validate` says why)")]


def test_a_scheduler_behind_another_cannot_make_a_posted_slot_due_again(settings, scheduled, redis_client, caplog):
    """Each scheduler wrote its own ``now`` as the checked mark: one an hour behind set it
    back, and the other then found the slot it had posted due again at every tick ("done",
    then "skipped missed slot" for the rest of the hour)."""
    ahead, behind = (Scheduler(poster_for(settings), redis_client) for _ in range(2))
    ahead.tick(utc(2026, 1, 5, 8, 50))
    assert [o.status for o in ahead.tick(utc(2026, 1, 5, 9, 0, 30))] == ["posted"]
    with caplog.at_level(logging.INFO, logger="adapters.scheduler"):
        assert behind.tick(utc(2026, 1, 5, 8, 1)) == []
        assert ahead.tick(utc(2026, 1, 5, 9, 1)) == []
        assert ahead.tick(utc(2026, 1, 5, 9, 30)) == []
    assert [r.getMessage() for r in caplog.records if r.name == "adapters.scheduler"] == []
    assert len(read_jsonl(scheduled)) == 1


class _HourFast(datetime):
    """This machine's clock, an hour ahead of Redis's."""

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) + timedelta(hours=1)


def test_a_scheduler_on_a_fast_machine_posts_by_redis_time(settings, write_persona, redis_client, monkeypatch):
    """The scheduler went by its own machine's clock: one an hour fast posted a 09:00 slot at 08:00."""
    slot = (datetime.fromtimestamp(redis_client.time()[0], UTC) + timedelta(minutes=30)).replace(second=0)
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={
        **POET_SCHEDULE, "cron": f"{slot.minute} {slot.hour} * * *", "timezone": "UTC"})
    runner = Scheduler(poster_for(settings), redis_client)
    runner.tick()  # the clock starts, by Redis's time
    monkeypatch.setattr("adapters.scheduler.datetime", _HourFast)
    assert runner.tick() == []
    assert not (settings.data_dir / "posts" / "poet.jsonl").exists()


class Crash(BaseException):
    """The process dies here: nothing after it runs."""


class DiesAfterPosting:
    """A real sink whose process dies after the platform accepted the post, before the ledger heard."""

    def __init__(self, inner) -> None:
        self.inner, self.spec, self.platform, self.retry = inner, inner.spec, inner.platform, inner.retry
        self.posts = 0

    def post(self, text: str, marker: str) -> Posted:
        self.inner.post(text, marker)
        self.posts += 1
        raise Crash

    def find(self, marker: str, text: str) -> Posted | None:
        return self.inner.find(marker, text)


def test_crash_between_posted_and_recorded_checkable_sink(settings, scheduled):
    dying = poster_for(settings, sink_factory=lambda spec, s: DiesAfterPosting(make_sink(spec, s)))
    with pytest.raises(Crash):
        dying.post("poet", slot="2026-01-06T09:00:00Z")
    record = dying.ledger.record("poet", "2026-01-06T09:00:00Z")
    assert '"state": "intent"' in record["sink:file:poet.jsonl"]
    [written] = read_jsonl(scheduled)

    retry = poster_for(settings).post("poet", slot="2026-01-06T09:00:00Z")
    assert retry.status == "posted" and retry.text == written["text"]
    assert retry.sinks["file:poet.jsonl"]["id"] == written["id"]
    assert len(read_jsonl(scheduled)) == 1  # found, not posted again


class Remote(FileSink):
    """A platform that cannot be searched afterwards (like X): retry safety 'none'."""

    retry = "none"

    def find(self, marker: str, text: str) -> Posted | None:
        return None


def test_crash_with_an_unsearchable_sink_is_never_posted_twice(settings, scheduled):
    remote = Remote("x", scheduled)
    dying = poster_for(settings, sink_factory=lambda spec, s: DiesAfterPosting(remote))
    with pytest.raises(Crash):
        dying.post("poet", slot="2026-01-07T09:00:00Z")
    retry = poster_for(settings, sink_factory=lambda spec, s: remote).post("poet", slot="2026-01-07T09:00:00Z")
    assert retry.status == "uncertain" and "may have posted" in retry.message
    assert len(read_jsonl(scheduled)) == 1
    again = poster_for(settings, sink_factory=lambda spec, s: remote).post("poet", slot="2026-01-07T09:00:00Z")
    assert again.status == "uncertain" and len(read_jsonl(scheduled)) == 1


def test_crash_before_the_platform_call_posts_on_retry(settings, scheduled):
    class DiesBeforePosting(FileSink):
        def post(self, text, marker):
            raise Crash

    with pytest.raises(Crash):
        poster_for(settings, sink_factory=lambda spec, s: DiesBeforePosting(spec, scheduled)).post("poet", slot="2026-01-01T09:00:00Z")
    retry = poster_for(settings).post("poet", slot="2026-01-01T09:00:00Z")
    assert retry.status == "posted" and len(read_jsonl(scheduled)) == 1


def test_a_lost_lease_cannot_overwrite_the_new_owner(settings, scheduled, redis_client):
    first = PostLedger(redis_client, lease_s=0.2)
    second = PostLedger(redis_client)
    assert first.claim("poet", "s2").claimed
    assert second.claim("poet", "s2").outcome == "busy"
    time.sleep(0.3)
    assert second.claim("poet", "s2").claimed

    with pytest.raises(PostingError, match="lost the claim") as lost:
        first.save("poet", "s2", text="stale")
    assert "`persona posts uncertain` shows what is unfinished" in str(lost.value)  # not "another scheduler"
    second.save("poet", "s2", text="fresh")
    assert second.record("poet", "s2")["text"] == "fresh"


def test_a_text_checked_under_a_hold_that_ran_out_is_not_saved(redis_client, monkeypatch):
    """A poster whose hold on poet's text choice ran out mid-check (a stalled process) may find a
    text new that another has just chosen: it saves nothing, and so posts nothing."""
    import persona.ledger

    monkeypatch.setattr(persona.ledger, "CHOOSING_LEASE_MS", 100)
    stalled, other = PostLedger(redis_client), PostLedger(redis_client)
    assert stalled.claim("poet", "a").claimed and other.claim("poet", "b").claimed
    with stalled.choosing("poet") as held:
        time.sleep(0.2)
        with other.choosing("poet") as taken:
            other.save("poet", "b", choosing=taken, text="The same words.")
        with pytest.raises(PostingError, match="another poster may have chosen the same text meanwhile; nothing was posted"):
            stalled.save("poet", "a", choosing=held, text="The same words.")
    assert "text" not in stalled.record("poet", "a") and other.record("poet", "b")["text"] == "The same words."


def test_scheduler_rides_out_redis_being_down(settings, scheduled, caplog):
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    poster = Poster(settings, down, slow_candidates)
    runner = Scheduler(poster, down, clock=lambda: utc(2026, 1, 5, 9))
    thread = threading.Thread(target=runner.run)
    thread.start()
    time.sleep(1.5)
    runner.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert "retrying in" in caplog.text


def test_slot_ids_use_seconds_not_local_time():
    when = datetime(2026, 6, 1, 10, tzinfo=UTC) + timedelta(hours=1)
    assert slot_id(when.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Kolkata"))) == "2026-06-01T11:00:00Z"


def test_a_slot_held_by_a_dead_scheduler_is_posted_once_its_lease_runs_out(settings, scheduled, redis_client):
    dead = PostLedger(redis_client, lease_s=0.5)  # it claimed the slot, then its process was killed
    assert dead.claim("poet", "2026-01-05T09:00:00Z").claimed
    runner = Scheduler(poster_for(settings), redis.Redis.from_url(settings.redis_url.get_secret_value()))
    runner.tick(utc(2026, 1, 5, 8))
    [held] = runner.tick(utc(2026, 1, 5, 9, 1))
    assert held.status == "busy" and not scheduled.exists()
    # Not "being posted by another scheduler right now": it may be dead, and holds the slot only so long.
    assert held.message == ("slot 2026-01-05T09:00:00Z of poet is held by another poster (a scheduler, `persona post` or "
                            "`persona posts approve`), at work or stopped mid-post; its claim runs out in 1 s "
                            "(posting.lease_s); the scheduler takes it at its first tick after that")
    time.sleep(0.6)
    [posted] = runner.tick(utc(2026, 1, 5, 9, 2))
    assert posted.status == "posted" and posted.slot == "2026-01-05T09:00:00Z"
    assert runner.tick(utc(2026, 1, 5, 9, 3)) == [] and len(read_jsonl(scheduled)) == 1


class KilledMidPost(FileSink):
    """The process is killed while the platform call is under way: no cleanup runs at all."""

    def post(self, text: str, marker: str) -> Posted:
        os._exit(1)


def _tick_and_die(settings: Settings, scheduled: Path, at: datetime) -> None:
    poster = poster_for(settings, sink_factory=lambda spec, s: KilledMidPost(spec, scheduled))
    Scheduler(poster, poster.ledger.redis).tick(at)


def _died_mid_post_at_nine(settings: Settings, scheduled: Path) -> Scheduler:
    """A scheduler that began 2026-01-05's 09:00 slot (its text chosen) and died posting it;
    the restarted one that looked last at 08:00, returned once the dead one's lease ran out.

    That lease is 0.5 s here (by default 10 minutes from its platform call): it can run
    out after the 15 minutes' grace, so the slot is late by the time anyone may take it."""
    import multiprocessing

    settings.posting = settings.posting.model_copy(update={"lease_s": 0.5})
    restarted = Scheduler(poster_for(settings), redis.Redis.from_url(settings.redis_url.get_secret_value()))
    restarted.tick(utc(2026, 1, 5, 8))
    dying = multiprocessing.get_context("fork").Process(target=_tick_and_die, args=(settings, scheduled, utc(2026, 1, 5, 9, 5)))
    dying.start()
    dying.join(20)
    assert dying.exitcode == 1 and not scheduled.exists()
    time.sleep(0.6)
    return restarted


def test_a_slot_begun_on_time_is_finished_after_a_crash_however_late(settings, scheduled):
    restarted = _died_mid_post_at_nine(settings, scheduled)
    [finished] = restarted.tick(utc(2026, 1, 5, 9, 16))
    assert finished.status == "posted" and finished.slot == "2026-01-05T09:00:00Z" and finished.text == TEXTS[0]
    assert [line["marker"] for line in read_jsonl(scheduled)] == ["poet:2026-01-05T09:00:00Z:file:poet.jsonl"]
    assert restarted.tick(utc(2026, 1, 5, 9, 17)) == []


def test_a_slot_whose_poster_died_mid_post_is_listed_for_a_person_once_its_claim_is_gone(settings, scheduled, redis_client):
    """An intent in a slot still open was never listed ("the scheduler finishes it"), though
    only the scheduler's own slots are finished by it, and only once the dead one's claim is gone."""
    dead = PostLedger(redis_client, lease_s=0.3)  # what a poster killed mid-post leaves: claim, text, intent
    for slot in ("2026-01-05T09:00:00Z", "manual-2026-01-05T10:00:00.000000Z"):
        assert dead.claim("poet", slot).claimed
        dead.save("poet", slot, text=TEXTS[0], sinks='["file:poet.jsonl"]')
        dead.set_sink("poet", slot, "file:poet.jsonl", SinkEntry(state="intent", marker=f"poet:{slot}:file:poet.jsonl"))
    ledger = PostLedger(redis_client)
    # The scheduler's slot is a post under way while claimed; `persona post`'s own is nobody else's to finish.
    [manual] = ledger.unsettled()
    assert (manual["slot"], manual["state"], manual["command"]) == (
        "manual-2026-01-05T10:00:00.000000Z", "intent", "persona post poet --slot manual-2026-01-05T10:00:00.000000Z")
    assert manual["held_s"] == "1" and manual["error"] == "its poster stopped before the platform answered"
    time.sleep(0.4)
    assert [(u["slot"], u["command"], u["held_s"]) for u in ledger.unsettled()] == [
        ("2026-01-05T09:00:00Z", "persona post poet --slot 2026-01-05T09:00:00Z", "0"),
        ("manual-2026-01-05T10:00:00.000000Z", "persona post poet --slot manual-2026-01-05T10:00:00.000000Z", "0"),
    ]
    # Finished: the scheduler's at its next tick, the other by hand; then nothing is left to list.
    runner = Scheduler(poster_for(settings), redis_client)
    runner.tick(utc(2026, 1, 5, 8))
    [finished] = runner.tick(utc(2026, 1, 5, 9, 1))
    assert finished.status == "posted" and finished.slot == "2026-01-05T09:00:00Z"
    assert poster_for(settings).post("poet", slot="manual-2026-01-05T10:00:00.000000Z").status == "posted"
    assert ledger.unsettled() == [] and [line["text"] for line in read_jsonl(scheduled)] == [TEXTS[0], TEXTS[0]]


def test_a_begun_slot_is_finished_even_when_a_newer_one_fell_due_meanwhile(settings, scheduled):
    """The newest due slot is not the begun one: it used to be skipped with the others."""
    restarted = _died_mid_post_at_nine(settings, scheduled)
    [finished] = restarted.tick(utc(2026, 1, 6, 9, 1))  # a day later: the next slot is due too
    assert finished.status == "posted" and finished.slot == "2026-01-05T09:00:00Z" and finished.text == TEXTS[0]
    [today] = restarted.tick(utc(2026, 1, 6, 9, 2))  # the next tick: today's, within its grace
    assert today.status == "posted" and today.slot == "2026-01-06T09:00:00Z"


def test_stopping_ends_a_wait_for_candidates_and_leaves_the_slot_due(settings, scheduled, redis_client):
    from adapters.posting.candidates import QueueCandidates
    from persona.queue import QueueClient

    stopping = threading.Event()
    candidates = QueueCandidates(QueueClient(redis_client, settings.queue), 60.0, stopping=stopping)
    runner = Scheduler(Poster(settings, redis_client, candidates), redis_client, stopping=stopping)
    runner.tick(utc(2026, 1, 5, 8))
    threading.Timer(0.5, runner.stop).start()  # no worker runs: only the stop ends the wait
    started = time.monotonic()
    assert runner.tick(utc(2026, 1, 5, 9, 1)) == []
    assert time.monotonic() - started < 10
    assert redis_client.hget("persona:scheduler:checked", "poet") == str(utc(2026, 1, 5, 8).timestamp()).encode()
    assert redis_client.exists("persona:post-lock:poet:2026-01-05T09:00:00Z") == 0


def test_a_wall_clock_stepped_back_does_not_lengthen_the_wait_for_candidates(settings, scheduled, redis_client,
                                                                             monkeypatch):
    """The wait was timed by the wall clock: stepped back an hour, it held the scheduler (and
    every persona after this one) an hour past posting.wait_s."""
    from adapters.posting import candidates as module
    from persona.queue import QueueClient

    monkeypatch.setattr(module, "WAIT_SLACK_S", 0.5)  # the queue's slack, shortened for the test
    monkeypatch.setattr(module, "time", SteppedBack())
    stopping = threading.Event()
    wait = module.QueueCandidates(QueueClient(redis_client, settings.queue), 1.0, stopping=stopping)
    persona = Poster(settings, redis_client, slow_candidates).registry.get("poet")
    timer = threading.Timer(20, stopping.set)  # ends a wait the stepped clock would hold a minute
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(ReplyTimeout):  # no worker runs
            wait(persona, 2, seed=1)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5


def test_a_queue_full_midway_withdraws_the_candidates_already_submitted(settings, write_persona, redis_client):
    from adapters.posting.candidates import QueueCandidates
    from persona.contract import GenerationRequest
    from persona.errors import QueueBusy
    from persona.personas import PersonaRegistry
    from persona.queue import QueueClient

    write_persona("poet", base="unused", adapters=["cli", "scheduler"])
    settings.queue.max_length = 5
    for _ in range(3):
        redis_client.xadd(keys.STREAM_BATCH, {"r": b"{}"})  # other batch work already waiting: room for two
    candidates = QueueCandidates(QueueClient(redis_client, settings.queue), 300.0)
    with pytest.raises(QueueBusy):
        candidates(PersonaRegistry.from_settings(settings).get("poet"), 8, seed=1)
    submitted = [GenerationRequest.from_json(fields[b"r"]) for _, fields in redis_client.xrange(keys.STREAM_BATCH)[3:]]
    assert len(submitted) == 2
    assert all(redis_client.exists(keys.cancel_key(request.id)) for request in submitted)  # no worker will generate them


def _post_in_a_process(settings: Settings, slot: str, start_at: float) -> None:
    poster = poster_for(settings)
    time.sleep(max(0.0, start_at - time.time()))
    poster.post("poet", slot=slot)


def test_four_scheduler_processes_post_a_slot_once(settings, scheduled):
    import multiprocessing

    context = multiprocessing.get_context("fork")  # each child inherits the settings as they are
    start_at = time.time() + 1.0
    workers = [
        context.Process(target=_post_in_a_process, args=(settings, "2026-01-09T09:00:00Z", start_at))
        for _ in range(4)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(20)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    assert len(read_jsonl(scheduled)) == 1


def test_redis_refusing_writes_is_logged_once_not_as_a_traceback_at_every_tick(
    settings, scheduled, own_redis, tmp_path, caplog, monkeypatch
):
    """On a full disk Redis refuses every change: the scheduler logged "scheduler tick failed"
    with a whole traceback at every tick, and never said that Redis refused writes."""
    import adapters.scheduler as scheduler_module
    from tests.test_monitoring import redis_unable_to_save

    monkeypatch.setattr(scheduler_module, "MAX_BACKOFF_S", 0.1)  # ticks tried again ten times a second
    _, _, client = own_redis
    runner = Scheduler(Poster(settings, client, slow_candidates), client)
    ticking = threading.Thread(target=runner.run, daemon=True)
    with caplog.at_level(logging.INFO, logger="adapters.scheduler"):
        with redis_unable_to_save(client, tmp_path / "gone"):
            ticking.start()
            time.sleep(1.0)  # some ten ticks refused
            assert client.hget(keys.SCHEDULER_CHECKED_KEY, "poet") is None  # nothing could be marked
        deadline = time.monotonic() + 10
        while client.hget(keys.SCHEDULER_CHECKED_KEY, "poet") is None:  # it ticks again, once Redis saves
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        runner.stop()
        ticking.join(timeout=10)
    said = [r for r in caplog.records if r.name == "adapters.scheduler"]
    refused = [r.getMessage() for r in said if "Redis refuses writes" in r.getMessage()]
    assert len(refused) == 1, refused
    assert refused[0].startswith("scheduler tick failed, as Redis refuses writes: Redis cannot write its data to disk "
                                 "(full, or not writable)")
    assert not any(r.exc_info for r in said), caplog.text  # no traceback
    assert "Redis takes changes again: the scheduler posts again" in [r.getMessage() for r in said]


def test_a_slot_exactly_the_grace_period_late_is_still_on_time():
    """posting.grace_s is how late a slot may be and still count as on time: at exactly that,
    it is posted, not skipped; with a grace of 0, a slot looked at on its very second is posted."""
    slot = utc(2026, 1, 3, 9)
    at_the_edge = plan_slots([slot], slot + timedelta(seconds=900), "skip", grace_s=900)
    assert at_the_edge.post == slot and not at_the_edge.late
    assert plan_slots([slot], slot, "skip", grace_s=0).post == slot
    assert plan_slots([slot], slot + timedelta(seconds=901), "skip", grace_s=900).post is None


def test_the_slots_a_person_may_still_name_are_the_three_newest_the_scheduler_would_post():
    """After a long outage with a wide grace, `--slot` is offered the newest slots the scheduler
    would still post, newest first, three at most (not every hour of the day)."""
    from adapters.posting.slots import catching_up

    now = utc(2026, 1, 3, 12, 30)
    assert catching_up("0 * * * *", "UTC", "skip", 86400, now) == [utc(2026, 1, 3, h) for h in (12, 11, 10)]
    assert catching_up("0 * * * *", "UTC", "skip", 86400, now, most=1) == [utc(2026, 1, 3, 12)]


def test_a_slot_named_at_its_very_instant_may_be_posted():
    """A slot has come at its own instant: naming it then is naming a slot on time, not one
    "past the scheduler's catch-up"."""
    from adapters.posting.slots import check_catching_up

    slot = utc(2026, 1, 3, 9)
    assert check_catching_up("2026-01-03T09:00", slot_id(slot), "0 9 * * *", "UTC", "skip", 900, now=slot) is None


def test_a_slot_named_in_the_hour_the_clocks_skip_is_told_so():
    """01:30 never happens in London on the day the clocks go forward: naming it is told why,
    with the slots the schedule has that day, not that it is off the schedule."""
    from adapters.posting.slots import resolve_slot
    from persona.errors import PostingError

    with pytest.raises(PostingError, match=r"does not happen in Europe/London \(the clocks go forward then\)"):
        resolve_slot("2026-03-29T01:30", "30 1 * * *", "Europe/London", now=utc(2026, 4, 1))


def test_with_missed_latest_only_the_newest_late_slot_may_still_be_named():
    """schedule.missed = "latest" posts the newest slot however late, and only it: older late
    slots are skipped, so they are not offered to `--slot` either."""
    from adapters.posting.slots import catching_up

    now = utc(2026, 1, 3, 12, 30)  # every slot is more than the 900 s grace late
    assert catching_up("0 * * * *", "UTC", "latest", 900, now) == [utc(2026, 1, 3, 12)]
    assert catching_up("0 * * * *", "UTC", "skip", 900, now) == []
