"""A production Redis's limits, said before they cost work: a maxmemory-policy that deletes
keys, a Redis that is full, and an ACL user denied what persona runs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from persona.cli.serve import check_redis_for_service
from persona.connection import connect
from persona.errors import ConfigError
from persona.monitoring import collect_stats
from persona.redis_refusals import ACL_RULES
from tests.fakes.full_redis import redis_refusing_writes


@contextlib.contextmanager
def evicting(client: redis.Redis, policy: str = "allkeys-lru") -> Iterator[None]:
    """Redis set to delete keys once full (a limit far above what the tests use, so nothing is
    deleted); the limits are put back after."""
    before = client.config_get("maxmemory*")
    client.config_set("maxmemory-policy", policy)
    client.config_set("maxmemory", 1 << 30)
    try:
        yield
    finally:
        client.config_set("maxmemory", before["maxmemory"])
        client.config_set("maxmemory-policy", before["maxmemory-policy"])


@pytest.fixture
def acl_user(redis_client: redis.Redis, redis_url: str) -> Iterator:
    """acl_user(name, *rules) -> the test Redis's URL for a new ACL user with ``rules``; each is deleted after."""
    made: list[str] = []

    def make(name: str, *rules: str) -> str:
        redis_client.acl_setuser(name, enabled=True, reset=True, passwords=["+pw-" + name])
        redis_client.execute_command("ACL", "SETUSER", name, *rules)
        made.append(name)
        parts = urlsplit(redis_url)
        return urlunsplit(parts._replace(netloc=f"{name}:pw-{name}@{parts.netloc.rpartition('@')[2]}"))

    yield make
    for name in made:
        redis_client.acl_deluser(name)


def _env(tmp_path: Path, settings, url: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
        "PERSONA_DATA_DIR": str(tmp_path / "cli-data"), "PERSONA_REDIS_URL": url,
        "PERSONA_PERSONAS_DIRS": json.dumps([str(p) for p in settings.personas_dirs]),
    }


