"""Every `persona ...` line the READMEs show parses with the CLI's own parser (nothing runs):
an option renamed or a command moved breaks this test, not a newcomer's first try."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from persona.cli import app

ROOT = Path(__file__).resolve().parent.parent
READMES = [ROOT / "README.md", ROOT / "bench" / "README.md"]
# A command line as a reader would type it: after an optional prompt, folder and settings.
COMMAND = re.compile(r"^\s*(?:\$\s+)?(?:\S*/)?(?:[A-Z][A-Z0-9_]*=\S+\s+)*persona\s+(?P<args>.*)$")


def shown_commands(readme: Path) -> list[tuple[int, str]]:
    """(line number, arguments) of each `persona` command in the file's code blocks."""
    found, in_block = [], False
    for number, line in enumerate(readme.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif in_block and (match := COMMAND.match(line)):
            found.append((number, match["args"]))
    return found


def variants(args: str) -> list[list[str]]:
    """The README's notation made concrete: `[--json]` is given, `A | B` is each of A and B,
    `FILE|FOLDER` is FILE, `ID...` is one ID."""
    words = shlex.split(args.replace("[", " ").replace("]", " "), comments=True)
    head, alternatives, current = [], [], None
    for word in words:
        if word == "|":
            current = []
            alternatives.append(current)
        elif current is not None:
            current.append(word)
        else:
            head.append(word)
    if alternatives:  # `retry ID | --all --yes`: the part before the first `|` is one choice
        command_words = [w for w in head if not w.isupper() and not w.startswith("-")]
        first = head[len(command_words):]
        choices = [first, *alternatives]
        head = command_words
    else:
        choices = [[]]
    return [[w.split("|")[0].removesuffix("...") for w in head + choice] for choice in choices]


def parse(args: list[str]) -> None:
    """Parse as `persona ARGS` would, down to the last subcommand, without invoking it."""
    command = get_command(app)
    context = command.make_context("persona", list(args))
    while hasattr(command, "resolve_command"):  # a group (typer's own click, not click's)
        rest = [*context._protected_args, *context.args]
        name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(name, rest, parent=context)


CASES = [(readme, number, args) for readme in READMES for number, args in shown_commands(readme)]


def test_the_readmes_show_commands():
    assert len([c for c in CASES if c[0].name == "README.md" and c[0].parent == ROOT]) > 30


@pytest.mark.parametrize(("readme", "number", "args"), CASES,
                         ids=[f"{r.relative_to(ROOT)}:{n}" for r, n, _ in CASES])
def test_a_command_the_readme_shows_parses(readme: Path, number: int, args: str):
    for words in variants(args):
        try:
            parse(words)
        except typer.BadParameter as exc:
            if "does not exist" not in exc.format_message():  # a reader's own file, named as an example
                pytest.fail(f"{readme.name}:{number}: `persona {' '.join(words)}`: {exc.format_message()}")
        except typer.TyperException as exc:  # an unknown command or option, a value that is not one
            pytest.fail(f"{readme.name}:{number}: `persona {' '.join(words)}`: {exc.format_message()}")
