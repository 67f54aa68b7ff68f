"""Persona files (TOML), their validation, and the registry that finds them.

A persona file names a base model and optionally a fine-tuned checkpoint, the voice
(system prompt and few-shot examples), sampling defaults, output filters, a posting
schedule, and the adapters it is enabled on. Files come from the project's
``personas/`` folder, any extra folders in the settings, and the data directory
(personas that training created); a later folder overrides an earlier one.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import threading
import time
import tomllib
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from persona.contract import MAX_SEED, SamplingOverrides, StopString
from persona.errors import ConfigError, UnknownPersona, closest
from persona.extras import install_command, installed
from persona.settings import Settings

__all__ = [
    "BUILTIN_PERSONAS_DIR",
    "Example",
    "FiltersConfig",
    "ModelConfig",
    "Persona",
    "PersonaRegistry",
    "PromptConfig",
    "Sampling",
    "ScheduleConfig",
    "cron_problem",
    "format_validation_error",
    "load_persona_file",
    "unread_reason",
    "unscheduled_reason",
    "zone_problem",
]

log = logging.getLogger(__name__)

BUILTIN_PERSONAS_DIR = Path(__file__).resolve().parent.parent / "personas"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
# NAME_PATTERN in words, for the errors that refuse a name.
NAME_RULE = "use lower-case letters, digits, - and _ (at most 64, starting with a letter or digit)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Which weights speak for the persona."""

    base: str = Field("smollm2", description="'smollm2' (bundled) or a local HF model folder")
    checkpoint: str | None = Field(
        None, description="a checkpoint version of this persona (v3) or a folder path"
    )


class Example(_Strict):
    """One few-shot exchange that shows the voice."""

    user: str
    assistant: str

    @field_validator("user", "assistant")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        # A blank side teaches the model to answer nothing, or to nothing.
        if not value.strip():
            raise ValueError("empty; an example shows the voice with a question and its answer: write both, or drop it")
        return value


class PromptConfig(_Strict):
    """The voice: what the model is told before the conversation."""

    system: str = ""
    examples: list[Example] = Field(default_factory=list)
    post_instruction: str = Field(
        "Write one short new post in your own voice.",
        description="what the model is asked when the persona writes a post (unless posts = continue)",
    )
    posts: Literal["auto", "ask", "continue"] = Field(
        "auto",
        description=(
            "how a post is written: ask (the system prompt, examples and post_instruction, "
            "then the persona's turn), continue (a fresh document in the author's voice, "
            "from the request's prefix: a model trained on the author's posts), or auto "
            "(continue on a fine-tuned checkpoint, and on a model without a chat template "
            "that the persona gives no system prompt or examples; ask otherwise)"
        ),
    )
    max_history_turns: int = Field(12, ge=0, description="recent turns kept as context")


class Sampling(_Strict):
    """Sampling defaults; a request may override any of them."""

    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    max_new_tokens: int = Field(96, ge=1, le=4096)
    repetition_penalty: float = Field(1.1, ge=0.5, le=3.0)
    stop: list[StopString] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)

    def merged(self, overrides: SamplingOverrides) -> Sampling:
        """These defaults with a request's overrides applied."""
        changes = {name: value for name, value in overrides.__dict__.items() if value is not None}
        if not changes:
            return self  # most requests override nothing: no copy (these are never changed in place)
        if "stop" in changes:
            changes["stop"] = [*self.stop, *changes["stop"]]
        return self.model_copy(update=changes)


class FiltersConfig(_Strict):
    """What a generated text must pass before it is posted."""

    min_chars: int = Field(10, ge=0)
    max_chars: int = Field(280, ge=1)
    blocklist: list[str] = Field(default_factory=list)
    max_copied_words: int = Field(8, ge=3, description="longest verbatim run from the corpus")
    corpus: str | None = Field(None, description="the persona's corpus (JSONL), for originality; relative to the persona file")

    @model_validator(mode="after")
    def _lengths_agree(self) -> FiltersConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is over max_chars ({self.max_chars}): no post could pass")
        return self


