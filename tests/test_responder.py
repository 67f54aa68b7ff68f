"""The platform-neutral core: polite words for every failure, /retry, /cancel, the persona switch."""

from __future__ import annotations

import asyncio
import re

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from adapters.ratelimit import rate_limited_text
from adapters.responder import (
    BUSY_TEXT,
    CHAT_PERSONA_TTL_S,
    LONG_MESSAGE_NOTE,
    NO_WORKER_TEXT,
    NO_WORKER_TIMEOUT_TEXT,
    NOTHING_TO_CANCEL_TEXT,
    NOTHING_TO_RETRY_TEXT,
    STARTING_TEXT,
    STARTING_TIMEOUT_TEXT,
    UNREACHABLE_TEXT,
    Responder,
    Where,
    check_default_persona,
    persona_words,
)
from persona import constants as keys
from persona import heartbeat
from persona.connection import connect_async
from persona.contract import Message
from persona.errors import ConfigError
from persona.settings import Settings
from tests.fakes.full_redis import redis_refusing_writes
from tests.fakes.scripted_worker import scripted_worker

HERE = Where(chat="c1", user="u1")

NO_RETRY = Retry(NoBackoff(), 0)  # a dead Redis fails at once (production clients back off)


async def test_redis_down_means_polite_replies_not_crashes(settings: Settings):
    dead = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=NO_RETRY)
    responder = Responder(dead, settings, "telegram")
    assert (await responder.admit(HERE))[0].allowed
    assert await responder.answer(HERE, "hello?") == UNREACHABLE_TEXT
    assert await responder.retry(HERE) == UNREACHABLE_TEXT
    assert await responder.reset(HERE) == UNREACHABLE_TEXT
    assert await responder.cancel(HERE) == UNREACHABLE_TEXT
    assert await responder.persona_for("c1") == settings.telegram.persona
    assert await responder.kept("interaction:1") == []
    await responder.move_chat("c1", "c2")  # logged, not raised
    await dead.aclose()


async def test_a_flood_while_redis_cannot_count_it_gets_one_notice_then_silence(settings: Settings):
    """The limits let every message through while Redis could not count them (out of reach, or the
    bot's client out of connections): a flood then got a "restarting" apology for each message.
    The bot counts them itself meanwhile."""
    dead = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=NO_RETRY)
    settings.telegram = settings.telegram.model_copy(update={"user_messages_per_minute": 2})
    responder = Responder(dead, settings, "telegram")
    decisions = [await responder.admit(HERE) for _ in range(5)]
    assert [limits.allowed for limits, _ in decisions] == [True, True, False, False, False]
    assert [bool(notice) for _, notice in decisions] == [False, False, True, False, False]
    await dead.aclose()


async def test_a_long_message_is_answered_with_a_note(settings: Settings, redis_url, redis_client):
    settings.telegram = settings.telegram.model_copy(update={"context_chars": 500})
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    assert await responder.retry(HERE) == NOTHING_TO_RETRY_TEXT
    assert await responder.cancel(HERE) == NOTHING_TO_CANCEL_TEXT
    with scripted_worker(settings, lambda r: f"read {len(r.messages[-1].content)}") as seen:
        reply = await responder.answer(HERE, "x" * 900 + "the question?")
    assert reply.startswith("read 500") and "read only its last 500 characters" in reply
    assert seen[0].messages[-1].content.endswith("the question?")
    await client.aclose()


JAPANESE = "語彙の多様性について考える。静かな朝に一杯のお茶を飲みながら、"


