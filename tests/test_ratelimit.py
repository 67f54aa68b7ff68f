"""Per-user and per-chat limits: one friendly notice per window, then quiet."""

from __future__ import annotations

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from adapters.ratelimit import WINDOW_S, RateLimiter
from persona import constants as keys

NO_RETRY = Retry(NoBackoff(), 0)  # a dead Redis fails at once (production clients back off)


async def test_users_and_chats_have_separate_limits(redis_url, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    limiter = RateLimiter(client, "discord", per_user=2, per_chat=3)
    now = 1_000_040.0  # 40 s before its one-minute window ends
    decisions = [await limiter.check("u1", "c1", now) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, False, False]
    assert [d.notify for d in decisions] == [False, False, True, False]
    assert decisions[2].retry_after_s == 40
    other = await limiter.check("u2", "c1", now)  # u2 is fine, but c1 has had 5 messages
    assert not other.allowed and not other.notify
    assert (await limiter.check("u3", "c2", now)).allowed
    assert (await limiter.check("u1", "c1", now + 60)).allowed  # the next window
    await client.aclose()


async def test_a_chat_gets_exactly_its_limit_of_messages_a_minute(redis_url, redis_client):
    """Four people each within their own limit: the chat's third message is answered, its fourth is not."""
    client = redis.asyncio.Redis.from_url(redis_url)
    limiter = RateLimiter(client, "discord", per_user=10, per_chat=3)
    now = 2_000_010.0
    decisions = [await limiter.check(f"u{n}", "busy-chat", now) for n in range(4)]
    await client.aclose()
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[3].notify  # the chat's first message over its limit gets the notice


async def test_a_windows_counters_expire_from_redis(redis_url, redis_client):
    """Each user's and chat's counter for a minute is gone from Redis two minutes later, not kept for ever."""
    client = redis.asyncio.Redis.from_url(redis_url)
    limiter = RateLimiter(client, "telegram", per_user=5, per_chat=5)
    now = 3_000_010.0
    await limiter.check("ttl-user", "ttl-chat", now)
    await client.aclose()
    window = int(now // WINDOW_S)
    user_ttl_s = redis_client.ttl(keys.rate_key("telegram", "user", "ttl-user", window))
    chat_ttl_s = redis_client.ttl(keys.rate_key("telegram", "chat", "ttl-chat", window))
    assert 0 < user_ttl_s <= 2 * WINDOW_S
    assert 0 < chat_ttl_s <= 2 * WINDOW_S


async def test_the_notice_never_says_try_again_in_0_s(redis_url, redis_client):
    """Over the limit in a window's last half second, the user is told about 1 s, not 0 s."""
    client = redis.asyncio.Redis.from_url(redis_url)
    limiter = RateLimiter(client, "discord", per_user=1, per_chat=5)
    now = 4_000_019.5  # half a second before its window ends
    await limiter.check("late", "c", now)
    over = await limiter.check("late", "c", now)
    await client.aclose()
    assert not over.allowed and over.notify
    assert over.retry_after_s == 1


async def test_while_redis_is_out_of_reach_each_process_counts_for_itself():
    """During an outage only a user's first messages go through: the rest get one notice, then quiet."""
    client = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=NO_RETRY)
    limiter = RateLimiter(client, "telegram", per_user=1, per_chat=5)
    now = 5_000_010.0
    decisions = [await limiter.check("u", "c", now) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, False, False]
    assert [d.notify for d in decisions] == [False, True, False]
    assert (await limiter.check("u", "c", now + WINDOW_S)).allowed  # a new minute, counted afresh
    await client.aclose()
