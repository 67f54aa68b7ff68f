"""`persona personas ...`: listing, showing and validating persona files."""

from __future__ import annotations

import typer
from rich.markup import escape

from persona.cli.common import console, err_console, friendly_errors, get_settings
from persona.personas import PersonaRegistry

personas_app = typer.Typer(help="List, show and validate persona files.", no_args_is_help=True)


@personas_app.command("list")
@friendly_errors
def list_personas() -> None:
    """One persona per line: name, base model and checkpoint, description."""
    registry = PersonaRegistry.from_settings(get_settings())
    found, problems = registry.scan()
    for name, persona in sorted(found.items()):
        weights = persona.model.base + (f"+{persona.model.checkpoint}" if persona.model.checkpoint else "")
        print(f"{name}\t{weights}\t{persona.description}")
    if problems:
        err_console.print(f"[yellow]{len(problems)} invalid persona file(s); see `persona personas validate`[/yellow]")


@personas_app.command()
@friendly_errors
def show(name: str = typer.Argument(..., help="the persona's name")) -> None:
    """Everything a persona file says, defaults filled in."""
    persona = PersonaRegistry.from_settings(get_settings()).get(name)
    console.print(f"[bold]{persona.name}[/bold]  ({persona.source})")
    import tomli_w

    data = persona.model_dump(mode="json", exclude_none=True)
    print(tomli_w.dumps(data))


@personas_app.command()
@friendly_errors
def validate(
    paths: list[str] = typer.Argument(None, help="files to check (default: every persona file)"),
) -> None:
    """Check persona files; each problem names the file and the exact field."""
    from pathlib import Path

    from persona.errors import ConfigError
    from persona.personas import load_persona_file

    registry = PersonaRegistry.from_settings(get_settings())
    files = [Path(p) for p in paths] if paths else registry.files()
    bad = 0
    for path in files:
        try:
            load_persona_file(path)
        except ConfigError as exc:
            bad += 1
            err_console.print(f"[red]✗[/red] {escape(str(exc))}", highlight=False)
        else:
            console.print(f"[green]✓[/green] {escape(str(path))}")
    if bad:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(personas_app, name="personas")
