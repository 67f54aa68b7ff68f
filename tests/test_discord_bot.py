"""The Discord adapter, with the real discord.py against a local fake REST API and gateway.

The bot is pointed at the fake by ``PERSONA_DISCORD__API_URL`` alone: it asks the
fake's ``/gateway/bot`` where the websocket is, exactly as it would a real proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import discord
import pytest
import redis
from discord.gateway import DiscordWebSocket
from pydantic import SecretStr

from adapters import delivery
from adapters.discord_bot import NOT_TEXT_TEXT, OPERATOR_ONLY_TEXT, PersonaBot
from adapters.responder import (
    BARE_MENTION_TEXT,
    BUSY_TEXT,
    NO_WORKER_TEXT,
    NO_WORKER_TIMEOUT_TEXT,
    RESET_TEXT,
    RESTARTING_TEXT,
    UNREACHABLE_TEXT,
)
from persona import constants as keys
from persona import swap as swaps
from persona.errors import ConfigError, PlatformUnreachable
from persona.personas import PersonaRegistry
from persona.settings import Settings
from tests.conftest import free_port
from tests.fakes.checkpoints import make_checkpoint
from tests.fakes.discord_api import (
    BOT_ID,
    CHANNEL_ID,
    GUILD_ID,
    OPERATOR_ROLE_ID,
    OTHER_CHANNEL_ID,
    STRANGER_CHANNEL_ID,
    STRANGER_GUILD_ID,
    STRANGER_ROLE_ID,
    FakeDiscord,
)
from tests.fakes.full_redis import redis_refusing_writes
from tests.fakes.scripted_worker import scripted_worker

TOKEN = "MTIzNDU2Nzg5.fake-discord.token_value"
DM_CHANNEL = 940000000000000001


@pytest.fixture
async def fake_api():
    fake = FakeDiscord(token=TOKEN)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def discord_settings(settings: Settings, fake_api: FakeDiscord, write_persona, tiny_llama_dir) -> Settings:
    write_persona("dc", base=str(tiny_llama_dir))
    settings.discord = settings.discord.model_copy(
        update={"token": SecretStr(TOKEN), "api_url": fake_api.api_url, "persona": "dc"}
    )
    return settings


@pytest.fixture
async def start_bot(discord_settings: Settings, fake_api: FakeDiscord, redis_client: redis.Redis):
    """Start a bot with some settings changed, connected to the fake: ``await start_bot(...)``."""
    running: list[tuple[PersonaBot, asyncio.Task]] = []
    default_base, default_gateway = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY

    async def start(**changes) -> PersonaBot:
        discord_settings.discord = discord_settings.discord.model_copy(update=changes)
        bot = PersonaBot(discord_settings)
        task = asyncio.create_task(bot.start_with_settings())
        running.append((bot, task))
        ready = asyncio.create_task(bot.wait_until_ready())
        done, _ = await asyncio.wait({ready, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()  # raises what stopped the bot
        assert ready in done, "the bot did not become ready"
        return bot

    yield start
    for bot, task in running:
        await bot.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = default_base, default_gateway


def echo(request) -> str:
    return "echo: " + " | ".join(f"{m.role}={m.content}" for m in request.messages)



async def kept_turns(fake_api, redis_client, key: str, turns: int) -> list[dict]:
    """The conversation once it holds ``turns`` turns: an exchange is kept once its reply went
    out, a moment after the fake received it."""
    await fake_api.wait_for(lambda: len(json.loads(redis_client.get(key) or "[]")) >= turns)
    return json.loads(redis_client.get(key))

async def test_it_connects_where_the_api_says_and_registers_its_commands(start_bot, fake_api):
    await start_bot()
    assert ("GET", "/gateway/bot") in fake_api.requests
    assert str(DiscordWebSocket.DEFAULT_GATEWAY) == fake_api.ws_url
    assert fake_api.intents & (1 << 15)  # MESSAGE_CONTENT was asked for
    assert {c["name"] for c in fake_api.commands} == {
        "ask", "retry", "reset", "cancel", "persona", "queue", "swap", "rollback",
    }


async def test_a_mention_is_answered_through_a_real_worker(start_bot, fake_api, running_worker, redis_client):
    running_worker()
    await start_bot()
    question = await fake_api.user_message("what is patience?", mention_bot=True)
    await fake_api.wait_for(lambda: len(fake_api.sent) == 1, timeout=60)
    reply = fake_api.sent[0]
    assert int(reply["message_reference"]["message_id"]) == int(question["id"])
    assert reply["allowed_mentions"]["parse"] == []  # a persona never pings anyone
    assert any(channel == CHANNEL_ID for channel, _ in fake_api.typing)
    stored = await kept_turns(fake_api, redis_client, keys.conversation_key("discord", f"{CHANNEL_ID}:111"), 2)
    assert stored[0] == {"role": "user", "content": "what is patience?"}
    assert stored[1]["role"] == "assistant"


async def test_only_mentions_dms_and_replies_to_the_bot_are_answered(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        await fake_api.user_message("talking among ourselves")
        await fake_api.user_message("hello bot", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
        first = fake_api.sent[0]
        await fake_api.user_message("in private", guild=False, channel_id=DM_CHANNEL)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 2)
        # A reply to the bot's reply: the chain (fetched from the API) is the context.
        await fake_api.user_message("tell me more", reply_to=first)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
    assert fake_api.texts(DM_CHANNEL) == ["echo: user=in private"]
    contexts = [[(m.role, m.content) for m in r.messages] for r in seen]
    assert contexts[0] == [("user", "hello bot")]
    assert contexts[2] == [("user", "hello bot"), ("assistant", "echo: user=hello bot"), ("user", "tell me more")]
    assert all(r.source == "discord" and r.user == "discord:111" for r in seen)


async def test_a_mention_of_the_bots_own_role_is_a_mention(start_bot, fake_api, discord_settings):
    """Discord's mention menu offers the bot and the role made for it under one name; a question
    that mentioned the role was met with silence."""
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        question = await fake_api.user_message("what is patience?", mention_bot_role=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
    assert fake_api.texts() == ["echo: user=what is patience?"]
    assert str(fake_api.sent[0]["message_reference"]["message_id"]) == question["id"]
    assert [m.content for m in seen[0].messages] == ["what is patience?"]  # the role's tag is not part of it


async def test_a_bare_mention_or_a_picture_gets_a_sentence_not_silence(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        await fake_api.user_message("", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
        await fake_api.user_message("", guild=False, channel_id=DM_CHANNEL, attachment="cat.png")
        await fake_api.wait_for(lambda: len(fake_api.sent) == 2)
        await fake_api.user_message("", attachment="cat.png")  # not addressed to the bot: none of its business
        await fake_api.user_message("and now a question", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
    assert fake_api.texts() == [BARE_MENTION_TEXT, NOT_TEXT_TEXT, "echo: user=and now a question"]
    assert len(seen) == 1  # neither went to a worker


async def test_a_message_too_long_for_discord_which_its_app_sent_as_a_file_is_read(start_bot, fake_api, discord_settings):
    """Discord's app makes a message over 2,000 characters into ``message.txt``: it was met with
    "I can't open files. Please write your message as text", which cannot be done. Now the file
    is downloaded (from the fake's own CDN, over a socket) and read as the message, a paste; the
    words written with it come after, and a reply to the answer still has the paste before it."""
    essay = "\n\n".join(f"Paragraph {n}: " + "tea and patience " * 40 for n in range(4)) + "\nnaïve café ✓"
    assert len(essay) > 2000
    with scripted_worker(discord_settings, lambda r: "echo: " + r.messages[-1].content[-30:]) as seen:
        await start_bot()
        await fake_api.user_message("", guild=False, channel_id=DM_CHANNEL, attachment="message.txt",
                                    attachment_bytes=essay.encode())
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
        await fake_api.user_message("what is this about?", mention_bot=True, attachment="message.txt",
                                    attachment_bytes=("\ufeff" + essay.replace("\n", "\r\n")).encode())
        await fake_api.wait_for(lambda: len(fake_api.sent) == 2)
        await fake_api.user_message("and the last paragraph?", reply_to=fake_api.sent[-1])
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
    assert [m.content for m in seen[0].messages] == [essay]
    assert [m.content for m in seen[1].messages] == [essay + "\n\nwhat is this about?"]  # no BOM, no CRs
    assert [(m.role, m.content) for m in seen[2].messages] == [
        ("user", essay + "\n\nwhat is this about?"), ("assistant", fake_api.sent[1]["content"]),
        ("user", "and the last paragraph?"),
    ]
    assert len(fake_api.downloads) == 2  # the reply chain's paste was read once, then remembered
    assert NOT_TEXT_TEXT not in fake_api.texts()


async def test_a_text_file_that_cannot_be_read_gets_a_sentence_saying_why(start_bot, fake_api, discord_settings):
    """Too big (left undownloaded), not UTF-8, or gone from the CDN: the sender hears which file
    and what to do, nothing reaches a worker, and a reply to that sentence leaves it out."""
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        await fake_api.user_message("read this", mention_bot=True, attachment="huge.log",
                                    attachment_bytes=b"x" * 100_001, content_type="text/plain")
        await fake_api.user_message("", guild=False, channel_id=DM_CHANNEL, attachment="old.txt",
                                    attachment_bytes="caf\xe9".encode("latin-1"))
        fake_api.gone_files.add("gone.md")
        await fake_api.user_message("and this", mention_bot=True, attachment="gone.md", attachment_bytes=b"# notes")
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
        too_big = next(m for m in fake_api.sent if "huge.log" in m["content"])
        await fake_api.user_message("sorry, here it is: tea", reply_to=too_big)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 4)
    texts = sorted(fake_api.texts()[:3])
    assert texts[0].startswith("I couldn't read your file gone.md: Discord would not let me download it (404")
    assert texts[1] == ("I couldn't read your file huge.log: it is 101 KB, and I read text files of up to 100 KB. "
                        "Please send me the part that matters, as a message or a smaller file.")
    assert texts[2].startswith("I couldn't read your file old.txt: it is not UTF-8 text.")
    assert not any(path.endswith("huge.log") for path in fake_api.downloads)
    assert [[(m.role, m.content) for m in r.messages] for r in seen] == [[("user", "read this"), ("user", "sorry, here it is: tea")]]


async def test_mentions_reach_the_persona_as_names_not_codes(start_bot, fake_api, discord_settings):
    """``<@222> <@&930…> <#920…>`` reached the model as digits it cannot read; the bot's own mention
    is still left out, wherever it stands."""
    content = (f"ask <@222> and <@&{OPERATOR_ROLE_ID}>, <@{BOT_ID}>, to meet in <#{OTHER_CHANNEL_ID}> "
               "<:blobcat:123456789012345678> at <t:1735732800:f>; try </ask:123456789012345679>, <@333>")
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        await fake_api.user_message(content, mention_bot=True, mentions=[(222, "grace")])
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
    assert seen[0].messages[-1].content == (
        "ask @grace and @persona-ops, , to meet in #off-topic :blobcat: at 2025-01-01 12:00 UTC; try /ask, @unknown-user"
    )


async def test_mentions_in_slash_ask_reach_the_persona_as_names_not_codes(start_bot, fake_api, discord_settings):
    """/ask's text has no message to name its mentions: they come from the interaction's resolved
    people, the server and the client's cache, as a message's do."""
    content = f"ask <@222> and <@&{OPERATOR_ROLE_ID}> in <#{OTHER_CHANNEL_ID}> at <t:1735732800:f>, <@333>"
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        await fake_api.slash("ask", {"text": content}, mentions=[(222, "grace")])
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
        await fake_api.slash("ask", {"text": f"and <@222> in <#{OTHER_CHANNEL_ID}>?"}, guild=False,
                             channel_id=DM_CHANNEL, mentions=[(222, "grace")])
        await fake_api.wait_for(lambda: len(fake_api.sent) == 2)
    assert seen[0].messages[-1].content == "ask @grace and @persona-ops in #off-topic at 2025-01-01 12:00 UTC, @unknown-user"
    assert seen[1].messages[-1].content == "and @grace in #off-topic?"


async def test_a_long_reply_is_split_at_2000_characters(start_bot, fake_api, discord_settings):
    words = " ".join(f"word{i}" for i in range(700))  # about 5,900 characters
    with scripted_worker(discord_settings, lambda r: words):
        await start_bot()
        await fake_api.user_message("everything", mention_bot=True)
        await fake_api.wait_for(lambda: len(" ".join(fake_api.texts())) >= len(words))
    texts = fake_api.texts()
    assert len(texts) == 3 and all(len(t) <= 2000 for t in texts)
    assert " ".join(texts) == words


async def test_an_emoji_rich_reply_fills_messages_as_discord_counts_them(start_bot, fake_api, discord_settings):
    """Discord counts code points: 3,000 emoji are two messages (three in UTF-16 units), and a run
    of flags is never cut between a flag's two letters."""
    flags = "🇬🇧" * 1500
    with scripted_worker(discord_settings, lambda r: "😀" * 3000 + "\n\n" + flags):
        await start_bot()
        await fake_api.user_message("emoji", mention_bot=True)
        await fake_api.wait_for(lambda: "".join(fake_api.texts()).count("🇬🇧") == 1500)
    texts = fake_api.texts()
    assert len(texts) == 4 and all(len(t) <= 2000 for t in texts)
    assert "".join(texts[:2]) == "😀" * 3000 and "".join(texts[2:]) == flags
    assert all(len(t) % 2 == 0 for t in texts[2:])


async def test_with_no_worker_running_a_mention_and_a_command_hear_so(start_bot, fake_api, discord_settings):
    """No worker: "typing…" for two minutes, then an apology for thinking too long. Now the
    asker hears within seconds that no worker runs (the question waits for one), and at the
    end that none ran."""
    await start_bot(reply_timeout_s=2.0)
    question = await fake_api.user_message("anyone home?", mention_bot=True)
    await fake_api.wait_for(lambda: len(fake_api.sent) == 2, timeout=10)
    assert fake_api.texts() == [NO_WORKER_TEXT, NO_WORKER_TIMEOUT_TEXT]
    assert str(fake_api.sent[0]["message_reference"]["message_id"]) == question["id"]  # quoted, in a server
    await fake_api.slash("ask", {"text": "and now?"})
    await fake_api.wait_for(lambda: len(fake_api.sent) == 4, timeout=10)
    assert fake_api.public_texts()[2:] == [NO_WORKER_TEXT, NO_WORKER_TIMEOUT_TEXT]


async def test_the_fake_refuses_what_discord_refuses(start_bot, fake_api, discord_settings):
    """Discord's own rule, so the tests above prove something: over 2,000 code points is refused."""
    bot = await start_bot()
    channel = bot.get_channel(CHANNEL_ID)
    await channel.send("😀" * 2000)
    with pytest.raises(discord.HTTPException, match="2000 or fewer"):
        await channel.send("a" * 2001)
    assert fake_api.texts() == ["😀" * 2000]


async def test_a_reply_to_the_last_part_of_a_long_answer_continues_from_the_question(start_bot, fake_api, discord_settings):
    words = " ".join(f"word{i}" for i in range(700))  # three messages

    def script(request) -> str:
        return words if len(request.messages) == 1 else "briefly: words"

    with scripted_worker(discord_settings, script) as seen:
        await start_bot()
        await fake_api.user_message("tell me everything", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
        await fake_api.user_message("and briefly?", reply_to=fake_api.sent[-1])
        await fake_api.wait_for(lambda: len(fake_api.sent) == 4)
    context = [(m.role, m.content.replace("\n", " ")) for m in seen[1].messages]
    assert context == [("user", "tell me everything"), ("assistant", words), ("user", "and briefly?")]


async def test_a_reply_to_a_slash_commands_answer_continues_from_its_question(start_bot, fake_api, discord_settings):
    """/ask's answer quotes nothing (the question was the command's option): the reply chain
    alone would be that answer, and a request cannot open with the persona's words."""
    words = " ".join(f"word{i}" for i in range(700))  # three follow-up messages

    def script(request) -> str:
        question = request.messages[-1].content
        return words if question == "tell me everything" else f"about {question}"

    with scripted_worker(discord_settings, script) as seen:
        await start_bot()
        await fake_api.slash("ask", {"text": "tell me everything"})
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
        last_part = fake_api.sent[-1]
        await fake_api.slash("ask", {"text": "what is rain?"})  # the conversation moves on
        await fake_api.wait_for(lambda: len(fake_api.sent) == 4)
        await fake_api.user_message("and briefly?", reply_to=last_part, author_id=222)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 5)
    context = [(m.role, m.content.replace("\n", " ")) for m in seen[2].messages]
    assert context == [("user", "tell me everything"), ("assistant", words), ("user", "and briefly?")]


async def test_a_reply_in_a_dm_continues_the_whole_conversation(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        for n, text in enumerate(["my name is Ada", "I like tea"]):
            await fake_api.user_message(text, guild=False, channel_id=DM_CHANNEL)
            await fake_api.wait_for(lambda n=n: len(fake_api.sent) == n + 1)
        await fake_api.user_message("what is my name?", guild=False, channel_id=DM_CHANNEL, reply_to=fake_api.sent[-1])
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
    assert [m.role for m in seen[2].messages] == ["user", "assistant", "user", "assistant", "user"]
    assert seen[2].messages[0].content == "my name is Ada" and seen[2].messages[-1].content == "what is my name?"


async def test_a_429_delays_the_reply_but_never_loses_it(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, echo):
        await start_bot()
        fake_api.rate_limit(f"/channels/{CHANNEL_ID}/messages", 1.0)
        started = time.monotonic()
        await fake_api.user_message("hi", mention_bot=True)
        await fake_api.wait_for(lambda: fake_api.texts() == ["echo: user=hi"])
    assert time.monotonic() - started >= 1.0
    posts = [r for r in fake_api.requests if r == ("POST", f"/channels/{CHANNEL_ID}/messages")]
    assert len(posts) == 2


@pytest.mark.parametrize("failure", ["503", "drop"])
async def test_an_answer_discord_fails_to_take_once_is_sent_again(start_bot, fake_api, discord_settings, failure, caplog):
    with scripted_worker(discord_settings, echo):
        await start_bot()
        fake_api.fail_sends(failure)  # discord.py itself tries a 503, or a reset connection on Linux, only once
        await fake_api.user_message("hi", mention_bot=True)
        await fake_api.wait_for(lambda: fake_api.texts() == ["echo: user=hi"])
    posts = [r for r in fake_api.requests if r == ("POST", f"/channels/{CHANNEL_ID}/messages")]
    assert len(posts) == 2 and "Traceback" not in caplog.text


async def test_a_part_that_arrived_though_its_answer_was_lost_is_not_posted_twice(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, lambda request: "x" * 2500):
        await start_bot()
        fake_api.fail_sends("drop after posting")
        await fake_api.user_message("hi", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
        await asyncio.sleep(0.3)
    assert "".join(fake_api.texts()) == "x" * 2500  # the first part once, quoted by the second
    assert int(fake_api.sent[1]["message_reference"]["message_id"]) == int(fake_api.sent[0]["id"])


async def test_an_answer_that_never_went_out_is_logged_in_one_line_and_kept_unanswered(
    start_bot, fake_api, discord_settings, redis_client, caplog, monkeypatch
):
    monkeypatch.setattr(delivery, "FIRST_RETRY_WAIT_S", 0.05)
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        fake_api.fail_sends(*["503"] * delivery.DELIVERY_TRIES)
        await fake_api.user_message("my name is Ada", guild=False, channel_id=DM_CHANNEL)
        await fake_api.wait_for(lambda: len(fake_api.requests) and not fake_api.failing_sends)
        await asyncio.sleep(0.3)
        assert fake_api.texts() == []
        stored = json.loads(redis_client.get(keys.conversation_key("discord", f"{DM_CHANNEL}:111")))
        assert stored == [{"role": "user", "content": "my name is Ada"}]
        await fake_api.user_message("and yours?", guild=False, channel_id=DM_CHANNEL)
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 1)
    assert [m.content for m in seen[1].messages] == ["my name is Ada", "and yours?"]  # no answer it never saw
    failures = [r for r in caplog.records if "could not send" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is None and "503" in failures[0].getMessage()
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("failure", ["503", "drop", "drop after posting"])
async def test_a_slash_answer_discord_fails_to_take_once_is_shown_once_and_kept(
    start_bot, fake_api, discord_settings, redis_client, failure, caplog
):
    """discord.py tries a 5xx on a follow-up again by itself, and nothing else. The answer fills
    its "thinking…" in by an edit, which can be sent again: a second edit shows it once."""
    conversation = keys.conversation_key("discord", f"{CHANNEL_ID}:111")
    with scripted_worker(discord_settings, echo):
        await start_bot()
        fake_api.fail_sends(failure)
        await fake_api.slash("ask", {"text": "what is calm?"})
        await fake_api.wait_for(lambda: fake_api.texts() and redis_client.get(conversation) is not None)
        await asyncio.sleep(0.3)
    assert fake_api.public_texts() == ["echo: user=what is calm?"]
    stored = json.loads(redis_client.get(conversation))
    assert stored == [{"role": "user", "content": "what is calm?"}, {"role": "assistant", "content": "echo: user=what is calm?"}]
    assert "Traceback" not in caplog.text


async def test_a_slash_answer_that_never_went_out_is_logged_in_one_line_and_retry_answers_it(
    start_bot, fake_api, discord_settings, redis_client, caplog, monkeypatch
):
    monkeypatch.setattr(delivery, "FIRST_RETRY_WAIT_S", 0.05)
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        fake_api.fail_sends(*["drop"] * delivery.DELIVERY_TRIES)
        await fake_api.slash("ask", {"text": "my name is Ada"})
        await fake_api.wait_for(lambda: not fake_api.failing_sends, timeout=10)
        await asyncio.sleep(0.3)
        assert fake_api.texts() == []
        stored = json.loads(redis_client.get(keys.conversation_key("discord", f"{CHANNEL_ID}:111")))
        assert stored == [{"role": "user", "content": "my name is Ada"}]  # unanswered, as it was never seen
        await fake_api.slash("retry")
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 1)
    assert fake_api.texts() == ["echo: user=my name is Ada"]
    assert [m.content for m in seen[1].messages] == ["my name is Ada"]
    failures = [r for r in caplog.records if "could not send" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is None and "after 4 tries" in failures[0].getMessage()
    assert "Traceback" not in caplog.text


async def test_a_long_slash_answers_part_that_may_have_arrived_is_not_posted_twice(
    start_bot, fake_api, discord_settings, redis_client, caplog
):
    """A follow-up (the parts after the first) has no nonce: one whose connection dropped once it
    was sent may have been posted, and is not sent again (a second copy confuses more than a
    missing one)."""
    with scripted_worker(discord_settings, lambda request: "x" * 2500):
        await start_bot()
        fake_api.fail_sends("ok", "drop after posting")
        await fake_api.slash("ask", {"text": "go on"})
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
        await asyncio.sleep(0.3)
    assert "".join(fake_api.texts()) == "x" * 2500
    stored = json.loads(redis_client.get(keys.conversation_key("discord", f"{CHANNEL_ID}:111")))
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert "no confirmation that part 2 of 2" in caplog.text and "Traceback" not in caplog.text


async def test_rate_limits_and_a_busy_queue_get_friendly_replies(start_bot, fake_api, discord_settings, redis_client):
    with scripted_worker(discord_settings, echo):
        await start_bot(user_messages_per_minute=1)
        for n in range(3):
            await fake_api.user_message(f"m{n}", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 2)
        await asyncio.sleep(0.3)
    answers = sorted(fake_api.texts())
    assert len(answers) == 2 and answers[0].startswith("I need a moment to catch up") and answers[1].startswith("echo: user=m")

    discord_settings.queue.max_length = 1
    redis_client.xadd(keys.STREAM_INTERACTIVE, {"r": b"{}"})
    await fake_api.user_message("busy?", mention_bot=True, author_id=222)
    await fake_api.wait_for(lambda: fake_api.texts()[-1] == BUSY_TEXT)


async def test_a_flood_is_counted_as_it_comes_and_told_to_slow_down_at_once(start_bot, fake_api, discord_settings):
    """Each message counted against the rate limit only when its turn came, after the answers to
    those before it: the notice came only once they were written. Counted as it comes, the notice
    goes out while the first answer is still being written, and the first two are answered."""
    writing = threading.Event()  # no answer is written until the notice went out

    def slow_echo(request) -> str:
        writing.wait(10)
        return echo(request)

    with scripted_worker(discord_settings, slow_echo):
        await start_bot(user_messages_per_minute=2)
        for n in range(8):
            await fake_api.user_message(f"m{n}", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1, timeout=5)
        writing.set()
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
        await asyncio.sleep(0.5)
    texts = fake_api.texts()
    assert texts[0].startswith("I need a moment to catch up")
    assert [answer.rsplit("=", 1)[1] for answer in texts[1:]] == ["m0", "m1"]


async def test_allow_and_deny_lists(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, echo):
        await start_bot(denied_channels=[OTHER_CHANNEL_ID], dm_policy="allowlist", allowed_users=[333])
        await fake_api.user_message("here?", mention_bot=True, channel_id=OTHER_CHANNEL_ID)
        await fake_api.user_message("dm", guild=False, channel_id=DM_CHANNEL, author_id=444)
        await fake_api.user_message("dm", guild=False, channel_id=DM_CHANNEL + 1, author_id=333)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 2)
        await asyncio.sleep(0.3)
    assert fake_api.texts(OTHER_CHANNEL_ID) == []
    assert "only talk to people on my list" in fake_api.texts(DM_CHANNEL)[0]
    assert fake_api.texts(DM_CHANNEL + 1) == ["echo: user=dm"]


async def test_slash_ask_retry_and_reset(start_bot, fake_api, discord_settings, redis_client):
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        await fake_api.slash("ask", {"text": "what is calm?"})
        await fake_api.wait_for(lambda: fake_api.texts() == ["echo: user=what is calm?"])
        assert fake_api.interaction_responses[0]["type"] == 5  # "thinking…" while it waits
        await fake_api.slash("retry")
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
        assert [m.content for m in seen[1].messages] == ["what is calm?"] and seen[1].sampling.seed is not None
        await fake_api.slash("reset")
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 3)
    assert fake_api.texts()[2] == RESET_TEXT
    assert redis_client.get(keys.conversation_key("discord", f"{CHANNEL_ID}:111")) is None


async def test_a_rate_limited_slash_command_is_refused_to_its_user_alone(start_bot, fake_api, discord_settings):
    """Every command counts against the rate limits, as messages do: past them the first gets the
    notice, for its user's eyes only, and the rest nothing (a flood is not met with a flood).
    The limits are read before "thinking…" (Discord keeps a response as visible as it was
    deferred, so a refusal filling in a public "thinking…" would be shown to the whole channel)."""
    with scripted_worker(discord_settings, echo):
        await start_bot(user_messages_per_minute=2)
        await fake_api.slash("ask", {"text": "first"})
        await fake_api.wait_for(lambda: fake_api.texts() == ["echo: user=first"])
        await fake_api.slash("reset")
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
        for command in ("ask", "retry", "reset", "cancel", "persona", "reset"):
            await fake_api.slash(command, {"text": "more"} if command == "ask" else None)
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 3)
        await asyncio.sleep(0.5)
    assert [r["type"] for r in fake_api.interaction_responses] == [5, 5, 4]  # the notice, unannounced
    assert fake_api.public_texts() == ["echo: user=first"]
    assert fake_api.texts()[1] == RESET_TEXT and fake_api.texts()[2].startswith("I need a moment to catch up")
    assert fake_api.interaction_responses[2]["data"]["flags"] & 64  # for its user alone


