"""`persona queue ...`: looking at the queue, live, and handling dead letters."""

from __future__ import annotations

import datetime as dt
import functools
import json
import time
from collections.abc import Callable
from typing import Annotated

import click
import redis
import typer
from pydantic import ValidationError
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from persona import constants as keys
from persona.cli.common import (
    console,
    err_console,
    explain_redis_error,
    friendly_errors,
    get_settings,
    local_time,
    print_whole,
)
from persona.cli.tables import WholeNumbersTable
from persona.connection import connect, retrying_until
from persona.contract import GenerationRequest
from persona.dead_letters import (
    DeadLetter,
    RetryReport,
    cap_warning,
    count_dead,
    dead_ids,
    drop_dead,
    find_dead,
    list_dead,
    newer_contract,
    retry_all,
    retry_dead,
    trimmed_note,
)
from persona.errors import QueueError
from persona.monitoring import QueueStats, collect_stats, stream_label
from persona.personas import Persona, PersonaRegistry
from persona.settings import Settings
from persona.telemetry_reading import THROUGHPUT_WINDOW_S

__all__ = [
    "dead", "drop", "register", "render_all", "render_latency", "render_stats", "render_stuck", "render_workers", "retry",
    "show", "stats", "summary_line", "watch",
]

MAX_PROBLEMS_SHOWN = 3
# A dead letter's id is a stream entry id ("1732800000000-0"), at most 41 characters.
MAX_ID_SHOWN_CHARS = 48
# How many letters `retry --all` names among those it refused (each one line).
MAX_REFUSED_SHOWN = 10
# How long one reading of `watch` retries a Redis that fails, at least (its interval, if
# longer), before its line says so: as the dashboard's sampler does. On the connection's own
# 8 reconnects a silent (SIGSTOPped) Redis held the watch without a line for 72 s.
READ_GIVE_UP_S = 3.0

queue_app = typer.Typer(help="Watch the queue and handle dead letters (list, show, retry, drop).", no_args_is_help=True)


def render_stats(stats: QueueStats) -> Table:
    """Depth, waiting age and counters, ready to print."""
    # "withdrawn": not taken yet, but no longer wanted: a worker discards them (they are not waiting work).
    figures = ("waiting", "in flight", "oldest waiting", "withdrawn", "expired")
    table = WholeNumbersTable("stream", *figures, numbers=figures, right=figures, title="queue", header_style="bold")
    for stream in stats.streams:
        table.add_row(escape(stream.label), str(stream.waiting), str(stream.in_flight), f"{stream.oldest_waiting_s:.1f}s",
                      str(stream.withdrawn), str(stream.expired))
    table.add_row("dead letters", str(stats.dead_letters))
    if stats.dead_letters_trimmed_since_cleared:  # until an operator empties the stream
        table.add_row("  deleted at the cap", str(stats.dead_letters_trimmed_since_cleared))
    warning = cap_warning(stats.dead_letters, stats.dead_letters_trimmed_since_cleared)
    if warning:  # past the cap the oldest letters go unseen: said while there is time to act
        table.caption, table.caption_style = escape(f"warning: {warning}"), "yellow"
    table.add_row("completed", str(stats.completed))
    # Replies sent, each counted once: a dead letter retried and then answered counts in
    # both, and this says how many that may be.
    if retried := stats.counters.get("retried", 0):
        table.add_row("  retried from dead letters", str(retried))
    # Discarded by a worker: their callers took them back, or stopped waiting. Not failures.
    table.add_row("withdrawn", str(stats.withdrawn))
    table.add_row("expired", str(stats.expired))
    # Never queued: turned away as they came, the queue full or their user's share waiting.
    table.add_row("refused", str(stats.refused))
    table.add_row("  queue full", str(stats.refused_full))
    table.add_row("  user's share", str(stats.refused_user_share))
    table.add_row("failed", str(stats.failed))
    for name, value in sorted(stats.counters.items()):
        if name.startswith("failed:"):
            table.add_row(f"  {escape(name)}", str(value))
    return table


