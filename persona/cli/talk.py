"""`persona ask` and `persona chat`: talking to a persona through the queue."""

from __future__ import annotations

import contextlib
import time

import redis
import typer

from persona.cli.common import (
    console,
    err_console,
    explain_redis_error,
    friendly_errors,
    get_settings,
)
from persona.connection import connect
from persona.contract import (
    MAX_NEW_TOKENS,
    MAX_SEED,
    GenerationRequest,
    Message,
    SamplingOverrides,
)
from persona.errors import PersonaError, RequestFailed
from persona.personas import PersonaRegistry
from persona.queue import QueueClient
from persona.settings import Settings


def _client(settings: Settings, url: str | None = None) -> QueueClient:
    return QueueClient(connect(settings, url=url), settings.queue)


def _ask(client: QueueClient, request: GenerationRequest, timeout: float | None = None):
    """``client.ask``; a Ctrl-C while waiting withdraws the request, so no worker spends
    its time on an answer nobody will read."""
    try:
        return client.ask(request, timeout=timeout)
    except KeyboardInterrupt:
        with contextlib.suppress(redis.exceptions.RedisError):
            client.cancel(request.id)
        raise


def _check_persona(settings: Settings, name: str) -> None:
    # Fail fast here rather than after a trip through the queue.
    PersonaRegistry.from_settings(settings).get(name)


@friendly_errors
def ask(
    persona: str = typer.Argument(..., help="which persona answers"),
    text: str = typer.Argument(..., help="what you say to it"),
    temperature: float = typer.Option(None, min=0.0, max=5.0, help="override the persona's temperature"),
    max_new_tokens: int = typer.Option(None, min=1, max=MAX_NEW_TOKENS, help="override the reply length limit"),
    seed: int = typer.Option(None, min=0, max=MAX_SEED, help="sampling seed, for a repeatable answer"),
    timeout: float = typer.Option(
        None, min=1.0, help="seconds to wait for the reply (also its deadline; default: the queue's)"
    ),
    json_output: bool = typer.Option(False, "--json", help="print the whole reply as JSON"),
) -> None:
    """Send one message to PERSONA through the queue and print its reply."""
    settings = get_settings()
    _check_persona(settings, persona)
    request = GenerationRequest(
        persona=persona,
        messages=[Message(role="user", content=text)],
        sampling=SamplingOverrides(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
        deadline=time.time() + timeout if timeout else 0.0,
    )
    reply = _ask(_client(settings), request, timeout=timeout)
    if json_output:
        print(reply.to_json())
    elif not reply.ok:
        raise RequestFailed(reply)
    else:
        print(reply.text)


def run_chat(settings: Settings, persona: str, *, url: str | None = None) -> None:
    """An interactive chat in the terminal, keeping recent turns as context."""
    _check_persona(settings, persona)
    client = _client(settings, url)
    history: list[Message] = []
    console.print(f"chatting with [bold]{persona}[/bold]; /reset forgets, /quit or Ctrl-D leaves")
    while True:
        try:
            text = console.input("[bold cyan]you>[/bold cyan] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history.clear()
            console.print("[dim](conversation forgotten)[/dim]")
            continue
        history.append(Message(role="user", content=text))
        request = GenerationRequest(persona=persona, messages=history[-settings.queue.max_messages :])
        # Whatever goes wrong with this message, it is dropped and the chat goes on.
        problem = None
        try:
            with console.status(f"{persona} is thinking..."):
                reply = _ask(client, request)
        except KeyboardInterrupt:  # as in a shell
            history.pop()
            console.print("[dim](withdrawn)[/dim]")
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
        history.append(Message(role="assistant", content=reply.text))
        console.print(f"[bold magenta]{persona}>[/bold magenta] ", end="")
        console.print(reply.text, highlight=False, markup=False)


@friendly_errors
def chat(persona: str = typer.Argument("sage", help="which persona to talk to")) -> None:
    """Chat with PERSONA in the terminal, through the queue (needs `persona up` running)."""
    run_chat(get_settings(), persona)


def register(app: typer.Typer) -> None:
    app.command()(ask)
    app.command()(chat)
