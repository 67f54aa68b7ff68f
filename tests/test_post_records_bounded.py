"""Post records that cannot matter any more expire, and the readers of open slots read only those
that still can: every post and every dashboard refresh read all of a persona's records (a SCAN of
the whole keyspace and a round trip each), and none ever expired, so a year of hourly posts took
seconds inside the 30 s text-choice hold."""

from __future__ import annotations

import redis

from adapters.posting.poster import Poster
from persona import constants as keys
from persona.ledger import (
    CLOSED_RECORD_KEPT_S,
    PostLedger,
    SinkEntry,
    closed_record_ttl_s,
)
from persona.settings import Settings

DAY_S = 24 * 3600
TEXT = "Attend to the small things; the large ones are made of them."


def close(ledger: PostLedger, persona: str, slot: str, state: str, **sinks: str) -> None:
    """A slot posted (or tried) to ``sinks`` (spec -> sink state), then closed in ``state``."""
    assert ledger.claim(persona, slot).claimed
    ledger.save(persona, slot, text=f"{TEXT} ({slot})")
    for spec, sink_state in sinks.items():
        ledger.set_sink(persona, slot, spec, SinkEntry(state=sink_state, marker=f"{persona}:{slot}:{spec}"))
    ledger.finish(persona, slot, state)


def begin(ledger: PostLedger, persona: str, slot: str) -> None:
    """A slot whose text is chosen and saved, its poster at work (or stopped mid-post)."""
    assert ledger.claim(persona, slot).claimed
    ledger.save(persona, slot, text=f"{TEXT} ({slot})")


def ttl_s(client: redis.Redis, persona: str, slot: str) -> int:
    return client.ttl(keys.post_record_key(persona, slot))


def open_set(client: redis.Redis, persona: str) -> set[str]:
    return {slot.decode() for slot in client.smembers(keys.post_open_key(persona))}


