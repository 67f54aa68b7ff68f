"""Each sink, with its real client library, against a fake platform on loopback."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests
from pydantic import SecretStr

from adapters.posting import chat_sinks, social
from adapters.posting.poster import Poster
from adapters.posting.sinks import (
    FileSink,
    SinkNoAnswer,
    SinkRateLimited,
    SinkUnreachable,
    make_sink,
    one_line,
    platform_of,
)
from adapters.scheduler import Scheduler
from persona.curation import TELEGRAM_LIMIT_CHARS
from persona.errors import ConfigError, PostingError, SinkError
from persona.settings import Settings
from tests.conftest import free_port, read_jsonl
from tests.fakes.social_api import FakePlatform, serve
from tests.fakes.telegram_api import in_a_thread


@pytest.fixture
def platform() -> Iterator[FakePlatform]:
    """Every fake platform API on one loopback port, served from a background thread."""
    with serve() as fake:
        yield fake


def settings_for(settings: Settings, fake: FakePlatform, **posting) -> Settings:
    changed = settings.model_copy(deep=True)
    changed.posting = changed.posting.model_copy(update={
        "x_api_url": fake.url, "mastodon_api_url": fake.url, "bluesky_api_url": fake.url + "/xrpc", **posting,
    })
    changed.discord = changed.discord.model_copy(update={"api_url": fake.url + "/api/v10"})
    changed.telegram = changed.telegram.model_copy(update={"api_url": fake.url + "/bot"})
    return changed


class DiedAfterPosting(BaseException):
    """The process died after the platform took the post, before its answer was read."""


def dies_after_posting(sink):
    """``sink`` as a poster that dies once it has posted: what a retry must not post twice."""

    class Dying:
        spec, platform, retry = sink.spec, sink.platform, sink.retry

        def post(self, text, marker):
            sink.post(text, marker)
            raise DiedAfterPosting

    return lambda spec, settings: Dying()


def test_file_sink_appends_json_lines_and_finds_by_marker(settings: Settings):
    sink = make_sink("file:archive/sage.jsonl", settings)
    assert isinstance(sink, FileSink) and sink.path == settings.data_dir / "posts" / "archive" / "sage.jsonl"
    first = sink.post("Be still.", "sage:s1:file")
    second = sink.post("Be here.", "sage:s2:file")
    assert [line["text"] for line in read_jsonl(sink.path)] == ["Be still.", "Be here."]
    assert sink.find("sage:s2:file", "Be here.").id == second.id != first.id
    assert sink.find("sage:s3:file", "Be.") is None
    with sink.path.open("a") as torn:
        torn.write('{"id": "half')  # a crash mid-write leaves a torn line
    assert sink.find("sage:s1:file", "Be still.").id == first.id


def test_a_file_that_cannot_be_written_is_a_refusal_naming_the_path(settings, tmp_path, write_persona, redis_client):
    """A path under a file (or a folder one may not write) read "no answer (safe to retry)",
    with a traceback, and was tried again every tick."""
    (tmp_path / "taken").write_text("a file, not a folder")
    write_persona("filer", base="unused", schedule={"sinks": [f"file:{tmp_path}/taken/posts.jsonl"], "candidates": 1})
    outcome = Poster(settings, redis_client, lambda persona, n, seed: ["Patience is a slow river."]).post("filer", slot="2026-01-01T09:00:00Z")
    assert (outcome.status, outcome.retry_later) == ("failed", False)
    assert f"cannot write {tmp_path}/taken/posts.jsonl" in outcome.message


def test_x_posts_through_tweepy_with_user_keys(settings, platform):
    from pydantic import SecretStr

    keys = {k: SecretStr("k-" + k) for k in ("x_consumer_key", "x_consumer_secret", "x_access_token", "x_access_token_secret")}
    sink = make_sink("x", settings_for(settings, platform, **keys))
    posted = sink.post("Patience is a slow river.", "m1")
    assert posted.id == "1790000000000000001" and posted.url.endswith(posted.id)
    [seen] = platform.seen
    assert seen["json"] == {"text": "Patience is a slow river."}
    assert seen["headers"]["Authorization"].startswith("OAuth ") and "k-x_consumer_key" in seen["headers"]["Authorization"]


def test_x_with_a_user_token_and_a_refusal(settings, platform):
    from pydantic import SecretStr

    sink = make_sink("x", settings_for(settings, platform, x_bearer_token=SecretStr("user-token")))
    platform.fail_with = 403
    with pytest.raises(SinkError, match="X refused"):
        sink.post("Patience.", "m1")
    assert platform.seen[0]["headers"]["Authorization"] == "Bearer user-token"


def test_x_gives_up_on_a_connection_that_never_answers(settings, monkeypatch):
    monkeypatch.setattr(social, "REQUEST_TIMEOUT_S", 0.5)
    with ThreadPoolExecutor(1) as pool, socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen()  # the kernel accepts the connection; nobody ever answers it
        settings.posting = settings.posting.model_copy(update={
            "x_api_url": f"http://127.0.0.1:{stalled.getsockname()[1]}", "x_bearer_token": SecretStr("user-token")})
        attempt = pool.submit(make_sink("x", settings).post, "Patience.", "m1")
        gave_up = attempt.exception(timeout=10)
        assert isinstance(gave_up, SinkNoAnswer) and isinstance(gave_up.__cause__, requests.exceptions.Timeout)
        assert "X did not answer in 0 s" in str(gave_up) or "X did not answer in 1 s" in str(gave_up)


def test_x_without_credentials_says_which_setting(settings):
    with pytest.raises(ConfigError, match="PERSONA_POSTING__X_BEARER_TOKEN"):
        make_sink("x", settings)


def test_mastodon_posts_with_an_idempotency_key(settings, platform):
    from pydantic import SecretStr

    sink = make_sink("mastodon", settings_for(settings, platform, mastodon_access_token=SecretStr("masto-token")))
    posted = sink.post("Attend to small things.", "sage:2026-01-01T09:00:00Z:mastodon")
    assert posted.id == "109000000000000001" and posted.url.startswith("https://masto.test/")
    [seen] = platform.seen
    assert seen["headers"]["Authorization"] == "Bearer masto-token"
    assert seen["headers"]["Idempotency-Key"] == "sage:2026-01-01T09:00:00Z:mastodon"
    assert seen["json"]["status"] == "Attend to small things."
    platform.fail_with = 422
    with pytest.raises(SinkError, match="Mastodon refused"):
        sink.post("again", "m2")


def test_bluesky_logs_in_then_creates_a_post(settings, platform):
    from pydantic import SecretStr

    sink = make_sink("bluesky", settings_for(settings, platform, bluesky_handle="sage.test", bluesky_password=SecretStr("app-pass")))
    posted = sink.post("A calm mind is a garden.", "m1")
    assert posted.id == "at://did:plc:fake/app.bsky.feed.post/3kabcdefghij0"
    assert posted.url == "https://bsky.app/profile/sage.test/post/3kabcdefghij0"
    login, create = platform.seen
    assert login["json"]["identifier"] == "sage.test" and login["json"]["password"] == "app-pass"
    assert create["json"]["record"]["text"] == "A calm mind is a garden."
    assert create["json"]["collection"] == "app.bsky.feed.post" and create["headers"]["Authorization"].startswith("Bearer ")


def test_bluesky_wrong_password_is_a_refusal(settings, platform):
    from pydantic import SecretStr

    platform.fail_with = 401
    sink = make_sink("bluesky", settings_for(settings, platform, bluesky_handle="sage.test", bluesky_password=SecretStr("nope")))
    with pytest.raises(SinkError, match="Bluesky refused"):
        sink.post("text", "m1")


def test_discord_channel_with_the_bot_token_and_a_nonce(settings, platform):
    from discord.http import Route
    from pydantic import SecretStr

    changed = settings_for(settings, platform)
    changed.discord.token = SecretStr("discord-bot-token")
    sink = make_sink("discord:123456789012345678", changed)
    posted = sink.post("Tend the garden daily.", "sage:s1:discord")
    assert posted.id == "1200000000000000001"
    # The link names the channel's server (it named @me, a direct message's place, for every channel).
    assert posted.url == "https://discord.com/channels/777/123456789012345678/1200000000000000001"
    me, message, channel = platform.seen
    assert channel["path"] == "/api/v10/channels/123456789012345678"
    assert me["headers"]["Authorization"] == "Bot discord-bot-token"
    assert message["path"] == "/api/v10/channels/123456789012345678/messages"
    assert message["json"]["content"] == "Tend the garden daily."
    assert message["json"]["enforce_nonce"] is True and len(message["json"]["nonce"]) == 25
    assert message["json"]["allowed_mentions"] == {"parse": []}  # "@everyone" in a post pings nobody
    assert Route.BASE == "https://discord.com/api/v10"  # put back for everyone else
    platform.discord_guild_id = None  # a direct message's channel
    assert sink.post("Tend it again.", "sage:s2:discord").url.startswith("https://discord.com/channels/@me/123456789012345678/")


def test_discord_needs_a_numeric_channel_and_a_token(settings):
    from pydantic import SecretStr

    with pytest.raises(ConfigError, match="PERSONA_DISCORD__TOKEN"):
        make_sink("discord:123", settings)
    settings.discord.token = SecretStr("t")
    with pytest.raises(ConfigError, match="is a number"):
        make_sink("discord:general", settings)


def test_telegram_channel_through_the_bot(settings, platform):
    from pydantic import SecretStr

    changed = settings_for(settings, platform)
    changed.telegram.token = SecretStr("123456:telegram-token")
    sink = make_sink("telegram:-1001234567890", changed)
    posted = sink.post("Small steps, daily.", "m1")
    assert posted.id == "77" and posted.url == "https://t.me/sagechannel/77"
    send = platform.seen[-1]
    assert send["path"] == "/bot123456:telegram-token/sendMessage"
    assert str(send["json"]["chat_id"]) == "-1001234567890" and send["json"]["text"] == "Small steps, daily."
    platform.fail_with = 400
    with pytest.raises(SinkError, match="(?i)chat not found"):
        sink.post("again", "m2")


def test_a_telegram_post_notifies_nobody_it_names(settings):
    """Telegram links each "@username" in a message and notifies that person: a persona posting
    "as @someone said" from its author's corpus pinged strangers in its channel. The post reads
    the same (an invisible word joiner after each "@"); an e-mail address is left as written."""
    written = "As @marcus_aurelius said to @everyone: patience. Write to sage@example.com"
    with in_a_thread("123456:telegram-token") as fake:
        changed = settings.model_copy(deep=True)
        changed.telegram.token, changed.telegram.api_url = SecretStr(fake.token), fake.base_url
        sink = make_sink("telegram:-1001234567890", changed)
        sink.post(written, "m1")
        [sent] = fake.sent
        assert sent["mentions"] == [] and sent["text"].replace("\u2060", "") == written
        assert "sage@example.com" in sent["text"]
        # A post at Telegram's limit has no room for the word joiners: said so, and nothing sent.
        at_limit = "@someone " + "x" * (TELEGRAM_LIMIT_CHARS - len("@someone "))
        with pytest.raises(SinkError, match=r"4,097 characters once its @mentions are kept from notifying anyone "
                                            r".*Telegram takes 4,096: shorten it by 1"):
            sink.post(at_limit, "m2")
        assert len(fake.sent) == 1


def test_a_telegram_post_keeps_its_links_whole(settings):
    """A post linking a Medium profile ("medium.com/@jane/...") got the word joiner after its "@",
    where Telegram ends a link: the channel showed "https://medium.com/@" as the link, for good.
    Telegram makes no mention inside a link, so a link goes as written; "@jane" beside it is quieted."""
    link = "https://medium.com/@jane/why-i-write-3f2a"
    written = f"New essay by @jane: {link}. Also at medium.com/@jane."
    with in_a_thread("123456:telegram-token") as fake:
        changed = settings.model_copy(deep=True)
        changed.telegram.token, changed.telegram.api_url = SecretStr(fake.token), fake.base_url
        make_sink("telegram:-1001234567890", changed).post(written, "m1")
        [sent] = fake.sent
    assert sent["links"] == [link, "medium.com/@jane"] and sent["mentions"] == []
    assert sent["text"] == written.replace("by @jane", "by @\u2060jane")  # the links byte for byte


def test_rate_limits_are_told_apart_from_refusals(settings, platform):
    changed = settings_for(settings, platform, x_bearer_token=SecretStr("user-token"))
    changed.telegram.token = SecretStr("123456:telegram-token")
    platform.fail_with = 429
    with pytest.raises(SinkRateLimited, match="X is rate-limiting"):
        make_sink("x", changed).post("Patience.", "m1")
    with pytest.raises(SinkRateLimited, match="Telegram is rate-limiting"):
        make_sink("telegram:-1001234567890", changed).post("Patience.", "m2")


def test_a_rate_limited_post_is_tried_again_at_the_next_tick(settings, platform, write_persona, redis_client):
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={
        "cron": "0 9 * * *", "timezone": "UTC", "missed": "skip", "enabled": True, "sinks": ["x"], "candidates": 1})
    changed = settings_for(settings, platform, x_bearer_token=SecretStr("user-token"))
    runner = Scheduler(Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."]), redis_client)
    at_nine = datetime(2026, 1, 5, 9, tzinfo=UTC)
    runner.tick(at_nine - timedelta(hours=1))  # the first look starts the clock
    platform.fail_with = 429  # X: too many requests, for now
    [limited] = runner.tick(at_nine + timedelta(seconds=30))
    assert limited.status == "failed" and limited.sinks["x"]["state"] == "rate_limited"
    platform.fail_with = None  # the limit has reset
    assert [(o.status, o.slot) for o in runner.tick(at_nine + timedelta(minutes=1))] == [("posted", "2026-01-05T09:00:00Z")]
    assert runner.tick(at_nine + timedelta(minutes=2)) == []
    assert [seen["json"]["text"] for seen in platform.seen] == ["Patience is a slow river."] * 2


def test_a_post_that_got_no_answer_is_tried_again_at_the_next_tick(settings, platform, write_persona, redis_client):
    """Mastodon unreachable: nothing went out, and a retry is safe. The slot used to be closed
    as failed after the one try."""
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={
        "cron": "0 9 * * *", "timezone": "UTC", "missed": "skip", "enabled": True, "sinks": ["mastodon"], "candidates": 1})
    changed = settings_for(settings, platform, mastodon_access_token=SecretStr("masto-token"))
    changed.posting.mastodon_api_url = f"http://127.0.0.1:{free_port()}"  # the server is down
    runner = Scheduler(Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."]), redis_client)
    at_nine = datetime(2026, 1, 5, 9, tzinfo=UTC)
    runner.tick(at_nine - timedelta(hours=1))  # the first look starts the clock
    [unanswered] = runner.tick(at_nine + timedelta(seconds=30))
    assert unanswered.status == "failed" and unanswered.retry_later
    assert "mastodon: unreachable, nothing sent: cannot reach Mastodon" in unanswered.message
    changed.posting.mastodon_api_url = platform.url  # back up
    assert [(o.status, o.slot) for o in runner.tick(at_nine + timedelta(minutes=1))] == [("posted", "2026-01-05T09:00:00Z")]
    assert runner.tick(at_nine + timedelta(minutes=2)) == []
    assert [seen["headers"]["Idempotency-Key"] for seen in platform.seen if seen["path"] == "/api/v1/statuses"] == [
        "poet:2026-01-05T09:00:00Z:mastodon"]


def test_a_platform_that_cannot_be_reached_is_tried_again_even_where_a_retry_is_unsafe(
    settings, platform, write_persona, redis_client
):
    """X and Telegram cannot tell a repeat post: a post that got no answer is left for a
    person. But a refused connection (a wrong API URL, the network down) sent nothing; it
    was marked "an earlier attempt may have posted" and the slot could never be posted."""
    write_persona("reach", base="unused", schedule={"sinks": ["x", "telegram:-1001234567890"], "candidates": 1})
    down = f"http://127.0.0.1:{free_port()}"
    changed = settings_for(settings, platform, x_bearer_token=SecretStr("user-token"), x_api_url=down)
    changed.telegram.token, changed.telegram.api_url = SecretStr("123456:telegram-token"), down + "/bot"
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."])
    first = poster.post("reach", slot="2026-01-05T09:00:00Z")
    assert (first.status, first.retry_later) == ("failed", True)
    assert {spec: entry["state"] for spec, entry in first.sinks.items()} == {"x": "unreachable", "telegram:-1001234567890": "unreachable"}
    assert f"x: unreachable, nothing sent: cannot reach X at {down}" in first.message
    changed.posting.x_api_url, changed.telegram.api_url = platform.url, platform.url + "/bot"  # fixed
    again = poster.post("reach", slot="2026-01-05T09:00:00Z")
    assert again.status == "posted" and [s["path"] for s in platform.seen if "getMe" not in s["path"]] == [
        "/2/tweets", "/bot123456:telegram-token/sendMessage"]


def test_a_text_that_went_out_on_one_sink_is_not_posted_again_the_next_day(settings, platform, write_persona, redis_client):
    """X refused a post that the other sink published: the slot closed as failed, and only a
    fully posted text counted among the recent posts, so the next day's could repeat it there."""
    write_persona("twice", base="unused", schedule={"sinks": ["file:twice.jsonl", "x"], "candidates": 2})
    changed = settings_for(settings, platform, x_bearer_token=SecretStr("user-token"))
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river.", "Small steps, daily."][:n])
    platform.fail_with = 403
    today = poster.post("twice", slot="2026-01-05T09:00:00Z")
    assert today.status == "failed" and today.sinks["file:twice.jsonl"]["state"] == "posted"
    platform.fail_with = None
    tomorrow = poster.post("twice", slot="2026-01-06T09:00:00Z")
    assert (tomorrow.status, tomorrow.text, tomorrow.rejected) == ("posted", "Small steps, daily.", {"near_repeat": 1})
    retried = poster.post("twice", slot="2026-01-05T09:00:00Z")  # X takes today's at last: listed once, not twice
    assert retried.status == "posted"
    assert poster.ledger.recent_texts("twice", 10) == ["Patience is a slow river.", "Small steps, daily."]


