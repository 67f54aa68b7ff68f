"""`persona checkpoints`, `persona swap`, `persona rollback`: which weights serve a persona."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import redis
import typer
from rich.markup import escape

from persona import swap as swaps
from persona.checkpoint_checks import static_problem
from persona.checkpoints import (
    BASE_VERSION,
    VERSION_PATTERN,
    CheckpointInfo,
    checkpoint_dir,
    resolve_checkpoint,
    scan_checkpoints,
)
from persona.cli.common import (
    console,
    err_console,
    explain_redis_error,
    failure_kind,
    friendly_errors,
    get_settings,
    json_error,
    local_time,
    print_whole,
)
from persona.cli.tables import WholeNumbersTable
from persona.cli.talk import stop_signals_as_ctrl_c, timeout_seconds
from persona.connection import connect, retrying_until
from persona.errors import (
    ModelError,
    PersonaError,
    SwapRefused,
    UnknownPersona,
)
from persona.heartbeat import live_worker_ids
from persona.personas import NAME_PATTERN, Persona, PersonaRegistry
from persona.settings import Settings
from persona.swap import current_version

__all__ = ["checkpoints", "normalise_target", "perform_swap", "register", "rollback", "swap"]

DEFAULT_TIMEOUT_S = 300.0
# The longest --timeout is ask's: a day, longer than any worker takes to load and check
# weights; past it (`inf`, `1e300`) a swap failed later with an OverflowError, so the
# option refuses it with the range.
OUTCOME_JSON_HELP = (
    "print the outcome as one JSON object (ok, committed, problem, each worker's vote and reason), "
    "a refusal too (with ok false and an error: kind and message, as every command's failure), "
    "which also exits with status 1"
)


def normalise_target(target: str, versions: Path | None = None) -> str:
    """A version name stays as it is; a folder becomes its absolute path (workers share it),
    except a version's own folder under ``versions`` (the persona's checkpoints), which
    becomes that version's name: swapped to by path, it was listed as "a folder outside
    the versioned checkpoints", starred nowhere, and swapping to it from that very
    version flipped for nothing (the same from the checkpoints folder, where ``v2`` is a
    folder too)."""
    path = Path(target).expanduser()
    if target == BASE_VERSION or not (path.is_absolute() or path.exists()):
        return target
    folder = path.resolve()
    if versions is not None and folder.parent == versions.resolve() and VERSION_PATTERN.match(folder.name):
        return folder.name
    return str(folder)


def _check_here(settings: Settings, client: redis.Redis, persona: Persona, target: str, workers: int, voters: int) -> None:
    """Checks this machine can make before asking the ``voters`` (of the live ``workers``:
    those that serve the persona) to load and check it."""
    try:
        _, folder = resolve_checkpoint(persona, settings, target)
    except ModelError:
        if workers:
            return  # the workers may hold checkpoints this machine does not
        raise
    if folder is not None:
        problem = static_problem(persona, folder)
        if problem:
            raise SwapRefused(f"{problem}; {persona.name!r} keeps its current version")
    if not voters:
        from persona.pool import ModelPool
        from persona.swapper import load_and_check

        # No worker to ask (none serves the persona): load and check the weights here, so
        # a broken checkpoint is refused now rather than by the first worker to serve it.
        with console.status(f"no running worker serves {persona.name}; loading {target} here to check it"):
            try:
                load_and_check(ModelPool(settings, "cpu"), persona, current_version(client, persona), target)
            except (ModelError, SwapRefused) as exc:
                raise SwapRefused(f"{exc}; {persona.name!r} keeps its current version") from None


def perform_swap(
    settings: Settings, client: redis.Redis, persona: Persona, target: str, *, kind: str = "swap",
    timeout_s: float = DEFAULT_TIMEOUT_S, on_open: Callable[[swaps.SwapProposal], None] | None = None,
) -> swaps.SwapOutcome:
    """Check, propose, gather the vote of every live worker that serves the persona, and
    commit or withdraw (``on_open``: see ``swap.run_swap``)."""
    _check_here(settings, client, persona, target, len(live_worker_ids(client)), len(swaps.voters(client, persona.name)))
    with console.status("asking the workers to load and check it") as status:

        def progress(ready: int, total: int) -> None:
            status.update(f"workers that loaded and checked {target}: {ready}/{total}")

        return swaps.swap_persona(client, persona, target, kind=kind, timeout_s=timeout_s, on_progress=progress,
                                  on_open=on_open)


def _timeout_option():
    """--timeout, as swap and rollback take it."""
    # A parser, not a range: `--timeout nan` passes any comparison (said "less than or equal to 86400").
    return typer.Option(DEFAULT_TIMEOUT_S, parser=timeout_seconds, metavar="SECONDS",
                        help="seconds to wait for every worker to be ready (1 to 86400)")


def _print_outcome(outcome: swaps.SwapOutcome, kind: str = SwapRefused.__name__, *, unopened: bool = False) -> None:
    """An outcome as ``--json`` prints it: its own fields, ``ok`` (committed), and for one not
    committed the ``error`` every other failing command prints (``kind``, its ``problem`` as
    the message). A refusal had no ``ok`` and no ``error``: a script that read those, as
    `persona swap --timeout 0 --json` gives them, took a refused swap for a success.
    ``unopened``: no proposal was made, so it has no id (one of "" read as an id)."""
    shown = {"ok": outcome.committed, **outcome.model_dump(mode="json", exclude={"proposal": {"id"}} if unopened else None)}
    if not outcome.committed:
        shown["error"] = json_error(outcome.problem, kind)
    print(json.dumps(shown, ensure_ascii=False), flush=True)


def _report(outcome: swaps.SwapOutcome, json_output: bool, started: float) -> None:
    if json_output:
        _print_outcome(outcome, unopened=not outcome.proposal.id)
        if not outcome.committed:
            raise typer.Exit(1)  # the object says why; nothing more on stderr to mix into it
        return
    if not outcome.committed:
        raise SwapRefused(outcome.problem)
    p = outcome.proposal
    switched = (f"{len(outcome.votes)} worker(s) switched" if outcome.votes else
                f"checked on this machine (no running worker serves {escape(p.persona)}); workers load "
                f"{escape(p.target)} when they next serve it")
    console.print(
        f"[green]{escape(p.persona)} now serves {escape(p.target)}[/green] (was {escape(p.previous)}); "
        f"{switched}, {time.time() - started:.1f} s",
        highlight=False,
    )


@contextlib.contextmanager
def _refusal_as_json(json_output: bool, draft: swaps.SwapProposal) -> Iterator[swaps.SwapProposal]:
    """With ``--json``, a swap refused before any worker voted (no earlier version, an unknown
    version, a checkpoint this machine refuses, another swap under way, Redis out of reach)
    is printed as the same outcome object a refused vote gives, its error's kind the class that
    refused it (UnknownPersona, SwapRefused, RedisUnavailable...), with exit status 1: it used
    to be a red line on stderr and nothing on stdout, which a script reading JSON chokes on.
    ``draft`` is filled in (target, previous) as the command learns them."""
    try:
        yield draft
    except (PersonaError, redis.exceptions.RedisError) as exc:
        if not json_output:
            raise
        problem = explain_redis_error(exc) if isinstance(exc, redis.exceptions.RedisError) else str(exc)
        _print_outcome(swaps.SwapOutcome(proposal=draft, committed=False, problem=problem), failure_kind(exc),
                       unopened=not draft.id)
        raise typer.Exit(1) from None


def _draft(persona: str, target: str, kind: Literal["swap", "rollback"]) -> swaps.SwapProposal:
    """The proposal a refused command reports: never opened, so no id and no workers."""
    return swaps.SwapProposal(id="", persona=persona, target=target, previous="", kind=kind)


@dataclasses.dataclass
class _Command:
    """What a swap or rollback command has learned so far: enough to say how it ended if stopped."""

    draft: swaps.SwapProposal
    timeout_s: float
    started: float = dataclasses.field(default_factory=time.time)
    client: redis.Redis | None = None

    def opened(self, proposal: swaps.SwapProposal) -> None:
        """Note the proposal as the swap opened it (its id, its voters): a stop then names it.
        In place: ``_refusal_as_json`` reports the same draft."""
        for name in type(proposal).model_fields:
            setattr(self.draft, name, getattr(proposal, name))


@contextlib.contextmanager
def _stop_reported(json_output: bool, command: _Command) -> Iterator[None]:
    """Ctrl-C, SIGTERM (`kill`) or SIGHUP (the terminal closed) withdraw the swap (``run_swap``
    does) and say so, as one JSON outcome under ``--json``; exit 130, 143 or 129. SIGTERM and
    SIGHUP ended the command without a word and left its proposal open: every other swap of
    the persona was refused until its --timeout ran out, the workers holding the new weights
    meanwhile. Ctrl-C withdrew it, but said nothing, and no JSON."""
    with stop_signals_as_ctrl_c() as stopping:
        try:
            yield
        except KeyboardInterrupt:
            how = "Ctrl-C" if stopping.signum is None else signal.Signals(stopping.signum).name
            committed, said = _after_stop(command, how)
            with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                if json_output:  # withdrawn: the old version serves on, as after a refusal
                    _print_outcome(swaps.SwapOutcome(proposal=command.draft, committed=committed, problem=said),
                                   unopened=not command.draft.id)
                else:
                    err_console.print(said, style="yellow", markup=False, highlight=False)
            raise typer.Exit(stopping.exit_status()) from None


def _after_stop(command: _Command, how: str) -> tuple[bool, str]:
    """Whether a stopped swap had been committed all the same (stopped just after), and what
    to tell the operator, as Redis says within a moment. A swap stopped before its proposal
    was opened (checking the weights here, say) has no proposal to name or withdraw: its
    JSON showed a proposal id of ""."""
    draft, client = command.draft, command.client
    what = (f"{draft.kind} of {draft.persona!r}" + (f" to {draft.target!r}" if draft.target else "")
            + (f" (proposal {draft.id})" if draft.id else ""))
    if client is None or not draft.previous or not draft.target:
        return False, f"{what} stopped ({how}) before any worker was asked; nothing changed"
    if not draft.id:
        return False, (f"{what} stopped ({how}) before a proposal was made, so no worker was asked; nothing changed: "
                       f"{draft.persona!r} keeps {draft.previous}")
    try:
        with retrying_until(time.monotonic() + swaps.WITHDRAW_WAIT_S):
            serving = swaps.active_versions(client).get(draft.persona)
    except redis.exceptions.RedisError as exc:
        return False, (
            f"{what} stopped ({how}); nothing changed ({draft.persona!r} keeps {draft.previous}), but Redis cannot "
            f"be reached to withdraw it ({str(exc).rstrip('.')}): other swaps of {draft.persona!r} may be refused "
            f"until it lapses, within {command.timeout_s:.0f} s"
        )
    if serving == draft.target:  # committed in the moment before the stop
        back = f"; `persona rollback {draft.persona}` returns to {draft.previous}" if draft.kind == "swap" else ""
        return True, f"{what} stopped ({how}) after it was committed: {draft.persona!r} serves {draft.target} now{back}"
    return False, f"{what} stopped ({how}) and withdrawn; nothing changed: {draft.persona!r} keeps {draft.previous}"


def _print_history(persona: str, rollback_to: str | None, history: list[dict[str, str]]) -> None:
    """What a rollback returns to, and the latest swaps, newest first, each with who made it."""
    if rollback_to is None:
        console.print(f"rollback: nothing to return to ({persona} was never swapped, or was rolled back as far as it goes)")
    else:
        console.print(f"rollback: `persona rollback {persona}` returns to {escape(rollback_to)}", highlight=False)
    if history:
        console.print("latest swaps, newest first:")
    for entry in history:
        when = local_time(float(entry.get("at") or 0))
        change = f"{entry.get('previous') or '?'} -> {entry.get('version', '?')}"
        by = f"  by {entry['by']}" if entry.get("by") else ""  # swaps logged before who was kept have none
        console.print(f"  {when}  {escape(entry.get('kind', 'swap')):<8}  {escape(change + by)}", highlight=False)


@friendly_errors
def checkpoints(
    persona_name: str = typer.Argument(..., metavar="PERSONA", help="the persona's name"),
    history: int = typer.Option(5, min=0, help="show this many of the persona's latest swaps and rollbacks (when, what, by whom)"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """The checkpoint versions of a persona: date, kind, metrics, which one is active, what a
    rollback returns to, and the latest swaps (each with who made it: user@host).

    An unfinished training run of the persona (stopped, or training now) is shown too, with
    the command that continues it.
    """
    from persona.cli.train_cmd import unfinished_json, unfinished_line
    from training.run_folder import unfinished_run

    settings = get_settings()
    try:
        persona = PersonaRegistry.from_settings(settings).get(persona_name)
    except UnknownPersona:
        # No persona file yet: a first run stopped (or still going) before it registered a checkpoint,
        # or one stopped by a full disk once it had (its versions were said to be none).
        if not re.fullmatch(NAME_PATTERN, persona_name):  # no folder of another's is looked in
            raise
        first = unfinished_run(settings, persona_name)
        found, unreadable = scan_checkpoints(settings.checkpoints_dir, persona_name)
        if first is None and not found and not unreadable:
            raise
        _print_without_persona(persona_name, found, unreadable, first, json_output)
        return
    unfinished = unfinished_run(settings, persona.name)
    found, unreadable = scan_checkpoints(settings.checkpoints_dir, persona.name)
    state = _swap_state(settings, persona, history)
    active = state.active
    # A version swapped to by its folder's path (as swaps made before the path was read
    # as the version were stored) is that version all the same.
    as_folder = Path(active).resolve() if active is not None and Path(active).is_absolute() else None

    def is_active(c: CheckpointInfo) -> bool | None:
        if active is None:
            return None  # unknown: Redis cannot be reached
        return c.version == active or (as_folder is not None and c.path is not None and c.path.resolve() == as_folder)

    if json_output:
        rows = [dict(c.model_dump(mode="json"), active=is_active(c)) for c in found]
        swapped = None if state.latest is None else [dict(e, at=float(e.get("at") or 0)) for e in state.latest]
        print(json.dumps({"persona": persona.name, "active": active, "versions": rows,
                          "unreadable": [str(p) for p in unreadable], "rollback_to": state.rollback_to,
                          "swaps": swapped, "unfinished_run": unfinished_json(unfinished) if unfinished else None,
                          "note": state.unknown}))
        return
    if state.unknown is not None:
        err_console.print(f"which version is active, and what a rollback returns to, is unknown: {state.unknown}",
                          style="yellow", markup=False, highlight=False)
    # Every cell escaped: a base or an active folder named "runs/[draft]" was read as markup.
    table = WholeNumbersTable("", "version", "created", "kind", "base", "metrics", numbers=("version",),
                              title=escape(f"{persona.name}: checkpoints (active: {active or 'unknown'})"), header_style="bold")
    table.add_row("*" if active == BASE_VERSION else "", BASE_VERSION, "", "", escape(persona.model.base), "")
    for c in found:
        created = dt.datetime.fromtimestamp(c.created_at).strftime("%Y-%m-%d %H:%M")
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(c.metrics.items())) or "-"
        table.add_row("*" if is_active(c) else "", *map(escape, (c.version, created, c.kind, c.base, metrics)))
    print_whole(table)
    if active is not None and active != BASE_VERSION and not any(is_active(c) for c in found):
        if VERSION_PATTERN.match(active):  # a version, not a folder elsewhere: removed, or unreadable
            removed = not (checkpoint_dir(settings.checkpoints_dir, persona.name) / active).is_dir()
            why = "whose folder was removed: a worker that starts cannot load it" if removed else "which cannot serve (see below)"
            console.print(
                f"active: {escape(active)}, {why}; swap to a listed one with `persona swap {persona.name} VERSION`",
                highlight=False,
            )
        else:
            console.print(f"active: {escape(active)} (a folder outside the versioned checkpoints)", highlight=False)
    for problem in unreadable:
        console.print(f"[yellow]unusable:[/yellow] {escape(str(problem))}", highlight=False)  # it says what to do
    if unfinished is not None:  # a run stopped with Ctrl-C was shown nowhere
        console.print(escape(unfinished_line(unfinished)), highlight=False)
    if state.latest is not None:
        _print_history(persona.name, state.rollback_to, state.latest)


def _print_without_persona(name: str, found: list[CheckpointInfo], unreadable: list[ModelError], unfinished,
                           json_output: bool) -> None:
    """`persona checkpoints NAME` for a persona with no file: its versions on disk, none served, and its run."""
    from persona.cli.train_cmd import unfinished_json, unfinished_line

    note = f"{name} has no persona file, so no version serves" if found else None
    if json_output:
        print(json.dumps({"persona": name, "active": None,
                          "versions": [dict(c.model_dump(mode="json"), active=False) for c in found],
                          "unreadable": [str(p) for p in unreadable], "rollback_to": None, "swaps": [],
                          "unfinished_run": unfinished_json(unfinished) if unfinished else None, "note": note}))
        return
    if not found:
        console.print(f"{escape(name)} has no checkpoints yet", highlight=False)
    else:
        table = WholeNumbersTable("version", "created", "kind", "base", "metrics", numbers=("version",),
                                  title=escape(f"{name}: checkpoints (no persona file: none serves)"), header_style="bold")
        for c in found:
            created = dt.datetime.fromtimestamp(c.created_at).strftime("%Y-%m-%d %H:%M")
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(c.metrics.items())) or "-"
            table.add_row(*map(escape, (c.version, created, c.kind, c.base, metrics)))
        print_whole(table)
    for problem in unreadable:
        console.print(f"[yellow]unusable:[/yellow] {escape(str(problem))}", highlight=False)
    if unfinished is not None:  # --resume writes the persona file of a run that registered its version
        console.print(escape(unfinished_line(unfinished)), highlight=False)


@dataclasses.dataclass
class _SwapState:
    """What Redis holds of a persona's swaps; with Redis out of reach, nothing but why (``unknown``)."""

    active: str | None
    rollback_to: str | None = None
    latest: list[dict[str, str]] | None = None
    unknown: str | None = None


