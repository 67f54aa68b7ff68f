"""`persona settings`: every setting, the value in effect, where it came from, and what it does.

Secrets (every ``SecretStr`` setting: tokens, passwords, keys) are never shown: a set one
reads ``set``, and a URL (PERSONA_REDIS_URL) is shown with its password as ``***``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated

import typer
from pydantic import BaseModel, SecretStr
from pydantic_core import to_jsonable_python
from rich.table import Table
from rich.text import Text

from persona.cli.common import friendly_errors, print_whole, warn_of_unknown_variables
from persona.errors import ConfigError, UsageError
from persona.logs import describe_url
from persona.settings import Settings, env_name, setting_fields
from persona.settings_sources import (
    SETTINGS_READ_ERRORS,
    explain_settings_error,
    nearest_variables,
    place_in_words,
    where_set,
)

__all__ = ["SettingRow", "register", "show_settings"]

DEFAULT_SOURCE = "default"
TOP_LEVEL = "top level"


@dataclass(frozen=True)
class SettingRow:
    """One setting as shown: JSON-able values, secrets already hidden."""

    section: str
    variable: str
    value: object
    default: object
    source: str
    description: str


@friendly_errors
def show_settings(
    names: Annotated[list[str] | None, typer.Argument(
        metavar="NAME", help="only variables holding one of these, in any case (telegram, max_batch)"
    )] = None,
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Every setting: its variable, the value in effect and where it came from, and what it does."""
    rows = _rows(_read())
    if names:
        rows = _matching(rows, names)
    if json_output:
        fields = ("value", "default", "source", "description")
        print(json.dumps({row.variable: {f: getattr(row, f) for f in fields} for row in rows}, ensure_ascii=False))
        return
    print_whole(*_tables(rows))


def _read() -> Settings:
    """The settings; ones that cannot be read are a ConfigError naming each variable, and
    where it was set (the question an operator came here with). A PERSONA_ variable that is no
    setting is warned of first, with the nearest one."""
    try:
        warn_of_unknown_variables()
        return Settings()
    except SETTINGS_READ_ERRORS as exc:
        explained = explain_settings_error(exc)
        if isinstance(exc, UnicodeDecodeError | OSError):  # where_set could read no more than Settings()
            raise ConfigError(explained) from None
        raise ConfigError(_with_places(explained)) from None


def _with_places(explained: str) -> str:
    """Each "PERSONA_X: ..." of an explanation as "PERSONA_X (set in .env): ..."."""
    places = {env_name(names): place for names, place in where_set().items()}
    parts = []
    for part in explained.split("; "):
        variable, colon, rest = part.partition(":")
        if colon and variable in places:
            part = f"{variable} (set in {place_in_words(places[variable])}):{rest}"
        parts.append(part)
    return "; ".join(parts)


def _rows(settings: Settings) -> list[SettingRow]:
    places = where_set()
    rows = []
    for names, field in setting_fields():
        value: object = settings
        for name in names:
            value = getattr(value, name)
        secret = _is_secret(field.annotation)
        rows.append(SettingRow(
            section=names[0] if len(names) > 1 else TOP_LEVEL,
            variable=env_name(names),
            value=_shown(value, secret=secret),
            default=_shown(field.get_default(call_default_factory=True), secret=secret),
            source=places.get(names, DEFAULT_SOURCE),
            description=field.description or "",
        ))
    return rows


def _is_secret(annotation: object) -> bool:
    return annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ())


def _shown(value: object, *, secret: bool = False) -> object:
    """``value`` as JSON, a secret as "set" or "unset" (a URL with its password hidden)."""
    if isinstance(value, SecretStr):
        raw = value.get_secret_value()
        return describe_url(raw) if "://" in raw else "set"
    if value is None and secret:
        return "unset"
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return to_jsonable_python(value)


def _matching(rows: list[SettingRow], filters: list[str]) -> list[SettingRow]:
    """The rows whose variable holds one of ``filters`` (any case); a filter that none holds
    is a UsageError naming the nearest variables."""
    unmatched = [f for f in filters if not any(f.lower() in row.variable.lower() for row in rows)]
    if unmatched:
        variables = [row.variable for row in rows]
        said = "; ".join(_no_such(f, variables) for f in unmatched)
        raise UsageError(f"{said}; `persona settings` with no NAME lists every one")
    return [row for row in rows if any(f.lower() in row.variable.lower() for f in filters)]


def _no_such(word: str, variables: list[str]) -> str:
    nearest = nearest_variables(word, variables)
    meant = f" (did you mean {' or '.join(nearest)}?)" if nearest else ""
    return f"no setting's variable holds {word!r}{meant}"


def _tables(rows: list[SettingRow]) -> list[Table]:
    """One table per section, in the model's order."""
    tables: dict[str, Table] = {}
    for row in rows:
        if row.section not in tables:
            table = tables[row.section] = Table(title=row.section, title_justify="left", header_style="bold")
            table.add_column("variable", no_wrap=True)
            table.add_column("value")
            table.add_column("from", no_wrap=True)
            table.add_column("what")
        tables[row.section].add_row(
            Text(row.variable), Text(_plain(row.value)), _source_text(row), Text(row.description)
        )
    return list(tables.values())


def _source_text(row: SettingRow) -> Text:
    if row.source == DEFAULT_SOURCE:
        return Text(f"({DEFAULT_SOURCE})", style="dim")
    text = Text(row.source, style="bold")
    if row.default not in ("unset", row.value):  # what it would be unset; secrets have none to show
        text.append(f" (default {_plain(row.default)})", style="dim")
    return text


def _plain(value: object) -> str:
    if isinstance(value, str):
        return value
    return "unset" if value is None else json.dumps(value, ensure_ascii=False)


def register(app: typer.Typer) -> None:
    app.command("settings")(show_settings)
