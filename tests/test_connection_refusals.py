"""What a Redis that refuses the session tells the user, in the real CLI and to a bot; and
what a caller hears when its client has no connection left to give (a refusal of its own)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis.asyncio

from persona.connection import connect, connect_async
from persona.constants import STREAM_INTERACTIVE
from persona.contract import GenerationRequest, Message
from persona.errors import ConfigError, QueueBusy, QueueError, ReplyTimeout
from persona.queue import AsyncQueueClient, QueueClient
from persona.settings import Settings
from tests.fakes.old_redis import OldRedis
from tests.fakes.tls import self_signed

PASSWORD = "hunter2-secret"


@pytest.fixture
def redis_5() -> Iterator[OldRedis]:
    """A Redis 5: no HELLO, and its refusal quotes the greeting back, password and all."""
    server = OldRedis("5.0.14")
    yield server
    server.close()


def test_a_redis_older_than_hello_is_said_to_be_too_old(tmp_path: Path, redis_5: OldRedis):
    """It was "refused the session ...: Check the URL's database number and user", which
    sent people to fix a URL that was right."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
        "PERSONA_DATA_DIR": str(tmp_path / "data"),
        "PERSONA_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{redis_5.port}/0",
    }
    told = subprocess.run([sys.executable, "-m", "persona", "queue", "stats"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    said = " ".join(told.stderr.split())
    assert told.returncode == 1 and "Traceback" not in said, said
    assert f"Redis at redis://***@127.0.0.1:{redis_5.port}/0 is too old: it does not know HELLO" in said
    assert "persona needs 6.2 or newer" in said and "database number" not in said
    assert PASSWORD not in said


async def test_a_bot_hears_the_same_without_the_password(settings, redis_5: OldRedis):
    """A bot logs the error as it is: no CLI redaction stands between it and the log."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis_5.port}/0"
    too_old = r"too old: it does not know HELLO.*needs 6\.2 or newer"
    with pytest.raises(ConfigError, match=too_old) as told:
        await connect_async(settings, url=url)
    assert PASSWORD not in str(told.value)
    with pytest.raises(ConfigError, match=too_old) as told:
        connect(settings, url=url)
    assert PASSWORD not in str(told.value)


def _persona(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def _env(tmp_path: Path, url: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")} | {
        "PERSONA_DATA_DIR": str(tmp_path / "data"), "PERSONA_REDIS_URL": url,
    }


@pytest.mark.parametrize(("url", "said"), [
    (f"redis://:{PASSWORD}@127.0.0.1:99999/0", "its port must be a number from 1 to 65535"),
    (f"redis://:{PASSWORD}@127.0.0.1:6391/0?ssl_cert_reqs=bogus", "ssl_cert_reqs, which a redis:// URL does not take"),
    (f"redis://:{PASSWORD}@127.0.0.1:6391/abc", "its database, the path after HOST:PORT, must be a number"),
    # Two slashes: "tmp" was read as a host, and dropped; the socket looked for was /x.sock.
    (f"unix://:{PASSWORD}@tmp/x.sock", "a unix:// URL's socket path is absolute, after three slashes: unix:///tmp/x.sock"),
])
def test_a_redis_url_redis_cannot_open_is_a_config_error_not_a_traceback(tmp_path: Path, url: str, said: str):
    """`persona queue stats --json` printed redis-py's traceback (Port out of range, an
    unexpected keyword argument), or for /abc went on to database 0."""
    told = _persona("queue", "stats", "--json", env=_env(tmp_path, url))
    assert told.returncode != 0 and told.stderr == "", told.stderr
    error = json.loads(told.stdout)["error"]
    assert error["kind"] == "ConfigError" and error["message"].startswith("PERSONA_REDIS_URL: "), error
    assert said in error["message"] and PASSWORD not in told.stdout


def test_a_tls_file_that_holds_no_certificate_is_said_to_be_the_fault(tmp_path: Path, own_redis):
    """A key given as the CA file was "cannot reach Redis ...: no certificate or crl found
    (rediss:// is TLS: does that port speak it?)": the port was never the fault. (ssl reads the
    files as it opens the connection, before a byte of TLS: a plain Redis shows it as well.)"""
    cert, key = self_signed(tmp_path)
    _, url, _ = own_redis
    address = url.replace("redis://", "rediss://")
    told = _persona("queue", "stats", "--json", env=_env(tmp_path, f"{address}?ssl_ca_certs={key}"))
    error = json.loads(told.stdout)["error"]
    assert error["kind"] == "ConfigError", error
    assert error["message"].startswith(f"the file that ssl_ca_certs names in PERSONA_REDIS_URL ({key}) holds no CA certificate")
    assert "speak" not in error["message"]
    (tmp_path / "other").mkdir()
    _, other_key = self_signed(tmp_path / "other")
    with pytest.raises(ConfigError, match="do not belong together: the key is not the certificate's"):
        connect(Settings(_env_file=None, data_dir=tmp_path / "data",
                         redis_url=f"{address}?ssl_certfile={cert}&ssl_keyfile={other_key}&ssl_cert_reqs=none"))


def test_a_redis_url_that_answers_nothing_is_not_sent_to_persona_up(tmp_path: Path):
    """"`persona up` starts one" sent people to start the embedded Redis, which a set
    PERSONA_REDIS_URL is not: the Redis it names is the one to look at."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    told = _persona("queue", "stats", env=_env(tmp_path, f"redis://:{PASSWORD}@127.0.0.1:{port}/0"))
    said = " ".join(told.stderr.split())
    assert told.returncode == 1 and "Traceback" not in said, said
    assert f"cannot reach Redis at redis://***@127.0.0.1:{port}/0" in said
    assert "Check that the Redis at that address is running and can be reached from here" in said
    assert "or unset PERSONA_REDIS_URL to use the embedded one" in said
    assert "`persona up` starts one" not in said and PASSWORD not in said


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/3?password=TOPSECRET", "redis://127.0.0.1:6379/3?password=***"),
    ("redis://:TOPSECRET@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("redis://ops:TOPSECRET@127.0.0.1:6379/0", "redis://ops:***@127.0.0.1:6379/0"),
    ("redis://TOPSECRET@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),  # a password with its colon left out
    ("redis://persona@127.0.0.1:6379/3?password=TOPSECRET", "redis://persona@127.0.0.1:6379/3?password=***"),
    ("redis://127.0.0.1:6379/3?username=persona&password=TOP%40SECRET",
     "redis://127.0.0.1:6379/3?username=persona&password=***"),
    ("rediss://h:6380/0?ssl_password=TOPSECRET&ssl_ca_certs=/ca.pem", "rediss://h:6380/0?ssl_password=***&ssl_ca_certs=/ca.pem"),
    ("unix://:TOP%40SECRET@/run/redis.sock?db=0", "unix://***@/run/redis.sock?db=0"),
])
def test_one_rule_hides_every_password_a_redis_url_can_hold(url: str, shown: str):
    """`persona up`'s banner, every connection error and the bots' logs showed a ``?password=``
    (only ``user:pass@`` was hidden), and `persona settings` had a rule of its own."""
    from persona.logs import describe_url, url_secrets

    assert describe_url(url) == shown
    assert {"TOPSECRET", "TOP@SECRET"} & url_secrets(url)


def test_a_wrong_password_in_the_query_is_called_wrong_and_never_shown(tmp_path: Path, redis_url: str):
    """It was "Redis at redis://…/0?password=WRONGPW123 wants a password, and PERSONA_REDIS_URL
    gives none": the password printed, and the diagnosis wrong."""
    from persona.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "guarded")
    server.start(unix_socket=False)
    try:
        wrong = f"redis://127.0.0.1:{server.port}/0?password=WRONGPW123"
        told = _persona("queue", "stats", env=_env(tmp_path, wrong))
        said = " ".join(told.stderr.split())
        assert told.returncode == 1 and "WRONGPW123" not in said, said
        assert f"Redis at redis://127.0.0.1:{server.port}/0?password=*** refused the password" in said
        told = _persona("queue", "stats", env=_env(tmp_path, f"redis://127.0.0.1:{server.port}/0"))
        assert "wants a password, and PERSONA_REDIS_URL gives none" in told.stderr
    finally:
        server.stop()


