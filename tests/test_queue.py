"""The queue contract over a real Redis: busy refusal, once-only replies, reclaim, dead letters."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from persona import constants as keys
from persona.contract import (
    ErrorKind,
    GenerationReply,
    GenerationRequest,
    Message,
    Priority,
    Timings,
)
from persona.errors import InvalidRequest, QueueBusy, ReplyTimeout
from persona.queue import AsyncQueueClient, Job, QueueClient, WorkQueue
from persona.telemetry import Tally, record_replies
from persona.validation import LATEST_DEADLINE_AFTER_S


def chat(text: str = "hi", **kwargs) -> GenerationRequest:
    return GenerationRequest(persona="sage", messages=[Message(role="user", content=text)], **kwargs)


def test_request_survives_the_trip_intact(client, work):
    sent = client.submit(chat("what is patience?", user="u1", source="test"))
    [job] = work.claim("w1", 10, block_ms=100)
    assert job.request == sent
    assert job.request.deadline > time.time()  # the queue's default deadline was stamped


def test_a_claim_takes_interactive_work_first_and_fills_its_room_with_batch_work(client, work):
    batch = [client.submit(chat(f"batch {n}", priority=Priority.batch)) for n in range(3)]
    interactive = [client.submit(chat(f"chat {n}")) for n in range(2)]
    first = work.claim("w1", 3, block_ms=0)
    assert [j.request.id for j in first] == [r.id for r in [*interactive, batch[0]]]
    assert [j.stream for j in first] == [keys.STREAM_INTERACTIVE] * 2 + [keys.STREAM_BATCH]
    assert [j.request.id for j in work.claim("w1", 3, block_ms=0)] == [r.id for r in batch[1:]]
    assert work.claim("w1", 3, block_ms=0) == [] and work.drained


def test_full_stream_refuses_with_busy_and_keeps_what_it_has(settings, client):
    settings.queue.max_length = 3
    for _ in range(3):
        client.submit(chat())
    with pytest.raises(QueueBusy, match="the queue is full"):
        client.submit(chat())
    # batch work has its own room: a full chat stream does not block posts
    client.submit(chat(priority=Priority.batch))
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 3


def test_a_batch_refused_part_way_says_exactly_which_requests_were_queued(settings, client, work):
    """submit_many raised a bare QueueBusy at the first refusal ("you already have 1 requests
    waiting"): the caller could not tell that requests after it were queued (another
    sender's, or room a worker made), nor which to send again."""
    settings.queue.max_length = 3
    settings.queue.max_pending_per_user = 1
    sent = [chat(f"m{n}", user=user) for n, user in enumerate(["ann", "ann", "bob", "cy", "dee"])]
    with pytest.raises(QueueBusy) as refused:
        client.submit_many(sent)
    busy = refused.value
    assert [r.id for r in busy.queued] == [sent[0].id, sent[2].id, sent[3].id]
    assert [r.id for r in busy.refused] == [sent[1].id, sent[4].id]
    assert all(r.deadline for r in busy.queued)  # stamped: ready to wait on
    said = str(busy)
    assert said.startswith("3 of 5 requests were queued and 2 refused")
    assert "request 2: you already have 1 request waiting" in said and "request 5: the queue is full" in said
    jobs = work.claim("w1", 10, block_ms=0)
    assert [job.request.id for job in jobs] == [r.id for r in busy.queued]
    work.deliver([(job, GenerationReply(id=job.request.id, ok=True)) for job in jobs], "w1")
    assert [r.id for r in client.submit_many(busy.refused)] == [sent[1].id, sent[4].id]  # room again


def test_a_batch_with_an_invalid_request_queues_none_and_names_it(settings, client):
    sent = [chat("fine"), chat(""), chat("fine too")]
    with pytest.raises(InvalidRequest, match=rf"request 2 of 3 \(id {sent[1].id}\): .*none of them was queued"):
        client.submit_many(sent)
    assert client.redis.exists(keys.STREAM_INTERACTIVE) == 0 or client.redis.xlen(keys.STREAM_INTERACTIVE) == 0


def test_invalid_requests_are_refused_before_queueing(settings, client):
    settings.queue.max_message_chars = 10
    with pytest.raises(InvalidRequest, match="at most 10"):
        client.submit(chat("x" * 11))
    with pytest.raises(InvalidRequest, match="empty"):
        client.submit(chat("   "))
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 0


def test_a_system_message_is_refused_not_dropped(client):
    """The prompt never had a place for it: it was dropped without a word, and the persona
    answered as if the caller's instruction had not been sent."""
    request = GenerationRequest(persona="sage", messages=[Message(role="system", content="Answer in French."),
                                                          Message(role="user", content="hi")])
    with pytest.raises(InvalidRequest, match=r"cannot carry a system message: a persona's system prompt is prompt.system"):
        client.submit(request)


def test_control_characters_are_stripped():
    request = chat("hel\x00lo\x1b[31m\n")
    assert request.messages[0].content == "hello[31m\n"


def test_half_an_emoji_is_replaced_and_the_request_queued(client, work):
    """A client that cuts an emoji's UTF-16 pair in two (JSON "\\ud83d") sends a lone
    surrogate: it passed the checks and then failed to serialise when submitted."""
    cut = json.loads('"patience \\ud83d"')
    sent = client.submit(chat(cut))
    [job] = work.claim("w", 10, block_ms=100)
    assert job.request.messages[0].content == sent.messages[0].content == "patience \ufffd"


def test_reply_is_delivered_once_even_if_two_workers_answer(client, work):
    request = client.submit(chat())
    [job] = work.claim("w1", 10, block_ms=100)
    first = GenerationReply(id=request.id, ok=True, text="first")
    second = GenerationReply(id=request.id, ok=True, text="second")
    assert work.deliver([(job, first)], "w1") == 1
    assert work.deliver([(job, second)], "w2") == 0
    assert client.wait(request, timeout=1).text == "first"
    assert client.redis.llen(keys.reply_key(request.id)) == 1  # one reply (read, and left until the next call)
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 0  # settled entries are deleted
    assert int(client.redis.hget(keys.STATS_KEY, "completed")) == 1


def test_an_answered_mark_lasts_until_its_request_is_over_not_a_day(settings, client, work):
    """Every request left its "answered" mark for 24 h whatever its deadline: about 110
    bytes each, 1 GB of Redis at 100 requests a second. It lasts for the reply's TTL, or
    a minute past the request's deadline where that is later, and still answers once."""
    settings.queue.reply_ttl_s = 600
    chat_request = client.submit(chat("a chat: the default deadline, 120 s"))
    long_request = client.submit(chat("a long batch", deadline=time.time() + 3600))
    doomed = client.submit(chat("set aside"))
    chat_job, long_job, doomed_job = work.claim("w1", 10, block_ms=100)
    for job in (chat_job, long_job):
        assert work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text="first"))], "w1") == 1
    work.dead_letter(doomed_job, "it crashed every worker", 3, "w1")
    mark_ttl = {r.id: client.redis.ttl(keys.answered_key(r.id)) for r in (chat_request, long_request, doomed)}
    assert 590 <= mark_ttl[chat_request.id] <= 600 and 590 <= mark_ttl[doomed.id] <= 600, mark_ttl
    assert 3650 <= mark_ttl[long_request.id] <= 3660, mark_ttl
    # What the mark guards: a second worker's answer (a reclaimed entry) is dropped, and a
    # submission sent again (a dropped connection) queues nothing.
    assert work.deliver([(chat_job, GenerationReply(id=chat_request.id, ok=True, text="second"))], "w2") == 0
    assert client.wait(chat_request, timeout=1).text == "first"
    client.submit(chat_request)
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 0