def _swap_state(settings: Settings, persona: Persona, history: int) -> _SwapState:
    """The active version, what a rollback returns to, and the ``history`` latest swaps. With
    Redis down the listing went no further than "cannot reach Redis", though the versions,
    their metrics and any unfinished run are all on disk: they are listed, none marked active."""
    try:
        client = connect(settings)
        earlier = swaps.version_history(client, persona.name)
        latest = swaps.swap_log(client, count=history, persona=persona.name) if history else []
        return _SwapState(current_version(client, persona), earlier[0] if earlier else None, latest)
    except PersonaError as exc:  # connect's: down, or a setting to fix (a password, TLS)
        return _SwapState(None, unknown=str(exc))
    except redis.exceptions.RedisError as exc:  # lost halfway through
        return _SwapState(None, unknown=explain_redis_error(exc))


@friendly_errors
def swap(
    persona_name: str = typer.Argument(..., metavar="PERSONA", help="the persona's name"),
    target: str = typer.Argument(..., metavar="VERSION|PATH", help="a version (v3), 'base', or a checkpoint folder"),
    timeout: float = _timeout_option(),
    json_output: bool = typer.Option(False, "--json", help=OUTCOME_JSON_HELP),
) -> None:
    """Switch a persona to another checkpoint on every live worker, or on none.

    Each worker loads and checks the new weights beside the old ones and says ready;
    only when all have does the active version flip (workers switch between batches,
    no request is dropped). If any worker refuses, nothing changes and you see why.
    Ctrl-C, SIGTERM or SIGHUP while it waits withdraws it: nothing changes (exit 130, 143, 129).
    """
    settings = get_settings()
    command = _Command(_draft(persona_name, target, "swap"), timeout)
    with _stop_reported(json_output, command), _refusal_as_json(json_output, command.draft) as draft:
        persona = PersonaRegistry.from_settings(settings).get(persona_name)
        client = command.client = connect(settings)
        target = draft.target = normalise_target(target, checkpoint_dir(settings.checkpoints_dir, persona.name))
        draft.previous = current_version(client, persona)
        if target == draft.previous:
            if json_output:  # still one JSON object, as --json promises: nothing needed doing
                _print_outcome(swaps.SwapOutcome(
                    proposal=draft.model_copy(update={"previous": target}), committed=True, unchanged=True,
                ), unopened=True)
            else:
                console.print(f"{escape(persona.name)} already serves {escape(target)}", highlight=False)
            return
        outcome = perform_swap(settings, client, persona, target, timeout_s=timeout, on_open=command.opened)
    _report(outcome, json_output, command.started)


@friendly_errors
def rollback(
    persona_name: str = typer.Argument(..., metavar="PERSONA", help="the persona's name"),
    timeout: float = _timeout_option(),
    json_output: bool = typer.Option(False, "--json", help=OUTCOME_JSON_HELP),
) -> None:
    """Go back to the version a persona served before its last swap (same all-or-nothing rules,
    and Ctrl-C, SIGTERM or SIGHUP while it waits withdraws it as it does a swap)."""
    settings = get_settings()
    command = _Command(_draft(persona_name, "", "rollback"), timeout)
    with _stop_reported(json_output, command), _refusal_as_json(json_output, command.draft) as draft:
        persona = PersonaRegistry.from_settings(settings).get(persona_name)
        client = command.client = connect(settings)
        draft.previous = current_version(client, persona)
        target = draft.target = swaps.rollback_target(client, persona.name)
        outcome = perform_swap(settings, client, persona, target, kind="rollback", timeout_s=timeout,
                               on_open=command.opened)
    _report(outcome, json_output, command.started)


def register(app: typer.Typer) -> None:
    app.command()(checkpoints)
    app.command()(swap)
    app.command()(rollback)
