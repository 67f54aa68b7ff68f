"""What every command shares: the settings, the console, and friendly errors.

An error ends a command with exit status 1 (2 for a command line that is wrong, as click
has it) and one red line on stderr, or, when the command was given ``--json`` (its
``json_output`` option), with the same status and one JSON object on stdout instead, shaped as a failed reply's: ``{"ok": false, "error": {"kind": ...,
"message": ...}}``, where ``kind`` names the class in ``persona.errors`` (``ConfigError``
for settings that cannot be read, or an optional part whose extra is not installed,
``UsageError`` for a command line that click refused: an unknown option, a value that is not one). A ConfigError ending a service that
`persona up` runs exits with ``persona.supervisor.CONFIG_ERROR_EXIT_STATUS`` instead, which
tells the supervisor that starting it again would only fail again.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

import redis
import typer
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from persona.errors import (
    ConfigError,
    PersonaError,
    QueueError,
    RedisUnavailable,
    UsageError,
)
from persona.extras import EXTRA_OF_MODULE, install_command
from persona.logs import hide_secrets, secrets_of
from persona.settings import Settings
from persona.settings_sources import (
    SETTINGS_READ_ERRORS,
    explain_settings_error,
    unknown_variables,
)
from persona.supervisor import SERVICE_ENV, config_error_exit_status

__all__ = [
    "EXTRA_OF_MODULE",
    "console",
    "err_console",
    "explain_redis_error",
    "failure_kind",
    "forget_interrupts_caught",
    "friendly_errors",
    "get_settings",
    "json_error",
    "local_time",
    "print_whole",
    "usage_failure",
    "wants_json",
    "warn_of_unknown_variables",
]

# A command line that is wrong ends the command with click's status, whoever refused it.
USAGE_EXIT_STATUS = 2

console = Console()
err_console = Console(stderr=True)
# Written into a pipe or a log, a line stays whole (a terminal still wraps at its width).
for _console in (console, err_console):
    _console.soft_wrap = not _console.is_terminal

# Wide enough for any row a table holds: the width a table is measured at, into a pipe.
UNBOUNDED_WIDTH_CHARS = 1_000_000

P = ParamSpec("P")
R = TypeVar("R")

# Whether the command running now was asked for JSON (set by ``friendly_errors``).
_json_errors: contextvars.ContextVar[bool] = contextvars.ContextVar("json_errors", default=False)


def _without_secrets(message: str) -> str:
    """``message`` with the settings' passwords and tokens hidden, once the settings are read:
    a server's own words may quote them (a Redis older than HELLO quotes the client's
    greeting back, password and all), and an error line ends up in CI logs and bug reports."""
    if not get_settings.cache_info().currsize:  # not read (or not readable): nothing to hide yet
        return message
    # A URL's password is hidden on its own; the rest says where Redis is.
    return hide_secrets(message, (secret for secret in secrets_of(get_settings()) if "://" not in secret))


def json_error(message: str, kind: str) -> dict[str, str]:
    """The ``error`` of a failure under ``--json``, ``{"kind": ..., "message": ...}``, the settings'
    secrets hidden: a failing command prints it beside ``"ok": false``, and a failed outcome (a
    post, samples not all written) beside its own fields."""
    return {"kind": kind, "message": _without_secrets(message)}


def _fail(message: str, kind: str, status: int = 1) -> typer.Exit:
    """Say why the command failed, as the command's output asks for; the exit to raise."""
    message = _without_secrets(message)
    if _json_errors.get():
        with contextlib.suppress(BrokenPipeError):  # its reader is gone (`| head -0`): the status still says it failed
            print(json.dumps({"ok": False, "error": json_error(message, kind)}, ensure_ascii=False), flush=True)
    else:
        # Escaped: a message quotes paths and text that may hold brackets ("my [draft] notes").
        err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(status)


def failure_kind(exc: PersonaError | redis.exceptions.RedisError) -> str:
    """The kind a failure is printed with under ``--json``: a project error's class, or for Redis,
    RedisUnavailable where it could not be reached and QueueError where it refused a command."""
    if isinstance(exc, PersonaError):
        return type(exc).__name__
    lost = isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
    return (RedisUnavailable if lost else QueueError).__name__


def wants_json(args: Sequence[str]) -> bool:
    """Whether a command line asks for JSON: ``--json`` among its options (before any ``--``)."""
    options = args[: args.index("--")] if "--" in args else args
    return "--json" in options


