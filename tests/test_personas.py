"""Persona files: the shipped ones are valid; a broken one is explained field by field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from persona.contract import SamplingOverrides
from persona.errors import ConfigError, UnknownPersona
from persona.personas import BUILTIN_PERSONAS_DIR, PersonaRegistry, load_persona_file, unread_reason
from tests.unreadable import unreadable


def test_shipped_personas_are_valid_and_distinct():
    shipped = {p.stem: load_persona_file(p) for p in sorted(BUILTIN_PERSONAS_DIR.glob("*.toml"))}
    assert {"sage", "bofh"} <= set(shipped)
    assert shipped["sage"].prompt.system != shipped["bofh"].prompt.system
    assert all(p.model.base == "smollm2" for p in shipped.values())


def test_shipped_personas_show_short_answers_and_sample_cool_enough_to_finish_them():
    """Through `persona up` and `persona ask` on the bundled model (12 questions, seeds 1-3,
    36 replies), bofh as shipped (temperature 0.9, two examples) rambled on to
    max_new_tokens, stopping mid-sentence, in 18 replies; at 0.7 in 12; at 0.9 with four
    short examples in 7; at 0.7 with four in 5 (and 5 of 36 again on seeds 4-6)."""
    shipped = [load_persona_file(p) for p in sorted(BUILTIN_PERSONAS_DIR.glob("*.toml"))]
    for persona in shipped:
        assert persona.sampling.temperature <= 0.8, persona.name
        for example in persona.prompt.examples:  # what the model copies is a line or two
            assert len(example.assistant) <= 120, (persona.name, example.assistant)
    bofh = next(p for p in shipped if p.name == "bofh")
    assert len(bofh.prompt.examples) >= 4


def _refusal(path: Path, text: str) -> str:
    """The error a persona file holding ``text`` is refused with."""
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_persona_file(path)
    return str(caught.value)


def test_wrong_field_is_named_exactly(tmp_path: Path):
    path = tmp_path / "bad.toml"
    message = _refusal(path, 'name = "bad"\n[sampling]\ntop_p = 1.7\n[model]\nbsae = "gpt2"\n')
    assert str(path) in message
    assert "sampling.top_p" in message and "1.7" in message
    assert "model.bsae" in message  # a typo is an error, not silently ignored


def test_invalid_toml_and_bad_names_are_explained(tmp_path: Path):
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "broken\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_persona_file(broken)
    mismatch = tmp_path / "alpha.toml"
    mismatch.write_text('name = "beta"\n')
    with pytest.raises(ConfigError, match="differs from the file name"):
        load_persona_file(mismatch)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_persona_file(binary)


def test_registry_lists_valid_files_and_reports_the_rest(settings, personas_dir: Path):
    (personas_dir / "ok.toml").write_text('description = "fine"\n')
    (personas_dir / "nope.toml").write_text("[sampling]\ntemperature = -1\n")
    registry = PersonaRegistry.from_settings(settings)
    found, problems = registry.scan()
    assert "ok" in found and "sage" in found and "nope" not in found
    assert len(problems) == 1 and "sampling.temperature" in str(problems[0])


def test_editor_locks_and_hidden_files_are_not_persona_files(settings, personas_dir: Path):
    """Emacs's lock while a buffer is changed (``.#mine.toml``, a dangling link) was read as a
    persona file: every command, and the service's metrics, reported an invalid persona."""
    (personas_dir / "mine.toml").write_text('description = "mine"\n')
    (personas_dir / ".#mine.toml").symlink_to("root@host.1234:1700000000")
    (personas_dir / "._mine.toml").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    (personas_dir / "#mine.toml").write_text("name = ")
    registry = PersonaRegistry.from_settings(settings)
    found, problems = registry.scan()
    assert "mine" in found and problems == []
    assert [p.name for p in registry.files() if p.parent == personas_dir] == ["mine.toml"]