def test_a_request_given_a_day_keeps_its_queued_mark_all_day(settings, client):
    """`ask` and `generate --timeout` give a request up to a day, far past the queue's default
    deadline. The mark it is queued with must last as long: once it lapsed, cancel() would say
    there was nothing to withdraw while the request still waited, and a submission redis-py
    sent again after a dropped connection would be queued a second time."""
    made = time.time()
    request = client.submit(chat("a day-long batch", created_at=made, deadline=made + LATEST_DEADLINE_AFTER_S))
    assert LATEST_DEADLINE_AFTER_S > settings.queue.default_deadline_s * 2 + 60  # past what the default keeps it
    assert client.redis.ttl(keys.answered_key(request.id)) >= LATEST_DEADLINE_AFTER_S  # still there at its deadline
    client.submit(request)  # sent again: a duplicate, not queued twice
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 1
    assert client.cancel(request.id) is True


def test_an_entry_with_a_huge_deadline_does_not_stop_its_batch_being_delivered(client, work):
    """A damaged or foreign entry's deadline, finite but huge (a nanosecond timestamp), made
    the answered mark's TTL one SET ... EX refuses, and with it the whole batch's delivery,
    sent again with every later batch: that worker delivered nothing any more."""
    import dataclasses

    good, odd = client.submit(chat("an ordinary one")), client.submit(chat("a damaged deadline"))
    good_job, odd_job = work.claim("w1", 10, block_ms=100)
    odd_job = dataclasses.replace(odd_job, due=1.76e18)
    replies = [(good_job, GenerationReply(id=good.id, ok=True, text="good")),
               (odd_job, GenerationReply(id=odd.id, ok=True, text="odd"))]
    assert work.deliver(replies, "w1") == 2
    assert client.wait(good, timeout=1).text == "good" and client.wait(odd, timeout=1).text == "odd"
    assert 0 < client.redis.ttl(keys.answered_key(odd.id)) <= keys.ANSWERED_TTL_S


def test_one_delivery_answers_settles_and_counts_a_mixed_batch(client, work):
    """Replies that succeeded and failed, from both streams, some with a sender, one already
    answered: each new reply reaches its caller once, every entry is settled, and each is
    counted under its outcome."""
    chats = [client.submit(chat(f"chat {n}", user="ann")) for n in range(3)]
    posts = [client.submit(chat(f"post {n}", priority=Priority.batch)) for n in range(2)]
    jobs = {job.request.id: job for job in work.claim("w1", 10, block_ms=0)}
    assert work.deliver([(jobs[chats[0].id], GenerationReply(id=chats[0].id, ok=True, text="early"))], "w0") == 1
    replies = [
        GenerationReply(id=chats[0].id, ok=True, text="again"),  # answered already: dropped
        GenerationReply(id=chats[1].id, ok=True, text="hi"),
        GenerationReply.failure(chats[2].id, ErrorKind.timeout, "too late"),
        GenerationReply.failure(posts[0].id, ErrorKind.cancelled, "withdrawn"),
        GenerationReply(id=posts[1].id, ok=True, text="a post"),
    ]
    assert work.deliver([(jobs[reply.id], reply) for reply in replies], "w1") == 4
    assert [client.redis.llen(keys.reply_key(r.id)) for r in [*chats, *posts]] == [1] * 5
    assert [client.wait(r, timeout=1).text for r in (chats[0], chats[1], posts[1])] == ["early", "hi", "a post"]
    assert client.wait(chats[2], timeout=1).error.kind is ErrorKind.timeout
    assert client.wait(posts[0], timeout=1).error.kind is ErrorKind.cancelled
    stats = {k.decode(): int(v) for k, v in client.redis.hgetall(keys.STATS_KEY).items()}
    # Expired and withdrawn requests are counted as such, not as failures.
    assert {k: v for k, v in stats.items() if k.startswith(("completed", "failed", "expired", "withdrawn"))} == {
        "completed": 3, "expired": 1, "withdrawn": 1,
    }
    assert int(client.redis.get(keys.user_pending_key("ann")) or 0) == 0  # ann may ask again
    for stream in (keys.STREAM_INTERACTIVE, keys.STREAM_BATCH):
        assert client.redis.xlen(stream) == 0
        assert client.redis.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0


def test_a_delivery_of_more_entries_than_one_command_takes_settles_them_all(settings, client, work):
    """Entries are acknowledged a thousand per command; a bigger delivery still settles each one."""
    settings.queue.max_length = 2000
    requests = client.submit_many([chat(f"n {n}") for n in range(1001)])
    jobs = work.claim("w1", 1001, block_ms=0)
    assert work.deliver([(job, GenerationReply(id=job.request.id, ok=True)) for job in jobs], "w1") == 1001
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 0
    assert client.redis.xpending(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)["pending"] == 0
    assert client.wait(requests[-1], timeout=1).ok


def test_waiting_without_a_worker_times_out_clearly(client):
    request = client.submit(chat())
    with pytest.raises(ReplyTimeout, match="is a worker running"):
        client.wait(request, timeout=0.2)


def test_a_timeout_while_a_worker_is_still_starting_says_so_and_what_to_do(settings, client, redis_client):
    """A worker loading its model (minutes of GPU warm-up) answers nothing yet: the timeout
    said "no worker answered... is a worker running?", which sent people to start another."""
    from persona import heartbeat

    loading = heartbeat.StartingWorker(id="loading-1", device="cpu", persona="sage", model="smollm2")
    heartbeat.announce_starting(redis_client, loading, ttl_s=30)
    request = client.submit(chat())
    with pytest.raises(ReplyTimeout) as timed_out:
        client.wait(request, timeout=0.2)
    said = str(timed_out.value)
    assert "a worker is still starting: loading smollm2 for sage, " in said
    assert " s so far" in said and "PERSONA_QUEUE__DEFAULT_DEADLINE_S" in said and "is a worker running" not in said

    async def wait_async() -> str:
        caller = redis.asyncio.Redis.from_url(settings.redis_url.get_secret_value())
        try:
            with pytest.raises(ReplyTimeout) as timed_out:
                await AsyncQueueClient(caller, settings.queue).wait(request, timeout=0.2)
        finally:
            await caller.aclose()
        return str(timed_out.value)

    assert "a worker is still starting" in asyncio.run(wait_async())