def render_latency(stats: QueueStats) -> Table:
    """Queue wait and generation percentiles, and throughput."""
    lat = stats.latency
    title = "latency"
    if lat:
        unwanted = "".join(f", {count} {name}" for name, count in (("withdrawn", lat.withdrawn), ("expired", lat.expired)) if count)
        title = f"latency (last {lat.window_s:.0f} s, {lat.replies} replies, {lat.failed} failed{unwanted})"
    figures = ("p50 ms", "p95 ms", "p99 ms")
    table = WholeNumbersTable("", *figures, numbers=figures, right=figures, title=title, header_style="bold")
    if lat:
        # Queue waits count failures too (the requests that timed out waiting are the worst).
        for name, p, count in (("queue wait", lat.queue_ms, lat.queue_waits), ("generation", lat.generate_ms, lat.replies)):
            # Nothing measured in the window: no figure, not a 0 ms one that reads as instant.
            cells = (f"{p.p50:.0f}", f"{p.p95:.0f}", f"{p.p99:.0f}") if count else ("-", "-", "-")
            table.add_row(name, *cells)
        # Over the last minute, or over what the reply log still holds when it reaches less far back.
        span = min(THROUGHPUT_WINDOW_S, lat.window_s)
        over = "last minute" if span >= THROUGHPUT_WINDOW_S else f"last {span:.0f} s: all the reply log holds"
        table.caption = f"throughput: {lat.replies_per_s:.2f} replies/s, {lat.tokens_per_s:.1f} tokens/s ({over})"
    return table


def render_workers(stats: QueueStats) -> Table:
    """Each live worker: heartbeat, host, device, the persona it runs (its version: "-" from one
    too old to say), the personas it serves, memory; then those still starting."""
    title = f"workers ({len(stats.workers) + len(stats.unreadable_workers)} live"
    title += f", {len(stats.starting_workers)} starting)" if stats.starting_workers else ")"
    if stats.unreadable_workers:
        title += f", [yellow]unreadable heartbeat: {escape(', '.join(stats.unreadable_workers))}[/yellow]"
    table = WholeNumbersTable("worker", "host", "device", "version", "state", "personas", "requests", "memory MB", "seen",
                              numbers=("requests", "memory MB", "seen"), title=title, header_style="bold")
    # Heartbeats are stamped by Redis's clock, and so is this reading: one clock for both.
    now = stats.redis_time or time.time()
    for w in stats.workers:
        personas = ", ".join(f"{k}@{v}" for k, v in sorted(w.personas.items())) or "-"
        table.add_row(
            *map(escape, (w.id, w.host, w.device, w.version or "-", w.state, personas)),
            str(w.requests), f"{w.memory_mb:.0f}", f"{now - w.last_seen:.1f}s ago",
        )
    for w in stats.starting_workers:  # not serving yet: what it loads, and for how long so far
        table.add_row(
            *map(escape, (w.id, w.host, w.device, w.version or "-", f"starting ({w.loading_s:.0f}s)", w.doing())),
            "-", "-", f"{max(0.0, now - w.last_seen):.1f}s ago",
        )
    if not stats.workers and not stats.unreadable_workers:
        table.caption = _no_live_worker(stats)
    return table


# While Redis refuses every change, a running worker cannot write its heartbeat: "start one"
# sent people starting workers beside those running.
HEARTBEATS_REFUSED = ("no worker can be listed live while Redis refuses changes: their heartbeats are refused too, so "
                      "running workers go unseen (see the warning above); they are listed again once Redis takes changes")


def _no_live_worker(stats: QueueStats) -> str:
    """Why no worker is listed live, and what to do."""
    if stats.writes_refused:
        return HEARTBEATS_REFUSED
    if stats.starting_workers:
        return "no worker serves yet: requests wait until a starting one has loaded its models"
    return "no live worker, so nothing is answered; start one with `persona worker` (or `persona up`)"


def render_stuck(stats: QueueStats) -> Table:
    """Requests in flight that should not be."""
    table = WholeNumbersTable("request", "persona", "worker", "held", "deliveries", "why", numbers=("held", "deliveries"),
                              title=f"[red]stuck work ({len(stats.stuck)})[/red]", header_style="bold")
    for s in stats.stuck:
        table.add_row(*map(escape, (s.request_id, s.persona, s.worker)), f"{s.held_s:.0f}s", str(s.deliveries), escape(s.reason))
    return table


def render_all(stats: QueueStats) -> Group:
    """Every section, for `stats` and each frame of `watch`."""
    warnings = [Text(f"warning: {line}", style="yellow") for line in stats.redis_warnings]
    # Redis refusing every change comes first: it explains the figures below (no worker live).
    first, last = (warnings[:1], warnings[1:]) if stats.writes_refused else ([], warnings)
    parts = [*first, render_stats(stats), render_latency(stats), render_workers(stats)]
    # Every persona's version (swapped or not), as /metrics and the dashboard show them.
    versions = stats.served_versions or stats.active_versions
    if versions:
        parts.append("active versions: " + escape(", ".join(f"{k}@{v}" for k, v in sorted(versions.items()))))
    if stats.stuck:
        parts.append(render_stuck(stats))
    parts += last  # Redis may delete keys
    return Group(*parts)


