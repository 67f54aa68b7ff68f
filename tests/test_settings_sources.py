"""Where settings come from: secret files named as the variables are, names that are no setting
(said, never refused), folders as one absolute path, a .env that is not UTF-8 text, and JSON
that is none, each named with the place it was set in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic_settings import SettingsError

from persona.settings import Settings
from persona.settings_sources import (
    NOT_SETTINGS,
    SETTINGS_READ_ERRORS,
    explain_settings_error,
    unknown_variables,
    where_set,
)
from persona.supervisor import SERVICE_ENV


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.upper().startswith("PERSONA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def secrets(clean_env: Path) -> Path:
    folder = clean_env / "secrets"
    folder.mkdir()
    return folder


def persona(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("PERSONA_")}
    return subprocess.run(
        [sys.executable, "-m", "persona", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
        env=clean | {"PERSONA_DATA_DIR": str(cwd / "data"), "COLUMNS": "200"} | (env or {}),
    )


def ignored(variable: str, where: str, meant: str) -> str:
    """The line that says ``variable``, set in ``where``, is no setting."""
    return f"{variable} (set in {where}) is not a setting, so it is ignored (did you mean {meant}?)"


def test_a_secret_file_named_as_a_nested_variable_sets_it_in_any_letter_case(secrets: Path):
    """Docker secrets named after the README's variables were read only for PERSONA_REDIS_URL:
    every token is nested, and /run/secrets/PERSONA_TELEGRAM__TOKEN left the bot without one."""
    (secrets / "PERSONA_TELEGRAM__TOKEN").write_text("123:from-a-secret\n")
    (secrets / "persona_dashboard__token").write_text("dash-secret")
    (secrets / "persona_worker__max_batch").write_text("4")
    settings = Settings(_secrets_dir=secrets)
    assert settings.telegram.token.get_secret_value() == "123:from-a-secret"
    assert settings.dashboard.token.get_secret_value() == "dash-secret"
    assert settings.worker.max_batch == 4
    place = str(secrets)
    assert where_set(secrets) == {
        ("telegram", "token"): place, ("dashboard", "token"): place, ("worker", "max_batch"): place,
    }  # what `persona settings` shows in its "from" column


def test_flags_then_environment_then_env_file_then_secrets_then_defaults(secrets: Path, monkeypatch):
    """The order the README states (a service's flag is a constructor argument here)."""
    for name in ("persona_queue__max_length", "persona_worker__max_batch", "persona_queue__max_pending_per_user"):
        (secrets / name).write_text("11")
    (secrets.parent / ".env").write_text("PERSONA_QUEUE__MAX_LENGTH=22\nPERSONA_WORKER__MAX_BATCH=22\n")
    monkeypatch.setenv("PERSONA_QUEUE__MAX_LENGTH", "33")
    settings = Settings(_secrets_dir=secrets)
    assert (settings.queue.max_length, settings.worker.max_batch, settings.queue.max_pending_per_user) == (33, 22, 11)
    assert settings.queue.max_deliveries == 3  # the default
    assert Settings(_secrets_dir=secrets, queue={"max_length": 44}).queue.max_length == 44
    assert where_set(secrets)[("queue", "max_length")] == "env"
    assert where_set(secrets)[("worker", "max_batch")] == ".env"


def test_a_name_that_is_no_setting_is_said_with_the_nearest_and_where_it_was_set(secrets: Path, monkeypatch):
    monkeypatch.setenv("PERSONA_REDIS_ULR", "redis://10.0.0.5:6379/0")
    monkeypatch.setenv("PERSONA_WORKER__ENGNE", "int8")
    monkeypatch.setenv("PERSONA_TELEGRAM_TOKEN", "123:abc")  # one underscore short
    monkeypatch.setenv("PERSONA_WORKER", '{"engne": "int8", "max_batch": 2}')
    (secrets.parent / ".env").write_text("PERSONA_WORKER__MAX_BATH=4\nCOMPOSE_PROJECT_NAME=persona\n")
    (secrets / "persona_dashboard__tokn").write_text("x")
    (secrets / "db_password").write_text("another program's")

    env = "the environment"
    assert unknown_variables(secrets) == [
        ignored("PERSONA_REDIS_ULR", env, "PERSONA_REDIS_URL"),
        ignored("PERSONA_TELEGRAM_TOKEN", env, "PERSONA_TELEGRAM__TOKEN"),
        (f"PERSONA_WORKER (set in {env}) holds 'engne', which is not a setting of worker, so it is ignored "
         "(did you mean 'engine'?)"),
        ignored("PERSONA_WORKER__ENGNE", env, "PERSONA_WORKER__ENGINE"),
        ignored("PERSONA_WORKER__MAX_BATH", ".env", "PERSONA_WORKER__MAX_BATCH"),
        ignored("PERSONA_DASHBOARD__TOKN", str(secrets), "PERSONA_DASHBOARD__TOKEN"),
    ]
    assert Settings(_secrets_dir=secrets).worker.max_batch == 2  # ignored, not refused


def test_persona_variables_that_are_not_settings_by_design_are_not_warned_of(clean_env: Path, monkeypatch):
    assert SERVICE_ENV in NOT_SETTINGS  # `persona up` sets it on every service it runs
    monkeypatch.setenv(SERVICE_ENV, "1")
    monkeypatch.setenv("PERSONA_QUEUE__MAX_LENGTH", "5")
    monkeypatch.setenv("persona_log_level", "debug")  # any letter case, as Settings() reads it
    assert unknown_variables() == []


def test_every_command_warns_of_a_misspelt_variable_and_runs_on(tmp_path: Path):
    (tmp_path / ".env").write_text("PERSONA_WORKER__MAX_BATH=4\n")
    warning = "warning: " + ignored("PERSONA_REDIS_ULR", "the environment", "PERSONA_REDIS_URL")
    typo = {"PERSONA_REDIS_ULR": "redis://10.0.0.5:6379/0"}
    shown = persona("settings", "max_batch", "--json", cwd=tmp_path, env=typo)
    assert shown.returncode == 0 and json.loads(shown.stdout)["PERSONA_WORKER__MAX_BATCH"]["value"] == 16
    assert shown.stderr.splitlines() == [
        warning, "warning: " + ignored("PERSONA_WORKER__MAX_BATH", ".env", "PERSONA_WORKER__MAX_BATCH"),
    ]
    listed = persona("personas", "list", cwd=tmp_path, env=typo)  # through get_settings, as every service
    assert listed.returncode == 0 and warning in listed.stderr.splitlines(), listed.stderr
    # A service `persona up` runs says nothing: `up` said it once as it started.
    quiet = persona("personas", "list", cwd=tmp_path, env=typo | {SERVICE_ENV: "1"})
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


def test_a_tilde_is_the_home_folder_and_a_relative_folder_is_made_absolute_at_once(clean_env: Path, monkeypatch):
    """Written in a .env, where no shell expands it, ~/persona-data was a folder named "~" in the
    working directory; a relative one moved with the directory a command was run from."""
    (clean_env / ".env").write_text('PERSONA_DATA_DIR=~/persona-data\nPERSONA_PERSONAS_DIRS=["~/mine", "theirs"]\n')
    settings = Settings()
    assert settings.data_dir == Path.home() / "persona-data"
    assert settings.personas_dirs == [Path.home() / "mine", clean_env / "theirs"]
    monkeypatch.setenv("PERSONA_DATA_DIR", "data/../here")
    assert Settings().data_dir == clean_env / "here"
    assert Settings(data_dir=Path("rel")).data_dir == clean_env / "rel"
    monkeypatch.setenv("PERSONA_DATA_DIR", " ")
    assert Settings().data_dir.name == "persona"  # blank: the default, as before


@pytest.mark.parametrize(("written", "said"), [
    (b"PERSONA_DISCORD__PERSONA=caf\xe9\n", "is not UTF-8 text (byte 0xe9 at byte 28, line 1); save it as UTF-8"),
    ("PERSONA_LOG_LEVEL=INFO\n".encode("utf-16"),
     "is not UTF-8 text (byte 0xff at byte 0, line 1) (it is UTF-16, as Notepad's \"Unicode\" saves); save it as UTF-8"),
])
def test_a_env_file_that_is_not_utf8_is_one_line_naming_it_not_a_traceback(tmp_path: Path, written: bytes, said: str):
    (tmp_path / ".env").write_bytes(written)
    for args in (["settings"], ["personas", "list"]):
        told = persona(*args, cwd=tmp_path)
        assert told.returncode == 1 and told.stderr == f"error: .env (in {tmp_path}) {said}\n", told.stderr
    as_json = persona("settings", "--json", cwd=tmp_path)
    assert as_json.returncode == 1 and as_json.stderr == ""
    assert json.loads(as_json.stdout) == {"ok": False, "error": {"kind": "ConfigError", "message": f".env (in {tmp_path}) {said}"}}


def test_a_secret_file_that_is_not_utf8_is_named(secrets: Path):
    (secrets / "PERSONA_TELEGRAM__TOKEN").write_bytes(b"123:\xff\xfe")
    with pytest.raises(SETTINGS_READ_ERRORS) as caught:
        Settings(_secrets_dir=secrets)
    assert explain_settings_error(caught.value, secrets) == (
        f"{secrets}/PERSONA_TELEGRAM__TOKEN is not UTF-8 text (byte 0xff at byte 4, line 1); save it as UTF-8"
    )


@pytest.mark.parametrize(("place", "said"), [(".env", ".env"), ("env", "the environment"), ("secrets", "SECRETS")])
def test_a_list_that_is_not_json_is_named_by_its_variable_and_where_it_was_set(secrets: Path, monkeypatch, place, said):
    """Written in .env (or as a secret), PERSONA_WORKER__PERSONAS=[sage] was blamed on
    PERSONA_WORKER, which nobody set; only the environment was looked at."""
    if place == ".env":
        (secrets.parent / ".env").write_text("PERSONA_TELEGRAM__ALLOWED_USERS=123,456\n")
    elif place == "env":
        monkeypatch.setenv("PERSONA_TELEGRAM__ALLOWED_USERS", "123,456")
    else:
        (secrets / "PERSONA_TELEGRAM__ALLOWED_USERS").write_text("123,456")
    with pytest.raises(SettingsError) as caught:
        Settings(_secrets_dir=secrets)
    assert explain_settings_error(caught.value, secrets) == (
        "PERSONA_TELEGRAM__ALLOWED_USERS cannot be read: expected a JSON list, e.g. PERSONA_TELEGRAM__ALLOWED_USERS="
        f"'[123, 456]'; it is set in {said.replace('SECRETS', str(secrets))}"
    )


def test_persona_settings_names_the_variable_of_a_list_in_env_file(tmp_path: Path):
    (tmp_path / ".env").write_text("PERSONA_WORKER__PERSONAS=[sage]\n")
    told = persona("settings", cwd=tmp_path)
    assert told.returncode == 1 and told.stderr == (
        "error: PERSONA_WORKER__PERSONAS cannot be read: expected a JSON list, "
        "e.g. PERSONA_WORKER__PERSONAS='[\"first\", \"second\"]'; it is set in .env\n"
    ), told.stderr


def unreadable(path: Path) -> None:
    """Make ``path`` unreadable to this user, or skip: root reads any file (chmod 000 or not)."""
    path.chmod(0o000)
    if os.geteuid() == 0 or os.access(path, os.R_OK):
        pytest.skip("running as root: a chmod 000 file is still readable")


@pytest.mark.parametrize("other", ["binary", "unreadable", "over 16 MiB"])
def test_files_of_other_programs_in_the_secrets_folder_are_never_opened(secrets: Path, other: str):
    """/run/secrets is shared (Compose and Swarm secrets, sops-nix and agenix put every secret of
    the host there): a binary key file, another user's 0400 password or 17 MiB of files of other
    programs stopped every command and service ("save it as UTF-8", PermissionError, "secrets_dir
    size is above 16777216 bytes")."""
    (secrets / "PERSONA_TELEGRAM__TOKEN").write_text("123:nested\n")
    (secrets / "persona_redis_url").write_text("redis://old:6379/0\n")
    (secrets / "PERSONA_DISCORD").write_text('{"token": "456:whole-section"}')  # a section as JSON, as before
    if other == "binary":
        (secrets / "redis-client.p12").write_bytes(bytes(range(256)))
    elif other == "unreadable":
        (secrets / "postgres-password").write_text("theirs")
        unreadable(secrets / "postgres-password")
    else:
        for name in ("model-license.bin", "backup.tar"):
            with (secrets / name).open("wb") as file:
                file.truncate(9 * 2**20)  # sparse: the sizes count, not the disk
    settings = Settings(_secrets_dir=secrets)
    assert settings.telegram.token.get_secret_value() == "123:nested"
    assert settings.discord.token.get_secret_value() == "456:whole-section"
    assert settings.redis_url.get_secret_value() == "redis://old:6379/0"
    place = str(secrets)
    assert where_set(secrets) == {("telegram", "token"): place, ("discord", "token"): place, ("redis_url",): place}
    assert unknown_variables(secrets) == []  # another program's file is no misspelt setting


def test_a_persona_file_that_names_no_setting_is_said_but_never_opened(secrets: Path):
    (secrets / "PERSONA_DASHBOARD__TOKN").write_bytes(b"\xff\xfe binary")
    (secrets / "persona_telegram_token").write_text("x")
    (secrets / "persona_telegram_token").chmod(0o000)  # unreadable, unless to root
    assert Settings(_secrets_dir=secrets).dashboard.token is None
    assert unknown_variables(secrets) == [
        ignored("PERSONA_DASHBOARD__TOKN", str(secrets), "PERSONA_DASHBOARD__TOKEN"),
        ignored("PERSONA_TELEGRAM_TOKEN", str(secrets), "PERSONA_TELEGRAM__TOKEN"),
    ]


def test_a_setting_file_that_cannot_be_read_is_refused_naming_it(secrets: Path):
    """Read past, it would leave the bot without its token, with nothing said: refused, in one
    line that names the file and what to do."""
    (secrets / "redis-client.p12").write_bytes(bytes(range(256)))  # not the one named
    (secrets / "PERSONA_TELEGRAM__TOKEN").write_text("123:abc")
    unreadable(secrets / "PERSONA_TELEGRAM__TOKEN")
    with pytest.raises(SETTINGS_READ_ERRORS) as caught:
        Settings(_secrets_dir=secrets)
    assert explain_settings_error(caught.value, secrets) == (
        f"{secrets}/PERSONA_TELEGRAM__TOKEN cannot be read: Permission denied; "
        "let the user persona runs as read it (chown or chmod it), or remove it"
    )


def test_a_secrets_folder_only_its_owner_may_list_still_gives_our_files(secrets: Path):
    """sops-nix makes its folder 0751: another user opens a file in it by name, but cannot list it."""
    (secrets / "PERSONA_TELEGRAM__TOKEN").write_text("123:abc")
    (secrets / "persona_worker__max_batch").write_text("4")
    secrets.chmod(0o311)
    try:
        if os.geteuid() == 0 or os.access(secrets, os.R_OK):
            pytest.skip("running as root: the folder is still listable")
        settings = Settings(_secrets_dir=secrets)
        assert (settings.telegram.token.get_secret_value(), settings.worker.max_batch) == ("123:abc", 4)
    finally:
        secrets.chmod(0o755)


def test_setting_files_over_16_mib_in_all_are_refused_by_what_they_are(secrets: Path):
    with (secrets / "PERSONA_WORKER__PERSONAS").open("wb") as file:
        file.truncate(17 * 2**20)  # sparse
    with pytest.raises(SETTINGS_READ_ERRORS) as caught:
        Settings(_secrets_dir=secrets)
    assert explain_settings_error(caught.value, secrets) == (
        f"the settings cannot be read: the setting files in {secrets} hold {17 * 2**20} bytes in all, more than "
        "16777216; each holds one value (a token, a URL), so one of them is not the file meant for it"
    )