def test_a_post_rate_limited_past_its_grace_gives_way_to_the_next_slot(settings, platform, write_persona, redis_client):
    """A platform that keeps refusing one slot: the slot is retried within the missed-slot
    policy, then skipped. It used to be retried at every tick however late, ahead of the next day's."""
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={
        "cron": "0 9 * * *", "timezone": "UTC", "missed": "skip", "enabled": True, "sinks": ["x"], "candidates": 1})
    changed = settings_for(settings, platform, x_bearer_token=SecretStr("user-token"))
    days = iter(["Patience is a slow river.", "Small steps, daily."])
    runner = Scheduler(Poster(changed, redis_client, lambda persona, n, seed: [next(days)]), redis_client)
    at_nine = datetime(2026, 1, 5, 9, tzinfo=UTC)
    runner.tick(at_nine - timedelta(hours=1))
    platform.fail_with = 429  # X turns every post away until tomorrow
    assert [o.sinks["x"]["state"] for o in runner.tick(at_nine + timedelta(minutes=1))] == ["rate_limited"]
    assert [o.sinks["x"]["state"] for o in runner.tick(at_nine + timedelta(minutes=10))] == ["rate_limited"]
    assert runner.tick(at_nine + timedelta(minutes=20)) == []  # past the 15 minutes' grace: skipped
    platform.fail_with = None
    [tomorrow] = runner.tick(at_nine + timedelta(days=1, minutes=1))
    assert (tomorrow.status, tomorrow.slot, tomorrow.text) == ("posted", "2026-01-06T09:00:00Z", "Small steps, daily.")
    assert len(platform.seen) == 3