async def test_the_note_says_how_much_of_a_message_the_model_read(
    settings: Settings, redis_url, redis_client, write_persona, tiny_llama_dir, running_worker
):
    """Japanese takes about two tokens a character, so the worker cut a message the bot had
    sent whole to fit the model's context, and nobody said so; one past the bot's budget was
    said to be read to its last 2000 characters though fewer were. The note says what the
    model read: here, a 512-position model, fewer characters than it has positions."""
    write_persona("tiny", base=str(tiny_llama_dir))
    settings.telegram = settings.telegram.model_copy(update={"persona": "tiny", "context_chars": 2000})
    running_worker(preload=["tiny"])
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    for message in ("START" + JAPANESE * 40, "START" + JAPANESE * 100):  # 1,205 and 3,005 characters
        reply = await responder.answer(HERE, message)
        [read] = re.findall(r"\(Your message was long, so I read only its last (\d+) characters\.\)$", reply)
        assert 0 < int(read) < 512, reply
    assert "read only" not in await responder.answer(HERE, "Hello?")
    await client.aclose()


async def test_a_question_the_bot_stops_waiting_for_is_not_generated_later(settings: Settings, redis_url, redis_client):
    """The bot gives up after reply_timeout_s and says so; its request carried the queue's
    default deadline instead, so a worker that got to it later still generated a reply
    nobody would read (a GPU's time, and the asker's /retry behind it)."""
    settings.telegram = settings.telegram.model_copy(update={"reply_timeout_s": 7.0})
    settings.queue = settings.queue.model_copy(update={"default_deadline_s": 300.0})
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    with scripted_worker(settings, lambda r: "fine") as seen:
        assert await responder.answer(HERE, "hello?") == "fine"
    assert seen[0].deadline - seen[0].created_at == pytest.approx(7.0, abs=0.5)
    await client.aclose()


async def test_switching_persona_checks_the_name(settings: Settings, redis_url, redis_client, write_persona):
    write_persona("quiet", base="smollm2", adapters=["cli"])
    write_persona("loud", base="smollm2")
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "discord")
    assert "no persona called 'quiet'" in await responder.set_persona("c1", "quiet")  # not enabled on discord
    assert (await responder.set_persona("c1", "loud")).startswith("From now on")
    assert await responder.persona_for("c1") == "loud" and await responder.persona_for("c2") == settings.discord.persona
    await client.aclose()


@pytest.mark.parametrize("platform", ["telegram", "discord"])
async def test_a_chats_persona_choice_lasts_while_it_is_answered_and_is_forgotten_after_long_quiet(
    platform: str, settings: Settings, redis_url, redis_client, write_persona
):
    """A /persona choice was kept in Redis for good, one key for every chat that ever chose. It
    now expires CHAT_PERSONA_TTL_S after the chat was last answered; the chat then hears the
    default persona again."""
    write_persona("loud", base="smollm2")
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, platform)
    key = keys.chat_persona_key(platform, HERE.chat)
    await responder.set_persona(HERE.chat, "loud")
    assert redis_client.ttl(key) == pytest.approx(CHAT_PERSONA_TTL_S, abs=5)
    with scripted_worker(settings, lambda r: f"{r.persona} here"):
        redis_client.expire(key, 60)  # as if the chat had been quiet for almost that long
        assert await responder.answer(HERE, "still there?") == "loud here"
        assert redis_client.ttl(key) == pytest.approx(CHAT_PERSONA_TTL_S, abs=5)  # renewed by the answer
        redis_client.pexpire(key, 1)  # quiet for all of it
        await asyncio.sleep(0.05)
        assert await responder.answer(HERE, "and now?") == f"{getattr(settings, platform).persona} here"
    assert await responder.persona_for(HERE.chat) == getattr(settings, platform).persona
    await client.aclose()


async def test_a_chats_persona_choice_is_read_while_redis_refuses_writes(settings: Settings, redis_url, redis_client, write_persona):
    """Renewing the choice is a write; a Redis that refuses writes (here: no replica to write to,
    as after a failover) still tells which persona the chat chose."""
    write_persona("loud", base="smollm2")
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    await responder.set_persona("c1", "loud")
    redis_client.config_set("min-replicas-to-write", 1)
    try:
        assert await responder.persona_for("c1") == "loud"
    finally:
        redis_client.config_set("min-replicas-to-write", 0)
    await client.aclose()