async def test_a_slash_command_waiting_on_a_slow_redis_for_the_rate_limit_says_thinking_first(
    start_bot, fake_api, discord_settings, redis_client
):
    """Discord drops a command not answered within 3 s: a Redis slow to count it (here paused)
    gets "thinking…" shown in time, and a refusal then comes on its own, to its user alone."""
    await start_bot(user_messages_per_minute=1)
    await fake_api.slash("reset")
    await fake_api.wait_for(lambda: fake_api.texts() == [RESET_TEXT])
    redis_client.client_pause(2500)
    await fake_api.slash("persona")
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
    assert [r["type"] for r in fake_api.interaction_responses] == [5, 5]  # "thinking…", in time
    assert fake_api.texts()[1].startswith("I need a moment to catch up")
    assert fake_api.sent[1]["flags"] & 64 and fake_api.deleted_originals == []  # it was for its user alone anyway


async def test_dms_refused_by_the_pairing_policy_count_against_the_rate_limit(start_bot, fake_api, discord_settings):
    """A stranger's flood of DMs got a pairing reply each: the limits are read before the policy."""
    await start_bot(dm_policy="pairing", user_messages_per_minute=2)
    for n in range(10):
        await fake_api.user_message(f"hi {n}", guild=False, channel_id=DM_CHANNEL, author_id=4444)
    await fake_api.wait_for(lambda: len(fake_api.texts(DM_CHANNEL)) == 3)
    await asyncio.sleep(0.5)
    said = fake_api.texts(DM_CHANNEL)
    assert len(said) == 3 and said[0] == said[1] and "pairing code" in said[0]
    assert said[2].startswith("I need a moment to catch up")