def test_a_timeout_with_workers_running_does_not_ask_whether_one_is(client, redis_client):
    from persona import heartbeat

    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="busy-1", state="serving"), ttl_s=30)
    with pytest.raises(ReplyTimeout, match="1 worker is running, but none took it before its deadline"):
        client.wait(client.submit(chat()), timeout=0.2)


def _answer_soon(work: WorkQueue, after_s: float, text: str = "answered"):
    """A thread that claims one request after ``after_s`` and answers it."""
    import threading

    def answer() -> None:
        time.sleep(after_s)
        [job] = work.claim("w1", 10, block_ms=1000)
        work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text=text))], "w1")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def test_a_wait_on_the_request_as_it_was_before_submit_waits_until_its_deadline(client, work):
    """An integrator who keeps their own request (deadline 0, as built) rather than the one
    submit returns: the wait gave up after 1 s, saying no worker answered."""
    request = chat()
    client.submit(request)
    answering = _answer_soon(work, 1.5)
    assert client.wait(request).text == "answered"
    answering.join()


def test_a_reply_waited_for_twice_comes_back_twice(client, work):
    """The second wait ran to its deadline and said no worker had answered: the reply's list
    was deleted by the client's next call, as it should be, once read."""
    request = client.submit(chat())
    _answer_soon(work, 0).join()
    first = client.wait(request, timeout=5)
    with pytest.raises(ReplyTimeout):
        client.wait(client.submit(chat("another")), timeout=0.1)  # this call deletes the list read
    assert client.redis.llen(keys.reply_key(request.id)) == 0
    started = time.monotonic()
    assert client.wait(request, timeout=5) == first
    assert time.monotonic() - started < 0.5


def test_a_wait_without_a_reply_says_why_there_is_none(settings, client, work, redis_client):
    with pytest.raises(ReplyTimeout, match="is not in the queue: it was never submitted"):
        client.wait(chat(), timeout=0.1)
    request = client.submit(chat())
    _answer_soon(work, 0).join()
    client.wait(request, timeout=5)
    redis_client.delete(keys.reply_key(request.id))  # its list deleted, as the reader's next call does
    elsewhere = QueueClient(redis_client, settings.queue)
    with pytest.raises(ReplyTimeout, match=r"was answered \(by worker w1\), but its reply is gone: it was read already"):
        elsewhere.wait(request, timeout=0.1)


def test_a_deadline_given_as_a_duration_is_refused_saying_it_is_a_time(client):
    """deadline=30 (meant as "30 s") was queued, answered at once with "waited past its
    deadline; please ask again", and asking again did the same."""
    with pytest.raises(InvalidRequest, match=r"deadline 30 is not a time: it is in epoch seconds \(time.time\(\) \+ 30"):
        client.submit(chat(deadline=30))
    with pytest.raises(InvalidRequest, match="epoch seconds"):
        client.ask(chat(deadline=-1), timeout=0.1)
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 0
    assert client.submit(chat(deadline=time.time() - 1)).deadline  # just passed: its worker answers it


@pytest.mark.parametrize("after_s", [float("inf"), float("nan"), 1e300, 24 * 3600 + 60])
def test_a_deadline_more_than_a_day_off_is_refused_before_redis(client, after_s):
    """deadline=inf crashed the submit (OverflowError); 1e300 reached Redis as a number it refused."""
    request = chat()
    with pytest.raises(InvalidRequest, match=r"more than 86400 s after the request was made; give one within a day"):
        client.submit(request.model_copy(update={"deadline": request.created_at + after_s}))
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 0
    assert client.submit(chat(deadline=time.time() + 24 * 3600 - 60)).deadline  # a day is fine


def test_dead_workers_entries_are_reclaimed_at_once(client, work):
    request = client.submit(chat())
    work.claim("dead-worker", 10, block_ms=100)
    jobs, exhausted = work.reclaim("live-worker", live_consumers={"live-worker"}, holding=set())
    assert [j.request.id for j in jobs] == [request.id] and not exhausted


def test_live_workers_entries_wait_for_the_visibility_timeout(settings, client, work):
    settings.queue.visibility_timeout_s = 0.2
    client.submit(chat())
    work.claim("slow-worker", 10, block_ms=100)
    assert work.reclaim("other", live_consumers={"slow-worker", "other"}, holding=set()) == ([], [])
    time.sleep(0.3)
    jobs, _ = work.reclaim("other", live_consumers={"slow-worker", "other"}, holding=set())
    assert len(jobs) == 1


def test_entries_a_live_worker_keeps_in_hand_are_not_reclaimed_however_long_they_take(settings, client, work):
    """A reply longer than the visibility timeout (4,096 tokens at 15 tokens/s) used to be
    taken from the live worker decoding it, generated again, and dead-lettered after
    three such deliveries while its first worker was still writing it."""
    settings.queue.visibility_timeout_s = 0.2
    client.submit(chat())
    held = work.claim("slow-worker", 10, block_ms=100)
    for _ in range(3):
        time.sleep(0.15)
        work.keep("slow-worker", held)
        assert work.reclaim("other", live_consumers={"slow-worker", "other"}, holding=set()) == ([], [])
    time.sleep(0.3)  # no longer kept: stalled
    [_taken], _ = work.reclaim("other", live_consumers={"slow-worker", "other"}, holding=set())
    work.keep("slow-worker", held)  # too late: it stays with the worker that took it
    [pending] = client.redis.xpending_range(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP, "-", "+", 10)
    assert pending["consumer"] == b"other" and pending["times_delivered"] == 2


def test_a_workers_own_entries_it_lost_are_taken_back_at_once_and_those_in_hand_never(client, work):
    """Entries claimed by a turn that failed before taking them in hand (Redis blinked)
    waited for the visibility timeout, as long as their deadline: always a timeout."""
    request = client.submit(chat())
    [job] = work.claim("w", 10, block_ms=100)
    assert work.reclaim("w", live_consumers={"w"}, holding={job.entry_id}) == ([], [])
    [again], _ = work.reclaim("w", live_consumers={"w"}, holding=set())
    assert again.request.id == request.id


def test_a_reclaim_takes_no_more_than_the_room_left(client, work):
    for n in range(5):
        client.submit(chat(str(n)))
    work.claim("dead-worker", 10, block_ms=100)
    jobs, _ = work.reclaim("live", live_consumers={"live"}, holding=set(), limit=2)
    assert len(jobs) == 2