def usage_failure(exc: typer.TyperException) -> typer.Exit:
    """A command line that click refused (under ``--json``), said as one JSON failure; the exit to raise."""
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)  # a usage error knows its command; a missing file does not
    if ctx is not None:  # after click's question ("Did you mean 'ask'?"), a sentence of its own
        message = message.rstrip(".")
        joined = " See" if message.endswith("?") else "; see"
        message = f"{message}{joined} `{ctx.command_path} --help`"
    as_json = _json_errors.set(True)
    try:
        return _fail(message, UsageError.__name__, USAGE_EXIT_STATUS)
    finally:
        _json_errors.reset(as_json)


@functools.cache
def get_settings() -> Settings:
    """The settings, read once per process; one that cannot be read ends the command (a ConfigError).
    A PERSONA_ variable that is no setting is warned of first, but for in a service `persona up`
    runs: `up` warned of it as it started, and each service would say it again."""
    try:
        if os.environ.get(SERVICE_ENV) != "1":
            warn_of_unknown_variables()
        return Settings()
    except SETTINGS_READ_ERRORS as exc:
        # The value itself is never shown: it may be a token.
        raise _fail(explain_settings_error(exc), ConfigError.__name__, config_error_exit_status()) from None


def warn_of_unknown_variables() -> None:
    """One warning line on stderr for each PERSONA_ variable that is no setting (a misspelling,
    which was silently ignored, or a setting of a newer version), with the nearest setting."""
    for line in unknown_variables():
        err_console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False)


def print_whole(*renderables: RenderableType) -> None:
    """Print to standard output: on a terminal, at its width; into a pipe or a file, each
    table as wide as its cells need, so that each row is one line with every cell whole.

    Fitted to a pipe's 80 columns, a table cut a worker's id to "vm-56a5…" and what it
    serves to "sage@ba…", and folded a dead letter's reason a word a line. (The posts
    listings, in posting_cmd, write plain columns into a pipe instead: the same idea,
    one whole line a row; these keep their frame, which scripts already read.)
    """
    if not console.is_terminal:
        for table in _tables(renderables):
            table.width = Measurement.get(console, console.options.update_width(UNBOUNDED_WIDTH_CHARS), table).maximum
    console.print(*renderables)


def _tables(renderables) -> list[Table]:
    """The tables among ``renderables``, those inside a Group too."""
    found = []
    for item in renderables:
        if isinstance(item, Table):
            found.append(item)
        elif isinstance(item, Group):
            found += _tables(item.renderables)
    return found


def local_time(at: float) -> str:
    """A timestamp as the tables show it (this machine's time, to the second); "-" for none."""
    return dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def explain_redis_error(exc: redis.exceptions.RedisError) -> str:
    """What a Redis failure past the connection's retries means, and what to do about it."""
    said = str(exc).rstrip(".")
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        if (embedded := _lost_embedded(said, exc)) is not None:
            return embedded
        if get_settings.cache_info().currsize and get_settings().redis_url is not None:  # not one `up` starts
            return (
                f"lost the connection to Redis ({said}); is the Redis that PERSONA_REDIS_URL names still "
                "running, and reachable from here? `persona queue stats` checks"
            )
        return (
            f"lost the connection to Redis ({said}); is it still running, at the address "
            "PERSONA_REDIS_URL gives if set? `persona up` starts one; `persona queue stats` checks"
        )
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return f"the server at PERSONA_REDIS_URL does not answer as Redis does ({said}); is that Redis's address?"
    if "MISCONF " in said:  # it refuses every write, PING too, until it can save again
        log_file = ("its log, " + str(get_settings().data_dir.absolute() / "redis" / "redis.log")
                    if get_settings.cache_info().currsize and get_settings().redis_url is None else "the Redis server's log")
        return (f"Redis cannot write its data to disk (full, or not writable), so it refuses every change until it "
                f"can: free space or fix the folder's permissions; {log_file} says which ({said})")
    refused = _refused_for(exc)
    if refused is not None:
        return refused
    return f"Redis refused a command ({said}); `persona queue stats` shows the state it is in"


def _refused_for(exc: redis.exceptions.RedisError) -> str | None:
    """A refusal that is Redis's state to fix (full, a user its ACL denies, a replica), said
    with the user and, for a full one, its maxmemory (asked of it once, briefly); else None."""
    from persona.connection import redis_url
    from persona.redis_refusals import is_full, refusal_text, user_of

    url = None
    if get_settings.cache_info().currsize:
        with contextlib.suppress(PersonaError):
            url = redis_url(get_settings())
    max_bytes = _maxmemory(url) if url and is_full(exc) else None
    return refusal_text(exc, user=user_of(url) if url else "default", max_bytes=max_bytes)