async def test_a_slash_command_refused_by_the_dm_policy_is_refused_to_its_user_alone(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot(dm_policy="allowlist", allowed_users=[333])
        refused = await fake_api.slash("ask", {"text": "hello?"}, guild=False, channel_id=DM_CHANNEL, author_id=444)
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 1)
        await fake_api.slash("ask", {"text": "hello"}, guild=False, channel_id=DM_CHANNEL + 1, author_id=333)
        await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
    assert "only talk to people on my list" in fake_api.texts()[0]
    assert fake_api.public_texts() == ["echo: user=hello"] and len(seen) == 1
    assert fake_api.deleted_originals == [refused["id"]]


async def test_a_refused_persona_switch_is_told_at_once_to_its_user_alone(
    start_bot, fake_api, discord_settings, write_persona, tiny_llama_dir, redis_client
):
    """Who may switch, and to what, the settings and persona files say: no "thinking…" first."""
    write_persona("other", base=str(tiny_llama_dir))
    await start_bot(operator_ids=[555])
    await fake_api.slash("persona", {"name": "other"}, author_id=111)
    await fake_api.slash("persona", {"name": "nosuch"}, author_id=555)
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
    assert [r["type"] for r in fake_api.interaction_responses] == [4, 4]  # answered, not deferred
    assert fake_api.public_texts() == []
    assert sorted(t.split(" ")[0] for t in fake_api.texts()) == ["Only", "There"]
    assert redis_client.get(keys.chat_persona_key("discord", str(CHANNEL_ID))) is None
    await fake_api.slash("persona", {"name": "other"}, author_id=555)
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 3)
    assert fake_api.public_texts() == [fake_api.texts()[2]] and fake_api.texts()[2].startswith("From now on")


