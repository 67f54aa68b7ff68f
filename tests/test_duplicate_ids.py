"""Two requests under one id: the second is refused (or set aside), never answered with the first's reply.

A request id names its reply list and its answered mark, so it must be unique while they
last (a day at most). A second, different request under an id in use was taken as queued
(``'duplicate'``, meant for redis-py re-sending the *same* submission) and its caller read
the first request's reply as its own; one written straight onto the stream was generated
and its reply dropped, its caller waiting for ever. An identical re-send still counts as queued.
"""

from __future__ import annotations

import json

import pytest

from persona import constants as keys
from persona.contract import ErrorKind, GenerationReply, GenerationRequest, Message
from persona.dead_letters import list_dead
from persona.errors import InvalidRequest
from persona.queue import AsyncQueueClient, QueueClient, WorkQueue

IN_USE = "request id order-42 is in use by another request"


def chat(text: str, **kwargs) -> GenerationRequest:
    return GenerationRequest(id="order-42", persona="sage", messages=[Message(role="user", content=text)], **kwargs)


def answer(work: WorkQueue, text: str) -> None:
    """One worker turn: claim the one request waiting and answer it ``text``."""
    [job] = work.claim("w1", 10, block_ms=100)
    assert work.deliver([(job, GenerationReply(id=job.request.id, ok=True, text=text))], "w1") == 1


def xadd(redis_client, request: GenerationRequest | dict) -> None:
    """Queue a request as a client in another language does: the JSON in field r, nothing else."""
    body = request.to_json() if isinstance(request, GenerationRequest) else json.dumps(request)
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": body})


def test_a_different_request_under_an_id_still_queued_is_refused(client, redis_client):
    client.submit(chat("question from A"))
    with pytest.raises(InvalidRequest, match=IN_USE) as refused:
        client.submit(chat("question from B", sampling={"max_new_tokens": 3}))
    assert "make a new id" in str(refused.value) and "24 h" in str(refused.value)
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 1


def test_the_same_request_sent_again_still_counts_as_queued(client, redis_client, work):
    """What ``'duplicate'`` is for: a submission re-sent (redis-py, after a dropped connection)."""
    request = client.submit(chat("question from A"))
    assert client.submit(request) == request
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 1
    answer(work, "for A")
    assert client.submit(request) == request  # answered already: still the same request, not refused
    assert client.ask(request, timeout=2).text == "for A"


def test_a_different_request_under_an_answered_id_is_refused_not_given_its_reply(client, work, settings, redis_client):
    """The audit's case: B asked something else under A's id and got A's reply, ok=True."""
    first = client.submit(chat("question from A"))
    answer(work, "for A")
    other = QueueClient(redis_client, settings.queue)
    with pytest.raises(InvalidRequest, match=IN_USE):
        other.ask(chat("question from B", sampling={"max_new_tokens": 3}), timeout=5)
    assert client.wait(first, timeout=2).text == "for A"  # A's reply is A's still
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0


async def test_an_async_ask_under_an_id_in_use_is_refused(client, settings, redis_url):
    import redis.asyncio

    client.submit(chat("question from A"))
    async_redis = redis.asyncio.Redis.from_url(redis_url)
    try:
        with pytest.raises(InvalidRequest, match=IN_USE):
            await AsyncQueueClient(async_redis, settings.queue).ask(chat("question from B"), timeout=5)
    finally:
        await async_redis.aclose()


def test_a_batch_with_two_requests_under_one_id_queues_none(client, redis_client):
    with pytest.raises(InvalidRequest, match=r"requests 1 and 3 .*share id order-42.*none of them was queued"):
        client.submit_many([chat("one"), GenerationRequest(persona="sage", messages=[Message(role="user", content="x")]),
                            chat("three")])
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0


def test_a_batch_that_meets_an_id_in_use_says_which_were_queued(client, redis_client):
    client.submit(chat("question from A"))
    fine = GenerationRequest(persona="sage", messages=[Message(role="user", content="fine")])
    with pytest.raises(InvalidRequest, match=rf"(?s)1 of 2 requests were queued; these were not:.*request 2 \(id order-42\): {IN_USE}"):
        client.submit_many([fine, chat("question from B")])
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 2


def test_a_direct_write_under_an_answered_id_is_answered_invalid_not_generated(client, work, redis_client):
    """Generated, its reply dropped (the id answered already), its caller's BLPOP waiting for ever."""
    client.submit(chat("question from A"))
    answer(work, "for A")
    redis_client.delete(keys.reply_key("order-42"))  # A's caller read its reply (a BLPOP takes it)
    xadd(redis_client, {"id": "order-42", "persona": "sage", "messages": [{"role": "user", "content": "from B"}]})

    assert work.claim("w1", 10, block_ms=100) == []  # not handed to the model
    _, got = redis_client.blpop([keys.reply_key("order-42")], timeout=2)
    reply = GenerationReply.from_json(got)
    assert reply.error.kind is ErrorKind.invalid and "in use by another request" in reply.error.message
    [letter] = list_dead(redis_client)
    assert "in use by another request" in letter.reason
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0


def test_a_direct_write_under_an_id_still_waiting_is_set_aside_and_the_first_answered(client, work, redis_client):
    """Its caller shares the first one's reply list: nothing is pushed there but the first one's reply."""
    first = client.submit(chat("question from A"))
    xadd(redis_client, chat("question from B"))

    [job] = work.claim("w1", 10, block_ms=100)
    assert job.request == first
    [letter] = list_dead(redis_client)
    assert "in use by another request" in letter.reason
    assert work.deliver([(job, GenerationReply(id=first.id, ok=True, text="for A"))], "w1") == 1
    assert client.wait(first, timeout=2).text == "for A"
    assert redis_client.llen(keys.reply_key(first.id)) == 1