class ScheduleConfig(_Strict):
    """When and where the persona posts on its own."""

    cron: str = "0 9 * * *"
    timezone: str = "UTC"
    missed: Literal["skip", "latest"] = "skip"
    sinks: list[str] = Field(default_factory=list)
    candidates: int = Field(8, ge=1, le=64)
    approval: bool = False
    enabled: bool = False

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        problem = zone_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        problem = cron_problem(value)
        if problem:
            raise ValueError(problem)
        return value


CRON_FIELDS = 5  # minute hour day-of-month month day-of-week
ZONE_EXAMPLES = "e.g. 'Europe/Berlin', 'America/New_York', 'UTC'"
# Names zoneinfo opens that name no zone: "localtime" is each machine's own (/etc/localtime),
# so schedulers on machines in different zones named one slot two ways and each posted it;
# "Factory" is tzdata's placeholder for a machine whose zone was never set.
NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})


@functools.cache
def _iana_zones() -> frozenset[str]:
    """The IANA zone names this machine knows (its own tz database, or the tzdata package)."""
    from zoneinfo import available_timezones

    return (frozenset(available_timezones()) - NOT_ZONES) | {"UTC"}


def zone_problem(name: str) -> str:
    """What is wrong with a schedule's time zone, '' if nothing: only an IANA name is one
    (anything else zoneinfo opens, a file path or "localtime", means something else on
    each machine, or nothing)."""
    zones = _iana_zones()
    if name in zones:
        return ""
    if name == "localtime":
        return (f"{name!r} is each machine's own zone, so schedulers on machines in different zones would post "
                f"a slot at different times, and twice; name the zone ({ZONE_EXAMPLES})")
    if name in NOT_ZONES:
        return f"{name!r} names no zone (tzdata keeps it for its own use); name the zone ({ZONE_EXAMPLES})"
    # A path ("/usr/share/zoneinfo/Europe/Berlin") is read as the zone its tail names.
    tails = [zone for zone in zones if name.endswith("/" + zone)]
    near = max(tails, key=len) if tails else closest(name, sorted(zones))
    return f"unknown time zone {name!r} ({f'did you mean {near!r}? ' if near else ''}an IANA name, {ZONE_EXAMPLES})"


