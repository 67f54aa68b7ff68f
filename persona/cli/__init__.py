"""The ``persona`` command line: the operator's whole surface.

Each module adds its commands to ``app``; add a new area by writing a module with a
``register(app)`` function and naming it in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import os
import select
import sys

import rich.console
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
    "persona.cli.corpus_cmd",
    "persona.cli.train_cmd",
    "persona.cli.eval_cmd",
    "persona.cli.generate_cmd",
    "persona.cli.export_cmd",
    "persona.cli.checkpoints_cmd",
    "persona.cli.dashboard_cmd",
    "persona.cli.settings_cmd",
    "persona.cli.bench",
]

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def _print_version(wanted: bool) -> None:
    if wanted:
        from persona.version import persona_version

        print(f"persona {persona_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print persona's version (with its git commit, run from a checkout) and exit."),
) -> None:
    pass


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


# What a value's type reads as in --help, as click has always written it: this typer
# writes its own labels (``<str>``, ``<int range>``, ``<list[str]>``, and ``<bool>`` beside
# every flag, which takes no value at all).
_TYPE_NAMES = {
    "str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN", "path": "PATH", "Path": "PATH",
    "dir": "DIRECTORY", "file": "FILE", "datetime": "DATETIME", "UUID": "UUID",
}


def _plain_type(label: str) -> str:
    """A typer type label (``<int range>``, ``<list[Path]>``, ``<a|b>``) as click writes it."""
    name = label.removeprefix("<").removesuffix(">").removesuffix(" range")
    if name.startswith("list[") and name.endswith("]"):
        name = name[len("list[") : -1]
    if "|" in name:  # choices
        return f"[{name}]"
    return _TYPE_NAMES.get(name, name.upper())


def _plain_placeholders(param) -> None:  # a typer parameter, as typer builds it
    """Usage lines and help as click writes them: ``persona swap [OPTIONS] PERSONA VERSION|PATH``
    (this typer wrote ``{PERSONA} {VERSION|PATH}``, and lowercase names: ``{persona} {text}``),
    a flag with no type beside it, a value's type as ``INTEGER``. Older typers, which write
    these as click does, have none of the hooks and are left alone."""
    if not hasattr(type(param), "display_type") or "display_type" in vars(param):  # an old typer, or done
        return
    typed = param.display_type
    if getattr(param, "is_flag", False):
        param.display_type = lambda ctx: None
    else:
        param.display_type = lambda ctx: _plain_type(typed(ctx))
    if param.param_type_name == "argument":
        param.metavar = param.metavar or param.name.upper()  # also how "Missing argument 'ID'." names it
        shown = param.metavar if param.required else f"[{param.metavar}]"
        shown += "..." if param.nargs != 1 else ""
        param.get_usage_pieces = lambda ctx: [shown]


def _tidy_help(command):  # a click command, as typer builds it
    """``command`` and its subcommands: their help reflowed, their placeholders plain."""
    command.help = _reflowed(command.help)
    for param in command.params:
        _plain_placeholders(param)
    help_option = command.get_help_option  # made when first asked for (--help itself, a flag)

    def plain_help_option(ctx):
        option = help_option(ctx)
        if option is not None:
            _plain_placeholders(option)
        return option

    command.get_help_option = plain_help_option
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)
    return command


# A reader that stops reading (`persona checkpoints sage | head -1`, `| grep -m1`) ends
# the command quietly, with no error text, and with status 0: the reader had what it
# wanted. Click exited 1 there, and so did rich's consoles, which failed every script under
# `set -o pipefail`; git and ls end by SIGPIPE (status 141), which fails such a script too.
# A command that had already failed keeps its own status.


def _pipe_closed(fd: int) -> bool:
    """Whether ``fd`` is a pipe whose reader has closed it (poll says POLLERR)."""
    if not hasattr(select, "poll"):  # no poll (Windows): a broken pipe there is taken as stdout's
        return fd == 1
    poller = select.poll()
    try:
        poller.register(fd, select.POLLOUT)
    except (OSError, ValueError):
        return False
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _drop_output_nobody_reads() -> bool:
    """Point standard output and error at /dev/null where their readers are gone, so that
    what is still buffered goes nowhere, not into an "Exception ignored ... BrokenPipeError"
    note at exit (status 120); whether standard output's was."""
    closed = [fd for fd in (1, 2) if _pipe_closed(fd)]
    if closed:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in closed:
            os.dup2(devnull, fd)
        os.close(devnull)
    return 1 in closed


def _on_broken_pipe(console: rich.console.Console) -> None:
    """A rich console (ours, or typer's for --help) whose reader is gone: standard output's
    ends the command with status 0; standard error's is dropped and the command goes on
    to its own status. Rich's default is ``SystemExit(1)``."""
    console.quiet = True
    _drop_output_nobody_reads()
    if not console.stderr:
        raise SystemExit(0)


def _stops_when_the_reader_goes(invoke):
    """``invoke`` (a click command's), ending with status 0 when standard output's reader
    goes while it writes with print() (click would exit 1); a broken pipe elsewhere (a
    socket) is left to fail as it does."""

    @functools.wraps(invoke)
    def wrapper(ctx):
        try:
            return invoke(ctx)
        except BrokenPipeError:
            if not _drop_output_nobody_reads():
                raise
            raise SystemExit(0) from None

    return wrapper


def _flush_stdout() -> None:
    """Write out what print() left buffered now, while a reader gone can be told apart."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_output_nobody_reads()


def _replace_what_cannot_be_shown() -> None:
    """Standard output and error, in an encoding that cannot write every character (a latin-1
    or cp1252 terminal), write "?" for those it cannot: a description holding "—", or
    validate's "✓", ended the command in a UnicodeEncodeError traceback. Their encoding is
    kept, and a stream set to handle errors its own way (surrogateescape) is left so."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="replace")


def main() -> None:
    """Entry point of the ``persona`` console script."""
    _replace_what_cannot_be_shown()
    rich.console.Console.on_broken_pipe = _on_broken_pipe  # the hook rich offers; see its docstring
    command = _tidy_help(typer.main.get_command(app))
    command.invoke = _stops_when_the_reader_goes(command.invoke)
    try:
        _run(command, sys.argv[1:])
    finally:
        _flush_stdout()
        from persona.cli.common import forget_interrupts_caught

        forget_interrupts_caught()


def _run(command, args: list[str]) -> None:
    from persona.cli.common import err_console, usage_failure, wants_json

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