async def test_redis_refusing_writes_means_polite_replies_not_silence(settings: Settings, redis_url, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    with redis_refusing_writes(redis_client):
        assert await responder.answer(HERE, "hello?") == BUSY_TEXT
        assert await responder.set_persona("c1", settings.telegram.persona) == BUSY_TEXT
    await client.aclose()


async def test_more_than_a_hundred_questions_waiting_at_once_are_all_queued(settings: Settings, redis_url, redis_client):
    """Each question waiting for its answer holds a connection, and the bots' client had redis-py's
    pool of 100: past 100 waiting, every asker was told the service was restarting and nothing was
    queued for them, with the queue 900 short of full. The client has room for every question the
    queue can hold (here, no worker runs: each one waits its second, then hears so)."""
    settings.telegram = settings.telegram.model_copy(update={"reply_timeout_s": 1.0})
    client = await connect_async(settings)
    responder = Responder(client, settings, "telegram")
    askers = [Where(chat=str(n), user=str(n)) for n in range(150)]
    replies = await asyncio.gather(*(responder.answer(where, "are you there?") for where in askers))
    assert set(replies) == {NO_WORKER_TIMEOUT_TEXT}
    assert redis_client.xlen(keys.STREAM_INTERACTIVE) == 150
    await client.aclose()


async def test_a_client_out_of_connections_says_busy_not_restarting(settings: Settings, redis_url, redis_client):
    """Should a client still run out of connections (redis-py's MaxConnectionsError), the asker
    hears that the bot is busy, at once: not that the service is restarting, after the whole wait."""
    settings.telegram = settings.telegram.model_copy(update={"reply_timeout_s": 3.0})
    client = redis.asyncio.Redis.from_url(redis_url, max_connections=4)
    responder = Responder(client, settings, "telegram")
    askers = [Where(chat=str(n), user=str(n)) for n in range(20)]
    started = asyncio.get_running_loop().time()
    replies = await asyncio.gather(*(responder.answer(where, "are you there?") for where in askers))
    assert BUSY_TEXT in replies and UNREACHABLE_TEXT not in replies
    assert set(replies) <= {BUSY_TEXT, NO_WORKER_TIMEOUT_TEXT}
    assert asyncio.get_running_loop().time() - started < 6  # the busy ones were told at once
    await client.aclose()


async def test_an_answer_kept_under_a_name_stays_as_it_was(settings: Settings, redis_url, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "discord")
    with scripted_worker(settings, lambda r: f"about {r.messages[-1].content}"):
        await responder.answer(HERE, "calm", keep_as="interaction:1")
        await responder.answer(HERE, "rain")  # the conversation moves on
        await responder.retry(HERE, keep_as="interaction:2")
    assert [m.content for m in await responder.kept("interaction:1")] == ["calm", "about calm"]
    assert [m.content for m in await responder.kept("interaction:2")] == ["calm", "about calm", "rain", "about rain"]
    await client.aclose()


async def test_a_chat_that_changes_id_keeps_its_persona_and_conversations(
    settings: Settings, redis_url, redis_client, write_persona
):
    write_persona("loud", base="smollm2")
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    turns = [Message(role="user", content="my name is Ada"), Message(role="assistant", content="Hello, Ada.")]
    await responder.set_persona("-100", "loud")
    await responder.store.save("-100:7", turns)
    await responder.move_chat("-100", "-200")
    assert await responder.persona_for("-200") == "loud" and await responder.persona_for("-100") == settings.telegram.persona
    assert await responder.store.load("-200:7") == turns and await responder.store.load("-100:7") == []
    await client.aclose()


async def test_a_reset_as_the_answer_arrives_holds(settings: Settings, redis_url, redis_client):
    """A /reset (which takes no lock) landing after the reply came but before the exchange was
    saved, here while the in-flight mark is cleared: the save used to undo it."""
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    clear = responder.store.clear_inflight

    async def reset_meanwhile(scope: str, request_id: str) -> None:
        await responder.reset(HERE)
        await clear(scope, request_id)

    responder.store.clear_inflight = reset_meanwhile
    with scripted_worker(settings, lambda r: "Hello, Ada."):
        assert await responder.answer(HERE, "my name is Ada") == "Hello, Ada."
    assert await responder.store.load(HERE.scope) == []
    responder.store.clear_inflight = clear
    with scripted_worker(settings, lambda r: "Hello again."):
        await responder.answer(HERE, "hi")  # the next exchange is kept as usual
    assert [m.content for m in await responder.store.load(HERE.scope)] == ["hi", "Hello again."]
    await client.aclose()


def test_the_bots_notices_are_no_part_of_what_the_persona_said():
    """A conversation rebuilt from the messages the bot sent (Discord's reply chain) leaves out
    what the bot said for itself, as the conversation kept in Redis does."""
    for notice in (NO_WORKER_TEXT, BUSY_TEXT, rate_limited_text(42)):
        assert persona_words(notice) == ""
    assert persona_words("Stillness." + LONG_MESSAGE_NOTE.format(chars=6000)) == "Stillness."
    assert persona_words("I can't answer that: some things are private.") == "I can't answer that: some things are private."


async def test_while_a_worker_loads_its_models_the_asker_hears_the_persona_is_waking_up(
    settings: Settings, redis_url, redis_client
):
    """Askers heard "none of my workers is running right now" while a worker was loading
    its models (about 15 s on a CPU, minutes of warm-up on a GPU), and at the end of the
    wait that none ran."""
    settings.telegram = settings.telegram.model_copy(update={"reply_timeout_s": 2.0})
    heartbeat.announce_starting(redis_client, heartbeat.StartingWorker(id="w-warming", persona="sage", model="smollm2"), 60)
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    told: list[str] = []

    async def notify(text: str) -> None:
        told.append(text)

    try:
        assert await responder.answer(HERE, "anyone home?", notify=notify) == STARTING_TIMEOUT_TEXT
    finally:
        heartbeat.withdraw(redis_client, "w-warming")  # the tests after this one have no worker starting
        await client.aclose()
    assert told == [STARTING_TEXT]
    assert persona_words(STARTING_TEXT) == persona_words(STARTING_TIMEOUT_TEXT) == ""  # never read back as its words


async def test_a_refusal_that_ends_in_a_question_is_one_sentence_not_two(
    settings: Settings, redis_url, redis_client, running_worker, write_persona
):
    """A worker's refusal ending in "did you mean 'temperature'?" read "...'temperature'?." to the asker."""
    write_persona("dc", base="smollm2", sampling={"temprature": 0.5})
    settings.telegram = settings.telegram.model_copy(update={"persona": "dc"})
    running_worker()
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    reply = await responder.answer(HERE, "hello?")
    assert reply.startswith("I can't answer that: ") and reply.endswith("did you mean 'temperature'?")
    assert responder.describe_persona("dc") == "dc (its persona file cannot be read right now)"
    await client.aclose()


async def test_a_persona_withdrawn_from_the_platform_stops_answering_there(
    settings: Settings, redis_url, redis_client, write_persona, personas_dir
):
    """The chat chose 'other'; then its file dropped telegram from adapters (or was deleted). It
    went on answering as 'other', and /persona still said "You are talking to Other"."""
    write_persona("tg", base="smollm2")
    write_persona("other", base="smollm2")
    settings.telegram = settings.telegram.model_copy(update={"persona": "tg"})
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    await responder.set_persona("c1", "other")
    with scripted_worker(settings, lambda r: f"as {r.persona}: {r.messages[-1].content}") as seen:
        assert await responder.answer(HERE, "hi") == "as other: hi"
        write_persona("other", base="smollm2", adapters=["cli"])
        assert await responder.answer(HERE, "hello") == (
            "I can't answer as 'other': it is not offered here any more. "
            "Available: bofh, sage, tg. Pick one with /persona NAME."
        )
        assert len(seen) == 1  # the worker never saw it
        assert await responder.persona_text("c1") == (
            "This chat's persona, 'other', is not offered here any more; pick another with /persona NAME "
            "(offered here: bofh, sage, tg)."
        )
        # Once the chat picks one that is offered, /retry answers the question that got none.
        await responder.set_persona("c1", "tg")
        assert await responder.retry(HERE) == "as tg: hello"
        (personas_dir / "tg.toml").unlink()  # deleted: the same
        assert (await responder.answer(HERE, "still there?")).startswith("I can't answer as 'tg': it is not offered")
    assert persona_words(await responder.answer(HERE, "and now?")) == ""  # a notice, not the persona's words
    await client.aclose()


async def test_persona_in_a_chat_whose_persona_was_withdrawn_with_none_left_says_to_come_back_later(
    settings: Settings, redis_url, redis_client, write_persona
):
    for bundled in ("bofh", "sage"):  # overridden, not offered here: only 'tg' is
        write_persona(bundled, base="smollm2", adapters=["cli"])
    write_persona("tg", base="smollm2")
    settings.telegram = settings.telegram.model_copy(update={"persona": "tg"})
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "telegram")
    assert await responder.persona_text("c1") == "You are talking to Tg: test persona tg\nAvailable: tg"
    assert await responder.persona_text("c1", available=False) == "You are talking to Tg: test persona tg"
    write_persona("tg", base="smollm2", adapters=["cli"])
    assert await responder.persona_text("c1", available=False) == (
        "This chat's persona, 'tg', is not offered here any more, and none is right now; please try again later."
    )
    await client.aclose()


