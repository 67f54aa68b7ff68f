"""One settings object: arguments beat the environment, which beats .env, secrets, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from persona.settings import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import os

    for name in list(os.environ):
        if name.startswith("PERSONA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_need_no_configuration(clean_env):
    settings = Settings()
    assert settings.redis_url is None  # the embedded Redis
    assert settings.data_dir.name == "persona"
    assert settings.queue.max_length == 1000
    assert settings.discord.api_url == "https://discord.com/api/v10"


def test_env_file_then_environment_then_arguments(clean_env, monkeypatch):
    (clean_env / ".env").write_text("PERSONA_QUEUE__MAX_LENGTH=5\nPERSONA_WORKER__MAX_BATCH=3\nPERSONA_LOG_LEVEL=DEBUG\n")
    assert Settings().queue.max_length == 5
    monkeypatch.setenv("PERSONA_QUEUE__MAX_LENGTH", "7")
    settings = Settings()
    assert settings.queue.max_length == 7  # environment beats .env
    assert settings.worker.max_batch == 3  # .env still fills what the environment leaves
    assert Settings(log_level="WARNING").log_level == "WARNING"  # arguments beat both


def test_secrets_directory_is_read_last(clean_env, monkeypatch):
    secrets = clean_env / "secrets"
    secrets.mkdir()
    (secrets / "persona_redis_url").write_text("redis://:from-secret@127.0.0.1:1/0")
    assert Settings(_secrets_dir=secrets).redis_url.get_secret_value().endswith("@127.0.0.1:1/0")
    monkeypatch.setenv("PERSONA_REDIS_URL", "redis://:from-env@127.0.0.1:2/0")
    assert ":from-env@" in Settings(_secrets_dir=secrets).redis_url.get_secret_value()


def test_tokens_are_secret_and_never_printed(clean_env, monkeypatch):
    monkeypatch.setenv("PERSONA_TELEGRAM__TOKEN", "123:very-secret-token")
    settings = Settings()
    assert settings.telegram.token.get_secret_value() == "123:very-secret-token"
    assert "very-secret-token" not in repr(settings)
    assert "very-secret-token" not in settings.model_dump_json()


def test_a_bad_value_names_the_setting(clean_env, monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("PERSONA_QUEUE__MAX_LENGTH", "zero")
    with pytest.raises(ValidationError, match="queue.max_length"):
        Settings()


def test_a_redis_url_needs_a_redis_scheme_and_blank_means_unset(clean_env, monkeypatch):
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error

    monkeypatch.setenv("PERSONA_REDIS_URL", "localhost:6379")
    with pytest.raises(ValidationError) as caught:
        Settings()
    explained = explain_settings_error(caught.value)
    assert explained.startswith("PERSONA_REDIS_URL:") and "redis://" in explained
    assert "localhost:6379" not in explained  # a URL may carry a password: never shown
    monkeypatch.setenv("PERSONA_REDIS_URL", " ")
    assert Settings().redis_url is None  # the embedded Redis, as when it is not set
    for good in ("redis://127.0.0.1:6379/0", "rediss://:pw@host:6380", "unix:///tmp/redis.sock"):
        assert Settings(redis_url=good).redis_url.get_secret_value() == good


def test_whitespace_around_a_token_is_no_part_of_it(clean_env, monkeypatch):
    """``PERSONA_TELEGRAM__TOKEN="123:abc "``, or a token pasted from a file with its newline, only
    got "Telegram refused the token" (or, for the newline, "cannot reach the Telegram Bot API")."""
    monkeypatch.setenv("PERSONA_TELEGRAM__TOKEN", "123:abc \n")
    monkeypatch.setenv("PERSONA_TELEGRAM__WEBHOOK_SECRET", "\tsecret-path ")
    monkeypatch.setenv("PERSONA_DISCORD__TOKEN", " MTIz.discord.token\r\n")
    monkeypatch.setenv("PERSONA_POSTING__X_BEARER_TOKEN", "bearer\n")
    monkeypatch.setenv("PERSONA_POSTING__MASTODON_ACCESS_TOKEN", " \n")
    monkeypatch.setenv("PERSONA_POSTING__BLUESKY_PASSWORD", " a password may end in a space ")
    (clean_env / ".env").write_text('PERSONA_DASHBOARD__TOKEN="dash-token "\n')
    settings = Settings()
    assert settings.telegram.token.get_secret_value() == "123:abc"
    assert settings.telegram.webhook_secret.get_secret_value() == "secret-path"
    assert settings.discord.token.get_secret_value() == "MTIz.discord.token"
    assert settings.dashboard.token.get_secret_value() == "dash-token"
    assert settings.posting.x_bearer_token.get_secret_value() == "bearer"
    assert settings.posting.mastodon_access_token is None  # nothing but whitespace: unset
    assert settings.posting.bluesky_password.get_secret_value() == " a password may end in a space "



def test_the_operators_role_is_taken_as_copied(clean_env, monkeypatch):
    """Its id as Discord's "Copy Role ID" gives it, or the mention Discord writes (``<@&id>``),
    with a stray newline from the file it was pasted from."""
    monkeypatch.setenv("PERSONA_DISCORD__OPERATOR_ROLE", " <@&930000000000000001>\n")
    assert Settings().discord.operator_role == "930000000000000001"
    monkeypatch.setenv("PERSONA_DISCORD__OPERATOR_ROLE", "930000000000000001 ")
    assert Settings().discord.operator_role == "930000000000000001"
    monkeypatch.setenv("PERSONA_DISCORD__OPERATOR_ROLE", " ")
    assert Settings().discord.operator_role is None


@pytest.mark.parametrize(("url", "said"), [
    ("redis://:hunter2-secret@127.0.0.1:99999/0", "its port must be a number from 1 to 65535"),
    ("redis://:hunter2-secret@127.0.0.1:abc/0", "its port must be a number from 1 to 65535"),
    ("redis://:hunter2/secret@127.0.0.1:6379/0", "a password holding / ? # or @ must be percent-encoded"),
    ("redis://:hunter2-secret@127.0.0.1:6379/0?socket_timeout=abc", "socket_timeout in its query"),
    ("redis://:hunter2-secret@[::1", "an IPv6 address must be closed by ]"),
    ("redis://:hunter2-secret@127.0.0.1:6379/0?ssl_cert_reqs=none", "ssl_cert_reqs, which a redis:// URL does not take"),
    ("rediss://:hunter2-secret@127.0.0.1:6379/0?ssl_cert_reqs=bogus", "Invalid SSL Certificate Requirements Flag: bogus"),
    ("redis://:hunter2-secret@127.0.0.1:6379/abc", "its database, the path after HOST:PORT, must be a number"),
    ("redis://:hunter2-secret@127.0.0.1:6379/0/1", "its database, the path after HOST:PORT, must be a number"),
])
def test_a_redis_url_redis_cannot_open_is_refused_by_name(clean_env, monkeypatch, url: str, said: str):
    """Each was a traceback (ValueError, TypeError) at the first command, even with --json; a
    database that is no number (/abc) was database 0, without a word."""
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error

    monkeypatch.setenv("PERSONA_REDIS_URL", url)
    with pytest.raises(ValidationError) as caught:
        Settings()
    explained = explain_settings_error(caught.value)
    assert explained.startswith("PERSONA_REDIS_URL: ") and said in explained, explained
    assert "secret" not in explained and "hunter2" not in explained


def test_a_redis_url_with_options_redis_takes_is_kept(clean_env):
    for good in ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/15",
                 "redis://[::1]:6379/0", "redis://:p%2Fw@host:6379/0?socket_timeout=2.5",
                 "rediss://host:6380/0?ssl_cert_reqs=none", "unix:///tmp/redis.sock?db=2"):
        assert Settings(redis_url=good).redis_url.get_secret_value() == good


def _duration_fields(model: type = Settings, names: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every duration setting (a float or int named ``*_s``), by its path of field names (a
    field added later is found too)."""
    import typing

    from pydantic import BaseModel

    found = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _duration_fields(field.annotation, (*names, name))
        elif name.endswith("_s") and {float, int} & {field.annotation, *typing.get_args(field.annotation)}:
            found.append((*names, name))
    return found