async def test_slash_persona_in_a_channel_whose_persona_was_withdrawn_says_so_in_one_sentence(
    start_bot, fake_api, discord_settings, write_persona, tiny_llama_dir
):
    """It read "You are talking to no one: 'dc' is not offered here any more; pick another with
    /persona NAME" and then "Available: ..." on a line of its own."""
    await start_bot()
    await fake_api.slash("persona")
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 1)
    write_persona("dc", base=str(tiny_llama_dir), adapters=["cli"])
    await fake_api.slash("persona")
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
    assert fake_api.texts() == [
        "You are talking to Dc: test persona dc\nAvailable: bofh, dc, sage",  # while it is offered
        "This chat's persona, 'dc', is not offered here any more; pick another with /persona NAME (offered here: bofh, sage).",
    ]
    assert fake_api.public_texts() == []  # for its user alone, as before


async def test_operator_commands_refuse_ordinary_users(start_bot, fake_api, discord_settings, write_persona, tiny_llama_dir):
    write_persona("other", base=str(tiny_llama_dir))
    await start_bot(operator_ids=[555], operator_role="persona-ops", allowed_guilds=[GUILD_ID])
    await fake_api.slash("queue", author_id=111)
    await fake_api.wait_for(lambda: len(fake_api.interaction_responses) == 1)
    refusal = fake_api.interaction_responses[0]
    assert refusal["data"]["content"] == OPERATOR_ONLY_TEXT and refusal["data"]["flags"] & 64  # ephemeral

    await fake_api.slash("queue", author_id=555)  # answered after "thinking…"
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
    assert "waiting" in fake_api.texts()[1]
    await fake_api.slash("queue", author_id=666, roles=[OPERATOR_ROLE_ID])
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 3)
    assert "workers:" in fake_api.texts()[2]

    await fake_api.slash("persona", {"name": "other"}, author_id=111)
    await fake_api.wait_for(lambda: "Only the bot's operators" in fake_api.texts()[-1])
    await fake_api.slash("persona", {"name": "other"}, author_id=555)
    await fake_api.wait_for(lambda: fake_api.texts()[-1].startswith("From now on you are talking to Other"))