@queue_app.command()
@friendly_errors
def stats(json_output: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Depth, oldest waiting age, in-flight and stuck work, latency p50/p95/p99, throughput, workers
    (those still loading their models listed as starting), and the version each persona serves."""
    settings = get_settings()
    figures = collect_stats(connect(settings), personas=_personas(settings),
                            default_deadline_s=settings.queue.default_deadline_s)
    if json_output:
        print(figures.model_dump_json())
        return
    print_whole(render_all(figures))


def _confirmed(question: str, undone: str, json_output: bool = False) -> bool:
    """Ask ``question``; with no one to answer it (stdin closed: cron, a script), say what was
    not done and how to run it unattended, rather than click's bare "Aborted.". Under
    ``--json`` it is asked on stderr, and a "no" is a failure (stdout holds one JSON object)."""
    try:
        answer = typer.confirm(question, err=json_output)
    except (typer.Abort, click.exceptions.Abort):  # typer has its own, in some versions
        (err_console if json_output else console).print()  # end the question's line
        raise QueueError(f"no answer to the question (no terminal to ask on), so {undone}; pass --yes to run it without asking") from None
    if not answer and json_output:
        raise QueueError(f"the answer was no, so {undone}")
    return answer


def _personas(settings: Settings) -> dict[str, Persona]:
    """The persona files this machine reads (those it cannot read are left out: `persona
    personas validate` names them), so every persona's version is shown, not only the swapped."""
    return PersonaRegistry.from_settings(settings).scan()[0]


def _read(
    figures: Callable[[], QueueStats], lost_since: float | None, interval: float,
) -> tuple[QueueStats | None, str, float | None]:
    """One reading for `watch`, given up after ``interval`` (``READ_GIVE_UP_S`` at least): the
    figures, or why they cannot be read (and since when Redis could not be read: None while it can)."""
    started = time.time()
    try:
        with retrying_until(time.monotonic() + max(interval, READ_GIVE_UP_S)):
            return figures(), "", None
    except redis.exceptions.RedisError as exc:
        # Since the first reading that failed began, not since one gave up (a minute later, once).
        lost_since = lost_since or started
        since = dt.datetime.fromtimestamp(lost_since).strftime("%H:%M:%S")
        return None, f"{explain_redis_error(exc)} (cannot read the queue since {since}; still trying: Ctrl-C stops)", lost_since


def summary_line(stats: QueueStats) -> str:
    """The figures `watch` prints as one line a period when its output is not a terminal
    (a file, `| tee`, a log collector)."""
    waiting = ", ".join(f"{s.label} {s.waiting}" for s in stats.streams)
    parts = [
        f"waiting {sum(s.waiting for s in stats.streams)} ({waiting})",
        f"in flight {sum(s.in_flight for s in stats.streams)}",
        f"oldest waiting {max((s.oldest_waiting_s for s in stats.streams), default=0.0):.1f}s",
    ]
    untaken = [(name, sum(getattr(s, name) for s in stats.streams)) for name in ("withdrawn", "expired")]
    if any(count for _, count in untaken):  # no longer wanted, not taken yet: a worker discards them
        parts.append("not taken yet, no longer wanted: " + ", ".join(f"{name} {count}" for name, count in untaken))
    parts += [
        f"completed {stats.completed}", f"withdrawn {stats.withdrawn}", f"expired {stats.expired}",
        f"refused {stats.refused}", f"failed {stats.failed}", f"dead letters {stats.dead_letters}",
    ]
    lat = stats.latency
    if lat and lat.replies:
        parts.append(f"p95 queue wait {lat.queue_ms.p95:.0f} ms, generation {lat.generate_ms.p95:.0f} ms")
    if lat:
        parts.append(f"{lat.replies_per_s:.2f} replies/s")
    live, starting = len(stats.workers) + len(stats.unreadable_workers), len(stats.starting_workers)
    if stats.writes_refused and not live:
        parts.append("workers 0 (heartbeats refused: Redis refuses changes)")
    elif starting:
        parts.append(f"workers {live} ({starting} starting" + (")" if live else ": nothing is answered until it serves)"))
    else:
        parts.append(f"workers {live}" + ("" if live else " (nothing is answered: start `persona worker`)"))
    if stats.stuck:
        parts.append(f"stuck {len(stats.stuck)} (see `persona queue stats`)")
    warnings = [f"warning: {line}" for line in stats.redis_warnings]
    # Redis refusing every change leads the line: it explains the figures (no worker live).
    return "; ".join(warnings[:1] + parts + warnings[1:] if stats.writes_refused else parts + warnings)


def _watch_live(figures: Callable[[], QueueStats], interval: float) -> None:
    """A terminal: one screen of figures, redrawn in place."""
    lost_since = None
    with Live(render_all(figures()), console=console, screen=False, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            # A restarting Redis is said on screen and waited for: the watch used to end
            # there, just when the operator most wanted to see it come back.
            stats, problem, lost_since = _read(figures, lost_since, interval)
            live.update(render_all(stats) if stats else Text(problem, style="red"), refresh=True)


def _watch_lines(figures: Callable[[], QueueStats], interval: float) -> None:
    """Not a terminal: one timestamped line a period, and the versions whenever they change
    (a live display there wrote nothing until it ended, and then only its last frame)."""
    began = time.monotonic()
    reading: tuple[QueueStats | None, str, float | None] = (figures(), "", None)
    versions = None
    while True:
        stats, problem, lost_since = reading
        now = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        if stats is None:
            print(f"{now} {problem}", flush=True)
        else:
            if stats.served_versions != versions:
                versions = stats.served_versions
                shown = ", ".join(f"{k}@{v}" for k, v in sorted(versions.items())) or "-"
                print(f"{now} active versions: {shown}", flush=True)
            print(f"{now} {summary_line(stats)}", flush=True)
        # A line an interval from the last reading's start: one that waited on a silent
        # Redis is not followed by a whole interval more.
        time.sleep(max(0.0, began + interval - time.monotonic()))
        began = time.monotonic()
        reading = _read(figures, lost_since, interval)


@queue_app.command()
@friendly_errors
def watch(interval: float = typer.Option(1.0, min=0.2, help="seconds between refreshes")) -> None:
    """The same figures as `stats`, refreshed live until Ctrl-C (through a Redis restart too).

    Into a file or a pipe (`| tee`), it prints one timestamped line of the main figures every
    INTERVAL seconds instead, and the active versions whenever they change.
    """
    settings = get_settings()
    figures = functools.partial(collect_stats, connect(settings), personas=_personas(settings),
                                default_deadline_s=settings.queue.default_deadline_s)
    try:
        (_watch_live if console.is_terminal else _watch_lines)(figures, interval)
    except KeyboardInterrupt:
        pass


@queue_app.command()
@friendly_errors
def dead(
    limit: int = typer.Option(50, min=1, help="show at most this many, newest first"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object per line"),
) -> None:
    """Requests set aside after too many failed deliveries, and entries that hold no valid
    request, with the reason and delivery count.

    The stream keeps about 10,000; past that Redis deletes the oldest. A warning below the
    list (on stderr with --json) says when it nears that cap, and how many went that way.
    """
    client = connect(get_settings())
    letters = list_dead(client, count=limit)
    held, trimmed = count_dead(client)
    warning = cap_warning(held, trimmed)
    note = "" if warning else trimmed_note(trimmed)  # the warning counts them too
    if json_output:
        for letter in letters:
            print(letter.model_dump_json())
        if warning or note:  # beside the lines, not among them
            err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}" if warning else escape(note), highlight=False)
        return
    if not letters:  # an empty table, its title and a rule, looked like output cut short
        console.print("no dead letters")
    # The id whole on a line, however narrow the terminal (a pipe is 80 columns): it is what
    # `show`, `retry` and `drop` take, and "1795810641…" was all there was to copy.
    table = WholeNumbersTable(numbers=("id", "deliveries"), title=f"dead letters ({len(letters)} of {held} shown, newest first)",
                              header_style="bold")
    table.add_column("id", no_wrap=True, min_width=max((len(d.id) for d in letters), default=2))
    for column in ("request", "persona", "deliveries", "when", "reason"):
        table.add_column(column)
    for d in letters:
        when = local_time(d.at)
        # Escaped: a reason or a persona holding "[...]" was read as markup, mangled, or
        # ("[/var/log/x]", a closing tag) ended the command with a traceback.
        table.add_row(escape(d.id), escape(d.request_id or "(malformed)"), escape(d.persona), str(d.deliveries), when,
                      escape(d.reason))
    if letters:
        print_whole(table)
        console.print(
            "see one whole with [bold]persona queue show ID[/bold]; re-queue one with [bold]persona queue retry ID[/bold] "
            "(or all with [bold]--all[/bold]); delete one for good with [bold]persona queue drop ID[/bold]"
        )
    if warning:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    elif note:
        console.print(escape(note), highlight=False)


def _why_unreadable(letter: DeadLetter) -> str:
    """The first line of what is wrong with a letter's request (pydantic says much more)."""
    try:
        GenerationRequest.from_json(letter.payload)
    except ValidationError as exc:
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg']}" for e in exc.errors()[:MAX_PROBLEMS_SHOWN]
        )
    return ""


def _shown_id(entry_id: str) -> str:
    """An id the user gave, as an error repeats it: cut when far longer than any id (a
    pasted file was repeated whole)."""
    if len(entry_id) <= MAX_ID_SHOWN_CHARS:
        return entry_id
    return f"{entry_id[:MAX_ID_SHOWN_CHARS]}… ({len(entry_id):,} characters, far longer than an id)"


@queue_app.command()
@friendly_errors
def show(
    entry_id: str = typer.Argument(..., metavar="ID", help="a dead-letter id from `persona queue dead`"),
    json_output: bool = typer.Option(False, "--json", help="print the letter as one JSON object"),
) -> None:
    """One dead letter whole: why it was set aside, who asked, and what it asked."""
    if not entry_id.strip():  # it read "no dead letter ; see ..."
        raise QueueError("a dead-letter ID is needed: `persona queue dead` lists them")
    letter = find_dead(connect(get_settings()), entry_id)
    if letter is None:
        raise QueueError(f"no dead letter {_shown_id(entry_id)}; see `persona queue dead`")
    if json_output:
        print(letter.model_dump_json())
        return
    lines = [
        f"dead letter {letter.id}",
        f"  set aside  {local_time(letter.at)} by worker {letter.worker or '-'} after {letter.deliveries} {'delivery' if letter.deliveries == 1 else 'deliveries'}: {letter.reason}",
        f"  bound for  {'the ' + stream_label(letter.stream) + ' stream' if letter.stream else '-'}",
    ]
    newer = newer_contract(letter.payload)
    if letter.request_id and not newer:
        request = GenerationRequest.from_json(letter.payload)
        user = f", user {request.user}" if request.user else ""
        lines.append(
            f"  request    {request.id} for {request.persona} ({request.mode}, {request.priority.value}, "
            f"from {request.source}{user}), sent {local_time(request.created_at)}"
        )
        if request.mode == "complete":
            lines.append(f"  prefix     {json.dumps(request.prefix, ensure_ascii=False)}")
        lines += [f"  {m.role:>9}: {m.content}" for m in request.messages]
        lines.append(f"re-queue it with `persona queue retry {letter.id}`, or delete it with `persona queue drop {letter.id}`")
    elif letter.request_id:  # a newer contract's: listed under its id, retried once this persona is upgraded
        lines += [
            f"  request    {letter.request_id} for {letter.persona or '-'}: {newer}",
            f"  payload    {letter.payload}",
            f"retry it with an upgraded persona, or delete it with `persona queue drop {letter.id}`",
        ]
    else:
        lines += [
            f"  unreadable {_why_unreadable(letter)}",
            f"  payload    {letter.payload}",
            f"it cannot be retried; delete it with `persona queue drop {letter.id}`",
        ]
    for line in lines:
        console.print(escape(line), highlight=False)


@queue_app.command()
@friendly_errors
def retry(
    entry_id: str = typer.Argument(None, metavar="ID", help="a dead-letter id from `persona queue dead`"),
    all_: bool = typer.Option(False, "--all", help="re-queue every dead letter"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation with --all"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Re-queue dead letters with their original arguments (and a fresh deadline).

    With --json: ok, requeued (their dead-letter ids), and those --all left: left, full (per
    stream, by its Redis key), unreadable, refused (dead-letter id: why, such as its request id
    in use by another request).
    """
    settings = get_settings()
    client = connect(settings)
    limit = settings.queue.max_length  # re-queued work is held to the queue's length as callers' is: a full stream refuses it
    if all_ and entry_id:
        raise QueueError(f"name one dead-letter ID or pass --all, not both (to re-queue only {entry_id}, leave out --all)")
    if not all_ and not entry_id:
        raise QueueError("name one dead-letter ID, or pass --all (see `persona queue dead`)")
    if entry_id:
        try:
            new_id = retry_dead(client, entry_id, limit)
        except ValueError:
            letter = find_dead(client, entry_id)
            why = _why_unreadable(letter) if letter else "gone meanwhile"
            raise QueueError(
                f"dead letter {entry_id} holds no readable request ({why}), so it cannot be retried; "
                f"see it with `persona queue show {entry_id}`, delete it with `persona queue drop {entry_id}`"
            ) from None
        if new_id is None:
            raise QueueError(f"no dead letter {_shown_id(entry_id)}; see `persona queue dead`")
        if json_output:
            _print_retried(RetryReport(requeued=[entry_id]))
            return
        console.print(f"re-queued {entry_id}")
        return
    count = client.xlen(keys.STREAM_DEAD)
    if not count:
        if json_output:
            _print_retried(RetryReport())
            return
        console.print("no dead letters")
        return
    if not yes and not _confirmed(f"re-queue all {count} dead letter(s)?", "nothing was re-queued", json_output):
        raise typer.Exit(1)
    report = retry_all(client, max_length=limit)
    if json_output:
        _print_retried(report)
        return
    console.print(f"re-queued {len(report.requeued)} dead letter(s)")
    if report.left:
        console.print(f"{report.left} left:")
    for stream, letters in report.full.items():
        console.print(
            f"  {letters} for the {stream_label(stream)} stream, which holds {limit} requests (PERSONA_QUEUE__MAX_LENGTH): "
            "run this again once it has drained (see `persona queue stats`)"
        )
    if report.unreadable:
        console.print(
            f"  {report.unreadable} holding no readable request, which cannot be retried (see `persona queue dead`); "
            "delete them with `persona queue drop --unreadable`"
        )
    for why in list(report.refused.values())[:MAX_REFUSED_SHOWN]:
        console.print(f"  {escape(why)}", highlight=False)
    if len(report.refused) > MAX_REFUSED_SHOWN:
        console.print(f"  and {len(report.refused) - MAX_REFUSED_SHOWN} more refused (see `persona queue dead`)")


def _print_retried(report: RetryReport) -> None:
    """`queue retry --json`'s object: the letters re-queued, and those left and why."""
    print(json.dumps({"ok": True, **report.model_dump(mode="json"), "left": report.left}))


@queue_app.command()
@friendly_errors
def drop(
    entry_ids: Annotated[list[str] | None, typer.Argument(metavar="ID", help="dead-letter ids from `persona queue dead`")] = None,
    all_: bool = typer.Option(False, "--all", help="delete every dead letter"),
    unreadable: bool = typer.Option(False, "--unreadable", help="delete every dead letter that holds no readable request"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation with --all or --unreadable"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Delete dead letters for good (one that can never be retried, or should not be).

    Their askers were told when the requests were set aside; nothing else refers to them.
    With --json: ok, and dropped (how many).
    """
    client = connect(get_settings())
    given = [name for name, on in (("dead-letter IDs", bool(entry_ids)), ("--all", all_), ("--unreadable", unreadable)) if on]
    if len(given) > 1:  # which one was meant cannot be guessed: --all deletes far more than --unreadable
        raise QueueError(f"{', '.join(given[:-1])} and {given[-1]} were given together: pass only one of them (see `persona queue dead`)")
    if not given:
        raise QueueError("name dead-letter IDs, or pass --all or --unreadable (see `persona queue dead`)")
    if entry_ids:
        entry_ids = list(dict.fromkeys(entry_ids))  # an id named twice is one letter, and said once
        if not all(i.strip() for i in entry_ids):
            raise QueueError("a dead-letter ID cannot be empty; nothing dropped; `persona queue dead` lists them")
        missing = [i for i in entry_ids if find_dead(client, i) is None]
        if missing:  # nothing is dropped: a typo among the ids should not go half done
            raise QueueError(f"no dead letter {', '.join(map(_shown_id, missing))}; nothing dropped; "
                             "see `persona queue dead`")
        ids = entry_ids
    else:
        ids = dead_ids(client, unreadable=unreadable)
    if ids and not entry_ids and not yes and not _confirmed(
        f"delete {len(ids)} dead letter(s) for good?", "nothing was dropped", json_output,
    ):
        raise typer.Exit(1)
    dropped = drop_dead(client, ids) if ids else 0
    if json_output:
        print(json.dumps({"ok": True, "dropped": dropped}))
    elif not ids:
        console.print("no dead letters" if all_ else "no unreadable dead letters")
    else:
        console.print(f"dropped {dropped} dead letter(s)")


def register(app: typer.Typer) -> None:
    app.add_typer(queue_app, name="queue")