DURATION_SETTINGS = _duration_fields()


def _variable(names: tuple[str, ...]) -> str:
    return "PERSONA_" + "__".join(name.upper() for name in names)


def test_the_walk_finds_the_duration_settings():
    assert {("queue", "default_deadline_s"), ("worker", "heartbeat_ttl_s"), ("posting", "tick_s"),
            ("discord", "reply_timeout_s"), ("telegram", "paste_window_s"), ("queue", "reply_ttl_s"),
            ("discord", "conversation_ttl_s"), ("telegram", "pairing_code_ttl_s")} <= set(DURATION_SETTINGS)


@pytest.mark.parametrize("value", ["inf", "-inf", "1e300"])
@pytest.mark.parametrize("names", DURATION_SETTINGS, ids=".".join)
def test_no_duration_setting_takes_infinity_or_the_like(clean_env, monkeypatch, names, value):
    """PERSONA_QUEUE__DEFAULT_DEADLINE_S=inf passed, then `persona ask` was an OverflowError
    traceback; PERSONA_WORKER__HEARTBEAT_TTL_S=inf one after the worker had loaded its models."""
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error

    variable = _variable(names)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert explain_settings_error(caught.value).startswith(f"{variable}: "), explain_settings_error(caught.value)


@pytest.mark.parametrize("names", DURATION_SETTINGS, ids=".".join)
def test_no_duration_setting_takes_more_than_its_bound_in_seconds(clean_env, monkeypatch, names):
    """PERSONA_QUEUE__REPLY_TTL_S=99999999999999999999 passed, then every reply a worker delivered
    was "Redis refused a command (value is not an integer or out of range ...)", and the reply it
    had pushed before the refused EXPIRE was kept with no expiry; over a float's bound the message
    said "less than or equal to 604800", with no unit."""
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error

    variable = _variable(names)
    monkeypatch.setenv(variable, "99999999999999999999")
    with pytest.raises(ValidationError) as caught:
        Settings()
    explained = explain_settings_error(caught.value)
    assert explained.startswith(f"{variable}: 99999999999999999999 s is more than "), explained
    assert "give a number of seconds within a " in explained, explained