def cron_problem(cron: str) -> str:
    """What is wrong with a schedule's cron expression, '' if nothing: not cron at all; six
    fields, which croniter reads as seconds at the end ("0 0 9 * * *", seconds first as
    Quartz writes it, would post every second of midnight on the 9th); a date that never
    comes ("0 9 30 2 *"). Without croniter (the posting extra) only the count of fields is
    checked, so that a file is judged alike on every install; ``unscheduled_reason`` says
    that a schedule enabled there cannot post."""
    fields = cron.split()
    wrong_count = (f"{cron!r} has {len(fields)} fields; a schedule has 5 (minute hour day month weekday), "
                   "no seconds: '0 9 * * *' is 09:00 daily")
    try:
        from croniter import CroniterBadDateError, croniter
    except ImportError:
        return wrong_count if len(fields) != CRON_FIELDS and not cron.strip().startswith("@") else ""
    if not croniter.is_valid(cron):
        return f"{cron!r} is not a cron expression (e.g. '0 9 * * *': 09:00 daily)"
    if len(fields) != CRON_FIELDS and not cron.strip().startswith("@"):
        return wrong_count
    from datetime import UTC, datetime

    try:
        croniter(cron, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterBadDateError:
        return f"{cron!r} names a date that never comes; nothing would ever be posted"
    return ""


class Persona(_Strict):
    """One persona file, validated."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    display_name: str = ""
    adapters: list[Literal["cli", "discord", "telegram", "scheduler"]] = Field(
        default_factory=lambda: ["cli", "discord", "telegram"]
    )
    model: ModelConfig = ModelConfig()
    prompt: PromptConfig = PromptConfig()
    sampling: Sampling = Sampling()
    filters: FiltersConfig = FiltersConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    source: Path | None = Field(None, exclude=True, description="the file it was read from")

    @field_validator("display_name")
    @classmethod
    def _one_line_display_name(cls, value: str) -> str:
        # It names the persona's turns in a transcript ("Sage: ..."): a line break there
        # would start a turn of its own. (Format characters stay: emoji joiners, RTL marks.)
        if any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in value):
            raise ValueError(f"{value!r} holds a line break or control character; a display name is one line")
        return value.strip()

    @property
    def speaker(self) -> str:
        """The name the persona speaks under in plain-text transcripts."""
        return self.display_name or self.name.replace("-", " ").replace("_", " ").title()


def unscheduled_reason(persona: Persona) -> str:
    """Why a persona whose file enables its schedule is not posted on it ("" if it is, or is not enabled)."""
    if not persona.schedule.enabled:
        return ""
    if "scheduler" not in persona.adapters:
        return f"adapters does not list \"scheduler\" (it lists {', '.join(persona.adapters) or 'none'}); add it to post on schedule"
    if not persona.schedule.sinks:
        return "schedule.sinks is empty; name where the posts go, e.g. sinks = [\"file:posts.jsonl\"]"
    if not installed("croniter"):  # no scheduler runs, and its cron goes unchecked
        return ("the posting extra is not installed, so nothing posts on schedule and schedule.cron cannot be "
                f"checked: {install_command('posting')}")
    return ""


def unread_reason(path: Path) -> str:
    """Why the registry passes over a file of this name ("" if it reads it): a hidden file, an
    editor's lock or backup (Emacs keeps ``.#name.toml``, a dangling link, while a buffer is
    changed; macOS writes ``._name.toml``), or ``.toml`` in another case."""
    name = path.name
    if name.startswith((".", "#")) or name.endswith("~"):
        return ("its name starts with '.' or '#' (a hidden file, or an editor's lock or backup), and such files "
                "are never read as personas")
    if name.lower().endswith(".toml") and not name.endswith(".toml"):
        return f"only names ending in '.toml' (lower case) are read as personas; rename it to {path.stem}.toml"
    return ""


def format_validation_error(path: Path, error: ValidationError) -> str:
    """Each problem on its own line, naming the exact field, e.g. ``sampling.top_p``."""
    lines = [f"{path}: {error.error_count()} problem(s)"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(file)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown field; {_meant(item['loc'])}")
            continue
        got = item.get("input")
        if item["loc"] == ("name",) and item["type"] == "string_pattern_mismatch":
            # The pattern itself told nobody what to do ("String should match pattern '^[a-z0-9]...'").
            example = _suggested_name(str(got))
            lines.append(
                f"  name: {got!r} is not a persona name: {NAME_RULE}{f', e.g. {example!r}' if example else ''}; "
                "without a name field, the file's name is the persona's"
            )
            continue
        if item["type"] == "value_error":
            # Our own checks: the message quotes the value and says what to do.
            said = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {said}")
            continue
        if item["type"] in ("model_type", "dict_type"):
            lines.append(f"  {where}: should be a table of fields (a [section], or {{ key = value, ... }}), not {got!r}")
            continue
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {item['msg']}{shown}")
    return "\n".join(lines)


def _meant(loc: tuple) -> str:
    """For a field no section has: the known one it is closest to, else the known ones. A
    top-level field found in a table was written below a [table] header, where TOML reads
    every key as the table's, up to the next header."""
    top_level = [name for name, field in Persona.model_fields.items() if not field.exclude]
    if len(loc) > 1 and loc[-1] in top_level:
        return (f"{loc[-1]} is a top-level field: write it at the top of the file, before any [table] header "
                f"(below [{loc[0]}], a key belongs to that table)")
    model: type[BaseModel] = Persona
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # a list index: the model is its items'
        kinds = [field.annotation, *get_args(field.annotation)]
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), model)
    known = [name for name, field in model.model_fields.items() if not field.exclude]
    meant = closest(str(loc[-1]), known)
    return f"did you mean {meant!r}?" if meant else f"known fields: {', '.join(known)}"


