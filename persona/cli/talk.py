"""`persona ask` and `persona chat`: talking to a persona through the queue."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator

import redis
import typer
from typer.core import TyperCommand

try:  # typer 0.2x carries its own click; older typers use click itself
    from typer._click.exceptions import NoSuchOption
except ImportError:  # pragma: no cover - depends on the typer installed
    from click.exceptions import NoSuchOption

from persona import heartbeat
from persona.cli.common import (
    console,
    err_console,
    explain_redis_error,
    friendly_errors,
    get_settings,
)
from persona.connection import connect, retrying_until
from persona.contract import (
    MAX_NEW_TOKENS,
    MAX_SEED,
    ErrorKind,
    GenerationReply,
    GenerationRequest,
    Message,
    SamplingOverrides,
)
from persona.errors import PersonaError, RequestFailed
from persona.personas import PersonaRegistry
from persona.queue import QueueClient
from persona.settings import Settings
from persona.validation import LATEST_DEADLINE_AFTER_S, check_request, has_visible_text

DEFAULT_PERSONA = "sage"  # the bundled persona `persona chat` talks to when none is named
CHAT_COMMANDS = "/reset forgets the conversation, /help shows this, /quit or Ctrl-D leaves"
AS_MESSAGE = "to send a line that starts with a / as a message, start it with // instead"
WORKER_STARTERS = "`persona up` or `persona worker` starts one"
FROM_STDIN = "-"  # `persona ask sage -` reads the message from standard input
# How to send a message that click would take for an option ("-5 degrees outside").
LEADING_DASH = 'put -- before it (`persona ask sage -- "-5 degrees"`), or send - and give it on standard input'
# A Ctrl-C is answered at once: withdrawing the message gives up on Redis after this long.
WITHDRAW_WAIT_S = 2.0
# The longest --timeout: a day. `--timeout inf` crashed, and 1e300 reached Redis as a
# 300-digit number it refused; a wait longer than a day is a mistake, not a plan.
MAX_TIMEOUT_S = LATEST_DEADLINE_AFTER_S
MIN_TIMEOUT_S = 1.0
# SIGTERM (`kill`, `docker stop`) and SIGHUP (the terminal closed) withdraw what waits, as
# Ctrl-C does; the command then exits 128 + the signal's number (143, 129), Ctrl-C with 130.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
CTRL_C_EXIT_STATUS = 130


class Stopping:
    """The stop signal (SIGTERM or SIGHUP) a command was sent while it waited, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stop = threading.Event()  # set once one was: the chat ends rather than goes on

    def exit_status(self) -> int:
        """128 + the signal's number; 130 (Ctrl-C's) when there was none."""
        return CTRL_C_EXIT_STATUS if self.signum is None else 128 + self.signum


@contextlib.contextmanager
def stop_signals_as_ctrl_c() -> Iterator[Stopping]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so the message waiting is
    withdrawn (they left it queued, for a worker to answer for nobody). Only the first: a
    second must not cut the withdrawal short."""
    stopping = Stopping()

    def handler(signum: int, frame: object) -> None:
        if stopping.signum is None:
            stopping.signum = signum
            stopping.stop.set()
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield stopping
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# How `persona ask` and `persona chat` give a request longer, for a timeout to name (the queue names no command).
ASK_LONGER = "`persona ask --timeout SECONDS`, or PERSONA_QUEUE__DEFAULT_DEADLINE_S for every caller"
CHAT_COMMAND_LONGER = "`persona chat --timeout SECONDS`, or PERSONA_QUEUE__DEFAULT_DEADLINE_S for every caller"
# The chat `persona up` opens has no --timeout: only the queue's default deadline gives it longer.
CHAT_LONGER = "PERSONA_QUEUE__DEFAULT_DEADLINE_S, the queue's deadline for every caller"


@dataclasses.dataclass(frozen=True)
class Asking:
    """How `ask` and `chat` ask for each reply, from their command lines: sampling overrides and
    --timeout (None: the persona's, the queue's)."""

    temperature: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    timeout: float | None = None

    def request(self, persona: str, messages: list[Message]) -> GenerationRequest:
        """The request for a reply to ``messages``, its deadline --timeout from now (if given)."""
        return GenerationRequest(
            persona=persona,
            messages=messages,
            sampling=SamplingOverrides(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed),
            deadline=time.time() + self.timeout if self.timeout else 0.0,
        )

    def wait_s(self, settings: Settings) -> float:
        """How long a reply is waited for: --timeout, or the queue's deadline."""
        return self.timeout or settings.queue.default_deadline_s