def test_wrong_credentials_are_refusals_that_name_the_setting(settings, platform, write_persona, redis_client):
    """A wrong Discord token escaped as "no answer (safe to retry)": the slot was tried again
    every tick for nothing. Each platform's "who are you?" now names the setting to fix."""
    wrong = settings_for(settings, platform, x_bearer_token=SecretStr("wrong"), mastodon_access_token=SecretStr("wrong"),
                         bluesky_handle="sage.test", bluesky_password=SecretStr("wrong"))
    wrong.discord.token, wrong.telegram.token = SecretStr("wrong"), SecretStr("123456:wrong")
    platform.fail_with = 401
    expected = {
        "x": "PERSONA_POSTING__X_BEARER_TOKEN",
        "mastodon": "PERSONA_POSTING__MASTODON_ACCESS_TOKEN",
        "bluesky": "PERSONA_POSTING__BLUESKY_PASSWORD",
        "discord:1234": "PERSONA_DISCORD__TOKEN",
        "telegram:@sagechannel": "PERSONA_TELEGRAM__TOKEN",
    }
    for spec, setting in expected.items():
        with pytest.raises(SinkError, match=setting) as refused:
            make_sink(spec, wrong).post("Patience.", "m1")
        assert "\n" not in str(refused.value)

    write_persona("locked", base="unused", schedule={"sinks": ["discord:1234"], "candidates": 1})
    outcome = Poster(wrong, redis_client, lambda persona, n, seed: ["Patience is a slow river."]).post("locked", slot="2026-01-01T09:00:00Z")
    assert (outcome.status, outcome.retry_later, outcome.sinks["discord:1234"]["state"]) == ("failed", False, "failed")
    assert "PERSONA_DISCORD__TOKEN" in outcome.message


def test_missing_settings_are_named_all_at_once(settings, write_persona, redis_client):
    """Six sinks without their settings used to be found one per attempt, and X's message
    read "PERSONA_POSTING__X_BEARER_TOKEN (AN OAUTH 2 USER TOKEN) OR X_CONSUMER_KEY AND FRIENDS"."""
    write_persona("unset", base="unused", schedule={"sinks": ["x", "mastodon", "bluesky", "discord:1", "telegram:@c"]})
    poster = Poster(settings, redis_client, lambda persona, n, seed: [])
    with pytest.raises(ConfigError) as unset:
        poster.post("unset", slot="2026-01-01T09:00:00Z")
    message = str(unset.value)
    for setting in ("PERSONA_POSTING__X_BEARER_TOKEN", "PERSONA_POSTING__X_ACCESS_TOKEN_SECRET",
                    "PERSONA_POSTING__MASTODON_ACCESS_TOKEN", "PERSONA_POSTING__BLUESKY_HANDLE",
                    "PERSONA_POSTING__BLUESKY_PASSWORD", "PERSONA_DISCORD__TOKEN", "PERSONA_TELEGRAM__TOKEN"):
        assert setting in message, setting
    assert "AND FRIENDS" not in message and message.startswith("5 sinks cannot post")
    # Three of X's four keys: the fourth is named, not the bearer token.
    settings.posting = settings.posting.model_copy(update={
        "x_consumer_key": SecretStr("k"), "x_consumer_secret": SecretStr("s"), "x_access_token": SecretStr("t"),
        "x_access_token_secret": SecretStr("  "), "mastodon_access_token": SecretStr("")})  # blank is unset
    with pytest.raises(ConfigError, match=r"set PERSONA_POSTING__X_ACCESS_TOKEN_SECRET too") as partial:
        make_sink("x", settings)
    assert "BEARER" not in str(partial.value)
    with pytest.raises(ConfigError, match="PERSONA_POSTING__MASTODON_ACCESS_TOKEN"):
        make_sink("mastodon", settings)