async def test_a_role_named_like_the_operators_in_someone_elses_server_makes_nobody_an_operator(
    start_bot, fake_api, discord_settings
):
    """Anyone can make a server, invite the bot and create a role named like the operators' one:
    the role is matched by its id, which is Discord's to give. A name alone would let them in."""
    with pytest.raises(ConfigError, match="PERSONA_DISCORD__ALLOWED_GUILDS"):
        await start_bot(operator_role="persona-ops")
    await start_bot(operator_role=str(OPERATOR_ROLE_ID))
    await fake_api.stranger_guild()
    await fake_api.slash("queue", author_id=777, roles=[STRANGER_ROLE_ID], guild_id=STRANGER_GUILD_ID,
                         channel_id=STRANGER_CHANNEL_ID)
    await fake_api.wait_for(lambda: len(fake_api.interaction_responses) == 1)
    assert fake_api.texts() == [OPERATOR_ONLY_TEXT]
    await fake_api.slash("queue", author_id=666, roles=[OPERATOR_ROLE_ID])
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
    assert "workers:" in fake_api.texts()[1]


async def test_operator_commands_are_refused_in_a_server_the_bot_does_not_answer_in(
    start_bot, fake_api, discord_settings, running_worker, redis_client, tiny_llama_dir
):
    """A role named like the operators' counts only in PERSONA_DISCORD__ALLOWED_GUILDS, and
    /queue, /swap and /rollback keep to the place lists as every other command does: a stranger's
    server, where its owner made a role of that name, cannot switch the checkpoint for everyone."""
    make_checkpoint(discord_settings, tiny_llama_dir, "dc", seed=1)
    running_worker("w-dc", preload=["dc"])
    await fake_api.wait_for(lambda: redis_client.exists(keys.worker_key("w-dc")))
    await start_bot(operator_ids=[555], operator_role="persona-ops", allowed_guilds=[GUILD_ID])
    await fake_api.stranger_guild()
    elsewhere = {"guild_id": STRANGER_GUILD_ID, "channel_id": STRANGER_CHANNEL_ID}
    await fake_api.slash("swap", {"persona": "dc", "version": "v1"}, author_id=777, roles=[STRANGER_ROLE_ID], **elsewhere)
    await fake_api.slash("queue", author_id=555, **elsewhere)  # an operator too: not there
    await fake_api.slash("rollback", {"persona": "dc"}, author_id=555, **elsewhere)
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 3)
    assert fake_api.texts() == ["I'm not answering in this channel."] * 3
    assert swaps.active_versions(redis_client).get("dc") is None  # still its file's: base
    await fake_api.slash("queue", author_id=666, roles=[OPERATOR_ROLE_ID])  # the role, where it counts
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 4)
    assert "workers:" in fake_api.texts()[3]


async def test_slash_swap_takes_a_version_name_not_a_folder(start_bot, fake_api, discord_settings, tiny_llama_dir):
    """A folder path names files on the bot's machine: only `persona swap` there takes one."""
    await start_bot(operator_ids=[555])
    for target in (str(tiny_llama_dir), "../dc/v1", "v1/../../x"):
        await fake_api.slash("swap", {"persona": "dc", "version": target}, author_id=555)
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 3)
    assert set(fake_api.texts()) == {
        "Name a version, such as v3 or base: a checkpoint folder can be swapped in only by `persona swap` on the server."
    }
    assert [r["type"] for r in fake_api.interaction_responses] == [4, 4, 4]  # refused at once, nothing read


async def test_operator_commands_say_thinking_before_waiting_on_a_slow_redis(start_bot, fake_api, redis_client):
    """Discord drops a command not answered within 3 s ("The application did not respond"):
    /queue, /swap and /rollback read Redis, which may take longer (here it is paused)."""
    await start_bot(operator_ids=[555])
    redis_client.client_pause(4000)  # every command waits 4 s, as on a slow or loading Redis
    await fake_api.slash("queue", author_id=555)
    await fake_api.slash("rollback", {"persona": "dc"}, author_id=555)
    await fake_api.wait_for(lambda: len(fake_api.texts()) == 2)
    assert [r["type"] for r in fake_api.interaction_responses] == [5, 5]  # "thinking…", in time
    assert any("waiting" in text for text in fake_api.texts())  # the stats came, late
    assert all(r["data"]["flags"] & 64 for r in fake_api.interaction_responses)  # for the operator alone