def test_two_direct_writes_under_one_id_answer_the_first_only(work, redis_client):
    first, second = chat("question from A"), chat("question from B")
    xadd(redis_client, first)
    xadd(redis_client, second)

    [job] = work.claim("w1", 10, block_ms=100)
    assert job.request == first
    [letter] = list_dead(redis_client)
    assert letter.payload == second.to_json()
    # Reclaimed (its worker stalled), the first is still the id's own request.
    assert [j.request for j in work.reclaim("w2", set(), holding=set())[0]] == [first]


def test_a_malformed_direct_write_under_an_id_still_waiting_leaves_its_reply_list_alone(client, work, redis_client):
    """Set aside as malformed, it was answered "invalid" into the list the first request's caller reads."""
    first = client.submit(chat("question from A"))
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": '{"id": "order-42", "persona": 7}'})
    jobs = work.claim("w1", 10, block_ms=100)
    [malformed] = [job for job in jobs if job.request is None]
    assert work.dead_letter(malformed, "malformed request", 1, "w1", kind=ErrorKind.invalid)
    assert redis_client.llen(keys.reply_key(first.id)) == 0
    [job] = [job for job in jobs if job.request is not None]
    assert work.deliver([(job, GenerationReply(id=first.id, ok=True, text="for A"))], "w1") == 1
    assert client.wait(first, timeout=2).text == "for A"


def test_an_ids_digest_lasts_as_long_as_its_answered_mark(client, work, redis_client):
    """Else a different request sent once the digest was gone, the mark still there, was taken as queued."""
    request = client.submit(chat("question from A"))
    answer(work, "for A")
    mark_ttl = redis_client.ttl(keys.answered_key(request.id))
    assert abs(redis_client.ttl(keys.digest_key(request.id)) - mark_ttl) <= 1


def test_a_submission_without_its_digest_is_told_apart_as_the_callers_are(client, redis_client, settings):
    """A caller of the submit script that passes no digest (ARGV[8]): Redis makes the same one."""
    from persona.queue import _submit_keys_args
    from persona.queue_scripts import SUBMIT_SCRIPT

    request = client.submit(chat("question from A"))
    redis_client.delete(keys.answered_key(request.id), keys.digest_key(request.id))
    redis_client.delete(keys.STREAM_INTERACTIVE)
    script_keys, args = _submit_keys_args(request, settings.queue)
    redis_client.eval(SUBMIT_SCRIPT, len(script_keys), *script_keys, *args[:-1])
    assert client.submit(request) == request  # the same request: queued once
    with pytest.raises(InvalidRequest, match=IN_USE):
        client.submit(chat("question from B"))
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 1


def test_a_direct_writes_mark_and_digest_last_past_its_default_deadline_not_a_day(work, settings, redis_client):
    """No field d, no deadline: the worker times it from its arrival plus the default, and its
    mark and digest, set as it is claimed, lasted the 24 h kept for a deadline unknown."""
    settings.queue.default_deadline_s = 3600.0  # past the reply's TTL: the mark lasts until it and a minute
    xadd(redis_client, chat("question from A"))

    [job] = work.claim("w1", 10, block_ms=100)
    for key in (keys.answered_key(job.request.id), keys.digest_key(job.request.id)):
        assert 3600 - 5 < redis_client.ttl(key) <= 3600 + keys.ANSWERED_PAST_DEADLINE_S
    assert job.due is None  # left for the worker to time, with the offset of its clock from Redis's it measured


def test_a_direct_write_that_used_up_its_deliveries_keeps_its_mark_past_its_deadline_not_a_day(
    work, settings, redis_client
):
    """Reclaimed once too often, it is set aside: its mark was set for 24 h, its deadline unknown."""
    settings.queue.default_deadline_s = 3600.0
    settings.queue.max_deliveries = 1
    xadd(redis_client, chat("question from A"))
    work.claim("w1", 10, block_ms=100)  # w1 dies holding it

    jobs, [(job, deliveries)] = work.reclaim("w2", set(), holding=set())
    assert jobs == []
    assert work.dead_letter(job, "it was delivered to workers that died or stalled", deliveries, "w2")
    for key in (keys.answered_key("order-42"), keys.digest_key("order-42")):
        assert 3600 - 5 < redis_client.ttl(key) <= 3600 + keys.ANSWERED_PAST_DEADLINE_S


def test_a_direct_write_sent_again_after_its_answer_is_dropped_without_a_letter_or_reply(work, redis_client):
    """Its first XADD's answer lost, a writer sends the same bytes again: set aside as "in use by
    another request", it pushed an ``invalid`` reply into the list the writer reads."""
    request = chat("question from A")
    xadd(redis_client, request)
    answer(work, "for A")
    assert GenerationReply.from_json(redis_client.blpop([keys.reply_key(request.id)], timeout=2)[1]).text == "for A"

    xadd(redis_client, request)  # the same bytes again
    assert work.claim("w1", 10, block_ms=100) == []
    assert list_dead(redis_client) == []
    assert redis_client.llen(keys.reply_key(request.id)) == 0
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 0
    assert redis_client.xpending(keys.STREAM_INTERACTIVE, keys.CONSUMER_GROUP)["pending"] == 0