def test_sink_specs(settings):
    assert platform_of("Telegram:@chan") == "telegram"
    with pytest.raises(ConfigError, match="unknown sink"):
        make_sink("myspace", settings)
    with pytest.raises(ConfigError, match="name the file"):
        make_sink("file:", settings)


def test_bluesky_finds_an_earlier_post_so_a_crash_is_never_posted_twice(settings, platform, write_persona):
    import redis
    from pydantic import SecretStr

    from adapters.posting.poster import Poster

    changed = settings_for(settings, platform, bluesky_handle="sage.test", bluesky_password=SecretStr("app-pass"))
    sink = make_sink("bluesky", changed)
    sink.post("Older post.", "m0")
    assert sink.find("m1", "A calm mind is a garden.") is None

    write_persona("sky", base="unused", schedule={"sinks": ["bluesky"], "candidates": 1})
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    client.flushall()
    write = lambda persona, n, seed: ["A calm mind is a garden."]
    with pytest.raises(DiedAfterPosting):
        Poster(changed, client, write, sink_factory=dies_after_posting(sink)).post("sky", slot="2026-01-01T09:00:00Z")
    retry = Poster(changed, client, write).post("sky", slot="2026-01-01T09:00:00Z")
    assert retry.status == "posted"
    assert retry.sinks["bluesky"]["id"] == "at://did:plc:fake/app.bsky.feed.post/3kabcdefghij1"
    creates = [s for s in platform.seen if s["path"].endswith("createRecord")]
    assert len(creates) == 2  # the older post and the crashed one; the retry found it instead


def test_mastodon_retry_after_a_lost_answer_reuses_the_idempotency_key(settings, platform, write_persona):
    import redis
    from pydantic import SecretStr

    from adapters.posting.poster import Poster

    changed = settings_for(settings, platform, mastodon_access_token=SecretStr("masto-token"))
    sink = make_sink("mastodon", changed)

    write_persona("masto", base="unused", schedule={"sinks": ["mastodon"], "candidates": 1})
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    client.flushall()
    write = lambda persona, n, seed: ["Tend the garden daily."]  # noqa: E731 (a candidate source)
    with pytest.raises(DiedAfterPosting):
        Poster(changed, client, write, sink_factory=dies_after_posting(sink)).post("masto", slot="2026-01-01T09:00:00Z")
    assert Poster(changed, client, write).post("masto", slot="2026-01-01T09:00:00Z").status == "posted"
    keys = [s["headers"]["Idempotency-Key"] for s in platform.seen if s["path"] == "/api/v1/statuses"]
    assert keys == ["masto:2026-01-01T09:00:00Z:mastodon"] and len(platform.statuses) == 1  # found, not sent again


def test_an_approved_post_that_x_turned_away_goes_out_when_approved_again(settings, platform, write_persona, redis_client):
    write_persona("careful", base="unused", schedule={"sinks": ["x"], "approval": True, "candidates": 1})
    changed = settings_for(settings, platform, x_bearer_token=SecretStr("user-token"))
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."])
    waiting = poster.post("careful", slot="2026-01-05T09:00:00Z")
    assert waiting.status == "pending"
    platform.fail_with = 429  # X: too many requests, for now
    limited = poster.approve(waiting.approval_id, "Patience, edited.")
    assert limited.status == "failed" and limited.sinks["x"]["state"] == "rate_limited"
    assert f"persona posts approve {waiting.approval_id}" in limited.message  # how to try again
    with pytest.raises(PostingError, match="already approved"):
        poster.reject(waiting.approval_id)  # too late to reject, and the slot is not left held
    platform.fail_with = None
    again = poster.approve(waiting.approval_id)
    assert again.status == "posted" and again.text == "Patience, edited."
    assert poster.approve(waiting.approval_id).status == "done"
    assert [seen["json"]["text"] for seen in platform.seen] == ["Patience, edited."] * 2


def test_a_post_whose_answer_was_lost_is_said_in_one_line_and_never_posted_twice(settings, platform, write_persona, redis_client, caplog):
    """Each platform takes the post and hangs up. A lost answer was logged as a crash,
    with a 60-line traceback on the terminal of `persona post`; X's slot was then left
    "uncertain" with no word of what to do about it."""
    changed = settings_for(settings, platform, x_bearer_token=SecretStr("user-token"),
                           mastodon_access_token=SecretStr("masto-token"), bluesky_handle="sage.test",
                           bluesky_password=SecretStr("app-password"))
    write_persona("lossy", base="unused", schedule={"sinks": ["x", "mastodon", "bluesky"], "candidates": 1})
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Tend the garden daily."])
    platform.drop_next(3)  # each platform's post
    first = poster.post("lossy", slot="2026-01-02T09:00:00Z")
    assert [r.exc_info for r in caplog.records if r.levelno >= logging.WARNING] == [None] * 3, caplog.text
    assert {spec: s["state"] for spec, s in first.sinks.items()} == {"x": "uncertain", "mastodon": "intent", "bluesky": "intent"}
    assert first.status == "uncertain" and len(platform.dropped) == 3
    assert "x: no answer, it may have posted: the connection broke before X answered" in first.message
    assert "`persona posts settle lossy 2026-01-02T09:00:00Z --posted LINK` (or `--not-posted`)" in first.message
    assert "Traceback" not in first.message and "\n" not in first.message
    retry = poster.post("lossy", slot="2026-01-02T09:00:00Z")
    assert {spec: s["state"] for spec, s in retry.sinks.items()} == {"x": "uncertain", "mastodon": "posted", "bluesky": "posted"}
    assert len([s for s in platform.seen if s["path"] == "/2/tweets"]) == 1  # X: left to a person
    assert len(platform.statuses) == 1 and len(platform.records) == 1  # the others: the same post, found or deduplicated


def test_discord_and_telegram_name_a_platform_down_and_a_lost_answer(settings, platform):
    """discord.py's and python-telegram-bot's connection errors escaped the sinks as they
    were: read as bugs, logged with their tracebacks, a Discord that was down included."""
    from adapters.posting.sinks import SinkUnreachable

    changed = settings_for(settings, platform)
    changed.discord.token, changed.telegram.token = SecretStr("discord-bot-token"), SecretStr("123456:telegram-token")
    discord_sink, telegram_sink = make_sink("discord:1234", changed), make_sink("telegram:@sagechannel", changed)
    platform.drop_next(2)
    with pytest.raises(SinkNoAnswer, match="the connection broke before Discord answered"):
        discord_sink.post("Tend the garden daily.", "sage:s1:discord:1234")
    with pytest.raises(SinkNoAnswer, match="the connection broke before Telegram answered"):
        telegram_sink.post("Tend the garden daily.", "sage:s1:telegram:@sagechannel")
    again = discord_sink.post("Tend the garden daily.", "sage:s1:discord:1234")  # the same nonce: the same message
    assert again.id == platform.discord_messages[0]["id"] and len(platform.discord_messages) == 1
    down = settings_for(settings, FakePlatform(url=f"http://127.0.0.1:{free_port()}"))
    down.discord.token = SecretStr("discord-bot-token")
    with pytest.raises(SinkUnreachable, match="cannot reach Discord at http://127.0.0.1"):
        make_sink("discord:1234", down).post("Tend the garden daily.", "sage:s2:discord:1234")