# `ask`'s and `chat`'s sampling options and --timeout: one meaning and one help text for both.
def _temperature_option():
    return typer.Option(None, min=0.0, max=5.0, help="override the persona's temperature")


def _max_new_tokens_option():
    return typer.Option(
        None, min=1, max=MAX_NEW_TOKENS,
        help="override the reply length limit, in tokens (a reply cut off there ends at its last finished sentence, "
        "or its last whole word and …)",
    )


def _seed_option():
    return typer.Option(
        None, min=0, max=MAX_SEED, metavar="N",
        help="sampling seed, for a repeatable answer: the same seed, message and settings get the same answer from "
        "the same worker and model version, when it is answering nothing else at the time",
    )


def timeout_seconds(value: str | float) -> float:
    """A --timeout as seconds, from MIN_TIMEOUT_S to MAX_TIMEOUT_S; else BadParameter that says
    why. Checked here, not by the option's range: `--timeout nan` passes any comparison, and
    was refused as "should be less than or equal to 86400"."""
    allowed = f"give seconds from {MIN_TIMEOUT_S:.0f} to {MAX_TIMEOUT_S:.0f} (a day)"
    try:
        seconds = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number; {allowed}") from None
    if math.isnan(seconds):
        raise typer.BadParameter(f"{value} is not a number; {allowed}")
    if not MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:
        raise typer.BadParameter(f"{value} is out of range; {allowed}")
    return seconds


def _timeout_option():
    return typer.Option(
        None, parser=timeout_seconds, metavar="SECONDS",
        help="seconds to wait for the reply (1 to 86400), also its deadline (default: the queue's, "
        "PERSONA_QUEUE__DEFAULT_DEADLINE_S, 120 s unless set); raise it while a worker is still loading its model",
    )


def _client(settings: Settings, url: str | None = None, longer: str = CHAT_LONGER) -> QueueClient:
    return QueueClient(connect(settings, url=url), settings.queue, longer_wait=longer)


def withdraw(
    client: QueueClient, requests: list[GenerationRequest], what: str = "that message", then: str = "answer it",
) -> str | None:
    """Withdraw requests whose caller pressed Ctrl-C, so no worker spends its time on answers
    nobody will read; None once done, else why not (``what`` they are, what a worker may
    ``then`` do). Quickly: with Redis down, redis-py's reconnects held the terminal for 9 s,
    and the chat then said "(withdrawn)" all the same. A Redis that refuses the write (a full
    disk: MISCONF) is said as such, not as one that "cannot be reached"."""
    try:
        with retrying_until(time.monotonic() + WITHDRAW_WAIT_S):
            for request in requests:
                client.cancel(request.id)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        return (f"could not withdraw {what}: Redis cannot be reached ({str(exc).rstrip('.')}); "
                f"a worker may still {then} once Redis is back, for nobody")
    except redis.exceptions.RedisError as exc:
        return (f"could not withdraw {what}, so a worker may still {then}, for nobody, if Redis takes "
                f"changes again before the deadline: {explain_redis_error(exc)}")
    return None


def _check_persona(settings: Settings, name: str) -> None:
    # Fail fast here rather than after a trip through the queue.
    PersonaRegistry.from_settings(settings).get(name)