def consumers(client) -> set[str]:
    return {c["name"].decode() for c in client.xinfo_consumers(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)}


def test_the_consumers_of_workers_that_died_are_forgotten_and_live_ones_kept(settings, client, work):
    """Workers killed with kill -9 never left the consumer group, and each start is a new
    consumer: `XINFO CONSUMERS` grew by one per crash, for good."""
    from persona.heartbeat import WorkerInfo, live_worker_ids, publish

    settings.queue.visibility_timeout_s = 0.2
    for n in range(2):
        client.submit(chat(f"held by killed-{n}"))
        work.claim(f"killed-{n}", 1, block_ms=100)
    publish(client.redis, WorkerInfo(id="idle-but-alive"), 30)
    client.submit(chat("answered"))
    [done] = work.claim("idle-but-alive", 10, block_ms=100)
    work.deliver([(done, GenerationReply(id=done.request.id, ok=True))], "idle-but-alive")  # holds nothing now
    time.sleep(0.3)  # every one idle past the visibility timeout
    assert consumers(client.redis) == {"killed-0", "killed-1", "idle-but-alive"}
    jobs, _ = work.reclaim("survivor", live_worker_ids(client.redis), holding=set(), limit=1)
    assert len(jobs) == 1  # killed-0's entry; killed-1 still holds its own
    assert consumers(client.redis) == {"survivor", "killed-1", "idle-but-alive"}
    [taken], _ = work.reclaim("survivor", {"survivor", "idle-but-alive"}, holding={jobs[0].entry_id})
    work.deliver([(job, GenerationReply(id=job.request.id, ok=True)) for job in (*jobs, taken)], "survivor")
    time.sleep(0.3)  # the survivor holds nothing either, and has no heartbeat (paused a while, say)
    assert work.forget_gone("survivor") == ["killed-1"]  # its entry was taken: it holds nothing now
    assert consumers(client.redis) == {"survivor", "idle-but-alive"}  # the one looking is never forgotten


def test_a_reclaim_whose_housekeeping_fails_still_hands_over_what_it_claimed(settings, client, work):
    """Forgetting gone workers' consumers runs inside a reclaim, after its claims: a script
    error there (a damaged worker index) lost the entries just claimed, and each retry
    counted one more delivery of them towards the dead letters."""
    settings.queue.visibility_timeout_s = 0.2
    client.submit(chat("held by a worker that died"))
    work.claim("killed", 1, block_ms=100)
    client.redis.set(keys.WORKER_INDEX_KEY, "not a sorted set")
    time.sleep(0.3)
    jobs, _ = work.reclaim("survivor", {"survivor"}, holding=set())
    assert [job.request.messages[-1].content for job in jobs] == ["held by a worker that died"]


def test_a_claim_waiting_on_both_streams_takes_no_more_than_its_room(client, work):
    """A blocking read of both streams counts per stream: a worker with room for 4 got 8,
    batch work beside the interactive work it had no room for."""
    assert work.claim("w", 4, block_ms=10) == [] and work.drained  # the next claim waits on both streams
    interactive = [client.submit(chat(f"chat {n}")) for n in range(3)]
    batch = [client.submit(chat(f"batch {n}", priority=Priority.batch)) for n in range(3)]
    first = work.claim("w", 4, block_ms=1000)
    assert [j.request.id for j in first] == [r.id for r in [*interactive, batch[0]]]
    rest = work.claim("w", 10, block_ms=100)  # the others went back to their stream, in order
    assert [j.request.id for j in rest] == [r.id for r in batch[1:]]


def test_poison_request_is_dead_lettered_after_max_deliveries(settings, client, work):
    settings.queue.max_deliveries = 2
    request = client.submit(chat())
    work.claim("crash-1", 10, block_ms=100)  # delivery 1
    jobs, exhausted = work.reclaim("crash-2", set(), holding=set())  # delivery 2
    assert len(jobs) == 1 and not exhausted
    jobs, exhausted = work.reclaim("w3", set(), holding=set())
    assert not jobs and len(exhausted) == 1
    job, deliveries = exhausted[0]
    work.dead_letter(job, "worker crashed", deliveries, "w3")
    reply = client.wait(request, timeout=1)
    assert not reply.ok and reply.error.kind is ErrorKind.dead_letter
    [(_, fields)] = client.redis.xrange(keys.STREAM_DEAD)
    assert fields[b"reason"] == b"worker crashed" and int(fields[b"deliveries"]) == 2
    assert GenerationRequest.from_json(fields[b"r"]).id == request.id
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 0


def test_a_dead_letter_whose_answer_was_lost_is_set_aside_and_counted_once(settings, client, redis_client):
    """A worker whose connection drops as it sets a request aside (redis-py re-sends the
    call, or the worker dies before its next one) leaves one letter, counted once: the
    add used to be re-sent as a second letter, and the count was a separate call, so
    `persona queue stats` misreported how many letters the cap trimmed."""
    from persona.connection import connect
    from persona.dead_letters import count_dead
    from tests.fakes.cutting_proxy import CuttingProxy

    proxy = CuttingProxy(settings.redis_url.get_secret_value())
    try:
        request = client.submit(chat(user="ann"))
        through_proxy = WorkQueue(connect(settings, url=proxy.url), settings.queue)
        [job] = through_proxy.claim("w", 1, block_ms=100)
        proxy.cut_answer_to(keys.STREAM_DEAD.encode())  # the letter is written; the worker never hears so
        through_proxy.dead_letter(job, "it crashed the worker", 3, "w")
        assert proxy.cuts == 1
    finally:
        proxy.close()
    assert count_dead(redis_client) == (1, 0)  # one letter, none taken for trimmed
    assert int(redis_client.hget(keys.STATS_KEY, "dead_lettered")) == 1
    assert redis_client.xpending(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)["pending"] == 0
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0
    reply = client.wait(request, timeout=1)
    assert reply.error.kind is ErrorKind.dead_letter
    assert redis_client.llen(keys.reply_key(request.id)) == 1
    assert int(redis_client.get(keys.user_pending_key("ann"))) == 0


def test_an_entry_set_aside_already_is_not_set_aside_again(client, work, redis_client):
    """Two workers that claimed the same stalled entry both reach its last delivery:
    the second finds it settled and adds nothing."""
    client.submit(chat())
    [job] = work.claim("w1", 1, block_ms=100)
    work.dead_letter(job, "stalled", 3, "w1")
    work.dead_letter(job, "stalled", 3, "w2")
    assert redis_client.xlen(keys.STREAM_DEAD) == 1
    stats = redis_client.hgetall(keys.STATS_KEY)
    assert int(stats[b"dead_lettered"]) == 1 and int(stats[b"failed:dead_letter"]) == 1