def load_persona_file(path: Path) -> Persona:
    """Read and validate one persona file; raise ConfigError naming what is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return _parsed(path, raw)[0]


def _parsed(path: Path, raw: bytes) -> tuple[Persona, dict]:
    """The persona a file's bytes hold, and its TOML as read; ConfigError naming what is wrong."""
    try:
        # Less the byte-order mark Windows editors write, which tomllib refuses.
        data = tomllib.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    if not data:
        # Every field has a default, so an empty file read as a persona on the bundled model:
        # `validate` passed it, and a worker that read a file mid-save served the bundled model.
        raise ConfigError(
            f"{path}: empty: a persona file needs at least a setting, e.g. its model ([model] base = \"smollm2\", "
            "the bundled one) and a system prompt ([prompt] system = \"...\"); "
            "`persona personas show sage` prints a whole one"
        )
    try:
        persona = Persona.model_validate({"name": path.stem, **data})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from exc
    if persona.name != path.stem:
        raise ConfigError(
            f"{path}: name: {persona.name!r} differs from the file name; "
            f"rename the file to {persona.name}.toml or fix the name"
        )
    return _base_beside_file(persona.model_copy(update={"source": path})), data


def _base_beside_file(persona: Persona) -> Persona:
    """``model.base`` named by a relative path is read from the persona file's folder, as
    ``filters.corpus`` is (it was read from the working directory: a worker started in
    another folder did not find it). A path found only from the working directory still
    works, as it did."""
    from persona.models import BUNDLED_ALIASES

    base = persona.model.base
    beside = persona.source.parent / Path(base) if persona.source else None
    if base in BUNDLED_ALIASES or Path(base).expanduser().is_absolute() or beside is None or not beside.exists():
        return persona
    return persona.model_copy(update={"model": persona.model.model_copy(update={"base": str(beside.resolve())})})


# How long a persona file must stand unchanged before a long-running reader takes a read of it
# that looks like a save caught part-way (PersonaRegistry._steady): a persona that lacks the
# settings the file ended with, or ends mid-line; and a file that is no persona at all (empty, not TOML, invalid,
# unreadable), which a slow writer (a network disk) can leave for seconds, and which costs
# nothing to wait on: the last good read answers meanwhile.
SAVE_SETTLE_S = 1.0
BROKEN_SETTLE_S = 5.0


@dataclass(frozen=True)
class _Read:
    """One read of a persona file: the persona or why it is none, and how the file stood."""

    persona: Persona | None
    problem: ConfigError | None = None
    stamp: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) as read; None: no file
    written_at: float = 0.0  # its modification time (seconds since the epoch)
    keys: tuple[str, ...] = ()  # the settings it holds in the file's order, dotted ("prompt.system")
    doubt: str = ""  # why a persona read may yet be a save caught part-way


def _read_once(path: Path) -> _Read:
    """Read a file once, noting whether it changed meanwhile."""
    try:
        with path.open("rb") as file:
            before = os.fstat(file.fileno())
            raw = file.read()
            after = os.fstat(file.fileno())
    except OSError as exc:
        problem = ConfigError(f"{path}: cannot read: {exc.strerror}")
        try:
            there = path.stat()
        except OSError:
            return _Read(None, problem)
        return _Read(None, problem, _stamp(there), there.st_mtime)
    stamp = _stamp(after)
    try:
        persona, data = _parsed(path, raw)
    except ConfigError as exc:
        return _Read(None, exc, stamp, after.st_mtime)
    doubt = ("changed while it was read" if _stamp(before) != stamp
             else "ends part-way through a line" if not raw.endswith(b"\n") else "")
    return _Read(persona, None, stamp, after.st_mtime, tuple(_keys(data)), doubt)


def _stamp(found: os.stat_result) -> tuple[int, int, int]:
    return found.st_ino, found.st_size, found.st_mtime_ns


def _keys(table: dict, within: str = "") -> Iterator[str]:
    """The dotted names of the settings a TOML table holds, its tables' included."""
    for key, value in table.items():
        yield within + key
        if isinstance(value, dict):
            yield from _keys(value, f"{within}{key}.")


def _cut_off(had: tuple[str, ...], has: tuple[str, ...]) -> list[str]:
    """The settings a file ended with (``had``, in its order) that a newer read lacks, when it
    lacks none before them: what a save caught part-way lacks. One taken out of the middle
    (an ``adapters`` line, to leave the default) is an edit."""
    there = set(has)
    lost = [key for key in had if key not in there]
    if not lost or any(key in there for key in had[had.index(lost[0]):]):
        return []
    return lost