def no_worker_note(client: QueueClient, wait_s: float, starters: str = WORKER_STARTERS) -> str | None:
    """What to tell the user when no worker is live (None when one is): the wait ahead is
    then a full deadline, and the user heard nothing until its end ("no worker answered ...
    in time"). A worker still loading its models is named as starting: "no worker is
    running" sent people to start one while `persona up` was starting it."""
    if heartbeat.live_worker_ids(client.redis):
        return None
    starting = heartbeat.starting_workers(client.redis)
    if starting:
        first = starting[0]  # the one starting longest: most likely the first to serve
        others = f" (and {len(starting) - 1} more)" if len(starting) > 1 else ""
        doing = f"{first.doing()}, " if first.persona else ""
        return (f"a worker is starting{others} ({doing}{first.loading_s:.0f} s so far); "
                f"this waits in the queue until it serves, up to {wait_s:.0f} s")
    return f"no worker is running yet; this waits in the queue for one, up to {wait_s:.0f} s ({starters})"


def queue_if_no_worker(
    client: QueueClient, request: GenerationRequest, wait_s: float, starters: str = WORKER_STARTERS,
) -> GenerationRequest | None:
    """With no worker live, queue the request, then say that it waits (``no_worker_note``);
    the request as queued, to wait for. None when a worker is live: ``ask`` queues it and
    starts waiting in one round trip. Said before the request was sent, "this waits in the
    queue" came ahead of a full queue's refusal (QueueBusy, now said alone)."""
    said = no_worker_note(client, wait_s, starters)
    if said is None:
        return None
    queued = client.submit(request)
    err_console.print(said, style="yellow", markup=False, highlight=False)
    return queued


@friendly_errors
def ask(
    persona: str = typer.Argument(..., help="which persona answers"),
    text: str = typer.Argument(
        ..., help="what you say to it; `-` reads it from standard input (all of it one message, line breaks kept)",
    ),
    temperature: float = _temperature_option(),
    max_new_tokens: int = _max_new_tokens_option(),
    seed: int = _seed_option(),
    timeout: float = _timeout_option(),
    json_output: bool = typer.Option(
        False, "--json", help="print the whole reply as JSON (exit status 1 when it is an error)"
    ),
) -> None:
    """Send one message to PERSONA through the queue and print its reply (needs `persona up`
    running, or a worker and Redis). Ctrl-C, SIGTERM or SIGHUP while it waits withdraws the
    message (exit 130, 143, 129).

    A message that starts with a dash ("-5 degrees outside") would be read as an option:
    put -- before it (`persona ask sage -- "-5 degrees"`), or send - and give it on standard input."""
    text = _read_message(text)
    settings = get_settings()
    _check_persona(settings, persona)
    asking = Asking(temperature, max_new_tokens, seed, timeout)
    request = asking.request(persona, [Message(role="user", content=text)])
    check_request(request, settings.queue)  # an empty or too long message is refused before Redis is needed
    client = _client(settings, longer=ASK_LONGER)
    with stop_signals_as_ctrl_c() as stopping:
        try:
            queued = queue_if_no_worker(client, request, asking.wait_s(settings))
            reply = client.ask(request, timeout=timeout) if queued is None else client.wait(queued, timeout=timeout)
        except KeyboardInterrupt:
            _withdraw_asked(client, request, json_output)
            raise typer.Exit(stopping.exit_status()) from None
    if json_output:
        print(reply.to_json())
        if not reply.ok:  # the error is in the JSON; the status tells a script it failed
            raise typer.Exit(1)
    elif not reply.ok:
        raise RequestFailed(reply)
    else:
        print(reply.text)
        if not has_visible_text(reply.text):
            _say_nothing_said(persona, reply, "raise --max-new-tokens")


def _read_message(text: str) -> str:
    """The message as given, or for `-` all of standard input (its trailing line break dropped)."""
    if text != FROM_STDIN:
        return text
    if sys.stdin is None:  # closed (`<&-`): nothing to read, as from an empty one
        return ""
    if sys.stdin.isatty():
        err_console.print("type the message, then Ctrl-D on a line of its own", markup=False, highlight=False)
    return sys.stdin.read().rstrip("\r\n")


