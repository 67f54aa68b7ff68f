"""Where the settings come from, and what a person checking them is told.

persona.settings holds the settings object and the rules of each value; this module reads the
places ``Settings()`` reads (the environment, ``.env`` in the working directory, the secrets
directory) to say where each value came from (``where_set``, ``place_in_words``), which
``PERSONA_`` names there are no setting, each with the nearest one (``unknown_variables``,
``nearest_variables``), and what an error of ``Settings()`` means (``explain_settings_error``):
a value refused, by its variable; JSON that is none, with the place it was set in; a .env or a
secret file that is not UTF-8 text, or cannot be read, by its name. It changes no value.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import (
    DotEnvSettingsSource,
    EnvSettingsSource,
    NestedSecretsSettingsSource,
    SettingsError,
)

from persona.settings import (
    ENV_FILE,
    ENV_PREFIX,
    LONGEST_CONVERSATION_TTL_S,
    LONGEST_GRACE_S,
    LONGEST_INTERVAL_S,
    Settings,
    env_name,
    setting_fields,
)
from persona.validation import LATEST_DEADLINE_AFTER_S

__all__ = [
    "SETTINGS_READ_ERRORS",
    "SecretFilesSource",
    "explain_settings_error",
    "nearest_variables",
    "place_in_words",
    "unknown_variables",
    "where_set",
]

# PERSONA_ variables that are no setting, and not a slip either: `persona up` marks the services it
# runs with PERSONA_UP_SERVICE (persona.supervisor.SERVICE_ENV; a test holds the two equal).
NOT_SETTINGS = frozenset({"PERSONA_UP_SERVICE"})
# The most near names a misspelt one is answered with.
MAX_SUGGESTIONS = 3

# The bounds of the duration settings, in words for the messages that name them.
BOUNDS_IN_WORDS = {
    60: "a minute", LATEST_DEADLINE_AFTER_S: "a day", LONGEST_INTERVAL_S: "a week", LONGEST_CONVERSATION_TTL_S: "a year",
    LONGEST_GRACE_S: "a thousand years",
}
BOUND_REASONS = {LATEST_DEADLINE_AFTER_S: "the furthest a request's deadline may lie ahead"}


class SecretFilesSource(NestedSecretsSettingsSource):
    """The secrets directory (``/run/secrets``), read as the environment is (``__`` between nested
    names, any letter case), but only the files named as a setting or a section is
    (``PERSONA_TELEGRAM__TOKEN``, ``persona_discord`` holding its JSON). The folder is shared:
    Compose and Swarm put every service's secrets there, sops-nix and agenix every secret of the
    host (root's, mode 0400), so another program's key file, binary, unreadable or large, is never
    opened, sized or counted. A file of ours that cannot be read (not UTF-8, not ours to read)
    stops ``Settings()``, and ``explain_settings_error`` names it: read past, it would leave a bot
    without its token or the queue on another Redis, with nothing said."""

    def validate_secrets_path(self, path: Path) -> None:
        if not path.is_dir():
            super().validate_secrets_path(path)  # missing: a warning; a file: refused
            return
        size = sum(file.stat().st_size for file in self._iter_secret_files(path))
        if size > self.secrets_dir_max_size:
            raise SettingsError(
                f"the setting files in {path} hold {size} bytes in all, more than {self.secrets_dir_max_size}; "
                "each holds one value (a token, a URL), so one of them is not the file meant for it"
            )

    @staticmethod
    def _iter_secret_files(path: Path) -> Iterator[Path]:
        variables = _setting_variables()
        yield from (file for file in _persona_files(path) if file.name.lower() in variables)

    def not_settings(self) -> list[str]:
        """The ``PERSONA_`` files here that name no setting, by lower-case name; never opened."""
        variables = _setting_variables()
        return [file.name.lower() for folder in self.secrets_paths if folder.is_dir()
                for file in _persona_files(folder) if file.name.lower() not in variables]

    def __repr__(self) -> str:
        return f"SecretFilesSource(secrets_dir={self.secrets_dir!r})"


def _setting_variables() -> frozenset[str]:
    """Each name a file of ours may have, lower-case: every setting's variable, and every
    section's, set whole as JSON (``persona_discord``)."""
    return frozenset(env_name(names[:depth]).lower() for names, _ in setting_fields() for depth in range(1, len(names) + 1))


def _persona_files(folder: Path) -> list[Path]:
    """The files directly in ``folder`` named ``PERSONA_*`` in any letter case, by name. A folder
    only its owner may list (sops-nix's is 0751) still opens by name: each setting's file is
    looked for as the README writes it and in lower case."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        entries = sorted({folder / name for variable in _setting_variables() for name in (variable, variable.upper())})
    return [entry for entry in entries if entry.name.lower().startswith(ENV_PREFIX.lower()) and _file_within(entry, folder)]


def _file_within(entry: Path, folder: Path) -> bool:
    """Whether ``entry`` is a file that stays inside ``folder`` (a Kubernetes secret is a link
    into its ``..data``); one that cannot even be looked at counts, so that reading it names it."""
    try:
        resolved = entry.resolve()
        if not resolved.is_file():
            return False
    except OSError:
        return True
    if folder.resolve() not in resolved.parents:
        warnings.warn(f"{entry} is not read: it is a link to {resolved}, outside {folder}", stacklevel=2)
        return False
    return True


def _places(secrets_dir: Path | None = None) -> list[tuple[str, EnvSettingsSource]]:
    """The places ``Settings()`` reads, lowest precedence first (a later one overrides), each
    with its name: the secrets directory (``/run/secrets``), ".env", "env". Each holds its
    variables by lower-case name (``source.env_vars``); a file of ours that is not UTF-8 raises
    UnicodeDecodeError here, as in ``Settings()``."""
    secrets_dir = secrets_dir or Settings.model_config.get("secrets_dir")
    return [
        (str(secrets_dir), SecretFilesSource(Settings, secrets_dir=secrets_dir)),
        (ENV_FILE, DotEnvSettingsSource(Settings)),
        ("env", EnvSettingsSource(Settings)),
    ]


def place_in_words(place: str) -> str:
    """A place ``where_set`` names, as a message says it: "the environment", ".env", the secrets folder."""
    return "the environment" if place == "env" else place


def where_set(secrets_dir: Path | None = None) -> dict[tuple[str, ...], str]:
    """Where each setting given a value gets it, read as ``Settings()`` reads them: "env", ".env",
    or the secrets directory (``/run/secrets``); a setting not here has its default. A place
    whose values cannot be read (JSON that is none) is left out: ``Settings()`` says why."""
    found: dict[tuple[str, ...], str] = {}
    for place, source in _places(secrets_dir):
        try:
            values = source()
        except SettingsError:
            continue
        for names, _ in setting_fields():
            held: object = values
            for name in names:
                held = held.get(name, _ABSENT) if isinstance(held, dict) else _ABSENT
            if held is not _ABSENT:
                found[names] = place
    return found


_ABSENT = object()


def unknown_variables(secrets_dir: Path | None = None) -> list[str]:
    """Each ``PERSONA_`` name set in the environment, .env or the secrets directory that names no
    setting (``PERSONA_REDIS_ULR``, ``PERSONA_TELEGRAM_TOKEN``), and each key of a section's JSON
    (``PERSONA_WORKER='{"engne": "int8"}'``) that names no field: one line each, saying where it
    was set and the nearest setting. They are ignored, not refused: a setting of a newer
    version must not stop an older one."""
    variables = [env_name(names) for names, _ in setting_fields()]
    sections = {env_name([name]).lower(): name for name in _sections()}
    known = {variable.lower() for variable in variables} | set(sections) | {n.lower() for n in NOT_SETTINGS}
    said: dict[str, str] = {}
    for place, source in reversed(_places(secrets_dir)):  # the place that wins first
        where = f"set in {place_in_words(place)}"
        names = dict(source.env_vars)
        if isinstance(source, SecretFilesSource):  # a file of ours only is opened
            names |= dict.fromkeys(source.not_settings())
        for name, value in sorted(names.items()):
            if not name.startswith(ENV_PREFIX.lower()) or name in said:
                continue
            if name in sections:
                said[name] = "; ".join(_unknown_keys(name.upper(), where, sections[name], value))
            elif name not in known:
                nearest = nearest_variables(name, variables)[:1]
                meant = f" (did you mean {nearest[0]}?)" if nearest else "; `persona settings` lists every one"
                said[name] = f"{name.upper()} ({where}) is not a setting, so it is ignored{meant}"
    return [line for line in said.values() if line]


def _sections() -> list[str]:
    """The settings that are sections (``worker``), set whole as JSON or field by field."""
    return [name for name, field in Settings.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)]


def _unknown_keys(variable: str, where: str, section: str, value: str | None) -> list[str]:
    """The keys of a section's JSON object that name no field of it, one line each."""
    try:
        given = json.loads(value or "")
    except ValueError:
        return []  # not JSON: Settings() says so
    if not isinstance(given, dict):
        return []
    fields = list(Settings.model_fields[section].annotation.model_fields)
    lines = []
    for key in given:
        if str(key).lower() not in fields:
            nearest = difflib.get_close_matches(str(key).lower(), fields, n=1)
            meant = f" (did you mean {nearest[0]!r}?)" if nearest else ""
            lines.append(f"{variable} ({where}) holds {key!r}, which is not a setting of {section}, so it is ignored{meant}")
    return lines


def nearest_variables(word: str, variables: list[str]) -> list[str]:
    """What ``word`` most likely misspells, nearest first: the variable it is but for its
    underscores ("telegram_token": PERSONA_TELEGRAM__TOKEN), variables near it whole
    ("redis_ulr"), a section ("telegarm": PERSONA_TELEGRAM__*), or variables near it by their
    last name ("max_bach": PERSONA_WORKER__MAX_BATCH)."""
    word = word.lower().removeprefix(ENV_PREFIX.lower())
    tails = {variable.lower().removeprefix(ENV_PREFIX.lower()): variable for variable in variables}
    squeezed = {re.sub("_+", "_", tail): variable for tail, variable in tails.items()}
    if (same := squeezed.get(re.sub("_+", "_", word))) is not None:
        return [same]
    whole = difflib.get_close_matches(word, list(tails), n=MAX_SUGGESTIONS, cutoff=0.8)
    if whole:
        return [tails[tail] for tail in whole]
    sections = {tail.partition("__")[0] for tail in tails if "__" in tail}
    for section in difflib.get_close_matches(word, sorted(sections), n=1):
        return [f"{ENV_PREFIX}{section.upper()}__*"]
    by_key: dict[str, list[str]] = {}
    for tail, variable in tails.items():
        by_key.setdefault(tail, []).append(variable)
        by_key.setdefault(tail.rpartition("__")[2], []).append(variable)
    keys = difflib.get_close_matches(word, list(by_key), n=MAX_SUGGESTIONS)
    return list(dict.fromkeys(v for key in keys for v in by_key[key]))[:MAX_SUGGESTIONS]


# What reading the settings can fail with: a value refused, JSON that is none, a .env or a
# secret file that is not UTF-8 text, or one that cannot be read. explain_settings_error says each.
SETTINGS_READ_ERRORS = (ValidationError, SettingsError, UnicodeDecodeError, OSError)


def explain_settings_error(exc: Exception, secrets_dir: Path | None = None) -> str:
    """What an error of ``SETTINGS_READ_ERRORS`` from ``Settings()`` means: by variable name, and
    for JSON that is none where it was set; a file that is not UTF-8 text or cannot be read, by
    its name."""
    if isinstance(exc, ValidationError):
        return "; ".join(_explain_invalid(error) for error in exc.errors())
    if isinstance(exc, UnicodeDecodeError):
        return _not_utf8(secrets_dir) or f"the settings cannot be read: {exc}"
    if isinstance(exc, PermissionError) and exc.filename:
        return (f"{exc.filename} cannot be read: {exc.strerror or exc}; let the user persona runs as read it "
                "(chown or chmod it), or remove it")
    if isinstance(exc, OSError):
        return f"{exc.filename or 'a settings file'} cannot be read: {exc.strerror or exc}"
    found = re.search(r'field "([^"]+)"(?: from source "([^"]+)")?', str(exc))
    if found is None:
        return f"the settings cannot be read: {exc}"
    # pydantic-settings parses list and nested values as JSON before validating them.
    bad = _unparsable(found.group(1), found.group(2), secrets_dir)
    return "; ".join(f"{env_name(names)} cannot be read: expected {_expected_form(names)}"
                     f"{f'; it is set in {place_in_words(place)}' if place else ''}" for names, place in bad)


def _not_utf8(secrets_dir: Path | None) -> str | None:
    """Which of .env and the secret files is not UTF-8 text, and where it goes wrong; None if each is."""
    secrets_dir = secrets_dir or Settings.model_config.get("secrets_dir")
    files = [(Path(ENV_FILE), f"{ENV_FILE} (in {Path.cwd()})")]
    if secrets_dir is not None and Path(secrets_dir).is_dir():  # the files Settings() reads there, no other
        files += [(path, str(path)) for path in SecretFilesSource._iter_secret_files(Path(secrets_dir).expanduser())]
    for path, name in files:
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except OSError:
            continue
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            utf16 = " (it is UTF-16, as Notepad's \"Unicode\" saves)" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
            return (f"{name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at byte {exc.start}, line {line}){utf16}; "
                    "save it as UTF-8")
    return None


def _explain_invalid(error: ErrorDetails) -> str:
    names = [part for part in error["loc"] if isinstance(part, str)]
    form = _expected_form(names)
    hint = f" (expected {form})" if form.startswith("a JSON list") else ""
    # A duration past a bound is told in seconds; our own checks say what is wrong in words already.
    message = _out_of_bounds(names, error) or error["msg"].removeprefix("Value error, ")
    return f"{env_name(names)}: {message[:1].lower()}{message[1:]}{hint}"


def _out_of_bounds(names: list[str], error: ErrorDetails) -> str | None:
    """A duration (a ``*_s`` setting) past a bound, in seconds and in words ("604800 s (a week)"),
    where pydantic says "less than or equal to 604800"; None for any other error."""
    kind = error["type"]
    if not (names and names[-1].endswith("_s")) or kind not in ("less_than_equal", "greater_than_equal", "greater_than"):
        return None
    bound = next(iter(error.get("ctx", {}).values()), None)
    if not isinstance(bound, int | float):
        return None
    given, words = _seconds(error["input"]), BOUNDS_IN_WORDS.get(bound)
    limit = f"{_seconds(bound)} s" + (f" ({words})" if words else "")
    if kind == "less_than_equal":
        within = f"within {words}" if words else f"up to {_seconds(bound)}"
        why = BOUND_REASONS.get(bound, "the longest it may be")
        return f"{given} s is more than {limit}, {why}; give a number of seconds {within}"
    if kind == "greater_than_equal":
        return f"{given} s is less than {limit}, the shortest it may be"
    return f"{given} s is too short: give a number of seconds more than {_seconds(bound)}"


def _seconds(value: object) -> str:
    """A number of seconds as given: an int in full (99999999999999999999), a float short (86401.0 as 86401)."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return str(int(value))
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def _annotation(names: list[str]) -> object:
    model: object = Settings
    annotation: object = None
    for name in names:
        fields = getattr(model, "model_fields", {})
        if name not in fields:
            return None
        annotation = model = fields[name].annotation
    return annotation


def _expected_form(names: list[str]) -> str:
    annotation = _annotation(names)
    if typing.get_origin(annotation) is list:
        example = "[123, 456]" if typing.get_args(annotation) == (int,) else '["first", "second"]'
        return f"a JSON list, e.g. {env_name(names)}='{example}'"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a JSON object, or one variable per field ({env_name(names)}__FIELD)"
    return "a valid value"


def _unparsable(field: str, source: str | None, secrets_dir: Path | None) -> list[tuple[list[str], str | None]]:
    """The set values under a top-level field that are not the JSON they must be, each with the
    place it was set: in the source pydantic-settings named (its class's name), else in any."""
    nested = _annotation([field])
    candidates = [[field]]
    if isinstance(nested, type) and issubclass(nested, BaseModel):
        candidates += [[field, sub] for sub in nested.model_fields]
    bad: list[tuple[list[str], str | None]] = []
    for place, held in reversed(_places(secrets_dir)):
        if source is not None and type(held).__name__ != source:
            continue
        for names in candidates:
            value = held.env_vars.get(env_name(names).lower())
            if value is not None and (len(names) == 1 or typing.get_origin(_annotation(names)) is list):
                try:
                    json.loads(value)
                except ValueError:
                    bad.append((names, place))
    return bad or [([field], None)]
