"""The ``persona`` command line: the operator's whole surface.

Each module adds its commands to ``app``; add a new area by writing a module with a
``register(app)`` function and naming it in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import typer
import typer.main

__all__ = ["app", "main"]

app = typer.Typer(
    name="persona",
    help="Turn an author's writing into a chatbot persona and run it for real people.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = [
    "persona.cli.serve",
    "persona.cli.talk",
    "persona.cli.personas_cmd",
    "persona.cli.queue_cmd",
    "persona.cli.adapters_cmd",
    "persona.cli.posting_cmd",
    "persona.cli.train_cmd",
    "persona.cli.checkpoints_cmd",
    "persona.cli.dashboard_cmd",
    "persona.cli.bench",
]

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def _reflowed(text: str | None) -> str | None:
    """Help text with each paragraph's lines joined, so the terminal wraps it at its own
    width: this typer keeps a docstring's line breaks past the first paragraph, and an
    80-column terminal showed them ragged ("...runs when / its / token is set").
    Paragraphs laid out by hand (indented lines, lists, ``\\b``) stay as written."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(
        p if any(line.startswith((" ", "- ", "* ", "\b")) for line in p.splitlines()) else " ".join(p.split("\n"))
        for p in paragraphs
    )


def _reflow_help(command):  # a click command, as typer builds it
    """``command`` and its subcommands, their help reflowed."""
    command.help = _reflowed(command.help)
    for sub in getattr(command, "commands", {}).values():
        _reflow_help(sub)
    return command


def main() -> None:
    """Entry point of the ``persona`` console script."""
    from persona.cli.common import err_console, usage_failure, wants_json

    command = _reflow_help(typer.main.get_command(app))
    args = sys.argv[1:]
    if not wants_json(args):
        command(args=args, prog_name="persona")
        return
    # Left to click, a bad option value printed usage text on stderr and nothing on
    # stdout: a script reading the JSON could not tell why. Here it is one JSON failure.
    try:
        code = command.main(args=args, prog_name="persona", standalone_mode=False)
    except typer.TyperException as exc:  # an unknown option, a value that is not one
        code = usage_failure(exc).exit_code
    except typer.Abort:  # input ended at a prompt
        err_console.print("Aborted!", markup=False)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