@dataclass
class _Kept:
    """A persona's last good read, and the newer read of its file held back from serving."""

    read: _Read
    held: tuple[int, int, int] | None = None  # the stamp of the read held back
    held_since: float = 0.0  # monotonic: when this registry first saw the file so
    settles_at: float = 0.0  # monotonic: when it is taken, if the file stays so
    said: bool = False  # whether holding it back was logged

    def stood_still_s(self, read: _Read) -> float:
        """How long the file has stood as ``read`` found it: since this registry first saw it so,
        or since its modification time where that is earlier and not in the future (a file
        server's clock ahead of ours)."""
        now = time.monotonic()
        if read.stamp != self.held:
            self.held, self.held_since = read.stamp, now
        age_s = time.time() - read.written_at
        return now - (min(self.held_since, now - age_s) if age_s >= 0 else self.held_since)


@dataclass
class PersonaRegistry:
    """Every persona the service knows, found in its folders.

    A registry that is asked again and again (a worker's, a bot's, the scheduler's) keeps each
    persona's last good read, and serves it while a newer read of the file looks like a save
    caught part-way (``_steady``).
    """

    folders: list[Path]
    # Each invalid file's problem as last logged: a service asks
    # every few seconds, and said each time, the same block filled its log for good.
    _said: dict[Path, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    # Each persona's last good read, by name (``_steady``).
    _kept: dict[str, _Kept] = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> PersonaRegistry:
        return cls([BUILTIN_PERSONAS_DIR, *settings.personas_dirs, settings.user_personas_dir])

    def files(self) -> list[Path]:
        """Persona files in search order; a later one overrides an earlier namesake. Hidden files
        and editors' locks are passed over (``unread_reason``): an Emacs lock read as a persona
        file made every command, and the service's metrics, report an invalid persona while a
        file was being edited."""
        return _persona_files(self._listed()[0])

    def misnamed(self) -> list[Path]:
        """Files in the folders that are surely meant as persona files, yet never read: those
        ending in ``.toml`` in another case (``caps.TOML``)."""
        return [p for _, entries in self._listed()[0] for p in entries
                if p.suffix.lower() == ".toml" and p.suffix != ".toml" and not p.name.startswith((".", "#"))]

    def unreadable_folders(self) -> dict[Path, ConfigError]:
        """Each folder that is there but cannot be read, with what to do: none of its personas is
        served (such a folder was passed over without a word, its personas "unknown")."""
        return self._listed()[1]

    def searched(self) -> list[str]:
        """The folders searched, in order, as a message names them: "(not there)" after one that is
        not, "(cannot be read)" after one that cannot be."""
        listed, unreadable = self._listed()
        there = {folder for folder, _ in listed}

        def named(folder: Path) -> str:
            if folder in there:
                return str(folder)
            return f"{folder} ({'cannot be read' if folder in unreadable else 'not there'})"

        return [named(folder) for folder in self.folders]

    def _listed(self) -> tuple[list[tuple[Path, list[Path]]], dict[Path, ConfigError]]:
        """Each folder there with its entries, in search order, and the problem of each that cannot be read."""
        listed: list[tuple[Path, list[Path]]] = []
        unreadable: dict[Path, ConfigError] = {}
        for folder in self.folders:
            try:
                listed.append((folder, sorted(folder.iterdir())))
            except (FileNotFoundError, NotADirectoryError):
                continue  # not there: `personas list` and `validate` name a folder the settings name
            except OSError as exc:
                unreadable[folder] = ConfigError(_unreadable_folder(folder, exc))
        return listed, unreadable

    def scan(self) -> tuple[dict[str, Persona], list[ConfigError]]:
        """All valid personas by name, and the errors of the folders that cannot be read and of the
        invalid files.

        An invalid file still overrides its earlier namesakes, as in ``get``: the
        persona is not served until it is fixed. Listing the earlier file instead showed
        a persona (in `persona personas list`, on the dashboard, preloaded by workers)
        that every request then found broken.
        """
        found, invalid, unreadable = self._scan()
        return found, [*unreadable.values(), *invalid.values()]

    def _scan(self) -> tuple[dict[str, Persona], dict[Path, ConfigError], dict[Path, ConfigError]]:
        """The valid personas, the invalid files' errors and the unreadable folders'."""
        found: dict[str, Persona] = {}
        invalid: dict[Path, ConfigError] = {}
        listed, unreadable = self._listed()
        files = _persona_files(listed)
        used = {path.stem: path for path in files}  # the last namesake is the one served
        for path in files:
            try:
                persona = self._steady(path.stem, path) if used[path.stem] == path else load_persona_file(path)
            except ConfigError as exc:
                invalid[path] = exc
                found.pop(path.stem, None)
                continue
            found[persona.name] = persona
        with self._lock:  # a file removed is no persona's now: one written again is read afresh
            for name in self._kept.keys() - used.keys():
                del self._kept[name]
        return found, invalid, unreadable

    def all(self) -> dict[str, Persona]:
        """All valid personas by name; invalid files and unreadable folders are skipped, each
        logged once until it changes."""
        found, invalid, unreadable = self._scan()
        for path, problem in [*unreadable.items(), *invalid.items()]:
            # Keyed on what is said, not on the file's bytes read again: a file rewritten between
            # the two reads (an editor saving) had its old problem said twice.
            said = str(problem)
            if self._said.get(path) != said:
                log.warning("skipping %s: %s", "a folder of persona files" if path in unreadable else
                            "invalid persona file", problem)
            self._said[path] = said
        for path in self._said.keys() - invalid.keys() - unreadable.keys():  # fixed or gone: said again if broken again
            self._said.pop(path, None)
        return found

    def get(self, name: str) -> Persona:
        """One persona by name, or UnknownPersona listing the known ones and the folders searched."""
        if re.fullmatch(NAME_PATTERN, name):
            path = next((path for path in reversed(self.files()) if path.stem == name), None)
            if path is not None:
                return self._steady(name, path)
            with self._lock:  # removed: one written again is read afresh
                self._kept.pop(name, None)
        else:  # its file is skipped by every listing: "unknown persona" sent people looking for it
            named = unicodedata.normalize("NFC", name)  # macOS keeps file names decomposed
            for path in reversed(self.files()):
                if unicodedata.normalize("NFC", path.stem) == named:
                    raise ConfigError(_misnamed(path))
        found, invalid, unreadable = self._scan()
        if invalid:  # the one meant may be among them: one line, not every file's problems in full
            log.warning("%d invalid persona file(s) skipped; `persona personas validate` names the problems", len(invalid))
        # The one meant may be in a folder that cannot be read: said in full, as nothing else says it.
        raise UnknownPersona(name, sorted(found), searched=self.searched(),
                             unreadable=[str(problem) for problem in unreadable.values()])

    def _steady(self, name: str, path: Path) -> Persona:
        """The persona in ``path``, or its last good read while the file looks like a save caught
        part-way; ConfigError for a file that stays no persona.

        A save in place (truncated, then written: `cp`, `cat >`, Python's ``write_text``, many
        editors) leaves the file empty, then part-written, for a moment. A worker that read it
        then served the bundled model (every field of an empty file has its default), or the
        persona without its system prompt, until its next read a second later. So a read is
        taken at once when it is the first, or a persona that reads whole: unchanged while it
        was read, ending at a line's end, and not lacking the settings the last good read ended
        with (an edit is served at the next read, as it was, unless it removes the file's last
        settings). Any other read (no persona; cut short) is held back, the last good read
        serving meanwhile, until the file has stood as read for SAVE_SETTLE_S, or
        BROKEN_SETTLE_S for one that is no persona: a save has finished by then, and the file
        is what its author meant (one left broken is then refused with why, as before).
        "Stood" is from the file's modification time, or from this registry's first sight of
        it where that time is in the future (a file server's clock ahead of ours). Holding a
        read back is logged once, and taking the file again after that. A removed file is
        taken at once.
        """
        read = _read_once(path)
        with self._lock:
            kept = self._kept.get(name)
            doubt = self._doubt(read, kept) if kept is not None else ""
            if not doubt:
                return self._take(name, read)
            settle_s = SAVE_SETTLE_S if read.persona is not None else BROKEN_SETTLE_S
            stood_s = kept.stood_still_s(read)
            if stood_s >= settle_s:
                return self._take(name, read)
            kept.settles_at = time.monotonic() + settle_s - stood_s
            if not kept.said:
                kept.said = True
                log.log(logging.INFO if read.persona is not None else logging.WARNING,
                        "persona %s: keeping its last good read of %s while %s; a file being saved reads so for a "
                        "moment, and is taken as it reads once it has stood unchanged for %g s",
                        name, kept.read.persona.source, doubt, settle_s)
            return kept.read.persona

    def held_back_s(self, name: str) -> float | None:
        """Seconds until the read of ``name``'s file held back (``_steady``) is taken, if the file
        stays as it is (0: at the next read); None if none is held back."""
        with self._lock:
            kept = self._kept.get(name)
            if kept is None or kept.held is None:
                return None
            return max(0.0, kept.settles_at - time.monotonic())

    @staticmethod
    def _doubt(read: _Read, kept: _Kept) -> str:
        """Why ``read`` may be a save caught part-way ('' if it reads whole, or as last time)."""
        if read.persona is not None and read.persona == kept.read.persona:
            return ""
        if read.stamp is None:  # gone: removed (an editor's save never leaves it so for long)
            return ""
        if read.problem is not None:
            return f"the file reads as no persona ({str(read.problem).removeprefix(f'{kept.read.persona.source}: ')})"
        if lost := _cut_off(kept.read.keys, read.keys):
            shown = ", ".join(lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
            return f"the file lacks the settings it ended with ({shown})"
        return f"the file {read.doubt}" if read.doubt else ""

    def _take(self, name: str, read: _Read) -> Persona:
        """Serve ``read`` from now on: its persona, or ConfigError with its problem."""
        kept = self._kept.pop(name, None)
        if kept is not None and kept.said:
            log.info("persona %s: its file is taken as it now reads (%s)", name,
                     "a persona" if read.persona is not None else "no persona")
        if read.persona is None:
            raise read.problem
        self._kept[name] = _Kept(read)
        return read.persona


def _persona_files(listed: list[tuple[Path, list[Path]]]) -> list[Path]:
    """The persona files among the folders' entries, in search order."""
    return [p for _, entries in listed for p in entries if p.name.endswith(".toml") and not unread_reason(p)]


def _unreadable_folder(folder: Path, exc: OSError) -> str:
    """What to do about a folder of persona files that cannot be read."""
    said = f"{folder}: cannot read this folder of persona files ({exc.strerror or exc}), so none of its personas is served"
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return f"{said}; mend it, or keep the persona files in a folder that can be read"
    return (f"{said}; let the user persona runs as{_user()} read it and the folders above it: change their "
            "permissions (e.g. chmod a+rx) or owner")


def _user() -> str:
    """' (name)' of the user this process runs as, '' where that cannot be told."""
    try:
        import pwd

        return f" ({pwd.getpwuid(os.geteuid()).pw_name})"
    except (ImportError, KeyError):  # not POSIX, or a uid with no name (a container's)
        return f" (uid {os.geteuid()})" if hasattr(os, "geteuid") else ""


def _suggested_name(word: str) -> str:
    """A persona name close to ``word`` ("Ünïcode" → "unicode", "My Bot" → "my-bot"), "" if none."""
    plain = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode().lower()
    name = re.sub(r"[^a-z0-9_-]+", "-", plain).strip("-_")[:64]
    return name if re.fullmatch(NAME_PATTERN, name) else ""


def _misnamed(path: Path) -> str:
    """What to do with a persona file whose name is no persona name."""
    example = _suggested_name(path.stem)
    rename = f"rename it to {example}.toml" if example else "rename it"
    return f"{path}: the file exists, but {path.stem!r} is not a persona name: {NAME_RULE}; {rename}"

