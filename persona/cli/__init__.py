"""The ``persona`` command line: the operator's whole surface.

Each module adds its commands to ``app``; add a new area by writing a module with a
``register(app)`` function and naming it in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import importlib

import typer

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


def main() -> None:
    """Entry point of the ``persona`` console script."""
    app()