def test_an_unreadable_entry_is_set_aside_uncounted_as_a_reply(work, redis_client):
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": b"not json"})
    [job] = work.claim("w", 1, block_ms=100)
    work.dead_letter(job, "malformed", 3, "w")
    [(_, fields)] = redis_client.xrange(keys.STREAM_DEAD)
    assert (fields[b"r"], fields[b"stream"], fields[b"worker"]) == (b"not json", keys.STREAM_INTERACTIVE.encode(), b"w")
    stats = redis_client.hgetall(keys.STATS_KEY)
    assert (int(stats[b"dead_lettered"]), int(stats[b"failed:unanswerable"])) == (1, 1)
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0


def test_leaving_worker_hands_back_what_it_holds(client, work):
    held = [client.submit(chat(str(i))) for i in range(3)]
    work.claim("leaver", 10, block_ms=100)
    assert work.hand_back("leaver") == 3
    jobs = work.claim("stayer", 10, block_ms=100)
    assert sorted(j.request.id for j in jobs) == sorted(r.id for r in held)
    consumers = client.redis.xinfo_consumers(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)
    assert [c["name"] for c in consumers] == [b"stayer"]  # left the group, nothing orphaned


def test_malformed_entry_becomes_a_job_with_a_problem(client, work, redis_client):
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": json.dumps({"id": "abc", "persona": ""})})
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": b"\xff\xfe not json"})
    first, second = work.claim("w", 10, block_ms=100)
    assert first.request is None and first.request_id == "abc" and "malformed" in first.problem
    assert second.request is None and second.request_id is None


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.binary(max_size=300)
    | st.dictionaries(st.text(max_size=10), st.none() | st.integers() | st.text(max_size=20) | st.lists(st.text(max_size=5)), max_size=6).map(
        lambda d: json.dumps(d).encode()
    )
)
def test_decoding_any_payload_never_crashes(payload: bytes):
    job = Job.parse(keys.STREAM_INTERACTIVE, b"1-0", {b"r": payload})
    assert (job.request is None) == (job.problem is not None)


# Any value Redis can hold, for each field a writer may leave out, damage, or not know of.
any_value = st.binary(max_size=40) | st.sampled_from([b"nan", b"inf", b"-inf", b"1e999", b"1_0", b" 12 ", b"0x10"])
a_request = chat().to_json().encode()


@hsettings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    b"r": any_value | st.just(a_request) | st.just(b"[" * 5000), b"d": any_value, b"e": any_value,
}))
def test_reading_any_entry_never_crashes(fields: dict[bytes, bytes]):
    """A deadline that was no number raised from ``Job.parse`` (the worker answered nobody);
    whatever an entry holds, it is a request or a problem, and what is read of it never raises."""
    job = Job.parse(keys.STREAM_INTERACTIVE, b"1-0", fields)
    assert (job.request is None) == (job.problem is not None)
    assert job.problem is None or "\n" not in job.problem
    assert job.due is None or job.expired(job.due + 1)
    assert isinstance(job.expired(time.time()), bool)
    assert isinstance(job.user, str) and isinstance(job.request_id, str | None)


def test_a_flood_from_one_user_cannot_take_everyones_place(settings, client, work):
    settings.queue.max_pending_per_user = 3
    flood = [client.submit(chat(user="flooder")) for _ in range(3)]
    with pytest.raises(QueueBusy, match="you already have 3 requests waiting"):
        client.submit(chat(user="flooder"))
    client.submit(chat(user="someone-else"))  # others still get in
    # once one of the flooder's requests is answered, they have room again
    jobs = work.claim("w", 1, block_ms=100)
    work.deliver([(jobs[0], GenerationReply(id=jobs[0].request.id, ok=True, text="ok"))], "w")
    client.submit(chat(user="flooder"))
    assert flood[0].id == jobs[0].request.id


def test_ask_refused_as_busy_returns_at_once_and_leaves_nothing_behind(settings, client):
    settings.queue.max_length = 1
    client.submit(chat())
    refused = chat()
    started = time.monotonic()
    with pytest.raises(QueueBusy, match="the queue is full"):
        client.ask(refused, timeout=30)
    assert time.monotonic() - started < 1.5  # not after a whole wait slice
    assert 0 < client.redis.ttl(keys.reply_key(refused.id)) <= 60  # the refusal's word expires soon
    settings.queue.max_length, settings.queue.max_pending_per_user = 10, 1
    client.submit(chat(user="u"))
    with pytest.raises(QueueBusy, match="you already have 1 request waiting; please wait for that answer first"):
        client.ask(chat(user="u"), timeout=30)


def refusals_counted(redis_client) -> dict[str, int]:
    """The refusals in the stats hash, by reason, as `persona queue stats` and /metrics read them."""
    counts = redis_client.hgetall(keys.STATS_KEY)
    return {reason: int(counts.get(f"refused:{reason}".encode(), 0)) for reason in ("full", "user_share")}


async def test_every_refused_request_is_counted_by_why_it_was_refused(settings, redis_url, redis_client, client):
    """Expired, withdrawn and completed requests were counted, refused ones nowhere: an
    operator could not see people being turned away. Whichever way a request comes (submit,
    ask, submit_many, an adapter's async ask), its refusal is counted as it is decided."""
    settings.queue.max_length, settings.queue.max_pending_per_user = 2, 1
    client.submit(chat(user="ann"))
    with pytest.raises(QueueBusy, match="you already have 1 request waiting"):
        client.submit(chat(user="ann"))
    client.submit(chat(user="bob"))  # the stream is full now
    assert refusals_counted(redis_client) == {"full": 0, "user_share": 1}  # those queued are not counted
    with pytest.raises(QueueBusy, match="the queue is full"):
        client.submit(chat(user="cy"))
    with pytest.raises(QueueBusy, match="the queue is full"):
        client.ask(chat(user="dee"), timeout=5)
    with pytest.raises(QueueBusy, match="0 of 2 requests were queued and 2 refused"):
        client.submit_many([chat(user="eve"), chat()])
    async_redis = redis.asyncio.Redis.from_url(redis_url)
    try:
        with pytest.raises(QueueBusy):
            await AsyncQueueClient(async_redis, settings.queue).ask(chat(user="fay"), timeout=5)
    finally:
        await async_redis.aclose()
    assert refusals_counted(redis_client) == {"full": 5, "user_share": 1}
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 2


