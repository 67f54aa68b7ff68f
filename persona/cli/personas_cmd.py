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
        # One line each, whatever the file holds: a multi-line description (a TOML """
        # string) or a tab in it used to split a persona across lines and columns.
        print("\t".join(" ".join(field.split()) for field in (name, weights, persona.description)))
    if problems:
        err_console.print(f"[yellow]{len(problems)} invalid persona file(s); see `persona personas validate`[/yellow]")


@personas_app.command()
@friendly_errors
def show(name: str = typer.Argument(..., help="the persona's name")) -> None:
    """Everything a persona file says, defaults filled in."""
    persona = PersonaRegistry.from_settings(get_settings()).get(name)
    import tomli_w

    data = persona.model_dump(mode="json", exclude_none=True)
    # Where it came from as a TOML comment: the output is itself a valid persona file
    # (a plain header line made `show sage > sage.toml` unreadable).
    source = " ".join(str(persona.source).split())
    print(f"# {persona.name}, from {source}, defaults filled in\n{tomli_w.dumps(data)}", end="")


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
    # Of namesakes in several folders only the last is used: say so, or a fix made to
    # the other file seems to change nothing.
    searched = registry.files()
    winner = {path.stem: path.resolve() for path in searched}
    searched_here = {path.resolve() for path in searched}
    bad = 0
    for path in files:
        try:
            load_persona_file(path)
        except ConfigError as exc:
            bad += 1
            err_console.print(f"[red]✗[/red] {escape(str(exc))}", highlight=False)
        else:
            here = path.resolve()
            unused = here in searched_here and winner[path.stem] != here
            note = f" [yellow](not used: {escape(str(winner[path.stem]))} overrides it)[/yellow]" if unused else ""
            console.print(f"[green]✓[/green] {escape(str(path))}{note}", highlight=False)
    if bad:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(personas_app, name="personas")
