"""Per-user and per-chat limits: one friendly notice per window, then quiet."""

from __future__ import annotations

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from adapters.ratelimit import RateLimiter

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


async def test_a_redis_outage_lets_messages_through():
    client = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=NO_RETRY)
    assert (await RateLimiter(client, "telegram", per_user=1, per_chat=1).check("u", "c")).allowed
    await client.aclose()