def test_a_password_in_the_query_of_a_redis_out_of_reach_is_not_in_the_json_error(tmp_path: Path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    told = _persona("queue", "stats", "--json", env=_env(tmp_path, f"redis://127.0.0.1:{port}/3?password=TOPSECRETPW"))
    error = json.loads(told.stdout)["error"]
    assert error["message"].startswith(f"cannot reach Redis at redis://127.0.0.1:{port}/3?password=***: ")
    assert "TOPSECRETPW" not in told.stdout + told.stderr


def _question(n: int) -> GenerationRequest:
    return GenerationRequest(persona="sage", messages=[Message(role="user", content=f"question {n}")])


async def _outcomes(asks) -> list[object]:
    return await asyncio.gather(*asks, return_exceptions=True)


async def test_a_service_client_has_a_connection_for_every_question_waiting(settings, redis_client):
    """Each caller waiting for its reply holds a connection, and redis-py's pool gave 100: past
    that, callers of the Python API were told "Redis cannot be reached (Too many connections)",
    waited out their deadline, and got redis-py's MaxConnectionsError, never queued."""
    client = await connect_async(settings)
    queue = AsyncQueueClient(client, settings.queue)
    outcomes = await _outcomes(queue.ask(_question(n), timeout=1.0) for n in range(150))
    assert {type(outcome) for outcome in outcomes} == {ReplyTimeout}  # queued, and no worker runs
    assert redis_client.xlen(STREAM_INTERACTIVE) == 150
    await client.aclose()


def test_a_blocking_client_has_a_connection_for_every_question_waiting(settings, redis_client):
    """The same for the blocking client (``connect``), shared by a program's threads."""
    queue = QueueClient(connect(settings), settings.queue)
    together = threading.Barrier(150)

    def ask(n: int) -> object:
        together.wait()
        try:
            return queue.ask(_question(n), timeout=1.0)
        except (QueueError, redis.exceptions.RedisError) as exc:  # what each thread heard
            return exc

    with ThreadPoolExecutor(max_workers=150) as threads:
        outcomes = list(threads.map(ask, range(150)))
    assert {type(outcome) for outcome in outcomes} == {ReplyTimeout}
    assert redis_client.xlen(STREAM_INTERACTIVE) == 150
    queue.redis.close()


async def test_a_caller_whose_client_is_out_of_connections_hears_busy_at_once(settings, redis_url, redis_client):
    """A client smaller than the callers sharing it: the ones it has no connection for are told
    the queue is busy at once, not that Redis cannot be reached after their whole wait."""
    client = redis.asyncio.Redis.from_url(redis_url, max_connections=3)
    queue = AsyncQueueClient(client, settings.queue)
    started = time.monotonic()
    outcomes = await _outcomes(queue.ask(_question(n), timeout=3.0) for n in range(12))
    busy = [outcome for outcome in outcomes if isinstance(outcome, QueueBusy)]
    assert busy and {type(outcome) for outcome in outcomes} <= {QueueBusy, ReplyTimeout}
    assert "every connection this program may open to Redis is in use" in str(busy[0])
    assert time.monotonic() - started < 5  # not after the whole wait
    await client.aclose()