def test_a_bound_is_told_in_seconds_and_in_words(clean_env, monkeypatch):
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error

    def explained(variable: str, value: str) -> str:
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValidationError) as caught:
            Settings()
        monkeypatch.delenv(variable)
        return explain_settings_error(caught.value)

    assert explained("PERSONA_WORKER__HEARTBEAT_S", "700000") == (
        "PERSONA_WORKER__HEARTBEAT_S: 700000 s is more than 604800 s (a week), the longest it may be; "
        "give a number of seconds within a week"
    )
    assert explained("PERSONA_DISCORD__CONVERSATION_TTL_S", "31536001").startswith(
        "PERSONA_DISCORD__CONVERSATION_TTL_S: 31536001 s is more than 31536000 s (a year)"
    )
    assert explained("PERSONA_TELEGRAM__PAIRING_CODE_TTL_S", "30") == (
        "PERSONA_TELEGRAM__PAIRING_CODE_TTL_S: 30 s is less than 60 s (a minute), the shortest it may be"
    )
    assert explained("PERSONA_QUEUE__VISIBILITY_TIMEOUT_S", "0") == (
        "PERSONA_QUEUE__VISIBILITY_TIMEOUT_S: 0 s is too short: give a number of seconds more than 0"
    )
    assert explained("PERSONA_QUEUE__MAX_LENGTH", "0") == (
        "PERSONA_QUEUE__MAX_LENGTH: input should be greater than or equal to 1"
    ), "only a duration is told in seconds"
    # A conversation is kept up to a year: its default is a week, and a month is a fair choice.
    assert Settings(discord={"conversation_ttl_s": 365 * 24 * 3600}).discord.conversation_ttl_s == 365 * 24 * 3600