def test_a_post_that_got_no_answer_past_its_grace_says_how_to_finish_it(settings, platform, write_persona, redis_client, caplog):
    """Mastodon took the post and hung up, then could not be reached to look for it: past the
    15 minutes' grace the slot was logged as "skipped missed slot", as if never tried, with a
    post that may not be out."""
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={
        "cron": "0 9 * * *", "timezone": "UTC", "missed": "skip", "enabled": True, "sinks": ["mastodon"], "candidates": 1})
    changed = settings_for(settings, platform, mastodon_access_token=SecretStr("masto-token"))
    runner = Scheduler(Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."]), redis_client)
    at_nine = datetime(2026, 1, 5, 9, tzinfo=UTC)
    runner.tick(at_nine - timedelta(hours=1))
    platform.drop_next(1)
    assert [o.sinks["mastodon"]["state"] for o in runner.tick(at_nine + timedelta(minutes=1))] == ["intent"]
    changed.posting.mastodon_api_url = f"http://127.0.0.1:{free_port()}"  # down
    assert [o.sinks["mastodon"]["state"] for o in runner.tick(at_nine + timedelta(minutes=10))] == ["intent"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adapters.scheduler"):
        assert runner.tick(at_nine + timedelta(minutes=20)) == []  # past the grace: no more retries
    [said] = [r.getMessage() for r in caplog.records if r.name == "adapters.scheduler"]
    assert "slot 2026-01-05T09:00:00Z got no answer from mastodon" in said, said
    assert "`persona post poet --slot 2026-01-05T09:00:00Z` finishes it safely" in said
    assert "skipped missed slot" not in caplog.text


def _post_within(sink, seconds: float, text: str, marker: str):
    """``sink.post``, or a failure if it has not returned in ``seconds`` (a post stuck in a wait)."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(sink.post, text, marker).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def test_discord_waits_out_a_short_rate_limit_and_names_a_long_one(settings, platform):
    """discord.py slept through any 429 for as long as Discord asked (a post, and the
    scheduler behind it, stalled), and five short ones in a row read "Discord refused the
    post": the slot closed as failed, never tried again."""
    changed = settings_for(settings, platform)
    changed.discord.token = SecretStr("discord-bot-token")
    sink = make_sink("discord:1234", changed)
    platform.discord_limits = [0.05]  # a short wait is waited out
    assert _post_within(sink, 10, "Tend the garden daily.", "sage:s1:discord:1234").id == platform.discord_messages[0]["id"]
    platform.discord_limits = [45.0]  # past the 30 s the sink waits: said at once
    with pytest.raises(SinkRateLimited, match="Discord is rate-limiting posts: it asks to wait 45 s"):
        _post_within(sink, 10, "Small steps, daily.", "sage:s2:discord:1234")
    platform.discord_limits = [0.05] * 5  # still limited after discord.py's five tries
    with pytest.raises(SinkRateLimited, match="Discord is rate-limiting posts"):
        _post_within(sink, 10, "Small steps, daily.", "sage:s2:discord:1234")
    assert len(platform.discord_messages) == 1


def test_a_post_discord_rate_limited_is_tried_again_at_the_next_tick(settings, platform, write_persona, redis_client):
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={
        "cron": "0 9 * * *", "timezone": "UTC", "missed": "skip", "enabled": True, "sinks": ["discord:1234"], "candidates": 1})
    changed = settings_for(settings, platform)
    changed.discord.token = SecretStr("discord-bot-token")
    runner = Scheduler(Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."]), redis_client)
    at_nine = datetime(2026, 1, 5, 9, tzinfo=UTC)
    runner.tick(at_nine - timedelta(hours=1))
    platform.discord_limits = [45.0]
    pool = ThreadPoolExecutor(1)
    [limited] = pool.submit(runner.tick, at_nine + timedelta(seconds=30)).result(timeout=10)
    pool.shutdown(wait=False)
    assert (limited.status, limited.retry_later, limited.sinks["discord:1234"]["state"]) == ("failed", True, "rate_limited")
    assert "discord:1234: rate-limited, nothing sent: Discord is rate-limiting posts: it asks to wait 45 s" in limited.message
    assert [(o.status, o.slot) for o in runner.tick(at_nine + timedelta(minutes=1))] == [("posted", "2026-01-05T09:00:00Z")]
    assert [m["content"] for m in platform.discord_messages] == ["Patience is a slow river."]


def test_mastodon_and_bluesky_say_a_rate_limit_and_a_server_error_at_once(settings, platform):
    """Mastodon.py slept out a 429 (5 minutes at a time, for as long as the limit lasted),
    stalling the scheduler; Bluesky's 429, 5xx and a login that found it down escaped the
    sink as tracebacks, read as "the post may be out"."""
    changed = settings_for(settings, platform, mastodon_access_token=SecretStr("masto-token"),
                           bluesky_handle="sage.test", bluesky_password=SecretStr("app-pass"))
    mastodon, bluesky = make_sink("mastodon", changed), make_sink("bluesky", changed)
    platform.fail_with = 429
    with pytest.raises(SinkRateLimited, match="Mastodon is rate-limiting posts"):
        _post_within(mastodon, 10, "Patience.", "m1")
    with pytest.raises(SinkRateLimited, match="Bluesky is rate-limiting posts: 429"):
        _post_within(bluesky, 10, "Patience.", "m1")
    platform.fail_with = 500  # the post may be stored: the next try looks for it first
    with pytest.raises(SinkNoAnswer, match="no answer from Bluesky at .*: 500"):
        bluesky.post("Patience.", "m1")
    platform.fail_with, platform.bluesky_login_fails_with = None, 502  # not even logged in: nothing was posted
    with pytest.raises(SinkUnreachable, match=r"cannot log in to Bluesky at .* \(502"):
        bluesky.post("Patience.", "m1")
    down = settings_for(settings, FakePlatform(url=f"http://127.0.0.1:{free_port()}"),
                        bluesky_handle="sage.test", bluesky_password=SecretStr("app-pass"))
    with pytest.raises(SinkUnreachable, match=r"cannot log in to Bluesky at .* \(connection refused\)"):
        make_sink("bluesky", down).post("Patience.", "m1")
    with pytest.raises(SinkUnreachable, match="cannot look on Bluesky at .* for the earlier post"):
        make_sink("bluesky", down).find("m1", "Patience.")
    assert platform.records == [] and platform.statuses == {}


def test_a_platform_down_when_a_retry_looks_for_the_earlier_post_is_tried_again_later(settings, platform, write_persona, redis_client):
    """Bluesky hung up on a post, then was down when the retry looked for it: the lookup's
    NetworkError escaped `persona post` as a traceback, and a scheduler tick with it, so
    no other persona posted until Bluesky came back."""
    write_persona("sky", base="unused", schedule={"sinks": ["bluesky"], "candidates": 1})
    changed = settings_for(settings, platform, bluesky_handle="sage.test", bluesky_password=SecretStr("app-pass"))
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["A calm mind is a garden."])
    platform.drop_next(1)
    assert poster.post("sky", slot="2026-01-05T09:00:00Z").sinks["bluesky"]["state"] == "intent"
    changed.posting.bluesky_api_url = f"http://127.0.0.1:{free_port()}/xrpc"  # down
    looked = poster.post("sky", slot="2026-01-05T09:00:00Z")
    assert (looked.status, looked.retry_later, looked.sinks["bluesky"]["state"]) == ("failed", True, "intent")
    assert "could not look for the earlier post, so nothing was sent: cannot look on Bluesky" in looked.message
    changed.posting.bluesky_api_url = platform.url + "/xrpc"  # back
    found = poster.post("sky", slot="2026-01-05T09:00:00Z")
    assert found.status == "posted" and len(platform.records) == 1  # found, not posted again


def test_a_discord_post_whose_poster_died_is_found_not_sent_again(settings, platform, write_persona, redis_client):
    """A scheduler died after Discord took the post; the slot is taken up again only when its
    lease runs out, ten minutes on, by when Discord has forgotten the nonce: it went out twice."""
    changed = settings_for(settings, platform)
    changed.discord.token = SecretStr("discord-bot-token")
    sink = make_sink("discord:1234", changed)

    write_persona("chat", base="unused", schedule={"sinks": ["discord:1234"], "candidates": 1})
    write = lambda persona, n, seed: ["Tend the garden daily."]
    with pytest.raises(DiedAfterPosting):
        Poster(changed, redis_client, write, sink_factory=dies_after_posting(sink)).post("chat", slot="2026-01-05T09:00:00Z")
    platform.expire_discord_nonces()  # the lease ran out: minutes later
    retry = Poster(changed, redis_client, write).post("chat", slot="2026-01-05T09:00:00Z")
    assert retry.status == "posted" and [m["content"] for m in platform.discord_messages] == ["Tend the garden daily."]
    assert retry.sinks["discord:1234"]["id"] == platform.discord_messages[0]["id"]
    assert sink.find("m2", "Small steps, daily.") is None
    platform.discord_history_forbidden = True  # no Read Message History: the nonce alone, said in the log
    assert sink.find("m1", "Tend the garden daily.") is None


def test_a_mastodon_post_finished_after_its_key_expired_is_found_not_sent_again(settings, platform, write_persona, redis_client):
    """Mastodon took a post and the answer was lost; the slot was finished more than an hour
    later (the machine down overnight), when Mastodon had forgotten the idempotency key:
    the post went out twice."""
    write_persona("masto", base="unused", schedule={"sinks": ["mastodon"], "candidates": 1})
    changed = settings_for(settings, platform, mastodon_access_token=SecretStr("masto-token"))
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Less, but better & <kinder>."])
    platform.drop_next(1)
    assert poster.post("masto", slot="2026-01-05T09:00:00Z").sinks["mastodon"]["state"] == "intent"
    platform.expire_mastodon_keys()  # the next morning
    finished = poster.post("masto", slot="2026-01-05T09:00:00Z")
    assert finished.status == "posted" and len(platform.statuses) == 1
    [made] = platform.statuses.values()
    assert finished.sinks["mastodon"]["id"] == made["id"] and made["content"] == "<p>Less, but better &amp; &lt;kinder&gt;.</p>"
    assert make_sink("mastodon", changed).find("m2", "Small steps, daily.") is None


def test_a_mastodon_that_cannot_be_reached_is_said_so_like_the_other_platforms(settings, platform, write_persona, redis_client):
    """A refused connection to Mastodon read "no answer (safe to retry) no answer from Mastodon",
    as if the post might be out, where every other sink said "unreachable, nothing sent"."""
    down = f"http://127.0.0.1:{free_port()}"
    changed = settings_for(settings, platform, mastodon_access_token=SecretStr("token"), mastodon_api_url=down)
    with pytest.raises(SinkUnreachable, match=rf"cannot reach Mastodon at {down} \(connection refused\)"):
        make_sink("mastodon", changed).post("Tend the garden daily.", "sage:s1:mastodon")
    write_persona("masto", base="unused", schedule={"sinks": ["mastodon"], "candidates": 1})
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."])
    first = poster.post("masto", slot="2026-01-05T09:00:00Z")
    assert (first.status, first.retry_later, first.sinks["mastodon"]["state"]) == ("failed", True, "unreachable")
    assert first.message.startswith(f"mastodon: unreachable, nothing sent: cannot reach Mastodon at {down}")
    changed.posting.mastodon_api_url = platform.url  # back up: posted once, without looking first
    assert poster.post("masto", slot="2026-01-05T09:00:00Z").status == "posted"
    assert [seen["path"] for seen in platform.seen] == ["/api/v1/statuses"]


def test_a_refused_telegram_token_is_not_spelt_out_in_the_message(settings, platform):
    """python-telegram-bot's refusal reads "The token `123456:secret` was rejected by the
    server": the bot's secret token went into the post's message, the log and the ledger."""
    changed = settings_for(settings, platform)
    changed.telegram.token = SecretStr("123456:very-secret")
    platform.fail_with = 401
    with pytest.raises(SinkError, match="PERSONA_TELEGRAM__TOKEN") as refused:
        make_sink("telegram:@sagechannel", changed).post("Patience.", "m1")
    assert "very-secret" not in str(refused.value) and "<PERSONA_TELEGRAM__TOKEN>" in str(refused.value)
    platform.fail_with = None
    changed.telegram.api_url = f"http://127.0.0.1:{free_port()}/bot"
    with pytest.raises(SinkUnreachable) as down:
        make_sink("telegram:@sagechannel", changed).post("Patience.", "m1")
    assert "very-secret" not in str(down.value)


def test_a_refused_post_says_how_to_finish_it_once_fixed(settings, platform, write_persona, redis_client):
    """A post that a platform refused (a wrong token) said only "check the setting": nothing
    retries a refusal, and posting again without --slot made a new post everywhere."""
    write_persona("fixme", base="unused", schedule={"sinks": ["file:fixme.jsonl", "x"], "candidates": 1})
    changed = settings_for(settings, platform, x_bearer_token=SecretStr("wrong"))
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."])
    platform.fail_with = 401
    refused = poster.post("fixme", slot="2026-01-05T09:00:00Z")
    assert (refused.status, refused.retry_later) == ("failed", False)
    assert refused.message.startswith("x: not posted: X refused the credentials (401 Unauthorized); check "
                                      "PERSONA_POSTING__X_BEARER_TOKEN in .env or the environment"), refused.message
    assert refused.message.endswith("which do not expire); once that is fixed, "
                                    "`persona post fixme --slot 2026-01-05T09:00:00Z` posts the same text where it failed (never twice)")
    platform.fail_with = None
    fixed = poster.post("fixme", slot="2026-01-05T09:00:00Z")
    assert (fixed.status, fixed.message) == ("posted", "")
    assert len(read_jsonl(changed.data_dir / "posts" / "fixme.jsonl")) == 1


def test_every_platform_that_cannot_be_reached_says_why_in_a_few_words_with_its_address(settings):
    """Each library said it its own way: urllib3's "HTTPConnectionPool(host=…): Max retries
    exceeded with url: … (Caused by NewConnectionError(…))", aiohttp's "Cannot connect to host
    … ssl:default [Connect call failed …]", httpx's "All connection attempts failed"."""
    down = settings_for(settings, FakePlatform(url=f"http://127.0.0.1:{free_port()}"), x_bearer_token=SecretStr("t"),
                        mastodon_access_token=SecretStr("t"), bluesky_handle="sage.test", bluesky_password=SecretStr("p"))
    down.discord.token, down.telegram.token = SecretStr("discord-bot-token"), SecretStr("123456:telegram-token")
    said = {}
    for spec in ("x", "mastodon", "bluesky", "discord:1234", "telegram:@sagechannel"):
        with pytest.raises(SinkUnreachable) as unreachable:
            make_sink(spec, down).post("Tend the garden daily.", f"sage:s1:{spec}")
        said[spec] = str(unreachable.value)
    url = down.posting.x_api_url
    assert said == {
        "x": f"cannot reach X at {url} (connection refused)",
        "mastodon": f"cannot reach Mastodon at {url} (connection refused)",
        "bluesky": f"cannot log in to Bluesky at {url}/xrpc (connection refused)",
        "discord:1234": f"cannot reach Discord at {url}/api/v10 (connection refused)",
        "telegram:@sagechannel": f"cannot reach Telegram at {url}/bot (connection refused)",
    }


def test_a_connection_that_times_out_or_names_no_host_is_said_in_a_few_words():
    """The other two ways a platform cannot be reached, as requests raises them."""
    import urllib3

    from adapters.posting.sinks import network_reason

    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)  # never accepted: once one connection waits, the next one's SYN goes unanswered
    waiting = socket.create_connection(full.getsockname())
    try:
        with pytest.raises(requests.exceptions.ConnectTimeout) as timed_out:
            requests.get("http://{}:{}/".format(*full.getsockname()), timeout=(0.3, 1))
    finally:
        waiting.close()
        full.close()
    assert network_reason(timed_out.value) == "timed out"
    # What urllib3 raises for a name the resolver does not know (a real lookup needs DNS).
    unknown = urllib3.exceptions.NameResolutionError("nohost.invalid", None, socket.gaierror(-2, "Name or service not known"))
    try:
        raise requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", unknown))
    except requests.exceptions.ConnectionError as exc:
        assert network_reason(exc) == "name not resolved"
        assert one_line(exc) == "name not resolved"
    assert network_reason(ValueError("not a network error")) is None
    # A sink's own error names the address already: kept whole, whatever is behind it.
    try:
        raise SinkUnreachable("cannot reach X at http://x.test (connection refused)") from ConnectionRefusedError(111, "refused")
    except SinkUnreachable as exc:
        assert one_line(exc) == "cannot reach X at http://x.test (connection refused)"