def test_requests_refused_and_sent_again_are_counted_refused_once(settings, redis_client, client):
    """QueueBusy.refused are to be sent again: each time they were refused again they were
    counted again, so the counters said more requests were turned away than were. A request
    is counted once, by why it was first refused; once there is room it is queued."""
    settings.queue.max_length = 1
    client.submit(chat())
    with pytest.raises(QueueBusy) as busy:
        client.submit_many([chat(), chat()])
    for _ in range(3):
        with pytest.raises(QueueBusy, match="0 of 2 requests were queued and 2 refused"):
            client.submit_many(busy.value.refused)
    assert refusals_counted(redis_client) == {"full": 2, "user_share": 0}
    ttl = redis_client.ttl(keys.refused_key(busy.value.refused[0].id))
    assert 0 < ttl <= settings.queue.default_deadline_s + 60  # a minute past its deadline, then forgotten
    settings.queue.max_length = 3
    assert client.submit_many(busy.value.refused) == busy.value.refused  # room now: queued
    assert refusals_counted(redis_client) == {"full": 2, "user_share": 0}


def test_a_refusal_whose_counter_cannot_be_added_to_is_still_said(settings, redis_client, client):
    """Counting never stops the work it counts: a damaged counter loses only its own count."""
    settings.queue.max_length, settings.queue.max_pending_per_user = 1, 1
    redis_client.hset(keys.STATS_KEY, "refused:full", "abc")
    client.submit(chat(user="ann"))
    with pytest.raises(QueueBusy, match="the queue is full"):
        client.submit(chat(user="bob"))
    settings.queue.max_length = 10
    with pytest.raises(QueueBusy, match="you already have 1 request waiting"):
        client.submit(chat(user="ann"))
    assert redis_client.hget(keys.STATS_KEY, "refused:full") == b"abc"
    assert redis_client.hget(keys.STATS_KEY, "refused:user_share") == b"1"


def test_a_queue_full_at_one_request_says_one_request(settings, client):
    """It said "the queue is busy (1 requests already waiting ...)"."""
    settings.queue.max_length = 1
    client.submit(chat())
    with pytest.raises(QueueBusy, match=r"persona:q:chat holds 1 request \(its limit, PERSONA_QUEUE__MAX_LENGTH=1\): 1 waiting;"):
        client.submit(chat())


def test_a_message_over_the_limit_is_refused_saying_what_to_do(settings, client):
    """It said only "a message is 9000 characters long; at most 8000 are accepted"."""
    with pytest.raises(InvalidRequest) as refused:
        client.submit(chat("x" * 9000))
    assert str(refused.value) == (
        "a message is 9,000 characters long; at most 8,000 are accepted: shorten it or send it in parts, "
        "or raise the limit with PERSONA_QUEUE__MAX_MESSAGE_CHARS (set it alike for the workers and every client)"
    )
    settings.queue.max_messages = 2
    many = GenerationRequest(persona="sage", messages=[Message(role="user", content="hi")] * 3)
    with pytest.raises(InvalidRequest, match=r"at most 2 are accepted: send only the latest 2, or raise the limit "
                                             r"with PERSONA_QUEUE__MAX_MESSAGES"):
        client.submit(many)
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 0


async def test_async_ask_is_one_round_trip_through_the_queue(settings, redis_url, redis_client, work):
    import redis.asyncio

    async_redis = redis.asyncio.Redis.from_url(redis_url)
    try:
        asker = AsyncQueueClient(async_redis, settings.queue)
        settings.queue.max_length = 0
        with pytest.raises(QueueBusy):
            await asker.ask(chat(), timeout=30)
        settings.queue.max_length = 10
        waiting = asyncio.create_task(asker.ask(chat("ping"), timeout=30))
        jobs = []
        while not jobs:
            await asyncio.sleep(0.05)
            jobs = work.claim("w", 10, block_ms=0)
        work.deliver([(jobs[0], GenerationReply(id=jobs[0].request.id, ok=True, text="pong"))], "w")
        assert (await waiting).text == "pong"
    finally:
        await async_redis.aclose()


def test_a_cancellation_says_whether_it_found_a_request_to_withdraw(client, work):
    """It said nothing: a typo in an id, or a request answered already, looked withdrawn."""
    assert client.cancel("no-such-request") is False
    answered = client.submit(chat("answered"))
    _answer_soon(work, 0).join()
    assert client.cancel(answered.id) is False
    waiting = client.submit(chat("waiting"))
    assert client.cancel(waiting.id) is True
    [job] = work.claim("w1", 10, block_ms=100)
    assert work.cancelled([job]) == {waiting.id}


def test_cancel_flags_are_read_only_for_requests_sent_before_a_cancellation(client, work):
    early = client.submit(chat("early"))
    withdrawn = client.submit(chat("withdrawn"))
    client.cancel(withdrawn.id)
    later = client.submit(chat("later"))
    ahead = chat("cancelled before it was even sent")
    client.cancel(ahead.id)
    ahead = client.submit(ahead)
    jobs = work.claim("w", 10, block_ms=100)
    assert [j.request.id for j in jobs] == [early.id, withdrawn.id, later.id, ahead.id]
    assert [j.not_cancelled for j in jobs] == [False, False, False, False]  # the epoch moved after "later"
    assert work.cancelled(jobs) == {withdrawn.id, ahead.id}
    fresh = client.submit(chat("fresh"))
    [job] = work.claim("w", 10, block_ms=100)
    assert job.request.id == fresh.id and job.not_cancelled and work.cancelled([job]) == set()


def test_a_request_withdrawn_while_a_claim_is_under_way_is_still_found_withdrawn(settings, redis_url, client):
    """A claim reads batch work in a second round trip; a cancellation landing between the
    two must not let the withdrawn request pass as unchanged since the first read."""
    import redis as redis_lib

    withdrawn = client.submit(chat("withdrawn mid-claim", priority=Priority.batch))
    worker_redis = redis_lib.Redis.from_url(redis_url)
    armed = []

    class CancelsBeforeTheBatchRead(worker_redis.connection_pool.connection_class):
        def send_packed_command(self, command, check_health=True):
            sent = command if isinstance(command, bytes) else b"".join(command)
            if armed and keys.STREAM_BATCH.encode() in sent:
                armed.clear()
                client.cancel(withdrawn.id)  # on another connection, before Redis sees the read
            super().send_packed_command(command, check_health)

    worker_redis.connection_pool.connection_class = CancelsBeforeTheBatchRead
    work = WorkQueue(worker_redis, settings.queue)
    armed.append(True)
    [job] = work.claim("w", 10, block_ms=0)
    assert not armed, "the claim never read the batch stream"
    assert job.request.id == withdrawn.id and not job.not_cancelled
    assert work.cancelled([job]) == {withdrawn.id}