def test_a_toml_extension_in_another_case_is_said_to_be_never_read(settings, personas_dir: Path):
    (personas_dir / "caps.TOML").write_text('description = "shouting"\n')
    registry = PersonaRegistry.from_settings(settings)
    assert "caps" not in registry.all() and registry.misnamed() == [personas_dir / "caps.TOML"]
    assert unread_reason(personas_dir / "caps.TOML") == (
        "only names ending in '.toml' (lower case) are read as personas; rename it to caps.toml")
    assert unread_reason(personas_dir / "caps.toml") == ""


def test_later_folder_overrides_a_builtin_namesake(settings, personas_dir: Path):
    (personas_dir / "sage.toml").write_text('description = "my own sage"\n')
    assert PersonaRegistry.from_settings(settings).get("sage").description == "my own sage"


def test_unknown_persona_lists_the_known_ones(settings):
    with pytest.raises(UnknownPersona, match="known personas: .*sage"):
        PersonaRegistry.from_settings(settings).get("nobody")
    with pytest.raises(UnknownPersona):
        PersonaRegistry.from_settings(settings).get("../../etc/passwd")


def test_a_misspelt_persona_name_suggests_the_one_meant(settings):
    """`persona ask sgae ...` listed every known persona and left the reader to spot the typo."""
    registry = PersonaRegistry.from_settings(settings)
    for typo, meant in (("sgae", "sage"), ("Sage", "sage"), ("bfoh", "bofh")):
        with pytest.raises(UnknownPersona) as caught:
            registry.get(typo)
        assert str(caught.value).endswith(f"Did you mean {meant!r}?"), caught.value
    with pytest.raises(UnknownPersona) as caught:
        registry.get("nobody")
    assert "did you mean" not in str(caught.value).lower()  # nothing close: only the list


