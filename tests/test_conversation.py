"""Conversation turns: trimmed to a budget keeping the newest, stored in Redis with a TTL."""

from __future__ import annotations

import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st

from adapters.conversation import ConversationStore, build_request, trim_turns
from persona import constants as keys
from persona.contract import Message

turn_lists = st.lists(
    st.builds(Message, role=st.sampled_from(["user", "assistant"]), content=st.text(min_size=1, max_size=50)),
    min_size=1, max_size=30,
)


@given(turn_lists, st.integers(1, 20), st.integers(1, 300))
def test_trimming_keeps_the_newest_turns_within_budget(turns, max_turns, max_chars):
    kept = trim_turns(turns, max_turns=max_turns, max_chars=max_chars)
    assert kept and kept[-1].content == turns[-1].content[-max_chars:]  # the newest is never lost
    assert len(kept) <= max_turns
    assert sum(len(m.content) for m in kept) <= max(max_chars, len(kept[-1].content))
    assert kept[0].role == "user" or len(kept) == 1
    tail = turns[len(turns) - len(kept):]
    assert [m.content for m in kept[:-1]] == [m.content for m in tail[:-1]]  # a contiguous newest run


def test_a_too_long_newest_message_keeps_its_end():
    kept = trim_turns([Message(role="user", content="a" * 10 + "THE END")], max_turns=5, max_chars=7)
    assert [m.content for m in kept] == ["THE END"]


def test_build_request_carries_user_source_and_seed():
    request = build_request("sage", [Message(role="user", content="hi")], user="telegram:1", source="telegram",
                            max_turns=4, max_chars=100, seed=7)
    assert (request.persona, request.user, request.source, request.sampling.seed) == ("sage", "telegram:1", "telegram", 7)


async def test_store_round_trip_ttl_and_forget(redis_url, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    store = ConversationStore(client, "telegram", ttl_s=300)
    turns = [Message(role="user", content="hello"), Message(role="assistant", content="hi")]
    await store.save("1:1", turns)
    assert await store.load("1:1") == turns
    assert 0 < redis_client.ttl(keys.conversation_key("telegram", "1:1")) <= 300
    assert await store.forget("1:1") and await store.load("1:1") == []
    redis_client.set(keys.conversation_key("telegram", "1:1"), b"not json")
    assert await store.load("1:1") == []  # a damaged record starts a fresh conversation

    await store.set_inflight("1:1", "r1")
    await store.clear_inflight("1:1", "r0")  # an older request does not clear a newer one
    assert await store.get_inflight("1:1") == "r1"
    await store.clear_inflight("1:1", "r1")
    assert await store.get_inflight("1:1") is None
    await client.aclose()


async def test_moving_a_chat_moves_each_users_conversation_and_nothing_else(redis_url, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    store = ConversationStore(client, "telegram", ttl_s=300)
    hello, newer = [Message(role="user", content="hello")], [Message(role="user", content="newer")]
    for scope in ("-100:1", "-100:2", "-1005:1"):
        await store.save(scope, hello)
    await store.save("-200:2", newer)  # written under the new id before the move came

    assert await store.move_chat("-100", "-200") == 1
    assert await store.load("-200:1") == hello and 0 < redis_client.ttl(keys.conversation_key("telegram", "-200:1")) <= 300
    assert await store.load("-200:2") == newer  # the newer one wins...
    assert await store.load("-100:1") == [] and await store.load("-100:2") == []  # ...and none is left behind
    assert await store.load("-1005:1") == hello  # a chat whose id merely starts the same stays
    assert await store.move_chat("-100", "-200") == 0  # Telegram's second notice finds nothing to move
    await client.aclose()