async def test_operators_swap_and_roll_back_a_checkpoint_on_the_live_workers(
    start_bot, fake_api, discord_settings, running_worker, redis_client, tiny_llama_dir
):
    make_checkpoint(discord_settings, tiny_llama_dir, "dc", seed=1)
    running_worker("w-dc", preload=["dc"])
    await fake_api.wait_for(lambda: redis_client.exists(keys.worker_key("w-dc")))
    await start_bot(operator_ids=[555])
    await fake_api.slash("swap", {"persona": "dc", "version": "v1"}, author_id=111)
    await fake_api.wait_for(lambda: len(fake_api.interaction_responses) == 1)
    assert fake_api.interaction_responses[0]["data"]["content"] == OPERATOR_ONLY_TEXT
    assert swaps.current_version(redis_client, PersonaRegistry.from_settings(discord_settings).get("dc")) == "base"

    await fake_api.slash("swap", {"persona": "dc", "version": "v1"}, author_id=555)
    await fake_api.wait_for(lambda: any("now serves v1" in t for t in fake_api.texts()), timeout=120)
    assert swaps.active_versions(redis_client)["dc"] == "v1"
    await fake_api.slash("swap", {"persona": "dc", "version": "v9"}, author_id=555)
    await fake_api.wait_for(lambda: any("v9" in t for t in fake_api.texts()), timeout=120)
    assert swaps.active_versions(redis_client)["dc"] == "v1"  # refused: nothing changed

    await fake_api.slash("rollback", {"persona": "dc"}, author_id=555)
    await fake_api.wait_for(lambda: any("now serves base" in t for t in fake_api.texts()), timeout=120)
    assert swaps.active_versions(redis_client)["dc"] == "base"
    assert [entry["by"] for entry in swaps.swap_log(redis_client, persona="dc")] == ["discord:ada (555)"] * 2


async def test_a_swap_while_the_only_worker_is_starting_says_to_wait_for_it(
    start_bot, fake_api, discord_settings, redis_client, tiny_llama_dir
):
    """/swap said "No worker is running" while a worker was loading its models (seconds on a
    CPU, minutes of GPU warm-up): the operator went to start another one."""
    from persona import heartbeat

    make_checkpoint(discord_settings, tiny_llama_dir, "dc", seed=1)
    heartbeat.announce_starting(redis_client, heartbeat.StartingWorker(id="w-loading"), ttl_s=60)
    try:
        await start_bot(operator_ids=[555])
        await fake_api.slash("swap", {"persona": "dc", "version": "v1"}, author_id=555)
        await fake_api.wait_for(lambda: any("still starting" in t for t in fake_api.texts()), timeout=60)
    finally:
        heartbeat.withdraw(redis_client, "w-loading")  # the test Redis is shared by the whole run


async def test_after_a_gateway_outage_the_bot_is_back_within_the_reply_timeout(
    start_bot, fake_api, discord_settings, caplog
):
    """While the gateway could not be reached, discord.py waited ever longer between tries (a
    random time up to 2, 4, 8, ... 1,024 s), far past the reply timeout: for minutes after
    Discord came back the bot heard nothing, and each failed try logged a traceback. The waits
    now stay within the reply timeout, and the outage is logged as it begins and as it ends."""
    with scripted_worker(discord_settings, echo):
        await start_bot(reply_timeout_s=0.5)
        caplog.set_level(logging.INFO)
        await fake_api.go_down()
        await fake_api.wait_for(lambda: len(fake_api.refused_connections) >= 5, timeout=5)
        fake_api.come_back()
        back = time.monotonic()
        await fake_api.wait_for(lambda: fake_api.resumes == 1, timeout=5)
        back_s = time.monotonic() - back
        await fake_api.user_message("are you back?", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
    tries = fake_api.refused_connections
    assert max(later - earlier for earlier, later in itertools.pairwise(tries)) < 0.5 + 0.4
    assert back_s < 1.5
    assert fake_api.texts() == ["echo: user=are you back?"]
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING or "again" in r.getMessage()]
    assert said[0][0] == "WARNING" and said[0][1].startswith("lost the connection to the Discord gateway (")
    assert said[0][1].endswith("; trying again, at most 0.5 s apart")
    assert said[1][0] == "INFO" and said[1][1].startswith("connected to the Discord gateway again after")
    assert len(said) == 2 and not any(r.exc_info for r in caplog.records)


