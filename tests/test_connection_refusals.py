"""What a Redis that refuses the session tells the user, in the real CLI and to a bot."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from persona.connection import connect, connect_async
from persona.errors import ConfigError
from tests.fakes.old_redis import OldRedis

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