def test_mastodon_says_what_it_answered_in_words_not_as_a_tuple(settings, platform):
    """Mastodon.py's error read "(('Mastodon API returned error', 401, 'Unauthorized', 'Validation failed'))"."""
    changed = settings_for(settings, platform, mastodon_access_token=SecretStr("wrong"))
    platform.fail_with = 401
    with pytest.raises(SinkError) as refused:
        make_sink("mastodon", changed).post("Patience.", "m1")
    assert str(refused.value).startswith("Mastodon refused the access token (401 Unauthorized: Validation failed); check ")


def test_the_scheduler_says_each_sink_failure_once_with_what_to_do_next(settings, platform, write_persona, redis_client, caplog):
    """The publisher logged X's refusal, then the scheduler logged the whole outcome again:
    a long-running service's log said every failure twice."""
    write_persona("poet", base="unused", adapters=["cli", "scheduler"], schedule={
        "cron": "0 9 * * *", "timezone": "UTC", "missed": "skip", "enabled": True,
        "sinks": ["file:poet.jsonl", "x"], "candidates": 1})
    changed = settings_for(settings, platform, x_bearer_token=SecretStr("user-token"))
    runner = Scheduler(Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."]), redis_client)
    at_nine = datetime(2026, 1, 5, 9, tzinfo=UTC)
    runner.tick(at_nine - timedelta(hours=1))
    platform.fail_with = 429  # first a rate limit: the scheduler tries again by itself
    with caplog.at_level(logging.INFO):
        [limited] = runner.tick(at_nine + timedelta(minutes=1))
    assert [r.getMessage() for r in caplog.records if "rate-limiting" in r.getMessage()] == [
        "poet slot 2026-01-05T09:00:00Z: x: rate-limited, nothing sent: X is rate-limiting posts: 429 Too Many Requests"]
    [said] = [r.getMessage() for r in caplog.records if r.name == "adapters.scheduler" and "is due" not in r.getMessage()]
    assert said == "poet: slot 2026-01-05T09:00:00Z partly posted: 1 of 2; it is tried again at the next tick", said
    assert (limited.status, limited.retry_later) == ("failed", True)
    caplog.clear()
    platform.fail_with = 403  # then a refusal: a person must act
    with caplog.at_level(logging.INFO):
        [refused] = runner.tick(at_nine + timedelta(minutes=2))
    assert len([r for r in caplog.records if "X refused the post" in r.getMessage()]) == 1, caplog.text
    [said] = [r.getMessage() for r in caplog.records if r.name == "adapters.scheduler" and "is due" not in r.getMessage()]
    assert said == ("poet: slot 2026-01-05T09:00:00Z partly posted: 1 of 2; once that is fixed, `persona post poet "
                    "--slot 2026-01-05T09:00:00Z` posts the same text where it failed (never twice)"), said
    assert (refused.status, refused.headline) == ("failed", "partly posted: 1 of 2")
    assert len(read_jsonl(changed.data_dir / "posts" / "poet.jsonl")) == 1  # the file sink, posted once


def test_a_telegram_api_url_without_bot_is_refused_naming_the_setting(settings, platform, write_persona, redis_client):
    """PERSONA_TELEGRAM__API_URL without its /bot: python-telegram-bot wrote the token into the
    port ("Invalid port"), and the post, never sent, was left "no answer, it may have posted"
    for a person to settle."""
    changed = settings_for(settings, platform)
    changed.telegram.token, changed.telegram.api_url = SecretStr("123456:telegram-token"), platform.url
    with pytest.raises(ConfigError, match="PERSONA_TELEGRAM__API_URL") as refused:
        make_sink("telegram:@sagechannel", changed).post("Patience.", "m1")
    assert f"set PERSONA_TELEGRAM__API_URL={platform.url}/bot" in str(refused.value)
    assert "telegram-token" not in str(refused.value)
    write_persona("tg", base="unused", schedule={"sinks": ["telegram:@sagechannel"], "candidates": 1})
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."])
    with pytest.raises(ConfigError, match="ends at the host"):
        poster.post("tg", slot="2026-01-05T09:00:00Z")
    assert poster.ledger.unsettled() == [] and platform.seen == []
    changed.telegram.api_url = platform.url.removeprefix("http://") + "/bot"  # no scheme: httpx cannot send it either
    with pytest.raises(ConfigError, match="not an http:// or https:// address"):
        make_sink("telegram:@sagechannel", changed)
    changed.telegram.api_url = platform.url + "/{token}/"  # python-telegram-bot's placeholder says where the token goes
    assert make_sink("telegram:@sagechannel", changed).api_url == platform.url + "/{token}/"


def test_a_failed_tls_handshake_sent_nothing_and_is_tried_again(settings, platform, tmp_path, write_persona, redis_client):
    """An X or Mastodon whose TLS handshake failed (a certificate not trusted, plain HTTP on the
    port) was read as "no answer, it may have posted": X's slot waited for a person to settle it."""
    from tests.fakes.tls import self_signed

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed(tmp_path))
    plain_on_https = platform.url.replace("http://", "https://")
    with serve(ssl_context=context) as untrusted:
        for url, reason in ((untrusted.url, "TLS certificate not trusted"), (plain_on_https, "TLS failed")):
            changed = settings_for(settings, platform, x_bearer_token=SecretStr("t"), mastodon_access_token=SecretStr("t"),
                                   x_api_url=url, mastodon_api_url=url)
            for spec, name in (("x", "X"), ("mastodon", "Mastodon")):
                with pytest.raises(SinkUnreachable, match=rf"cannot reach {name} at {url} \({reason}"):
                    make_sink(spec, changed).post("Tend the garden daily.", f"sage:s1:{spec}")
        assert untrusted.seen == [] and platform.seen == []
        write_persona("tls", base="unused", schedule={"sinks": ["x"], "candidates": 1})
        changed.posting.x_api_url = untrusted.url
        poster = Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."])
        first = poster.post("tls", slot="2026-01-05T09:00:00Z")
    assert (first.status, first.retry_later, first.sinks["x"]["state"]) == ("failed", True, "unreachable")
    assert first.message.startswith(f"x: unreachable, nothing sent: cannot reach X at {untrusted.url} (TLS certificate not trusted")
    assert poster.ledger.unsettled() == []  # nothing for a person to settle
    changed.posting.x_api_url = platform.url  # fixed: posted, once
    assert poster.post("tls", slot="2026-01-05T09:00:00Z").status == "posted"
    assert [seen["path"] for seen in platform.seen] == ["/2/tweets"]


