"""`persona settings`, run as an operator runs it: every setting, its value, where it came from."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from persona.settings import env_name, setting_fields


def settings(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "persona", "settings", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return clean | {"PERSONA_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}


def row(output: str, variable: str) -> str:
    """The table row of ``variable``, its cells joined by single spaces."""
    [line] = [line for line in output.splitlines() if re.search(rf"\b{variable}\b", line)]
    return " ".join(cell.strip() for cell in line.strip("│ ").split("│"))


def test_every_setting_is_shown_with_its_value_and_where_it_came_from(env, tmp_path: Path):
    (tmp_path / ".env").write_text("PERSONA_WORKER__MAX_BATCH=3\n")
    env["PERSONA_QUEUE__MAX_LENGTH"] = "5"

    shown = settings(env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert row(shown.stdout, "PERSONA_QUEUE__REPLY_TTL_S") == "PERSONA_QUEUE__REPLY_TTL_S 600 (default) how long an unread reply is kept"
    assert row(shown.stdout, "PERSONA_QUEUE__MAX_LENGTH").startswith("PERSONA_QUEUE__MAX_LENGTH 5 env (default 1000) ")
    assert row(shown.stdout, "PERSONA_WORKER__MAX_BATCH").startswith("PERSONA_WORKER__MAX_BATCH 3 .env (default 16) ")
    sections = [line for line in shown.stdout.splitlines() if line and line[0].isalpha()]
    assert sections == ["top level", "queue", "worker", "discord", "telegram", "dashboard", "posting"]

    as_json = json.loads(settings("--json", env=env, cwd=tmp_path).stdout)
    assert list(as_json) == [env_name(names) for names, _ in setting_fields()]  # every one, in the model's order
    assert as_json["PERSONA_QUEUE__MAX_LENGTH"] == {
        "value": 5, "default": 1000, "source": "env", "description": "requests waiting per stream before 'busy'",
    }
    assert as_json["PERSONA_WORKER__MAX_BATCH"]["source"] == ".env"
    assert as_json["PERSONA_TELEGRAM__WEBHOOK_LISTEN"]["value"] == "127.0.0.1"
    assert as_json["PERSONA_TELEGRAM__WEBHOOK_LISTEN"]["source"] == "default"


def test_secrets_are_never_shown_only_whether_they_are_set(env, tmp_path: Path):
    env["PERSONA_TELEGRAM__TOKEN"] = "123:very-secret-token"
    env["PERSONA_POSTING__X_CONSUMER_KEY"] = "consumer-key-secret"
    (tmp_path / ".env").write_text("PERSONA_REDIS_URL=redis://ops:hunter2-secret@127.0.0.1:1/0\n")

    plain = settings(env=env, cwd=tmp_path)
    as_json = settings("--json", env=env, cwd=tmp_path)
    for output in (plain.stdout, as_json.stdout):
        for secret in ("very-secret-token", "consumer-key-secret", "hunter2-secret"):
            assert secret not in output
    assert row(plain.stdout, "PERSONA_TELEGRAM__TOKEN").startswith("PERSONA_TELEGRAM__TOKEN set env ")
    assert row(plain.stdout, "PERSONA_REDIS_URL").startswith("PERSONA_REDIS_URL redis://ops:***@127.0.0.1:1/0 .env ")
    shown = json.loads(as_json.stdout)
    assert shown["PERSONA_POSTING__X_CONSUMER_KEY"] | {"description": ""} == {
        "value": "set", "default": "unset", "source": "env", "description": "",
    }
    assert shown["PERSONA_DASHBOARD__TOKEN"]["value"] == "unset"
    assert shown["PERSONA_REDIS_URL"]["value"] == "redis://ops:***@127.0.0.1:1/0"


def test_a_url_whose_passwords_are_in_its_query_is_shown_as_every_command_shows_it(env, tmp_path: Path):
    """`persona settings` had a masker of its own, which showed `ssl_password=` and hid the user
    name of `ops@host?password=...`, where every other command showed `ops@...?password=***`."""
    env["PERSONA_REDIS_URL"] = "rediss://ops@127.0.0.1:1/0?password=hunter2-secret&ssl_password=key-secret"
    shown = json.loads(settings("redis_url", "--json", env=env, cwd=tmp_path).stdout)["PERSONA_REDIS_URL"]["value"]
    assert shown == "rediss://ops@127.0.0.1:1/0?password=***&ssl_password=***", shown


def test_names_filter_by_any_part_of_the_variable_in_any_case(env, tmp_path: Path):
    shown = json.loads(settings("telegram", "MAX_batch", "--json", env=env, cwd=tmp_path).stdout)
    assert "PERSONA_TELEGRAM__WEBHOOK_LISTEN" in shown and "PERSONA_WORKER__MAX_BATCH" in shown
    assert all("TELEGRAM" in variable or "MAX_BATCH" in variable for variable in shown), list(shown)


def test_a_name_no_variable_holds_is_an_error_naming_the_nearest(env, tmp_path: Path):
    plain = settings("max_bach", env=env, cwd=tmp_path)
    assert plain.returncode == 2 and plain.stdout == ""  # a wrong command line: click's status
    assert "no setting's variable holds 'max_bach' (did you mean PERSONA_WORKER__MAX_BATCH?)" in plain.stderr

    as_json = settings("telegarm", "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 2 and as_json.stderr == ""
    failed = json.loads(as_json.stdout)["error"]
    assert failed["kind"] == "UsageError" and "(did you mean PERSONA_TELEGRAM__*?)" in failed["message"], failed


def test_a_value_that_cannot_be_read_is_named_with_where_it_was_set(env, tmp_path: Path):
    (tmp_path / ".env").write_text("PERSONA_QUEUE__MAX_LENGTH=abc\n")
    plain = settings(env=env, cwd=tmp_path)
    assert plain.returncode == 1 and plain.stdout == "" and "Traceback" not in plain.stderr
    assert "PERSONA_QUEUE__MAX_LENGTH (set in .env): input should be a valid integer" in plain.stderr

    env["PERSONA_QUEUE__MAX_LENGTH"] = "abc"
    as_json = settings("--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 1 and as_json.stderr == ""
    assert json.loads(as_json.stdout) == {"ok": False, "error": {
        "kind": "ConfigError",
        "message": "PERSONA_QUEUE__MAX_LENGTH (set in the environment): input should be a valid integer, "
        "unable to parse string as an integer",
    }}