def test_request_overrides_merge_with_defaults(tmp_path: Path):
    persona = load_persona_file(BUILTIN_PERSONAS_DIR / "sage.toml")
    merged = persona.sampling.merged(SamplingOverrides(temperature=0.0, stop=["\n\n"]))
    assert merged.temperature == 0.0
    assert merged.top_p == persona.sampling.top_p
    assert merged.stop[-1] == "\n\n"


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_file_content_loads_or_raises_config_error(tmp_path_factory, content: bytes):
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.toml"
    path.write_bytes(content)
    try:
        persona = load_persona_file(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
    else:
        assert persona.name == "fuzz"
        tomllib.loads(content.decode())


def test_filters_that_no_post_could_pass_are_refused():
    from pydantic import ValidationError

    from persona.personas import FiltersConfig

    with pytest.raises(ValidationError, match="min_chars"):
        FiltersConfig(min_chars=400, max_chars=280)
    assert FiltersConfig(min_chars=280, max_chars=280).min_chars == 280


def test_a_misspelt_field_suggests_the_one_meant(tmp_path: Path):
    message = _refusal(tmp_path / "typo.toml", 'descripton = "calm"\n[sampling]\ntemprature = 0.5\nzzz = 1\n')
    assert "descripton: unknown field; did you mean 'description'?" in message
    assert "sampling.temprature: unknown field; did you mean 'temperature'?" in message
    assert "sampling.zzz: unknown field; known fields: temperature, top_p" in message


def test_an_invalid_file_hides_its_earlier_namesake_as_get_does(settings, personas_dir: Path):
    """A broken override used to leave the builtin sage listed (by `personas list`, the
    dashboard, a worker's preload) while every request for sage found the broken file."""
    (personas_dir / "sage.toml").write_text("[sampling]\ntop_p = 7\n")
    registry = PersonaRegistry.from_settings(settings)
    found, problems = registry.scan()
    assert "sage" not in found and "bofh" in found
    assert len(problems) == 1 and "sampling.top_p" in str(problems[0])
    with pytest.raises(ConfigError, match="sampling.top_p"):
        registry.get("sage")
    (personas_dir / "sage.toml").write_text('description = "fixed"\n')
    assert registry.scan()[0]["sage"].description == "fixed"


def test_a_name_that_breaks_the_pattern_says_what_a_name_may_be(tmp_path: Path):
    message = _refusal(tmp_path / "Sage.toml", 'description = "capital"\n')
    assert "'Sage' is not a persona name: use lower-case letters" in message and "^[a-z0-9]" not in message


def test_personas_commands_keep_their_formats_with_unusual_files(settings, personas_dir: Path):
    """`list` is one line per persona, `show` prints a persona file, and `validate` says
    which of two namesakes is used."""
    import json
    import os
    import subprocess
    import sys

    (personas_dir / "poet.toml").write_text(
        'description = """Writes\ttabs and\nnew lines."""\ndisplay_name = "Poète [draft]"\n'
        '[prompt]\nsystem = "Sé breve. Ünïcode ✓"\n'
    )
    (personas_dir / "sage.toml").write_text('description = "my own sage"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_PERSONAS_DIRS": json.dumps([str(personas_dir)]),
            "COLUMNS": "200", "PYTHONIOENCODING": "utf-8"}

    def persona(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persona", "personas", *args], env=env, capture_output=True,
                              check=False, text=True, encoding="utf-8", timeout=120)

    listed = persona("list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert all(len(row) == 3 for row in rows), rows
    assert ["poet", "smollm2", "Writes tabs and new lines."] in rows and ["sage", "smollm2", "my own sage"] in rows

    shown = persona("show", "poet")
    assert shown.returncode == 0, shown.stderr
    data = tomllib.loads(shown.stdout)  # the output is a persona file itself
    assert data["name"] == "poet" and data["display_name"] == "Poète [draft]" and data["sampling"]["top_p"] == 0.95
    assert str(personas_dir / "poet.toml") in shown.stdout

    checked = persona("validate")
    assert checked.returncode == 0, checked.stderr
    [builtin] = [line for line in checked.stdout.splitlines() if str(BUILTIN_PERSONAS_DIR / "sage.toml") in line]
    assert f"not used: {personas_dir / 'sage.toml'} overrides it" in builtin
    [own] = [line for line in checked.stdout.splitlines() if str(personas_dir / "sage.toml") in line and "✓" in line
             and str(BUILTIN_PERSONAS_DIR) not in line]
    assert "not used" not in own


def test_an_example_with_an_empty_side_is_refused(tmp_path: Path):
    message = _refusal(tmp_path / "shy.toml", '[prompt]\nexamples = [{ user = "Hi?", assistant = "  " }]\n')
    assert "prompt.examples.0.assistant: empty; an example shows the voice" in message
    assert "prompt.examples.0.user" not in message


def test_a_display_name_is_one_line_of_any_script(tmp_path: Path):
    """A line break in it started a turn of its own in a plain model's transcript."""
    message = _refusal(tmp_path / "two.toml", 'display_name = "Sage\\nUser"\n')
    assert "display_name: 'Sage\\nUser' holds a line break" in message
    path = tmp_path / "family.toml"
    path.write_text('display_name = "👨\u200d👩\u200d👧 \u200fزينون Ζήνων"\n')  # joiners and an RTL mark
    assert load_persona_file(path).speaker == "👨\u200d👩\u200d👧 \u200fزينون Ζήνων"


def test_our_own_checks_and_a_section_given_a_value_read_plainly(tmp_path: Path):
    message = _refusal(tmp_path / "when.toml", '[schedule]\ntimezone = "Mars/Base"\n')
    assert "  schedule.timezone: unknown time zone 'Mars/Base'" in message
    assert "Value error" not in message and "(got 'Mars/Base')" not in message
    message = _refusal(tmp_path / "daily.toml", 'schedule = "daily"\n')
    assert "schedule: should be a table of fields" in message and "ScheduleConfig" not in message


@pytest.mark.parametrize("zone, says", [
    ("localtime", "'localtime' is each machine's own zone"),
    ("Factory", "'Factory' names no zone"),
    ("/usr/share/zoneinfo/Europe/Berlin", "did you mean 'Europe/Berlin'?"),
])
def test_a_schedule_zone_is_an_iana_name_not_what_this_machine_opens(tmp_path: Path, zone: str, says: str):
    """zoneinfo opens "localtime" (each machine's /etc/localtime), "Factory" and file paths:
    "localtime" was accepted, and schedulers on machines in different zones each named the
    09:00 slot by their own zone and both posted it."""
    message = _refusal(tmp_path / "when.toml", f'[schedule]\ntimezone = "{zone}"\n')
    assert f"  schedule.timezone: {says}" in message or f"schedule.timezone: unknown time zone {zone!r} ({says}" in message
    assert "e.g. 'Europe/Berlin'" in message


def test_an_unknown_persona_is_one_line_not_every_invalid_files_problems(settings, personas_dir: Path, caplog):
    """Asking for a persona that does not exist logged each invalid file's problems in
    full before the error it was about."""
    for name in ("one", "two"):
        (personas_dir / f"{name}.toml").write_text("[sampling]\ntemprature = 1\n")
    with caplog.at_level("WARNING"), pytest.raises(UnknownPersona, match="known personas: .*sage"):
        PersonaRegistry.from_settings(settings).get("nobody")
    [said] = caplog.messages
    assert "2 invalid persona file(s) skipped; `persona personas validate`" in said and "temprature" not in said


def test_a_relative_base_model_is_found_beside_the_persona_file_from_any_folder(tmp_path: Path, monkeypatch):
    """model.base = "../models/mine" was read from the working directory: `persona up` or a
    worker started in another folder could not find the model that `filters.corpus`, read
    from the file's folder, sat beside."""
    from persona.models import resolve_base

    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "config.json").write_text("{}")
    (tmp_path / "personas").mkdir()
    (tmp_path / "personas" / "mine.toml").write_text('[model]\nbase = "../models/mine"\n')
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")
    persona = load_persona_file(tmp_path / "personas" / "mine.toml")
    assert resolve_base(persona.model.base, tmp_path / "cache") == tmp_path / "models" / "mine"

    monkeypatch.chdir(tmp_path)  # a path that only the working directory makes sense of works as it did
    (tmp_path / "personas" / "old.toml").write_text('[model]\nbase = "models/mine"\n')
    assert load_persona_file(tmp_path / "personas" / "old.toml").model.base == "models/mine"
    (tmp_path / "personas" / "bundled.toml").write_text('[model]\nbase = "smollm2"\n')
    (tmp_path / "personas" / "smollm2").mkdir()  # a folder of the alias's name does not hide the bundled model
    assert load_persona_file(tmp_path / "personas" / "bundled.toml").model.base == "smollm2"


def _validate_env(settings, personas_dir: Path) -> dict[str, str]:
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return env | {"PERSONA_DATA_DIR": str(settings.data_dir), "PERSONA_PERSONAS_DIRS": json.dumps([str(personas_dir)]),
                  "PYTHONIOENCODING": "utf-8"}


def _validate_folder(settings, personas_dir: Path):
    """`persona personas validate FOLDER`, run as a user runs it, on these settings' data."""
    return subprocess.run([sys.executable, "-m", "persona", "personas", "validate", str(personas_dir)],
                          env=_validate_env(settings, personas_dir), capture_output=True, check=False, text=True,
                          encoding="utf-8", timeout=120)


def test_validate_warns_of_a_system_prompt_the_models_context_has_no_room_for(
    settings, personas_dir: Path, write_persona, tiny_llama_dir
):
    """A 20,000-word system prompt passed validate; served, its end was cut from every request,
    and each took the only worker minutes."""
    import json

    long = " ".join(["Patience is the slow river that carves the canyon of a life."] * 300)  # about 4,200 tokens
    write_persona("wordy", base=str(tiny_llama_dir), system=long)  # the tiny model reads 512 tokens
    write_persona("terse", base=str(tiny_llama_dir))
    write_persona("epic", base="smollm2", system=long * 3)
    checked = _validate_folder(settings, personas_dir)
    assert checked.returncode == 0, checked.stderr
    said = {line.split(": ")[1].removesuffix(".toml").rsplit("/", 1)[-1]: line for line in checked.stderr.splitlines()}
    assert set(said) == {"wordy", "epic"}, checked.stderr
    assert re.search(r"prompt\.system is [\d,]+ tokens, and the model reads 512 tokens, of which 504 may be prompt "
                     r"beside a reply of up to sampling\.max_new_tokens \(8\): the system prompt alone leaves no room",
                     said["wordy"]), said["wordy"]
    # The bundled model's tokenizer is read once it was unpacked; before, the length is estimated.
    assert re.search(r"prompt\.system is (about )?[\d,]+ tokens( \(estimated at 4 characters a token\))?, and the model "
                     r"reads 8,192 tokens", said["epic"]), said["epic"]
    assert all(line.startswith("warning: ") for line in said.values())
    as_json = subprocess.run([*checked.args, "--json"], env=_validate_env(settings, personas_dir), capture_output=True,
                             check=False, text=True, encoding="utf-8", timeout=120)
    warned = {Path(c["path"]).stem: c["warnings"] for c in json.loads(as_json.stdout)["checked"]}
    assert warned["terse"] == [] and [said["wordy"].removeprefix("warning: ")] == warned["wordy"]


def _poster_with_every_credential(settings, redis_client):
    """A Poster whose sinks all have credentials: only a sink's spelling can be refused."""
    from pydantic import SecretStr

    from adapters.posting.poster import Poster

    credentialed = settings.model_copy(deep=True)
    credentialed.discord.token = credentialed.telegram.token = SecretStr("123:token")
    posting = credentialed.posting
    posting.x_bearer_token = posting.mastodon_access_token = posting.bluesky_password = SecretStr("secret")
    posting.bluesky_handle = "persona.example"
    return Poster(credentialed, redis_client, lambda persona, n, seed: [])


def test_validate_refuses_a_schedule_that_names_one_place_twice(settings, personas_dir: Path, redis_client):
    """"discord:1234" and "Discord: 1234" are one channel: posting refuses such a schedule ("post to
    the same place"), yet `persona personas validate` passed it. It now says so, with the file and
    the field, by posting's own reading of the specs: the two refuse the same files."""
    archive = settings.data_dir / "posts" / "archive.jsonl"
    (personas_dir / "echo.toml").write_text('[schedule]\nsinks = ["discord:1234", "file:echo.jsonl", "Discord: 1234"]\n')
    (personas_dir / "archive.toml").write_text(f'[schedule]\nsinks = ["file:archive.jsonl", "file:{archive}"]\n')
    (personas_dir / "handle.toml").write_text('[schedule]\nsinks = ["telegram:@Persona", "telegram:@persona"]\n')
    (personas_dir / "fine.toml").write_text('[schedule]\nsinks = ["file:a.jsonl", "file:a.jsonl", "file:b.jsonl", "discord:1234", "telegram:1234"]\n')
    checked = _validate_folder(settings, personas_dir)
    assert checked.returncode == 1
    twice = "post to the same place, which would get each post twice; list it once"
    assert f"{personas_dir / 'echo.toml'}: schedule.sinks: 'discord:1234' and 'Discord: 1234' {twice}" in checked.stderr
    assert f"{personas_dir / 'archive.toml'}: schedule.sinks: 'file:archive.jsonl' and 'file:{archive}' {twice}" in checked.stderr
    assert f"{personas_dir / 'handle.toml'}: schedule.sinks: 'telegram:@Persona' and 'telegram:@persona'" in checked.stderr
    assert f"✓ {personas_dir / 'fine.toml'}" in checked.stdout

    poster = _poster_with_every_credential(settings, redis_client)
    refused = set()
    for name in ("echo", "archive", "handle", "fine"):
        try:
            poster.sinks_for(poster.registry.get(name), None)
        except ConfigError as exc:
            assert "post to the same place" in str(exc)
            refused.add(name)
    assert refused == {"echo", "archive", "handle"}


def test_validate_refuses_exactly_the_sink_specs_that_posting_refuses(settings, personas_dir: Path, redis_client):
    """A schedule of sinks "bogus:1", "telegram" and "file:" passed `persona personas validate`,
    though `persona post` refused each ("unknown sink", "name the channel", "name the file").
    Validate now reads each spec as posting does, and says what posting says, file and field
    first; a missing credential is not its concern (it may be set where the scheduler runs)."""
    import json

    specs = ["bogus:1", "telegram", "file:", "discord:general", "discord:", "telegram: ", "", "xx", "file:ok.jsonl",
             "Discord: 1234", "telegram:@chan", "telegram:-100123", "x", " Mastodon ", "bluesky"]
    for n, spec in enumerate(specs):
        (personas_dir / f"s{n}.toml").write_text(f"[schedule]\nsinks = [{json.dumps(spec)}]\n")
    checked = _validate_folder(settings, personas_dir)
    assert checked.returncode == 1

    poster = _poster_with_every_credential(settings, redis_client)
    said_by_posting = {}
    for n in range(len(specs)):
        try:
            poster.sinks_for(poster.registry.get(f"s{n}"), None)
        except ConfigError as exc:
            said_by_posting[n] = str(exc)
    assert set(said_by_posting) == {0, 1, 2, 3, 4, 5, 6, 7}
    for n in range(len(specs)):
        path = personas_dir / f"s{n}.toml"
        if n in said_by_posting:
            assert f"✗ {path}: schedule.sinks: {said_by_posting[n]}" in checked.stderr
        else:
            assert f"✓ {path}" in checked.stdout
    assert "unknown sink 'bogus:1'; use one of" in said_by_posting[0]
    assert "sink 'telegram': name the channel, e.g. telegram:-1001234567890" in said_by_posting[1]
    assert "sink 'discord:general': a Discord channel is a number" in said_by_posting[3]


def test_a_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path):
    """Windows editors begin a UTF-8 file with one: it was "not valid TOML: Invalid statement"."""
    path = tmp_path / "bom.toml"
    path.write_bytes('\ufeffdescription = "Sé"\n'.encode())
    assert load_persona_file(path).description == "Sé"