def scans(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_a_slot_closed_for_good_expires_and_one_that_still_matters_is_kept(redis_client):
    """Posted, rejected, expired or failed with every sink answered: nothing may post the slot again
    once its grace period is over, so its record goes 30 days on. Open, waiting for approval, or with a
    sink that never answered: a person (or a retry) still needs it, and it never expires."""
    ledger = PostLedger(redis_client)
    close(ledger, "sage", "manual-2026-03-01T09:00:00.000000Z", "posted", mastodon="posted")
    close(ledger, "sage", "manual-2026-03-01T10:00:00.000000Z", "rejected")
    close(ledger, "sage", "manual-2026-03-01T11:00:00.000000Z", "failed", mastodon="failed")
    close(ledger, "sage", "manual-2026-03-01T12:00:00.000000Z", "failed", mastodon="posted", x="rate_limited")
    for slot in ("manual-2026-03-01T09:00:00.000000Z", "manual-2026-03-01T10:00:00.000000Z",
                 "manual-2026-03-01T11:00:00.000000Z", "manual-2026-03-01T12:00:00.000000Z"):
        assert CLOSED_RECORD_KEPT_S - 60 < ttl_s(redis_client, "sage", slot) <= CLOSED_RECORD_KEPT_S, slot

    close(ledger, "sage", "manual-2026-03-02T09:00:00.000000Z", "uncertain", x="uncertain")
    close(ledger, "sage", "manual-2026-03-02T10:00:00.000000Z", "failed", mastodon="intent")
    close(ledger, "sage", "manual-2026-03-02T11:00:00.000000Z", "pending")
    begin(ledger, "sage", "manual-2026-03-02T12:00:00.000000Z")
    kept = {"manual-2026-03-02T09:00:00.000000Z", "manual-2026-03-02T10:00:00.000000Z",
            "manual-2026-03-02T11:00:00.000000Z", "manual-2026-03-02T12:00:00.000000Z"}
    assert {slot: ttl_s(redis_client, "sage", slot) for slot in kept} == dict.fromkeys(kept, -1)
    assert open_set(redis_client, "sage") == kept  # what the readers read, and nothing else
    assert ledger.open_texts("sage") == {"manual-2026-03-02T12:00:00.000000Z": f"{TEXT} (manual-2026-03-02T12:00:00.000000Z)"}
    assert {(u["slot"], u["sink"], u["state"]) for u in ledger.unsettled("sage")} == {
        ("manual-2026-03-02T09:00:00.000000Z", "x", "uncertain"), ("manual-2026-03-02T10:00:00.000000Z", "mastodon", "intent")}


def test_a_post_made_by_the_poster_leaves_a_record_that_expires(settings: Settings, write_persona, redis_client):
    """`persona post sage --text ...` left a 1 KB record with no expiry, and a post with no candidate
    a "failed" one: one a post, for good."""
    write_persona("sage", base="unused", schedule={"sinks": ["file:sage.jsonl"], "candidates": 1})
    poster = Poster(settings, redis_client, lambda persona, n, seed: [])  # nothing generated: no candidate
    posted = poster.post("sage", text=TEXT)
    assert posted.status == "posted"
    assert CLOSED_RECORD_KEPT_S - 60 < ttl_s(redis_client, "sage", posted.slot) <= CLOSED_RECORD_KEPT_S
    nothing = poster.post("sage")
    assert nothing.status == "no_candidate"
    assert CLOSED_RECORD_KEPT_S - 60 < ttl_s(redis_client, "sage", nothing.slot) <= CLOSED_RECORD_KEPT_S
    assert open_set(redis_client, "sage") == set()


def test_the_newest_closed_scheduled_slot_keeps_its_record(redis_client):
    """With schedule.missed = "latest" the newest slot is posted however late (a monthly schedule's,
    a month on): its record is what says it was. Each older one expires once a newer one closes."""
    ledger = PostLedger(redis_client)
    close(ledger, "sage", "2026-02-01T09:00:00Z", "posted", mastodon="posted")
    assert ttl_s(redis_client, "sage", "2026-02-01T09:00:00Z") == -1
    close(ledger, "sage", "2026-03-01T09:00:00Z", "posted", mastodon="posted")
    assert ttl_s(redis_client, "sage", "2026-03-01T09:00:00Z") == -1
    assert ttl_s(redis_client, "sage", "2026-02-01T09:00:00Z") > 0
    close(ledger, "sage", "2026-01-01T09:00:00Z", "failed", mastodon="failed")  # an older one closed late
    assert ttl_s(redis_client, "sage", "2026-01-01T09:00:00Z") > 0
    close(ledger, "sage", "manual-2026-04-01T09:00:00.000000Z", "posted", mastodon="posted")  # no scheduled slot
    assert ttl_s(redis_client, "sage", "2026-03-01T09:00:00Z") == -1
    assert ledger.claim("sage", "2026-03-01T09:00:00Z").outcome == "done"


def test_a_closed_record_outlives_twice_the_grace_period(redis_client):
    """A slot is posted again (by the scheduler, or by `persona post --slot`) only within
    posting.grace_s of its time: with a grace of 40 days, its record is kept 80."""
    assert closed_record_ttl_s(900) == CLOSED_RECORD_KEPT_S
    ledger = PostLedger(redis_client, grace_s=40 * DAY_S)
    close(ledger, "sage", "manual-2026-03-01T09:00:00.000000Z", "posted", mastodon="posted")
    assert 80 * DAY_S - 60 < ttl_s(redis_client, "sage", "manual-2026-03-01T09:00:00.000000Z") <= 80 * DAY_S


def test_a_failed_slot_tried_again_is_kept_while_it_is_under_way(redis_client):
    """A failed slot's record was set to expire; tried again, its sink's intent keeps it (the retry
    may be out there), and closed again it expires again."""
    ledger = PostLedger(redis_client)
    slot = "manual-2026-03-01T09:00:00.000000Z"
    close(ledger, "sage", slot, "failed", mastodon="rate_limited")
    assert ttl_s(redis_client, "sage", slot) > 0
    assert ledger.claim("sage", slot).claimed
    ledger.set_sink("sage", slot, "mastodon", SinkEntry(state="intent", marker="m"))
    assert ttl_s(redis_client, "sage", slot) == -1 and open_set(redis_client, "sage") == {slot}
    ledger.record_post("sage", slot, "mastodon", SinkEntry(state="intent", marker="m", id="1"), TEXT)
    ledger.finish("sage", slot, "posted")
    assert ttl_s(redis_client, "sage", slot) > 0 and open_set(redis_client, "sage") == set()


def test_neither_reader_scans_the_records(redis_client):
    """`open_texts` (each post's text choice, inside the hold) and `unsettled` (the dashboard every
    15 s) scanned the whole keyspace and read every record of the persona's: now they read its open
    slots only, however many closed ones there are."""
    ledger = PostLedger(redis_client)
    for hour in range(40):
        close(ledger, "sage", f"2026-03-01T{hour // 2:02d}:{hour % 2 * 30:02d}:00Z", "posted", mastodon="posted")
    begin(ledger, "sage", "2026-03-02T09:00:00Z")
    close(ledger, "poet", "2026-03-02T09:00:00Z", "uncertain", x="uncertain")
    ledger.unsettled()  # the sets are built (nothing to build here): from now on, nothing scans
    redis_client.config_resetstat()
    assert list(ledger.open_texts("sage")) == ["2026-03-02T09:00:00Z"]
    assert [(u["persona"], u["slot"]) for u in ledger.unsettled()] == [("poet", "2026-03-02T09:00:00Z")]
    assert [(u["persona"], u["slot"]) for u in ledger.unsettled("poet")] == [("poet", "2026-03-02T09:00:00Z")]
    with ledger.choosing("sage"):
        pass
    assert scans(redis_client) == 0
    assert open_set(redis_client, "sage") == {"2026-03-02T09:00:00Z"}


def test_records_written_before_the_open_sets_are_found_by_the_first_reader(redis_client):
    """After an upgrade, the records an older service left have no place in any open set: the
    first reader puts them there (once), so an open or uncertain slot is still seen, and gives
    those closed for good their expiry."""
    def old_record(persona: str, slot: str, state: str, **sinks: str) -> None:
        fields = {"state": state, "text": f"{TEXT} ({slot})", "updated": "1772355600.0"}
        fields |= {f"sink:{spec}": SinkEntry(state=s, marker="m").to_json() for spec, s in sinks.items()}
        redis_client.hset(keys.post_record_key(persona, slot), mapping=fields)

    for day in range(1, 21):
        old_record("sage", f"2026-01-{day:02d}T09:00:00Z", "posted", mastodon="posted")
    old_record("sage", "2026-02-01T09:00:00Z", "", mastodon="intent")  # stopped mid-post, its claim gone
    old_record("poet", "manual-2026-02-01T09:00:00.000000Z", "uncertain", x="uncertain")
    old_record("poet", "2026-02-02T09:00:00Z", "pending")
    ledger = PostLedger(redis_client)

    assert ledger.open_texts("sage") == {"2026-02-01T09:00:00Z": f"{TEXT} (2026-02-01T09:00:00Z)"}
    assert open_set(redis_client, "sage") == {"2026-02-01T09:00:00Z"}
    assert open_set(redis_client, "poet") == {"manual-2026-02-01T09:00:00.000000Z", "2026-02-02T09:00:00Z"}
    assert {(u["persona"], u["slot"], u["state"]) for u in ledger.unsettled()} == {
        ("sage", "2026-02-01T09:00:00Z", "intent"), ("poet", "manual-2026-02-01T09:00:00.000000Z", "uncertain")}
    expiring = [day for day in range(1, 21) if ttl_s(redis_client, "sage", f"2026-01-{day:02d}T09:00:00Z") > 0]
    assert expiring == list(range(1, 20))  # all but the newest closed scheduled slot
    assert ttl_s(redis_client, "sage", "2026-02-01T09:00:00Z") == -1

    redis_client.config_resetstat()
    PostLedger(redis_client).unsettled()  # built once, by whichever reader came first
    assert scans(redis_client) == 0


def test_a_slot_whose_approval_lapsed_unanswered_is_closed_by_the_next_look(redis_client):
    """A post nobody approved waited in its slot's record for good (approvals lapse after 30 days,
    and nothing claims a past slot again): the next look at the open slots closes it as expired."""
    ledger = PostLedger(redis_client)
    slot = "2026-03-01T09:00:00Z"
    assert ledger.claim("sage", slot).claimed
    ledger.save("sage", slot, text=TEXT, approval="a1b2c3")
    ledger.finish("sage", slot, "pending")
    redis_client.set(keys.approval_key("a1b2c3"), "waiting")
    assert ledger.unsettled() == [] and open_set(redis_client, "sage") == {slot}  # still waiting: kept
    redis_client.delete(keys.approval_key("a1b2c3"))  # lapsed
    assert ledger.unsettled() == []
    assert ledger.record("sage", slot)["state"] == "expired" and open_set(redis_client, "sage") == set()


def test_readers_still_answer_where_redis_refuses_the_writes_that_build_the_sets(redis_client, caplog):
    """Redis refusing writes (here: no replica in step, NOREPLICAS) the first time a reader looks:
    it reads every record, as before, rather than fail (the dashboard would show Redis down)."""
    redis_client.hset(keys.post_record_key("sage", "2026-02-01T09:00:00Z"),
                      mapping={"state": "uncertain", "text": TEXT, "sink:x": SinkEntry(state="uncertain", marker="m").to_json()})
    redis_client.config_set("min-replicas-to-write", 1)
    try:
        listed = PostLedger(redis_client).unsettled()
    finally:
        redis_client.config_set("min-replicas-to-write", 0)
    assert [(u["slot"], u["state"]) for u in listed] == [("2026-02-01T09:00:00Z", "uncertain")]
    assert "every post record is read instead" in caplog.text
    assert not redis_client.exists(keys.POST_OPEN_BUILT_KEY)
    assert [(u["slot"], u["state"]) for u in PostLedger(redis_client).unsettled()] == [("2026-02-01T09:00:00Z", "uncertain")]
    assert redis_client.exists(keys.POST_OPEN_BUILT_KEY)