def test_a_heartbeat_must_come_well_within_its_ttl(clean_env, monkeypatch):
    """PERSONA_WORKER__HEARTBEAT_S=30 (the TTL left at 10 s) passed: the worker's heartbeat
    lapsed 10 s after each beat, so `persona queue stats` said "no live worker" while it served,
    and other workers took its requests from it as a dead worker's."""
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error

    monkeypatch.setenv("PERSONA_WORKER__HEARTBEAT_S", "30")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert explain_settings_error(caught.value) == (
        "PERSONA_WORKER__HEARTBEAT_TTL_S: 10 s is less than twice PERSONA_WORKER__HEARTBEAT_S (30 s): "
        "a worker would be taken for dead between heartbeats, or after one lost beat, and its requests "
        "taken from it by other workers; set PERSONA_WORKER__HEARTBEAT_TTL_S to 60 or more, or "
        "PERSONA_WORKER__HEARTBEAT_S to 5 or less"
    )
    monkeypatch.setenv("PERSONA_WORKER__HEARTBEAT_TTL_S", "59.5")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("PERSONA_WORKER__HEARTBEAT_TTL_S", "60")
    assert Settings().worker.heartbeat_ttl_s == 60
    monkeypatch.delenv("PERSONA_WORKER__HEARTBEAT_TTL_S")
    monkeypatch.setenv("PERSONA_WORKER__HEARTBEAT_S", "5")  # with the default TTL, 10 s
    assert Settings().worker.heartbeat_s == 5


def test_a_default_deadline_is_at_most_the_furthest_a_request_may_set(clean_env, monkeypatch):
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error
    from persona.validation import LATEST_DEADLINE_AFTER_S

    assert Settings(queue={"default_deadline_s": LATEST_DEADLINE_AFTER_S}).queue.default_deadline_s == LATEST_DEADLINE_AFTER_S
    monkeypatch.setenv("PERSONA_QUEUE__DEFAULT_DEADLINE_S", str(LATEST_DEADLINE_AFTER_S + 1))
    with pytest.raises(ValidationError) as caught:
        Settings()
    explained = explain_settings_error(caught.value)
    assert explained.startswith("PERSONA_QUEUE__DEFAULT_DEADLINE_S: 86401 s is more than 86400 s (a day)"), explained


def test_a_log_level_in_any_case_is_taken_and_others_name_the_choices(clean_env, monkeypatch):
    """PERSONA_LOG_LEVEL=debug (or LOUD) passed, then `persona up` was "ValueError: Unknown level"."""
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error

    for given, level in (("debug", "DEBUG"), ("Warning", "WARNING"), (" error ", "ERROR"), ("warn", "WARNING")):
        monkeypatch.setenv("PERSONA_LOG_LEVEL", given)
        assert Settings().log_level == level
    monkeypatch.setenv("PERSONA_LOG_LEVEL", "LOUD")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert explain_settings_error(caught.value) == (
        "PERSONA_LOG_LEVEL: input should be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"
    )


def test_a_setting_set_to_nothing_is_unset(clean_env, monkeypatch):
    """PERSONA_DATA_DIR= was the working directory (``Path("")`` is "."), a blank adapter
    persona was a persona named ""; a blank list was a JSON error."""
    from persona.settings import default_data_dir

    for variable in ("PERSONA_DATA_DIR", "PERSONA_DISCORD__PERSONA", "PERSONA_WORKER__PERSONAS",
                     "PERSONA_PERSONAS_DIRS", "PERSONA_LOG_LEVEL", "PERSONA_DASHBOARD__HOST"):
        monkeypatch.setenv(variable, "")
    (clean_env / ".env").write_text("PERSONA_TELEGRAM__PERSONA=\n")
    settings = Settings()
    assert settings.data_dir == default_data_dir() and settings.personas_dirs == []
    assert settings.discord.persona == "sage" and settings.telegram.persona == "sage"
    assert settings.worker.personas == [] and settings.log_level == "INFO" and settings.dashboard.host == "127.0.0.1"
    monkeypatch.setenv("PERSONA_DATA_DIR", "  ")
    assert Settings().data_dir == default_data_dir()


