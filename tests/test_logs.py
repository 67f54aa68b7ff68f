"""Secrets never reach a log line, however they get into one."""

from __future__ import annotations

import logging

import pytest

from persona.logs import secrets_of, setup_logging
from persona.settings import Settings

TOKEN = "123456:AAE-super-secret-telegram-token"
DISCORD = "discord.secret.token.value"
REDIS_PASSWORD = "hunter2-redis-password"


@pytest.fixture(autouse=True)
def _restore_root_logger():
    """setup_logging replaces the root handlers; later tests must not write to this test's stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_every_secret_is_scrubbed_from_logs(capsys, tmp_path):
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0",
        telegram={"token": TOKEN},
        discord={"token": DISCORD},
    )
    assert {TOKEN, DISCORD, REDIS_PASSWORD} <= set(secrets_of(settings))
    setup_logging(settings, level="DEBUG")
    log = logging.getLogger("persona.test")
    log.info("GET https://api.telegram.org/bot%s/getUpdates", TOKEN)
    log.warning("connected with %s", settings.redis_url.get_secret_value())
    log.error("discord said no to %s", DISCORD)
    logging.getLogger("someone.else").info("unrelated /bot999:XYZ_abc-1/sendMessage")
    try:
        raise RuntimeError(f"bad token {TOKEN}")
    except RuntimeError:
        log.exception("failure")
    written = capsys.readouterr().err
    assert "getUpdates" in written and "discord said no" in written
    for secret in (TOKEN, DISCORD, REDIS_PASSWORD, "999:XYZ_abc-1"):
        assert secret not in written


def test_a_log_level_in_lower_case_sets_the_level(tmp_path):
    """PERSONA_LOG_LEVEL=debug was "ValueError: Unknown level: 'debug'" at start-up."""
    setup_logging(Settings(_env_file=None, data_dir=tmp_path, log_level="debug"))
    assert logging.getLogger().level == logging.DEBUG
    setup_logging(Settings(_env_file=None, data_dir=tmp_path), level="warning")
    assert logging.getLogger().level == logging.WARNING


@pytest.mark.parametrize(("url", "shown"), [
    # redis-py decodes a query option's name: pass%77ord= is its password, and was shown as written.
    ("redis://h:6379/0?pass%77ord=s3cret", "redis://h:6379/0?pass%77ord=***"),
    ("rediss://h/0?ssl%5Fpassword=k3y", "rediss://h/0?ssl%5Fpassword=***"),
    # An address with no host keeps its // (it was shown as unix:/tmp/r.sock).
    ("unix:///tmp/r.sock?password=x", "unix:///tmp/r.sock?password=***"),
    ("redis://ops@h/0?password=pw", "redis://ops@h/0?password=***"),
])
def test_a_url_is_shown_without_any_password_redis_py_would_read_in_it(url: str, shown: str):
    from persona.logs import describe_url

    assert describe_url(url) == shown