async def test_the_token_never_reaches_the_logs(start_bot, fake_api, discord_settings, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    with scripted_worker(discord_settings, echo):
        await start_bot()
        await fake_api.user_message("hi", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
    assert "IDENTIFY" in caplog.text or "identif" in caplog.text.lower()
    assert TOKEN not in caplog.text
    assert str(BOT_ID) in caplog.text


async def test_a_refused_message_content_intent_says_how_to_enable_it(discord_settings, fake_api, redis_client):
    fake_api.message_content_allowed = False
    default_base, default_gateway = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    try:
        async with PersonaBot(discord_settings) as bot:
            with pytest.raises(ConfigError, match="Message Content Intent"):
                await asyncio.wait_for(bot.serve(), 30)
    finally:
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = default_base, default_gateway


async def test_a_wrong_token_is_a_clear_error(discord_settings, fake_api, redis_client):
    discord_settings.discord = discord_settings.discord.model_copy(update={"token": SecretStr("wrong")})
    default_base = discord.http.Route.BASE
    try:
        async with PersonaBot(discord_settings) as bot:
            with pytest.raises(ConfigError, match="refused the token"):
                await asyncio.wait_for(bot.serve(), 30)
    finally:
        discord.http.Route.BASE = default_base


@pytest.mark.parametrize(("code", "error"), [
    (4004, "^Discord refused the token: check PERSONA_DISCORD__TOKEN$"),  # reset in the Developer Portal
    (4013, r"^Discord closed the gateway connection for good \(4013, invalid intents\): check"),
])
async def test_a_session_discord_ends_for_good_while_running_is_a_one_line_error(
    discord_settings, fake_api, redis_client, code, error
):
    default_base, default_gateway = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    try:
        async with PersonaBot(discord_settings) as bot:
            serving = asyncio.create_task(bot.serve())
            await asyncio.wait_for(fake_api.identified.wait(), 30)
            fake_api.token = "revoked"
            await fake_api.end_sessions(code)
            with pytest.raises(ConfigError, match=error) as ended:
                await asyncio.wait_for(serving, 30)
    finally:
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = default_base, default_gateway
    assert ended.value.__cause__ is None and ended.value.__suppress_context__  # no traceback


async def test_a_persona_not_enabled_on_discord_is_refused_before_the_bot_starts(discord_settings, write_persona, tiny_llama_dir):
    discord_settings.discord = discord_settings.discord.model_copy(update={"persona": "dcc"})
    with pytest.raises(ConfigError, match=r"^PERSONA_DISCORD__PERSONA names 'dcc', .*Did you mean 'dc'\?"):
        PersonaBot(discord_settings)
    write_persona("tg", base=str(tiny_llama_dir), adapters=["telegram"])
    discord_settings.discord = discord_settings.discord.model_copy(update={"persona": "tg"})
    with pytest.raises(ConfigError, match=r"^PERSONA_DISCORD__PERSONA names 'tg', whose adapters list has no 'discord'"):
        PersonaBot(discord_settings)


async def test_an_unreachable_api_is_a_clear_error_naming_the_setting(discord_settings, redis_client):
    discord_settings.discord = discord_settings.discord.model_copy(update={"api_url": f"http://127.0.0.1:{free_port()}/api/v10"})
    default_base = discord.http.Route.BASE
    try:
        async with PersonaBot(discord_settings) as bot:
            with pytest.raises(PlatformUnreachable, match="cannot reach Discord at .*PERSONA_DISCORD__API_URL"):
                await asyncio.wait_for(bot.serve(), 30)
    finally:
        discord.http.Route.BASE = default_base


async def test_sigterm_withdraws_a_question_in_flight_and_tells_its_asker(fake_api, redis_url, redis_client, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
        "PERSONA_DATA_DIR": str(tmp_path / "data"), "PERSONA_REDIS_URL": redis_url,
        "PERSONA_DISCORD__TOKEN": TOKEN, "PERSONA_DISCORD__API_URL": fake_api.api_url,
    }
    bot = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "persona", "discord", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    scope = f"{CHANNEL_ID}:111"
    try:
        await asyncio.wait_for(fake_api.identified.wait(), 60)
        await fake_api.user_message("a question no worker takes before the restart", mention_bot=True)
        await fake_api.wait_for(lambda: redis_client.get(keys.inflight_key("discord", scope)))
        request_id = redis_client.get(keys.inflight_key("discord", scope)).decode()
        bot.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(bot.communicate(), 20)
    finally:
        if bot.returncode is None:
            bot.kill()
    assert bot.returncode == 0 and b"Traceback" not in output
    assert fake_api.texts() == [RESTARTING_TEXT]
    assert redis_client.exists(keys.cancel_key(request_id))  # no worker will spend time on it


async def test_a_question_deleted_while_the_bot_thinks_still_gets_its_answer(start_bot, fake_api, discord_settings):
    def slow(request) -> str:
        time.sleep(1.0)
        return "a long thoughtful answer"

    with scripted_worker(discord_settings, slow):
        await start_bot()
        question = await fake_api.user_message("what is patience?", mention_bot=True)
        await fake_api.wait_for(lambda: fake_api.typing)  # it is thinking
        fake_api.delete(question)
        await fake_api.wait_for(lambda: fake_api.texts() == ["a long thoughtful answer"])
    assert "message_reference" not in fake_api.sent[0]  # sent unquoted: there is nothing left to quote


async def test_a_thread_is_refused_where_its_parent_channel_is_denied(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot(denied_channels=[OTHER_CHANNEL_ID])
        denied = await fake_api.thread(parent_id=OTHER_CHANNEL_ID)
        open_thread = await fake_api.thread(parent_id=CHANNEL_ID)
        await fake_api.user_message("in a thread of the denied channel", mention_bot=True, channel_id=denied)
        await fake_api.slash("ask", {"text": "and by slash command?"}, channel_id=denied)
        await fake_api.wait_for(lambda: len(fake_api.interaction_responses) == 1)
        await fake_api.user_message("in a thread of an open channel", mention_bot=True, channel_id=open_thread)
        await fake_api.wait_for(lambda: len(fake_api.texts(open_thread)) == 1)
        await asyncio.sleep(0.3)
    assert fake_api.texts(denied) == []
    assert fake_api.interaction_responses[0]["data"]["content"] == "I'm not answering in this channel."
    assert [r.messages[-1].content for r in seen] == ["in a thread of an open channel"]


async def test_a_thread_is_answered_where_its_parent_channel_is_allowed(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, echo):
        await start_bot(allowed_channels=[CHANNEL_ID])
        allowed = await fake_api.thread(parent_id=CHANNEL_ID)
        elsewhere = await fake_api.thread(parent_id=OTHER_CHANNEL_ID)
        await fake_api.user_message("elsewhere", mention_bot=True, channel_id=elsewhere)
        await fake_api.slash("ask", {"text": "by slash command"}, channel_id=allowed, author_id=222)
        await fake_api.user_message("in a thread of the allowed channel", mention_bot=True, channel_id=allowed)
        await fake_api.wait_for(lambda: len(fake_api.texts(allowed)) == 1 and len(fake_api.texts()) == 2)
        await asyncio.sleep(0.3)
    assert fake_api.texts(allowed) == ["echo: user=in a thread of the allowed channel"]
    assert fake_api.texts(elsewhere) == []
    assert "echo: user=by slash command" in fake_api.texts()


async def test_a_thread_discord_py_never_cached_is_refused_where_its_parent_channel_is_denied(
    start_bot, fake_api, discord_settings
):
    with scripted_worker(discord_settings, echo) as seen:
        bot = await start_bot(denied_channels=[OTHER_CHANNEL_ID])
        denied = await fake_api.thread(parent_id=OTHER_CHANNEL_ID, announced=False)
        open_thread = await fake_api.thread(parent_id=CHANNEL_ID, announced=False)
        assert bot.get_channel(denied) is None and bot.get_channel(open_thread) is None  # discord.py never heard of them
        await fake_api.user_message("in an old thread of the denied channel", mention_bot=True, channel_id=denied)
        await fake_api.user_message("in an old thread of an open channel", mention_bot=True, channel_id=open_thread)
        await fake_api.wait_for(lambda: len(fake_api.texts(open_thread)) == 1)
        await asyncio.sleep(0.3)
    assert fake_api.texts(denied) == []
    assert [r.messages[-1].content for r in seen] == ["in an old thread of an open channel"]


async def test_a_thread_discord_py_never_cached_is_answered_where_its_parent_is_the_only_allowed_channel(
    start_bot, fake_api, discord_settings
):
    with scripted_worker(discord_settings, echo):
        await start_bot(allowed_channels=[CHANNEL_ID])
        allowed = await fake_api.thread(parent_id=CHANNEL_ID, announced=False)
        elsewhere = await fake_api.thread(parent_id=OTHER_CHANNEL_ID, announced=False)
        await fake_api.user_message("elsewhere", mention_bot=True, channel_id=elsewhere)
        await fake_api.user_message("in an old thread of the allowed channel", mention_bot=True, channel_id=allowed)
        await fake_api.wait_for(lambda: len(fake_api.texts(allowed)) == 1, timeout=10)
        await asyncio.sleep(0.3)
    assert fake_api.texts(allowed) == ["echo: user=in an old thread of the allowed channel"]
    assert fake_api.texts(elsewhere) == []


async def test_an_uncached_threads_parent_is_fetched_once_for_all_its_messages(start_bot, fake_api, discord_settings):
    with scripted_worker(discord_settings, echo):
        await start_bot(denied_channels=[OTHER_CHANNEL_ID])
        thread = await fake_api.thread(parent_id=CHANNEL_ID, announced=False)
        chatter = await fake_api.thread(parent_id=CHANNEL_ID, announced=False)
        await fake_api.user_message("talking among ourselves", channel_id=chatter)
        for n in range(3):
            await fake_api.user_message(f"m{n}", mention_bot=True, channel_id=thread)
            await fake_api.wait_for(lambda n=n: len(fake_api.texts(thread)) == n + 1, timeout=10)
    assert fake_api.requests.count(("GET", f"/channels/{thread}")) == 1
    assert ("GET", f"/channels/{chatter}") not in fake_api.requests  # not addressed to the bot: never looked up


async def test_a_thread_whose_parent_cannot_be_looked_up_is_not_answered_until_it_can_be(
    start_bot, fake_api, discord_settings
):
    """With channel lists set, a place the bot cannot place is one it keeps quiet in:
    it may be under a denied channel."""
    with scripted_worker(discord_settings, echo):
        await start_bot(denied_channels=[OTHER_CHANNEL_ID])
        thread = await fake_api.thread(parent_id=CHANNEL_ID, announced=False)  # allowed, as it turns out
        fake_api.forbidden_channels.add(thread)
        await fake_api.user_message("while the lookup fails", mention_bot=True, channel_id=thread)
        await fake_api.wait_for(lambda: fake_api.requests.count(("GET", f"/channels/{thread}")) == 1, timeout=10)
        fake_api.forbidden_channels.clear()  # a failure is not remembered: the next message asks again
        await fake_api.user_message("once it works", mention_bot=True, channel_id=thread)
        await fake_api.wait_for(lambda: len(fake_api.texts(thread)) == 1, timeout=10)
        await asyncio.sleep(0.3)
    assert fake_api.texts(thread) == ["echo: user=once it works"]
    assert fake_api.requests.count(("GET", f"/channels/{thread}")) == 2


async def test_a_slash_command_is_answered_when_redis_refuses_writes(start_bot, fake_api, redis_client):
    await start_bot()
    with redis_refusing_writes(redis_client):
        await fake_api.slash("ask", {"text": "anyone there?"})
        await fake_api.wait_for(lambda: fake_api.texts() == [BUSY_TEXT])
    assert fake_api.interaction_responses[0]["type"] == 5  # the "thinking…" is followed by an answer


@pytest.mark.slow  # the client's reconnect backoff takes about 15 s before it gives up politely
async def test_slash_commands_during_a_redis_outage_get_polite_replies(start_bot, fake_api, discord_settings, tmp_path):
    from persona.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "own-redis")
    discord_settings.redis_url = SecretStr(server.start())
    try:
        await start_bot()
        server.stop()
        await fake_api.slash("ask", {"text": "anyone there?"})
        await fake_api.slash("reset", author_id=222)
        # Discord drops a command not answered within 3 s: "thinking…" goes first, then the apology.
        await fake_api.wait_for(lambda: fake_api.texts() == [UNREACHABLE_TEXT] * 2, timeout=90)
    finally:
        server.stop()
    assert [r["type"] for r in fake_api.interaction_responses] == [5, 5]


async def test_a_server_message_edited_to_mention_the_bot_is_answered_once(start_bot, fake_api, discord_settings):
    """Someone asks, then edits the message to add the bot's mention: it stayed silent. Now that
    edit is answered; no other edit is (a DM's, or one of a message it answered already)."""
    with scripted_worker(discord_settings, lambda request: f"echo: {request.messages[-1].content}") as seen:
        await start_bot()
        plain = await fake_api.user_message("what is patience?")
        await asyncio.sleep(0.5)  # read (and left alone) before the edit, as a person edits seconds later
        await fake_api.edit_message(plain, "what is patience?", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
        await fake_api.edit_message(plain, "what is patience, really?", mention_bot=True)  # a typo fixed
        await fake_api.edit_message(plain, "what is patience, really?")  # the mention taken out
        await fake_api.edit_message(plain, "what is patience, really?", mention_bot_role=True)  # and put back
        asked = await fake_api.user_message("and kindness?", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 2)
        await fake_api.edit_message(asked, "and kindness, too?", mention_bot=True)
        in_private = await fake_api.user_message("hello", guild=False, channel_id=DM_CHANNEL)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
        await fake_api.edit_message(in_private, "hello there", mention_bot=True)
        await fake_api.user_message("ping", mention_bot=True)  # dispatched after every edit
        await fake_api.wait_for(lambda: len(fake_api.sent) == 4)
        await asyncio.sleep(0.3)
    assert fake_api.texts() == ["echo: what is patience?", "echo: and kindness?", "echo: hello", "echo: ping"]
    assert str(fake_api.sent[0]["message_reference"]["message_id"]) == plain["id"]
    assert len(seen) == 4


async def test_a_reply_to_the_no_worker_notice_leaves_the_notice_out_of_the_conversation(
    start_bot, fake_api, discord_settings
):
    """The notice is the bot's, not the persona's: in the conversation it read as the persona's
    own earlier answer."""
    await start_bot(reply_timeout_s=8.0)
    await fake_api.user_message("anyone home?", mention_bot=True)
    await fake_api.wait_for(lambda: fake_api.texts() == [NO_WORKER_TEXT], timeout=6)
    notice = fake_api.sent[0]
    with scripted_worker(discord_settings, echo) as seen:
        await fake_api.wait_for(lambda: len(fake_api.sent) == 2)  # answered once a worker started
        await fake_api.user_message("hello?", reply_to=notice)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
    assert [(m.role, m.content) for m in seen[-1].messages] == [("user", "anyone home?"), ("user", "hello?")]


async def thread_from(fake_api: FakeDiscord, message: dict, *, announced: bool = True) -> int:
    """A thread started from ``message`` ("Create Thread" on it): Discord gives it the message's id."""
    made = await fake_api.thread(parent_id=int(message["channel_id"]), announced=False)
    thread = fake_api.threads.pop(made) | {"id": message["id"]}
    fake_api.threads[int(thread["id"])] = thread
    if announced:
        await fake_api.dispatch("THREAD_CREATE", thread)
    return int(thread["id"])


async def test_a_thread_started_from_an_answer_continues_its_conversation(start_bot, fake_api, discord_settings):
    """Someone starts a thread on the bot's answer and asks in it, "@bot tell me more": the bot
    knew nothing of the answer the thread is about. The thread now opens with the conversation of
    the message it was started from (its reply chain), and goes on with its own."""
    with scripted_worker(discord_settings, echo) as seen:
        await start_bot()
        await fake_api.user_message("what is rain?", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 1)
        thread = await thread_from(fake_api, fake_api.sent[0])
        await fake_api.user_message("tell me more", mention_bot=True, channel_id=thread)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 2)
        await fake_api.user_message("and snow?", mention_bot=True, channel_id=thread)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 3)
        someones = await fake_api.user_message("our trip is on Friday", author_id=333)
        uncached = await thread_from(fake_api, someones, announced=False)  # from before the bot started, say
        await fake_api.user_message("will it rain?", mention_bot=True, channel_id=uncached)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 4)
        plain = await fake_api.thread()  # started on its own: no message to continue
        await fake_api.user_message("hello", mention_bot=True, channel_id=plain)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 5)
    asked = [[(m.role, m.content) for m in request.messages] for request in seen]
    first_answer = ("assistant", "echo: user=what is rain?")
    assert asked[1] == [("user", "what is rain?"), first_answer, ("user", "tell me more")]
    assert asked[2][:3] == asked[1] and asked[2][-1] == ("user", "and snow?")
    assert asked[3] == [("user", "our trip is on Friday"), ("user", "will it rain?")]
    assert asked[4] == [("user", "hello")]


async def test_quick_messages_are_answered_in_the_order_they_came(start_bot, fake_api, discord_settings):
    """Each message of a quick run waited for Redis (its rate limit) before taking its place in
    the conversation, and Redis's answers came back in any order: the run was answered last first,
    and the first message's answer was missing all the others."""
    with scripted_worker(discord_settings, echo):
        await start_bot()
        for n in range(5):
            await fake_api.user_message(f"m{n}", mention_bot=True)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 5)
        for n in range(3):
            await fake_api.user_message(f"d{n}", guild=False, channel_id=DM_CHANNEL, author_id=222)
        await fake_api.wait_for(lambda: len(fake_api.sent) == 8)
    answers = fake_api.texts(CHANNEL_ID)
    assert [answer.rsplit("=", 1)[1] for answer in answers] == ["m0", "m1", "m2", "m3", "m4"]
    assert answers[1] == "echo: user=m0 | assistant=echo: user=m0 | user=m1"
    assert [answer.rsplit("=", 1)[1] for answer in fake_api.texts(DM_CHANNEL)] == ["d0", "d1", "d2"]