async def test_a_default_persona_withdrawn_while_running_is_said_to_the_asker_and_logged_once(
    settings: Settings, redis_url, redis_client, write_persona, caplog
):
    write_persona("tg", base="smollm2")
    settings.discord = settings.discord.model_copy(update={"persona": "tg"})
    client = redis.asyncio.Redis.from_url(redis_url)
    responder = Responder(client, settings, "discord")
    write_persona("tg", base="smollm2", adapters=["cli", "telegram"])
    with scripted_worker(settings, lambda r: f"as {r.persona}") as seen, caplog.at_level("INFO", "adapters.responder"):
        for chat in ("c1", "c2"):
            reply = await responder.answer(Where(chat=chat, user="u1"), "hello")
            assert reply == ("I can't answer as 'tg': it is not offered here any more. Available: bofh, sage. "
                             "Pick one with /persona NAME.")
        assert not seen
        said = [r.getMessage() for r in caplog.records if "default persona" in r.getMessage()]
        assert said == [(
            "discord: the default persona 'tg' (PERSONA_DISCORD__PERSONA) is no longer offered here (its file is "
            "gone, or its adapters no longer lists 'discord'), so chats that chose no persona are not answered: add "
            "'discord' back to its adapters, or set PERSONA_DISCORD__PERSONA to one of bofh, sage and restart"
        )]
        write_persona("tg", base="smollm2")  # put back: answered again, and that is said too
        assert await responder.answer(HERE, "hello") == "as tg"
        assert "discord: the default persona 'tg' is offered here again" in caplog.messages


def test_a_default_persona_that_is_not_there_or_not_on_the_platform_is_refused_naming_the_setting(
    settings: Settings, write_persona
):
    write_persona("dc", base="smollm2", adapters=["cli", "telegram"])
    settings.telegram = settings.telegram.model_copy(update={"persona": "dcc"})
    with pytest.raises(ConfigError, match=r"^PERSONA_TELEGRAM__PERSONA names 'dcc', .*Did you mean 'dc'\? Fix the setting$"):
        check_default_persona(settings, "telegram")
    settings.discord = settings.discord.model_copy(update={"persona": "dc"})
    with pytest.raises(ConfigError, match=r"^PERSONA_DISCORD__PERSONA names 'dc', whose adapters list has no 'discord'"):
        check_default_persona(settings, "discord")
    settings.telegram = settings.telegram.model_copy(update={"persona": "dc"})
    check_default_persona(settings, "telegram")