X_USER_KEY_SETTINGS = ", ".join(f"PERSONA_POSTING__{key.upper()}" for key in social.X_USER_KEYS)


@pytest.mark.parametrize(("status", "detail", "said"), [
    (401, None, ("X refused the credentials (401 Unauthorized); check PERSONA_POSTING__X_BEARER_TOKEN in .env or the "
                 "environment (an OAuth 2 user token, which expires 2 hours after it is made: for posts day after day, "
                 f"set the four OAuth 1.0a user keys instead, {X_USER_KEY_SETTINGS}, which do not expire)")),
    (429, None, "X is rate-limiting posts: 429 Too Many Requests"),
    (403, None, "X refused the post: 403 Forbidden: You are not allowed to create a Tweet with duplicate content"),
    (403, "You are not permitted to perform this action.",
     ("X refused the post: 403 Forbidden: You are not permitted to perform this action; if the app may not post, give it "
      "Read and Write permission in the X developer portal, then generate the access token again (a token keeps the "
      "permissions it was made with)")),
    (403, "Authenticating with OAuth 2.0 Application-Only is forbidden for this endpoint.",
     ("X refused the post: 403 Forbidden: Authenticating with OAuth 2.0 Application-Only is forbidden for this endpoint; "
      "set PERSONA_POSTING__X_BEARER_TOKEN to an OAuth 2 user token (with tweet.write), or the four OAuth 1.0a user keys")),
    (503, "Service Unavailable", "X answered with a server error: 503 Service Unavailable"),
])
def test_x_says_what_it_answered_once_and_what_to_do(settings, platform, status, detail, said):
    """tweepy's message is the status line, then X's words, which for a 401 or a 429 are the
    reason again: "X refused the credentials (401 Unauthorized Unauthorized); check …"."""
    sink = make_sink("x", settings_for(settings, platform, x_bearer_token=SecretStr("user-token")))
    platform.fail_with, platform.x_detail = status, detail
    with pytest.raises((SinkError, SinkNoAnswer)) as refused:
        sink.post("Patience.", "m1")
    assert str(refused.value) == said