def test_a_persona_file_whose_name_is_no_persona_name_says_what_to_rename_it_to(settings, personas_dir: Path):
    """`persona personas show Ünïcode` with Ünïcode.toml there said "unknown persona 'Ünïcode'"."""
    (personas_dir / "Ünïcode.toml").write_text('description = "accents"\n')
    with pytest.raises(ConfigError) as caught:
        PersonaRegistry.from_settings(settings).get("Ünïcode")
    said = str(caught.value)
    assert not isinstance(caught.value, UnknownPersona)
    assert said.startswith(f"{personas_dir / 'Ünïcode.toml'}: the file exists, but 'Ünïcode' is not a persona name: use lower-case")
    assert said.endswith("; rename it to unicode.toml")
    assert "e.g. 'unicode'" in _refusal(personas_dir / "Ünïcode.toml", 'description = "accents"\n')


def test_a_top_level_field_written_below_a_table_header_is_said_to_belong_at_the_top(tmp_path: Path):
    """It got "schedule.adapters: unknown field; did you mean 'candidates'?"."""
    message = _refusal(tmp_path / "late.toml", '[schedule]\nenabled = true\nadapters = ["scheduler"]\n')
    assert ("schedule.adapters: unknown field; adapters is a top-level field: write it at the top of the file, "
            "before any [table] header (below [schedule], a key belongs to that table)") in message
    assert "did you mean" not in message


