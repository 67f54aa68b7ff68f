"""Private-chat access: open, allow-list, and pairing codes the operator approves."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from adapters.access import (
    AccessControl,
    approve_code,
    approved_users,
    pending_pairings,
    revoke_user,
)
from persona import constants as keys

NO_RETRY = Retry(NoBackoff(), 0)  # a dead Redis fails at once (production clients back off)


async def test_policies(redis_url, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    assert (await AccessControl(client, "discord", "open", [], 600).check("1")).allowed
    allowlist = AccessControl(client, "discord", "allowlist", [7], 600)
    assert (await allowlist.check("7")).allowed
    refused = await allowlist.check("8")
    assert not refused.allowed and "list" in refused.reply and not pending_pairings(redis_client)

    pairing = AccessControl(client, "discord", "pairing", [], 600)
    first = await pairing.check("8", "bob")
    second = await pairing.check("8", "bob")
    assert first.reply == second.reply and not first.allowed
    [pending] = pending_pairings(redis_client)
    assert (pending.platform, pending.user, pending.name) == ("discord", "8", "bob")
    assert len(pending.code) == 8 and pending.code in first.reply
    assert approve_code(redis_client, pending.code).user == "8"
    assert (await pairing.check("8")).allowed and (await allowlist.check("8")).allowed
    assert approved_users(redis_client) == {"telegram": [], "discord": ["8"]}
    assert revoke_user(redis_client, "discord", "8") and not revoke_user(redis_client, "discord", "8")
    assert not (await pairing.check("8")).allowed
    await client.aclose()


async def test_redis_down_refuses_politely_but_serves_the_configured_list():
    dead = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=NO_RETRY)
    pairing = AccessControl(dead, "telegram", "pairing", [7], 600)
    assert (await pairing.check("7")).allowed
    refused = await pairing.check("8")
    assert not refused.allowed and "try again" in refused.reply
    await dead.aclose()


async def test_a_pairing_code_expires_and_so_does_the_users_hold_on_it(redis_url, redis_client):
    """ "Codes expire", the operator is told: kept for good, every stranger who ever wrote
    would stay in `persona access list`."""
    client = redis.asyncio.Redis.from_url(redis_url)
    await AccessControl(client, "telegram", "pairing", [], 600).check("901", "ann")
    await client.aclose()
    [pending] = pending_pairings(redis_client)
    assert 0 < redis_client.ttl(keys.pairing_code_key(pending.code)) <= 600
    assert 0 < redis_client.ttl(keys.pairing_user_key("telegram", "901")) <= 600


async def test_a_code_typed_in_lower_case_with_spaces_around_is_approved(redis_url, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    pairing = AccessControl(client, "telegram", "pairing", [], 600)
    await pairing.check("901", "ann")
    [pending] = pending_pairings(redis_client)
    assert approve_code(redis_client, f"  {pending.code.lower()} ").user == "901"
    assert (await pairing.check("901")).allowed and pending_pairings(redis_client) == []
    await client.aclose()


async def test_pending_pairings_are_listed_oldest_first(redis_url, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    pairing = AccessControl(client, "discord", "pairing", [], 600)
    for user in ("1001", "1002", "1003"):
        await pairing.check(user, f"user {user}")
    await client.aclose()
    assert [pending.user for pending in pending_pairings(redis_client)] == ["1001", "1002", "1003"]


def _check_at_once(redis_url: str, user: str, threads: int = 4, tasks: int = 4) -> list[str]:
    """One stranger's messages checked together: from `threads` threads at once (two bot
    processes), each with `tasks` checks on one AccessControl at once (discord.py runs each
    on_message as its own task); the replies."""
    start = threading.Barrier(threads)

    def one_bot() -> list[str]:
        async def bot() -> list[str]:
            client = redis.asyncio.Redis.from_url(redis_url)
            gate = AccessControl(client, "discord", "pairing", [], 600)
            start.wait()
            decisions = await asyncio.gather(*(gate.check(user, "mallory") for _ in range(tasks)))
            await client.aclose()
            return [decision.reply for decision in decisions]

        return asyncio.run(bot())

    with ThreadPoolExecutor(threads) as pool:
        return [reply for replies in pool.map(lambda _: one_bot(), range(threads)) for reply in replies]


async def test_messages_checked_at_once_get_one_code(redis_url, redis_client):
    for user in ("4242", "4243", "4244"):
        replies = _check_at_once(redis_url, user)
        [pending] = [p for p in pending_pairings(redis_client) if p.user == user]
        assert all(pending.code in reply for reply in replies)
    assert len(list(redis_client.scan_iter(match=keys.PAIRING_CODE_KEY_PREFIX + "*"))) == 3


async def test_approval_and_revoke_leave_the_user_no_code_that_readmits_them(redis_url, redis_client):
    replies = _check_at_once(redis_url, "4343")
    [code] = {reply.split("code is ")[1][:8] for reply in replies}
    assert approve_code(redis_client, code).user == "4343"
    assert revoke_user(redis_client, "discord", "4343")
    assert approve_code(redis_client, code) is None
    assert approved_users(redis_client)["discord"] == [] and pending_pairings(redis_client) == []


async def test_a_revoke_ends_the_users_pending_code(redis_url, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    refused = await AccessControl(client, "telegram", "pairing", [], 600).check("77", "eve")
    await client.aclose()
    [pending] = pending_pairings(redis_client)
    assert pending.code in refused.reply
    assert not revoke_user(redis_client, "telegram", "77")  # never approved, and its code is gone too
    assert approve_code(redis_client, pending.code) is None and pending_pairings(redis_client) == []


def test_a_spare_code_made_before_one_code_per_user_is_never_approved(redis_client):
    """Codes made by the old GET-then-SET: two for one user, the user's key naming the later one."""
    for code in ("SPARE222", "LIVE3333"):
        record = {"platform": "discord", "user": "4444", "name": "mallory", "created_at": time.time()}
        redis_client.set(keys.pairing_code_key(code), json.dumps(record), ex=600)
        redis_client.set(keys.pairing_user_key("discord", "4444"), code, ex=600)
    assert [p.code for p in pending_pairings(redis_client)] == ["LIVE3333"]
    assert approve_code(redis_client, "LIVE3333").user == "4444"
    assert revoke_user(redis_client, "discord", "4444")
    assert approve_code(redis_client, "SPARE222") is None
    assert approved_users(redis_client)["discord"] == []
