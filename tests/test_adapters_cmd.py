"""`persona access ...`, `persona telegram|discord` without a token, and which adapters `persona up` starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio
from pydantic import SecretStr

from adapters.access import AccessControl
from persona.settings import Settings
from persona.supervisor import services_for_up


def persona(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return clean | {"PERSONA_DATA_DIR": str(tmp_path / "data"), "PERSONA_REDIS_URL": redis_url}


async def test_pairing_approve_list_and_revoke(env, redis_url: str, redis_client):
    client = redis.asyncio.Redis.from_url(redis_url)
    access = AccessControl(client, "telegram", "pairing", [], code_ttl_s=600)
    refusal = await access.check("4242", "Ada Lovelace")
    code = refusal.reply.split("pairing code is ")[1].split(".")[0]

    listed = json.loads(persona("access", "list", "--json", env=env).stdout)
    assert listed["approved"] == {"telegram": [], "discord": []}
    assert [(p["code"], p["user"], p["name"]) for p in listed["pending"]] == [(code, "4242", "Ada Lovelace")]

    approved = persona("access", "approve", code, env=env)
    assert approved.returncode == 0 and "Ada Lovelace" in approved.stdout
    assert (await access.check("4242")).allowed
    again = persona("access", "approve", code, env=env)
    assert again.returncode == 1 and "no pending pairing code" in again.stderr

    assert json.loads(persona("access", "list", "--json", env=env).stdout)["approved"]["telegram"] == ["4242"]
    # A platform misspelt said "slack user 4242 was not approved", as if the id were wrong.
    misspelt = persona("access", "revoke", "slack", "4242", env=env)
    assert misspelt.returncode == 1 and "unknown platform 'slack'; name telegram or discord" in misspelt.stderr
    assert persona("access", "revoke", "Telegram", "4242", env=env).returncode == 0
    assert not (await access.check("4242")).allowed
    await client.aclose()


async def test_a_strangers_name_is_shown_as_written_and_never_breaks_the_listing(env, redis_url: str):
    """A name is whatever a stranger calls themselves: "[/]" made `access list` fail with a rich
    MarkupError, hiding every pending code, and "[bold green]✔ approved[/]" showed styled."""
    client = redis.asyncio.Redis.from_url(redis_url)
    access = AccessControl(client, "telegram", "pairing", [], code_ttl_s=600)
    await access.check("13", "[/]")
    refusal = await access.check("14", "Eve [bold green]✔ approved by operator[/]")
    code = refusal.reply.split("pairing code is ")[1].split(".")[0]
    listed = persona("access", "list", env=env | {"COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert "[/]" in listed.stdout and "Eve [bold green]✔ approved by operator[/]" in listed.stdout
    approved = persona("access", "approve", code, env=env | {"COLUMNS": "200"})
    assert approved.returncode == 0 and "Traceback" not in approved.stderr
    assert "approved Eve [bold green]✔ approved by operator[/] (telegram user 14)" in approved.stdout
    await client.aclose()


async def test_access_approve_and_revoke_json_print_one_object_and_a_refusal_as_the_json_failure(env, redis_url,
                                                                                                  redis_client):
    """`access list` had --json and `access approve` and `access revoke` did not; a revoke of a
    user never approved was a bare line on stderr."""
    client = redis.asyncio.Redis.from_url(redis_url)
    access = AccessControl(client, "discord", "pairing", [], code_ttl_s=600)
    refusal = await access.check("77", "Grace")
    code = refusal.reply.split("pairing code is ")[1].split(".")[0]

    approved = persona("access", "approve", code, "--json", env=env)
    assert approved.returncode == 0, approved.stderr
    shown = json.loads(approved.stdout)
    assert (shown["ok"], shown["code"], shown["platform"], shown["user"], shown["name"]) == (True, code, "discord", "77", "Grace")
    again = persona("access", "approve", code, "--json", env=env)
    assert (again.returncode, again.stderr) == (1, "")
    assert json.loads(again.stdout)["error"] == {
        "kind": "ConfigError", "message": f"no pending pairing code {code!r} (codes expire); see `persona access list`"}

    revoked = persona("access", "revoke", "discord", "77", "--json", env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout) == {"ok": True, "platform": "discord", "user": "77"}
    assert not (await access.check("77")).allowed
    never = persona("access", "revoke", "discord", "77", "--json", env=env)
    assert (never.returncode, never.stderr) == (1, "")
    assert json.loads(never.stdout) == {"ok": False, "error": {
        "kind": "ConfigError", "message": "discord user 77 was not approved; `persona access list` shows who is"}}
    plain = persona("access", "revoke", "discord", "77", env=env)
    assert (plain.returncode, plain.stdout) == (1, "") and "discord user 77 was not approved" in plain.stderr
    await client.aclose()


@pytest.mark.parametrize("platform", ["telegram", "discord"])
def test_an_adapter_without_a_token_says_what_to_set(env, platform: str):
    result = persona(platform, env=env)
    assert result.returncode == 1 and f"PERSONA_{platform.upper()}__TOKEN" in result.stderr


def test_up_starts_only_the_adapters_that_have_tokens(tmp_path: Path):
    bare = Settings(_env_file=None, data_dir=tmp_path)
    names = [s.name for s in services_for_up(bare, dashboard=False)]
    assert "telegram" not in names and "discord" not in names
    tokened = Settings(_env_file=None, data_dir=tmp_path, telegram={"token": SecretStr("1:x")}, discord={"token": SecretStr("y")})
    names = [s.name for s in services_for_up(tokened, dashboard=False)]
    assert "telegram" in names and "discord" in names