def _maxmemory(url: str) -> int | None:
    """The maxmemory of the Redis at ``url`` (INFO answers while it is full); None where it cannot be read."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as client:
            return int(client.info("memory").get("maxmemory", 0)) or None
    except (redis.exceptions.RedisError, ValueError, TypeError):
        return None


def _lost_embedded(said: str, exc: redis.exceptions.RedisError | None = None) -> str | None:
    """A lost connection to the embedded Redis, said with what became of it (once the
    settings are read and name no PERSONA_REDIS_URL); None otherwise. One whose process runs
    but that timed out (stopped by a signal, stuck) or loads its data is said so: it was said
    to have stopped, with `persona up` to start again, though `persona up` was running."""
    if not get_settings.cache_info().currsize:
        return None
    settings = get_settings()
    if settings.redis_url is not None:
        return None
    from persona.embedded_locks import server_pid
    from persona.embedded_redis import find_embedded_url

    if isinstance(exc, redis.exceptions.TimeoutError | redis.exceptions.BusyLoadingError):
        from persona.connection import not_ready

        if (pid := server_pid(settings.data_dir)) is not None:
            return not_ready(settings.data_dir, pid)

    lost = f"lost the connection to the embedded Redis of data directory {settings.data_dir} ({said})"
    if find_embedded_url(settings.data_dir) is None:
        return (
            f"{lost}: it has stopped, as it does when the last `persona up`, `persona worker` or "
            "`persona dashboard` serving on it stops (what was queued is kept with its data). "
            "Start `persona up` (or `persona worker`) again, then try again"
        )
    return f"{lost}; it is running again now (this command's connections find it where it is), so try again"


def friendly_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the project's errors, Redis failing under them, and an optional part whose extra
    is not installed (a ModuleNotFoundError of a module in ``EXTRA_OF_MODULE``, said as a
    ConfigError naming the extra) into one red line (one JSON object on stdout for a command
    given ``--json``) and exit status 1 (a UsageError: 2; a ConfigError in a service `persona
    up` runs: ``CONFIG_ERROR_EXIT_STATUS``), no traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        as_json = _json_errors.set(bool(kwargs.get("json_output")))
        try:
            return func(*args, **kwargs)
        except PersonaError as exc:
            raise _fail(str(exc), type(exc).__name__, _exit_status(exc)) from None
        except redis.exceptions.RedisError as exc:  # Redis stopped, or never was Redis, mid-command
            raise _fail(explain_redis_error(exc), failure_kind(exc)) from None
        except ModuleNotFoundError as exc:
            extra = EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])
            if extra is None:  # not an optional part's: a broken install or a bug, traceback and all
                raise
            raise _fail(_needs_extra(extra, exc.name), ConfigError.__name__, config_error_exit_status()) from None
        finally:
            _json_errors.reset(as_json)

    return wrapper


def _needs_extra(extra: str, module: str) -> str:
    """What to install for a command that stopped on ``module`` missing: its extra, by name.
    The traceback named the module alone (aiohttp, for `persona discord`), never the extra."""
    return f"this needs the {extra} extra, which is not installed (no module named {module!r}): {install_command(extra)}"


def _exit_status(exc: PersonaError) -> int:
    """The status a command ends with on ``exc``: a wrong command line's is click's, 2, with
    ``--json`` or without; a ConfigError in a service `persona up` runs tells the supervisor not
    to start it again; any other failure's is 1."""
    if isinstance(exc, UsageError):
        return USAGE_EXIT_STATUS
    return config_error_exit_status() if isinstance(exc, ConfigError) else 1


def forget_interrupts_caught() -> None:
    """Clear CPython's note that a KeyboardInterrupt went unhandled; ``main`` calls it as a
    command ends, and one that really is unhandled is noted again as it leaves ``main``.
    Stop signals raise it wherever the main thread is (a worker's, `ask`'s SIGTERM), and
    torch's and transformers' imports, as a model loads, run thousands of pieces of code that
    exec() runs from a string (dataclasses' and namedtuples' methods; `gguf`'s, just after
    "converting the bundled model"). Such code that it leaves is noted as unhandled, however
    it is caught later, and under `python -m` (how `persona up` runs workers) the process then
    ended itself with SIGINT at exit: status -2, no traceback. Each exec() of a string clears
    the note."""
    exec("", {})  # noqa: S102 - an empty program, run for that side effect