def test_a_workers_recorded_tally_counts_as_record_replies_does(settings, redis_url, redis_client, client, work):
    import redis as redis_lib

    replies = [
        GenerationReply(id="a", ok=True, text="x", persona="p", version="v1", new_tokens=3,
                        timings=Timings(queue_ms=12.5, generate_ms=230)),
        GenerationReply.failure("b", ErrorKind.timeout, "late", persona="p"),
        GenerationReply(id="c", ok=True, text="y", persona="p", version="v2", new_tokens=4,
                        timings=Timings(queue_ms=700_000, generate_ms=5)),
    ]
    work.deliver([(None, reply) for reply in replies], "w")
    assert _telemetry(redis_client)["log"] == []  # delivering does not count: recording does
    work.record(Tally.of(replies, batch_size=3))
    delivered = _telemetry(redis_client)
    redis_client.flushdb()
    record_replies(redis_lib.Redis.from_url(redis_url), replies, batch_size=3)
    assert delivered == _telemetry(redis_client)
    assert delivered["hist:batch_size"] == {"4": "1", "count": "1", "sum": "3"}
    assert delivered["hist:queue_wait_seconds"]["+Inf"] == "1"


def _telemetry(client) -> dict:
    found = {name: {k.decode(): v.decode() for k, v in client.hgetall(keys.histogram_key(name)).items()}
             for name in ("queue_wait_seconds", "generate_seconds", "batch_size")}
    found = {f"hist:{name}": value for name, value in found.items()}
    found["versions"] = client.hgetall(keys.VERSION_REPLIES_KEY)
    found["tokens"] = client.hget(keys.STATS_KEY, "tokens")
    found["log"] = [fields for _, fields in client.xrange(keys.REPLY_LOG_STREAM)]
    return found


def test_an_overlong_user_or_source_is_refused_before_it_names_a_redis_key(client):
    """A megabyte ``user`` was queued, and stored as the name of its fair-share counter key."""
    with pytest.raises(InvalidRequest, match=r"the user is 1,000,000 characters long; at most 128 are accepted"):
        client.submit(chat(user="u" * 1_000_000))
    with pytest.raises(InvalidRequest, match=r"the source is 129 characters long; at most 128"):
        client.submit(chat(source="s" * 129))
    assert client.redis.keys(keys.user_pending_key("*")) == [] and client.redis.xlen(keys.STREAM_INTERACTIVE) == 0
    # What the bots send is far inside the limit: a Telegram id, a Discord snowflake.
    for user in ("telegram:" + str(2**63 - 1), "discord:" + str(2**64 - 1)):
        client.submit(chat(user=user, source=user.split(":")[0]))
    assert client.redis.xlen(keys.STREAM_INTERACTIVE) == 2


def test_a_senders_count_of_waiting_requests_that_is_no_number_starts_again_at_one(settings, client, work):
    """A sender's count that Redis could not add to (`SET persona:user-pending:ann abc`) failed
    every request they sent with "value is not an integer", for as long as it lived."""
    pending = keys.user_pending_key("ann")
    client.redis.set(pending, "abc")
    request = client.submit(chat(user="ann"))
    assert client.redis.get(pending) == b"1" and client.redis.ttl(pending) > 0
    [job] = work.claim("w", 1, block_ms=100)
    work.deliver([(job, GenerationReply(id=request.id, ok=True, text="ok"))], "w")
    assert client.redis.get(pending) == b"0"


def test_a_cancel_epoch_that_is_no_number_starts_again_and_workers_read_the_flags_again(client, work):
    """After `SET persona:cancel-epoch abc` every cancel failed ("value is not an integer"),
    its flag set all the same, and every entry carried "abc" unchanged: workers never read a
    flag, and generated withdrawn requests anyway."""
    client.redis.set(keys.CANCEL_EPOCH_KEY, "abc")
    withdrawn, wanted = client.submit(chat("withdrawn")), client.submit(chat("wanted"))
    assert client.cancel(withdrawn.id) is True
    later = client.submit(chat("later"))
    jobs = work.claim("w", 10, block_ms=100)
    assert [job.request.id for job in jobs] == [withdrawn.id, wanted.id, later.id]
    assert work.cancelled(jobs) == {withdrawn.id}
    assert client.redis.incr(keys.CANCEL_EPOCH_KEY)  # a number again


def test_a_cancel_epoch_started_again_is_no_value_a_queued_entry_carries(client, work):
    """Started again at 1, an entry sent when it was 1 (before it was damaged) would pass as
    not cancelled however often it was withdrawn."""
    client.redis.set(keys.CANCEL_EPOCH_KEY, "1")
    sent_at_one = client.submit(chat("sent at epoch 1"))
    client.redis.set(keys.CANCEL_EPOCH_KEY, "abc")
    assert client.cancel(sent_at_one.id) is True
    [job] = work.claim("w", 10, block_ms=100)
    assert not job.not_cancelled and work.cancelled([job]) == {sent_at_one.id}


@pytest.mark.parametrize("damage", [
    lambda r: r.hset(keys.CANCEL_EPOCH_KEY, "epoch", 3),
    lambda r: r.rpush(keys.CANCEL_EPOCH_KEY, "3"),
], ids=["hash", "list"])
def test_a_cancel_epoch_of_another_type_starts_again_and_submissions_go_through(client, work, damage):
    """With the cancel epoch a hash or a list (`HSET persona:cancel-epoch ...`), every
    submission failed ("WRONGTYPE Operation against a key holding the wrong kind of value")
    until a withdrawal happened to overwrite it."""
    damage(client.redis)
    withdrawn, wanted = client.submit(chat("withdrawn")), client.submit(chat("wanted"))
    assert client.redis.type(keys.CANCEL_EPOCH_KEY) == b"string"
    assert client.cancel(withdrawn.id) is True
    jobs = work.claim("w", 10, block_ms=100)
    assert [job.request.id for job in jobs] == [withdrawn.id, wanted.id]
    assert work.cancelled(jobs) == {withdrawn.id}


def _stale(text: str) -> GenerationRequest:
    """A request whose deadline passes a moment after it is queued."""
    now = time.time()
    return chat(text, created_at=now, deadline=now + 0.05)


def test_a_full_queue_with_no_worker_says_what_fills_it_and_that_trying_again_will_not_help(settings, client):
    """It said "the queue is busy (3 requests already waiting ...); please try again in a
    moment": 3 was the limit, the entries were expired and withdrawn ones, and with no
    worker to clear them away trying again never helped."""
    settings.queue.max_length = 4
    client.submit(_stale("timed out"))
    withdrawn = [client.submit(chat(f"withdrawn {n}")) for n in range(2)]
    for request in withdrawn:
        client.cancel(request.id)
    client.submit(chat("still wanted"))
    time.sleep(0.1)
    with pytest.raises(QueueBusy) as refused:
        client.submit(chat())
    said = str(refused.value)
    assert said.startswith("the queue is full: persona:q:chat holds 4 requests (its limit, PERSONA_QUEUE__MAX_LENGTH=4): "
                           "1 past their deadline, 2 withdrawn, 1 waiting; no worker is running")
    assert "trying again will not help: start one (`persona worker`, or `persona up`)" in said
    with pytest.raises(QueueBusy, match="1 past their deadline, 2 withdrawn, 1 waiting; no worker is running"):
        client.ask(chat(), timeout=5)