def test_every_setting_says_what_it_does():
    """`persona settings` shows each setting's description: a new one without it would show a blank."""
    from persona.settings import env_name, setting_fields

    undescribed = [env_name(names) for names, field in setting_fields() if not (field.description or "").strip()]
    assert not undescribed, f"add description= to these fields in persona/settings.py: {undescribed}"
    assert ("telegram", "webhook_listen") in dict(setting_fields())  # the walk reaches the nested ones


def test_where_each_setting_comes_from(clean_env, monkeypatch):
    from persona.settings_sources import where_set

    secrets = clean_env / "secrets"
    secrets.mkdir()
    (secrets / "persona_redis_url").write_text("redis://:from-secret@127.0.0.1:1/0")
    (secrets / "persona_log_level").write_text("DEBUG")
    (clean_env / ".env").write_text("PERSONA_LOG_LEVEL=ERROR\nPERSONA_WORKER__MAX_BATCH=3\n")
    monkeypatch.setenv("PERSONA_WORKER__MAX_BATCH", "4")
    monkeypatch.setenv("PERSONA_QUEUE", '{"max_length": 5}')  # a section as one JSON object
    assert where_set(secrets) == {
        ("redis_url",): str(secrets), ("log_level",): ".env", ("worker", "max_batch"): "env", ("queue", "max_length"): "env",
    }


def test_a_redis_url_with_port_zero_is_refused_not_sent_to_6379(clean_env, monkeypatch):
    """redis-py reads port 0 as no port and goes to 6379: a typo'd port quietly reached
    another Redis (or none), so it is refused by name."""
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error

    monkeypatch.setenv("PERSONA_REDIS_URL", "redis://127.0.0.1:0/0")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "its port must be a number from 1 to 65535" in explain_settings_error(caught.value)


def test_a_redis_url_without_a_redis_scheme_is_told_the_schemes_and_an_example(clean_env, monkeypatch):
    """An http:// URL, or a host and port alone, is told which schemes a Redis URL starts with and
    shown one that works, not that redis-py "refuses its query options"."""
    from pydantic import ValidationError

    from persona.settings_sources import explain_settings_error

    for url in ("http://127.0.0.1:6379/0", "localhost:6379"):
        monkeypatch.setenv("PERSONA_REDIS_URL", url)
        with pytest.raises(ValidationError) as caught:
            Settings()
        assert explain_settings_error(caught.value) == (
            "PERSONA_REDIS_URL: must start with redis://, rediss://, unix:// (e.g. redis://127.0.0.1:6379/0)"
        )


def test_an_adapter_tries_to_reconnect_at_most_ten_seconds_apart_and_never_past_its_reply_timeout():
    """While Discord or Telegram cannot be reached, the adapter tries again at most 10 s apart
    (the libraries' own waits grow to 30 s, or 1,024 s), so a message written as it comes back
    is heard within that; with a shorter reply timeout, at most that apart."""
    from persona.settings import DiscordSettings, TelegramSettings

    assert DiscordSettings().reconnect_wait_cap_s == 10.0  # the reply timeout is 120 s by default
    assert TelegramSettings(reply_timeout_s=3).reconnect_wait_cap_s == 3.0


def test_the_readme_states_the_rate_limits_the_settings_default_to():
    """The README tells an operator how many messages a person and a chat get a minute by
    default: the numbers must be the settings' own."""
    import re

    from persona.settings import ChatAdapterSettings

    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8").split())
    said = re.search(r"`USER_MESSAGES_PER_MINUTE` \((\d+)\) and each chat `CHAT_MESSAGES_PER_MINUTE` \((\d+)\)", readme)
    assert said is not None, "the README no longer states the rate limits' defaults"
    defaults = ChatAdapterSettings()
    assert (int(said[1]), int(said[2])) == (defaults.user_messages_per_minute, defaults.chat_messages_per_minute)