def test_an_unknown_persona_names_the_folders_searched(settings, personas_dir: Path, tmp_path: Path):
    """"unknown persona 'x'; known personas: none" did not say where personas were looked for: with
    none or few known, nobody could tell that the folder was the wrong one."""
    with pytest.raises(UnknownPersona) as caught:
        PersonaRegistry.from_settings(settings).get("nobody")
    assert (f"known personas: bofh, sage (searched {BUILTIN_PERSONAS_DIR}, {personas_dir}, "
            f"{settings.user_personas_dir} (not there)). See `persona personas list`.") in str(caught.value)
    with pytest.raises(UnknownPersona) as caught:
        PersonaRegistry([tmp_path / "gone"]).get("sage")
    assert str(caught.value).startswith(f"unknown persona 'sage'; known personas: none (searched {tmp_path / 'gone'} "
                                        "(not there)).")


@pytest.mark.parametrize("locked", ["the folder", "a folder above it"])
def test_a_personas_folder_that_cannot_be_read_is_said_by_every_command_and_the_others_are_served(
        tmp_path: Path, locked: str):
    """It was passed over without a word: `list` showed the other personas alone (exit 0), `show tiny`
    said "unknown persona", `validate` died with a PermissionError traceback (and a folder named in
    PERSONA_PERSONAS_DIRS below one that cannot be read made every command die so)."""
    own, shared = tmp_path / "data" / "personas", tmp_path / "shared" / "personas"
    for folder, name in ((own, "tiny"), (shared, "mini")):
        folder.mkdir(parents=True)
        (folder / f"{name}.toml").write_text('description = "small"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env |= {"PERSONA_DATA_DIR": str(own.parent), "PERSONA_PERSONAS_DIRS": json.dumps([str(shared)]), "COLUMNS": "400"}
    folder, hidden, served = (own, "tiny", "mini") if locked == "the folder" else (shared, "mini", "tiny")
    said_of_it = (f"{folder}: cannot read this folder of persona files (Permission denied), so none of its personas "
                  "is served; let the user persona runs as")
    with unreadable(folder if locked == "the folder" else folder.parent) as prefix:
        def persona(*args: str) -> subprocess.CompletedProcess:
            run = subprocess.run([*prefix, sys.executable, "-m", "persona", "personas", *args], env=env,
                                 capture_output=True, text=True, check=False, timeout=60)
            assert "Traceback" not in run.stderr, run.stderr
            return run

        listed, listed_json, shown, checked = persona("list"), persona("list", "--json"), persona("show", hidden), \
            persona("validate")
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == sorted(["bofh", "sage", served])
    assert said_of_it in listed.stderr and "read it and the folders above it" in listed.stderr, listed.stderr
    assert "not a folder" not in listed.stderr and "invalid persona file" not in listed.stderr  # it is a folder
    assert [problem for problem in json.loads(listed_json.stdout)["invalid"] if problem.startswith(said_of_it)]
    assert shown.returncode == 1 and f"unknown persona {hidden!r}" in shown.stderr, shown.stderr
    assert f"{folder} (cannot be read)" in shown.stderr and said_of_it in shown.stderr, shown.stderr
    assert checked.returncode == 1 and f"✗ {said_of_it}" in checked.stderr, checked.stderr
    assert f"✓ {BUILTIN_PERSONAS_DIR / 'sage.toml'}" in checked.stdout and f"{served}.toml" in checked.stdout


def test_a_service_says_once_that_a_personas_folder_cannot_be_read_and_serves_the_others(tmp_path: Path):
    """Workers (and so `persona up`) preload every persona the registry finds: a folder it could not
    read was skipped without a line in their logs."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tiny.toml").write_text('description = "small"\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mini.toml").write_text('description = "also small"\n')
    serve = ("import logging, sys\nfrom pathlib import Path\nfrom persona.personas import PersonaRegistry\n"
             "logging.basicConfig(format='%(levelname)s %(message)s')\n"
             "registry = PersonaRegistry([Path(p) for p in sys.argv[1:]])\n"
             "for _ in range(3): print(sorted(registry.all()))")
    with unreadable(tmp_path / "mine") as prefix:
        served = subprocess.run([*prefix, sys.executable, "-c", serve, str(tmp_path / "mine"), str(tmp_path / "other")],
                                capture_output=True, text=True, check=False, timeout=60)
    assert served.returncode == 0 and served.stdout.splitlines() == ["['mini']"] * 3, served.stderr
    [said] = served.stderr.splitlines()
    assert said.startswith(f"WARNING skipping a folder of persona files: {tmp_path / 'mine'}: cannot read this folder "
                           "of persona files (Permission denied)"), said