def _persona(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_queue_stats_says_that_an_evicting_redis_can_lose_work(tmp_path, settings, redis_client, redis_url):
    """Under allkeys-lru, Redis deleted the queued requests, the counters, the dead letters and
    the swapped version to make room for another app's keys, and nothing anywhere said it could."""
    with evicting(redis_client):
        table = _persona("queue", "stats", env=_env(tmp_path, settings, redis_url))
        as_json = _persona("queue", "stats", "--json", env=_env(tmp_path, settings, redis_url))
    said = " ".join(table.stdout.split())
    assert table.returncode == 0, table.stderr
    assert "warning: Redis deletes keys when full (maxmemory-policy allkeys-lru, maxmemory 1.0 GB)" in said
    assert "queued requests" in said and "`CONFIG SET maxmemory-policy noeviction`" in said
    assert "`maxmemory-policy noeviction`" in said  # the redis.conf line
    memory = json.loads(as_json.stdout)["redis_memory"]
    assert memory["evicts"] is True and memory["policy"] == "allkeys-lru" and memory["max_bytes"] == 1 << 30
    assert "CONFIG SET maxmemory-policy noeviction" in memory["warning"]


def test_a_long_running_service_warns_of_an_evicting_redis_as_it_starts(settings, redis_client, redis_url, caplog):
    """What the worker, `persona up` and the dashboard run once connected. Under volatile-lru the
    replies and heartbeats (which carry a TTL) go first."""
    client = connect(settings, url=redis_url)
    with caplog.at_level(logging.WARNING):
        check_redis_for_service(client, redis_url)
    assert "deletes keys" not in caplog.text  # noeviction, no limit: nothing said
    with evicting(redis_client, "volatile-lru"), caplog.at_level(logging.WARNING):
        check_redis_for_service(client, redis_url)
    [line] = [r.getMessage() for r in caplog.records if "deletes keys" in r.getMessage()]
    assert "maxmemory-policy volatile-lru" in line and "CONFIG SET maxmemory-policy noeviction" in line


def test_a_user_denied_info_starts_all_the_same(settings, redis_url, acl_user, caplog):
    """A managed Redis often denies INFO: the check is skipped (said at debug), nothing fails."""
    url = acl_user("no-info", "~*", "+@all", "-info")
    client = connect(settings, url=url)
    with caplog.at_level(logging.DEBUG, logger="persona.monitoring"):
        check_redis_for_service(client, url)
        stats = collect_stats(client)
    assert stats.redis_memory is None
    assert "not checking Redis's maxmemory-policy: INFO is refused" in caplog.text


def test_queue_stats_reads_a_full_redis_and_says_it_is_full(settings, redis_client):
    """Redis refuses every command queued in MULTI once over maxmemory, reads too:
    `persona queue stats` failed ("Command # 1 (HGETALL persona:stats) of pipeline caused error")."""
    redis_client.hincrby("persona:stats", "completed", 7)
    with redis_refusing_writes(redis_client):
        stats = collect_stats(redis_client)
    assert stats.completed == 7
    assert stats.redis_memory.full and stats.redis_memory.warning.startswith("Redis is full (maxmemory 1 bytes reached)")


def test_an_ask_on_a_full_redis_is_told_that_redis_is_full(tmp_path, settings, redis_client, redis_url, write_persona):
    """It showed the submit script's raw error ("Error running script (call to f_e2c5...):
    @user_script:42: ... -OOM command not allowed ...") and sent people to `persona queue stats`."""
    write_persona("tiny", base="smollm2")
    with redis_refusing_writes(redis_client):
        told = _persona("ask", "tiny", "hi", "--json", env=_env(tmp_path, settings, redis_url))
    error = json.loads(told.stdout)["error"]
    assert told.returncode == 1 and error["kind"] == "QueueError", told.stdout
    assert error["message"].startswith(
        "Redis is full (maxmemory 1 bytes reached): nothing new can be queued; free memory or raise maxmemory"), error
    assert "user_script" not in error["message"] and "persona queue stats" not in error["message"]


def test_a_worker_whose_user_cannot_run_scripts_says_so_before_loading_models(
    tmp_path, settings, redis_url, acl_user, write_persona,
):
    """It loaded every model (minutes on a GPU), then exited 1 pointing at `persona queue stats`,
    which failed the same way; nothing named ACLs or what persona needs."""
    write_persona("tiny", base="smollm2")
    url = acl_user("limited", "~*", "+@all", "-eval", "-evalsha", "-script")
    started = time.monotonic()
    told = _persona("worker", "--device", "cpu", env=_env(tmp_path, settings, url))
    said = " ".join(told.stderr.split())
    assert told.returncode == 1 and "Traceback" not in said, said
    assert "refuses user 'limited' what persona needs (this user has no permissions to run the 'eval' command" in said
    assert f"`ACL SETUSER limited reset on >PASSWORD {ACL_RULES}`" in said and f"`user limited on >PASSWORD {ACL_RULES}`" in said
    assert "loading" not in said and "pw-limited" not in said
    assert time.monotonic() - started < 30
    stats = _persona("queue", "stats", env=_env(tmp_path, settings, url))
    said = " ".join(stats.stderr.split())
    assert "Redis refuses user 'limited' a command" in said and f"ACL SETUSER limited reset on >PASSWORD {ACL_RULES}" in said


@pytest.mark.parametrize("denied", [["-xreadgroup"], ["resetkeys", "~other:*"]])
def test_a_user_denied_streams_or_persona_keys_is_refused_at_start(settings, acl_user, denied):
    url = acl_user("partial", "~*", "+@all", *denied)
    with pytest.raises(ConfigError, match=r"refuses user 'partial' what persona needs .*ACL SETUSER partial reset on"):
        check_redis_for_service(connect(settings, url=url), url)


def test_the_acl_the_error_recommends_runs_persona_and_reads_its_memory(settings, acl_user, client, work):
    """The rules the message gives (persona's keys only, no dangerous commands but INFO) pass
    the check, queue and take work, and still let it read maxmemory-policy."""
    url = acl_user("persona-min", *ACL_RULES.split())
    service = connect(settings, url=url)
    check_redis_for_service(service, url)
    assert collect_stats(service).redis_memory is not None
    from persona.contract import GenerationRequest, Message
    from persona.queue import QueueClient, WorkQueue

    request = GenerationRequest(persona="tiny", messages=[Message(role="user", content="hi")])
    QueueClient(service, settings.queue).submit(request)
    [job] = WorkQueue(service, settings.queue).claim("w-acl", 1, block_ms=0)
    assert job.request.id == request.id


def test_a_redis_over_its_limit_only_by_its_replica_and_aof_buffers_is_not_called_full():
    """Redis leaves its replicas' output buffers and the AOF rewrite's out of maxmemory
    (INFO's mem_not_counted_for_evict): a primary with replicas was said to be full, "nothing
    new can be queued", while it still took every write."""
    from persona.monitoring import RedisMemory

    buffered = RedisMemory(used_bytes=110, max_bytes=100, policy="noeviction", evicted_keys=0, uncounted_bytes=20)
    assert not buffered.full and buffered.warning == ""
    assert RedisMemory(used_bytes=130, max_bytes=100, policy="noeviction", evicted_keys=0, uncounted_bytes=20).full