def test_x_with_user_keys_names_those_keys_when_refused(settings, platform):
    keys = {key: SecretStr("wrong") for key in social.X_USER_KEYS}
    platform.fail_with = 401
    with pytest.raises(SinkError) as refused:
        make_sink("x", settings_for(settings, platform, x_bearer_token=SecretStr("unused"), **keys)).post("Patience.", "m1")
    assert str(refused.value) == (
        f"X refused the credentials (401 Unauthorized); check {X_USER_KEY_SETTINGS} (the app's API key and secret, and "
        "the posting account's access token and secret, from the X developer portal) in .env or the environment")


def test_each_log_line_about_a_sink_names_it(settings, platform, write_persona, redis_client, caplog):
    """Two Discord channels, one rate-limited: the log said "poet slot …: Discord is
    rate-limiting posts", and not which channel (nor, for a lost answer, which one)."""
    write_persona("poet", base="unused", schedule={"sinks": ["discord:111", "discord:222"], "candidates": 1})
    changed = settings_for(settings, platform)
    changed.discord.token = SecretStr("discord-bot-token")
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."])
    platform.discord_limits = [120.0]  # the first channel's post
    with caplog.at_level(logging.INFO, logger="adapters.posting.publishing"):
        first = poster.post("poet", slot="2026-01-05T09:00:00Z")
    assert [r.getMessage() for r in caplog.records if r.name == "adapters.posting.publishing"] == [
        ("poet slot 2026-01-05T09:00:00Z: discord:111: rate-limited, nothing sent: Discord is rate-limiting posts: "
         "it asks to wait 120 s"),
        f"poet slot 2026-01-05T09:00:00Z: posted to discord:222 as {first.sinks['discord:222']['url']}",
    ]
    caplog.clear()
    platform.drop_next(1)  # the retry's post is made, its answer lost
    with caplog.at_level(logging.WARNING, logger="adapters.posting.publishing"):
        poster.post("poet", slot="2026-01-05T09:00:00Z")
    [said] = [r.getMessage() for r in caplog.records if r.name == "adapters.posting.publishing"]
    assert said.startswith("poet slot 2026-01-05T09:00:00Z: discord:111: no answer (safe to retry): the connection broke"), said


def test_a_discord_that_never_answers_is_given_up_on(settings, platform, monkeypatch, write_persona, redis_client):
    """discord.py sets no time-out: a stalled Discord held `persona post` (and the scheduler,
    past its lease) for aiohttp's 5 minutes a request. A login that gets no answer sent
    nothing; a post that gets none may be there, and the retry finds it."""
    monkeypatch.setattr(chat_sinks, "DISCORD_REQUEST_TIMEOUT_S", 0.5)
    changed = settings_for(settings, platform)
    changed.discord.token = SecretStr("discord-bot-token")
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen()  # the kernel accepts the connection; nobody ever answers it
        down = settings_for(settings, FakePlatform(url=f"http://127.0.0.1:{stalled.getsockname()[1]}"))
        down.discord.token = changed.discord.token
        with pytest.raises(SinkUnreachable, match=r"cannot log in to Discord at http://127.0.0.1:\d+/api/v10 \(timed out\)"):
            _post_within(make_sink("discord:1234", down), 10, "Tend the garden daily.", "sage:s0:discord:1234")
    write_persona("slow", base="unused", schedule={"sinks": ["discord:1234"], "candidates": 1})
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Tend the garden daily."])
    platform.slow_s = 2.0  # the message is made; its answer comes too late
    first = poster.post("slow", slot="2026-01-05T09:00:00Z")
    assert (first.status, first.retry_later) == ("failed", True)
    assert first.message.startswith("discord:1234: no answer (safe to retry): Discord did not answer in 0.5 s"), first.message
    platform.slow_s = 0.0
    platform.expire_discord_nonces()  # the retry finds the message in the channel, not by its nonce
    assert poster.post("slow", slot="2026-01-05T09:00:00Z").status == "posted"
    assert len(platform.discord_messages) == 1


def test_telegram_that_never_says_who_the_bot_is_sent_nothing(settings, platform):
    """Telegram's getMe, asked before the post, got no answer: the post, never sent, was left
    "no answer, it may have posted" for a person to settle. And a post Telegram took 5 s to
    confirm was left so too (python-telegram-bot's time-out)."""
    changed = settings_for(settings, platform)
    changed.telegram.token = SecretStr("123456:telegram-token")
    platform.slow_s = 5.5
    with socket.socket() as stalled, ThreadPoolExecutor(2) as pool:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen()
        down = settings_for(settings, FakePlatform(url=f"http://127.0.0.1:{stalled.getsockname()[1]}"))
        down.telegram.token = changed.telegram.token
        unanswered = pool.submit(make_sink("telegram:@sagechannel", down).post, "Tend the garden daily.", "m0")
        slow = pool.submit(make_sink("telegram:@sagechannel", changed).post, "Tend the garden daily.", "m1")
        with pytest.raises(SinkUnreachable, match=r"cannot reach Telegram at http://127.0.0.1:\d+/bot \(timed out\)"):
            unanswered.result(timeout=20)
        assert slow.result(timeout=20).id == "77"


def test_two_spellings_of_one_place_are_refused_before_anything_goes_out(settings, platform, write_persona, redis_client):
    """"discord:1234", "Discord:1234" and "discord: 1234" are one channel, but each spec was a
    sink of its own, with its own nonce: every post went to that channel three times."""
    changed = settings_for(settings, platform)
    changed.discord.token = SecretStr("discord-bot-token")
    write_persona("echo", base="unused", adapters=["cli", "scheduler"], schedule={
        "sinks": ["discord:1234", "Discord:1234", "discord: 1234"], "candidates": 1, "enabled": True})
    poster = Poster(changed, redis_client, lambda persona, n, seed: ["Patience is a slow river."])
    said = "sinks 'discord:1234' and 'Discord:1234' post to the same place, which would get each post twice"
    with pytest.raises(ConfigError, match=said):
        poster.post("echo", slot="2026-01-05T09:00:00Z")
    assert platform.discord_messages == [] and poster.ledger.record("echo", "2026-01-05T09:00:00Z") == {}
    assert [problem for problem in Scheduler(poster, redis_client).preflight() if said in problem]  # said at start
    archive = changed.data_dir / "posts" / "echo.jsonl"
    with pytest.raises(ConfigError, match=f"sinks 'file:echo.jsonl' and 'file:{archive}' post to the same place"):
        poster.post("echo", sinks=["file:echo.jsonl", f"file:{archive}"], text="Patience.")
    # The same spec listed twice is one sink: posted once, and said once.
    posted = poster.post("echo", sinks=["discord:1234", "discord:1234"], text="Patience.")
    assert list(posted.sinks) == ["discord:1234"] and len(platform.discord_messages) == 1