def test_a_full_queue_longer_than_a_refusal_looks_through_says_its_counts_are_of_the_oldest_it_read(
    settings, client, work
):
    """A refusal judges at most the oldest 200 untaken entries (each is read inside Redis, on
    every refusal), and says how many more it did not look at: it counted those as waiting
    ("202 waiting (of the oldest 200 untaken)"), 10 of them withdrawn."""
    settings.queue.max_length = 211
    client.submit(chat("held"))
    work.claim("w-stopped", 1, block_ms=0)  # no heartbeat: a worker that stopped holds it
    client.submit_many([_stale(f"timed out {n}") for n in range(5)])
    for request in client.submit_many([chat(f"withdrawn {n}") for n in range(3)]):
        client.cancel(request.id)
    client.submit_many([chat(f"wanted {n}") for n in range(192)])
    for request in client.submit_many([chat(f"withdrawn past the oldest 200 {n}") for n in range(10)]):
        client.cancel(request.id)
    time.sleep(0.1)
    with pytest.raises(QueueBusy) as refused:
        client.submit(chat())
    assert ("holds 211 requests (its limit, PERSONA_QUEUE__MAX_LENGTH=211): 1 held by a worker that stopped; "
            "of the rest, 5 past their deadline, 3 withdrawn, 192 waiting among the oldest 200 looked at, "
            "10 more not looked at; no worker is running") in str(refused.value)


def test_a_full_queue_with_a_live_worker_says_to_try_again_in_a_moment(settings, client, work, redis_client):
    from persona import heartbeat

    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-busy", state="serving"), ttl_s=30)
    settings.queue.max_length = 2
    client.submit(chat("in hand"))
    work.claim("w-busy", 1, block_ms=0)
    client.submit(chat("next"))
    with pytest.raises(QueueBusy) as refused:
        client.submit(chat())
    assert str(refused.value) == ("the queue is busy: persona:q:chat holds 2 requests (its limit, "
                                  "PERSONA_QUEUE__MAX_LENGTH=2), 1 of them being answered; please try again in a moment")

    async def submit_async() -> str:
        caller = redis.asyncio.Redis.from_url(settings.redis_url.get_secret_value())
        try:
            with pytest.raises(QueueBusy) as refused:
                await AsyncQueueClient(caller, settings.queue).submit(chat())
        finally:
            await caller.aclose()
        return str(refused.value)

    assert "1 of them being answered; please try again in a moment" in asyncio.run(submit_async())


def test_a_timeout_tells_a_request_a_worker_is_still_answering_from_one_none_took(client, work, redis_client):
    """A long message a worker had taken and was still generating timed out as "1 worker is
    running, but did not reach it before its deadline"."""
    from persona import heartbeat

    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-slow", state="serving"), ttl_s=30)
    ahead = client.submit(chat("x" * 6000))
    taken = client.submit(chat("taken"))
    never_taken = client.submit(chat("never taken"))
    work.claim("w-slow", 2, block_ms=0)  # taken, and still being answered
    with pytest.raises(ReplyTimeout) as timed_out:
        client.wait(taken, timeout=0.2)
    said = str(timed_out.value)
    assert said.startswith(f"request {taken.id} for persona 'sage' was not answered in time: worker w-slow took it ")
    assert "and is still answering it" in said and "none took it" not in said
    with pytest.raises(ReplyTimeout, match="1 worker is running, but none took it before its deadline"):
        client.wait(never_taken, timeout=0.2)
    heartbeat.withdraw(redis_client, "w-slow")  # it stopped with them in hand
    with pytest.raises(ReplyTimeout, match="worker w-slow took it .* but its heartbeat has lapsed"):
        client.wait(ahead, timeout=0.2)


def test_a_timeout_names_the_callers_own_way_to_wait_longer_and_no_command_of_its_own(settings, client, redis_client):
    """It told every caller to use `persona ask --timeout`, `persona generate`'s too."""
    from persona import heartbeat

    heartbeat.publish(redis_client, heartbeat.WorkerInfo(id="w-1", state="serving"), ttl_s=30)
    request = client.submit(chat())
    with pytest.raises(ReplyTimeout) as timed_out:
        client.wait(request, timeout=0.2)
    assert "persona ask" not in str(timed_out.value)
    assert "give it longer (a later deadline, or PERSONA_QUEUE__DEFAULT_DEADLINE_S for every caller)" in str(timed_out.value)
    own = QueueClient(redis_client, settings.queue, longer_wait="`persona generate --timeout SECONDS`")
    with pytest.raises(ReplyTimeout, match=r"give it longer \(`persona generate --timeout SECONDS`\)"):
        own.wait(request, timeout=0.2)


def test_an_entry_whose_deadline_is_unknown_keeps_its_answered_mark_as_long_as_any_request_may_wait(settings, client, work):
    """An older client's entry carries no deadline: it may be waited on as long as any
    request (a day), so its answered mark must last that long, not the reply's TTL; else a
    submission sent again after that is queued and answered a second time. It is answered in
    one batch with an ordinary request, whose known deadline must not shorten it."""
    import dataclasses

    settings.queue.reply_ttl_s = 600
    known, unknown = client.submit(chat("an ordinary one")), client.submit(chat("from an older client"))
    known_job, unknown_job = work.claim("w1", 10, block_ms=100)
    unknown_job = dataclasses.replace(unknown_job, due=None)
    replies = [(known_job, GenerationReply(id=known.id, ok=True, text="known")),
               (unknown_job, GenerationReply(id=unknown.id, ok=True, text="unknown"))]
    assert work.deliver(replies, "w1") == 2
    assert client.wait(unknown, timeout=1).text == "unknown"
    assert client.redis.ttl(keys.answered_key(unknown.id)) >= keys.ANSWERED_TTL_S - 10


def test_a_leaving_worker_hands_back_more_entries_than_one_page_of_them(client, work):
    """A GPU worker may hold more entries than one page of them (``RECLAIM_BATCH``) when its
    max_batch is large: all are handed back, and it leaves the group with nothing orphaned."""
    from persona.pending_entries import RECLAIM_BATCH

    held = [client.submit(chat(str(i))) for i in range(RECLAIM_BATCH + 5)]
    assert len(work.claim("leaver", len(held), block_ms=100)) == len(held)
    assert work.hand_back("leaver") == len(held)
    consumers = client.redis.xinfo_consumers(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)
    assert [c["name"] for c in consumers] == []
    assert len(work.claim("stayer", len(held), block_ms=100)) == len(held)
