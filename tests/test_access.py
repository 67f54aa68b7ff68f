"""Private-chat access: open, allow-list, and pairing codes the operator approves."""

from __future__ import annotations

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