def _say_nothing_said(persona: str, reply: GenerationReply, more: str) -> None:
    """Say on stderr that a reply has no text: it showed as an empty line, as if nothing had
    happened. ``more``: how to give a reply cut off at its token limit more room."""
    if reply.finish_reason == "length":  # cut off, and cut back to its last whole word: none
        why = f"its reply reached its token limit before a whole word; {more}, or rephrase"
    else:
        why = "its reply ended at once; ask again, or rephrase"
    err_console.print(f"({persona} said nothing: {why})", style="yellow", markup=False, highlight=False)


class AskCommand(TyperCommand):
    """`persona ask`, whose usage error for a message click took as an option says how to send it."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        given = args[: args.index("--")] if "--" in args else args[:]  # a copy: click's parser uses args up
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as exc:
            if any(arg.startswith(exc.option_name) and _looks_like_a_message(arg) for arg in given):
                exc.message = f"{exc.message.rstrip('.')}. If that is your message, {LEADING_DASH}"
            raise


def _looks_like_a_message(arg: str) -> bool:
    """Whether an argument click took for an option reads as words or a number instead."""
    if any(char.isspace() for char in arg):
        return True
    try:
        float(arg)
    except ValueError:
        return False
    return True


def _withdraw_asked(client: QueueClient, request: GenerationRequest, json_output: bool) -> None:
    """Withdraw the message of an `ask` stopped while it waited, and say so: on stderr, and
    under ``--json`` also as the failed reply a script reads (it read nothing, exit 130)."""
    problem = withdraw(client, [request])
    said = problem or "(withdrawn: no worker will answer it)"
    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
        err_console.print(said, style="yellow" if problem else "dim", markup=False, highlight=False)
        if json_output:
            message = problem or "withdrawn before it was answered (Ctrl-C, SIGTERM or SIGHUP): no worker will answer it"
            print(GenerationReply.failure(request.id, ErrorKind.cancelled, message, persona=request.persona).to_json(),
                  flush=True)


def run_chat(
    settings: Settings,
    persona: str,
    *,
    url: str | None = None,
    stop: threading.Event | None = None,
    starters: str = WORKER_STARTERS,
    asking: Asking | None = None,
) -> None:
    """An interactive chat in the terminal, keeping recent turns as context.

    ``stop``: set (by ``persona up``'s SIGTERM or SIGHUP) when an interrupt ends the chat
    rather than withdraws one message. ``starters``: where a worker will come from.
    ``asking``: `persona chat`'s sampling options and --timeout (none: the chat `persona up` opens).
    """
    _check_persona(settings, persona)
    client = _client(settings, url, CHAT_LONGER if asking is None else CHAT_COMMAND_LONGER)
    longer_reply = f"raise sampling.max_new_tokens in {persona}'s file" if asking is None else "raise --max-new-tokens"
    asking = asking or Asking()
    history: list[Message] = []
    console.print(f"chatting with [bold]{persona}[/bold]; {CHAT_COMMANDS}")
    while True:
        try:
            if sys.stdin is None:  # closed (`<&-`): at its end, as an empty one is
                raise EOFError
            text = console.input("[bold cyan]you>[/bold cyan] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not has_visible_text(text):  # only spaces, zero-width or format characters: as a blank line
            continue
        command = _command(text)
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            history.clear()
            console.print("[dim](conversation forgotten)[/dim]")
            continue
        if command == "/help":
            console.print(f"{CHAT_COMMANDS}; {AS_MESSAGE}", markup=False, highlight=False)
            continue
        if command is not None:  # a typo such as /quitt went to the persona as a message
            err_console.print(f"unknown command {command}; {CHAT_COMMANDS}; {AS_MESSAGE}",
                              markup=False, highlight=False)
            continue
        text = text.removeprefix("/") if text.startswith("//") else text  # "//usr is..." says "/usr is..."
        history.append(Message(role="user", content=text))
        request = asking.request(persona, history[-settings.queue.max_messages :])
        # Whatever goes wrong with this message, it is dropped and the chat goes on.
        problem = None
        try:
            queued = queue_if_no_worker(client, request, asking.wait_s(settings), starters)
            with console.status(f"{persona} is thinking..."):
                reply = (client.ask(request, timeout=asking.timeout) if queued is None
                         else client.wait(queued, timeout=asking.timeout))
        except KeyboardInterrupt:  # as in a shell
            history.pop()
            withdrawn = withdraw(client, [request])
            if withdrawn is None:
                console.print("[dim](withdrawn)[/dim]")
            else:
                err_console.print(withdrawn, style="yellow", markup=False, highlight=False)
            if stop is not None and stop.is_set():  # SIGTERM or SIGHUP: `persona up` is stopping, and the chat with it
                return
            continue
        except PersonaError as exc:
            problem = str(exc)
        except redis.exceptions.RedisError as exc:  # Redis may be back for the next message
            problem = explain_redis_error(exc)
        else:
            if not reply.ok:
                problem = reply.error.message if reply.error else "failed"
        if problem is not None:
            history.pop()
            err_console.print(problem, style="red", markup=False, highlight=False)
            continue
        if not has_visible_text(reply.text):
            history.pop()  # a turn with no answer: asked again, it goes as if asked first
            _say_nothing_said(persona, reply, longer_reply)
            continue
        console.print(f"[bold magenta]{persona}>[/bold magenta] ", end="")
        console.print(reply.text, highlight=False, markup=False)
        history.append(_as_context(reply.text, settings.queue.max_message_chars))


def _command(text: str) -> str | None:
    """The chat command a line is (``/reset``), lower-cased; None for a message. A path
    such as "/etc/hosts?" is a message, and so is a line that starts with "//"."""
    word = text.split(maxsplit=1)[0]
    return word.lower() if re.fullmatch(r"/[A-Za-z]+", word) else None


def _as_context(reply: str, limit_chars: int) -> Message:
    """A reply as the next requests' context: one longer than a message may be is cut to
    fit, and the user told so (whole, it made every later message in the chat refused
    as "a message is N characters long")."""
    if len(reply) > limit_chars:
        console.print(f"[dim](only the first {limit_chars} characters of that reply stay in the conversation)[/dim]")
    return Message(role="assistant", content=reply[:limit_chars])


@friendly_errors
def chat(
    persona: str = typer.Argument(DEFAULT_PERSONA, help="which persona to talk to"),
    temperature: float = _temperature_option(),
    max_new_tokens: int = _max_new_tokens_option(),
    seed: int = _seed_option(),
    timeout: float = _timeout_option(),
) -> None:
    """Chat with PERSONA in the terminal, through the queue (needs `persona up` running).

    Each message goes with the recent turns as context. In the chat, /reset forgets the
    conversation, /help lists the commands, /quit or Ctrl-D leaves, and Ctrl-C withdraws a
    message still waiting for its reply; a line that starts with // is sent starting with /.
    SIGTERM or SIGHUP (the terminal closed) withdraws it too, and ends the chat (exit 143, 129).
    The sampling options and --timeout hold for every message, as `persona ask`'s do for its one.
    """
    with stop_signals_as_ctrl_c() as stopping:
        try:
            run_chat(get_settings(), persona, stop=stopping.stop,
                     asking=Asking(temperature, max_new_tokens, seed, timeout))
        except KeyboardInterrupt:  # a stop signal between messages
            if stopping.signum is None:
                raise
    if stopping.signum is not None:
        raise typer.Exit(stopping.exit_status())


def register(app: typer.Typer) -> None:
    app.command(cls=AskCommand)(ask)
    app.command()(chat)
