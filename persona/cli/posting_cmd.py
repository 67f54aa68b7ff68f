"""`persona post`, `persona posts ...` and `persona scheduler`: curated posts, by hand or on schedule."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from persona import heartbeat
from persona.cli.common import (
    console,
    err_console,
    friendly_errors,
    get_settings,
    json_error,
)
from persona.cli.talk import queue_if_no_worker, stop_signals_as_ctrl_c
from persona.connection import connect
from persona.contract import GenerationRequest
from persona.errors import PersonaError, PostingError, SinkError
from persona.logs import setup_logging
from persona.personas import Persona, PersonaRegistry
from persona.queue import QueueClient
from persona.settings import Settings

__all__ = ["approve", "history", "pending", "post", "register", "reject", "scheduler", "settle", "uncertain"]

log = logging.getLogger(__name__)

posts_app = typer.Typer(help="The approval queue, the posts that got no answer, and the history of what went out.", no_args_is_help=True)

FAILED_STATUSES = ("no_candidate", "failed", "uncertain", "busy")
# The error kind a failed outcome is printed with under --json: a sink that turned the post away
# or gave no answer, else the post itself (no candidate passed, another scheduler holds the slot).
FAILURE_KINDS = {"failed": SinkError.__name__, "uncertain": SinkError.__name__}
SLOT_HELP = (
    "which slot: 2026-11-27T18:00 (in the persona's schedule.timezone), 2026-11-27T18:00Z or +01:00 "
    "(that instant), 2026-11-27 (that day's one slot), or a slot name `persona post` printed"
)


# A dry run with no worker looks this long for one (`persona up` may be starting it this
# moment) before it says so and ends, rather than waiting posting.wait_s (5 minutes).
NO_WORKER_GRACE_S = 3.0
WORKER_LOOK_S = 0.25

# What str.splitlines breaks a line at, and how a piped listing writes each inside a cell.
LINE_BREAKS = ("\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
LINE_BREAK_ESCAPES = {char: repr(char)[1:-1] for char in LINE_BREAKS}
STDIN_TEXT_HELP = "`-` reads {} from standard input (all of it one post, line breaks kept)"  # "them" (words), "it" (a text)


def _read_text(text: str | None) -> str | None:
    """A --text as given, or for `-` all of standard input (its trailing line break dropped)."""
    if text != "-":
        return text
    if sys.stdin.isatty():
        err_console.print("type the post, then Ctrl-D on a line of its own")
    return sys.stdin.read().rstrip("\r\n")


def _poster(
    settings: Settings, source: str = "cli", stopping: threading.Event | None = None, *, worker_now: bool = False,
    by_hand: bool = False, on_publish=None,
):
    """A Poster whose candidates come through the queue; with ``worker_now``, only from a
    worker that serves or is starting (see ``_FromAWorker``); ``by_hand`` (`persona post`):
    it says when they wait for a worker (see ``_SaysItWaits``); ``on_publish``: see ``Poster``."""
    from adapters.posting.candidates import QueueCandidates
    from adapters.posting.poster import Poster

    client = connect(settings)
    queue = _SaysItWaits(client, settings) if by_hand else QueueClient(client, settings.queue)
    candidates = QueueCandidates(queue, settings.posting.wait_s, source=source, stopping=stopping)
    return Poster(settings, client, _FromAWorker(candidates) if worker_now else candidates, on_publish=on_publish)


class _SaysItWaits(QueueClient):
    """The queue of `persona post`: with no worker live, its first candidate is queued, then said
    to wait for one (``queue_if_no_worker``). Said before they were sent, "this waits in the
    queue" came ahead of a full queue's refusal; said not at all, the spinner ran for
    posting.wait_s (5 minutes) before "no worker answered"."""

    def __init__(self, client, settings: Settings) -> None:
        super().__init__(client, settings.queue)
        self.wait_s = settings.posting.wait_s
        self.told = False

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        if self.told:
            return super().submit(request)
        self.told = True  # first: queue_if_no_worker queues it through this method
        queued = queue_if_no_worker(self, request, self.wait_s)
        return super().submit(request) if queued is None else queued


class _FromAWorker:
    """Candidates through the queue, asked for only while a worker serves or is starting:
    with none, a dry run said it would wait and failed 5 minutes later (posting.wait_s)."""

    def __init__(self, candidates) -> None:
        self.candidates = candidates

    @property
    def withdrawn(self) -> int:
        return self.candidates.withdrawn

    def __call__(self, persona: Persona, n: int, seed: int) -> list:
        queue: QueueClient = self.candidates.queue
        give_up = time.monotonic() + NO_WORKER_GRACE_S
        while not (heartbeat.live_worker_ids(queue.redis) or heartbeat.starting_workers(queue.redis)):
            if time.monotonic() >= give_up:
                raise PostingError(
                    f"no worker serves persona {persona.name!r} (none is running or starting), so nothing can write "
                    f"its candidates: start one with `persona worker` (or `persona up`), then run this again"
                )
            time.sleep(WORKER_LOOK_S)
        return self.candidates(persona, n, seed)  # a worker still starting: said (``_SaysItWaits``), then waited for


def _plain(text: str, style: str = "") -> Text:
    """Text shown exactly as written: a post's "[brackets]" are not markup, nor ":100:" an emoji."""
    return Text(text, style=style)


def _print_rows(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Rows as a table on a terminal; piped or redirected, one unwrapped line per row.

    The table folds a long cell onto more lines (a text or link cut short with "…" cannot be
    checked or copied), which at 80 columns left a word or two a line; a pipe gets each row
    whole, its short cells padded into columns and the last one (a text, a command) as it is.
    A line break inside a cell is written as `\\n`, so that a post is still one line (`--json`
    has each text exactly).
    """
    if console.is_terminal:
        table = Table(*(Column(header, overflow="fold") for header in headers))
        for row in rows:
            table.add_row(*map(_plain, row))
        console.print(table)
        return
    rows = [tuple(map(_one_line, row)) for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in (headers, *rows):
        _say("  ".join([*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)), row[-1]]).rstrip())


def _one_line(cell: str) -> str:
    """A cell with each character that would break its line escaped: "\\n", "\\r", "\\u2028"."""
    return "".join(LINE_BREAK_ESCAPES.get(char, char) for char in cell)


def _say(text: str, style: str = "", to: Console = console) -> None:
    to.print(_plain(text, style), highlight=False)


def _show(outcome, as_json: bool) -> None:
    """An outcome of `persona post` or `posts approve`: one JSON object with ``ok`` (and, failed,
    the ``error`` every failing command prints), or lines, a failure's on stderr as any error's."""
    failed = outcome.status in FAILED_STATUSES
    if as_json:
        shown = {"ok": not failed, **outcome.to_dict()}
        if failed:
            shown["error"] = json_error(outcome.message or outcome.headline,
                                        FAILURE_KINDS.get(outcome.status, PostingError.__name__))
        print(json.dumps(shown, ensure_ascii=False))
        return
    to = err_console if failed else console
    to.print(_plain(outcome.headline, "red" if failed else "green"), _plain(f"{outcome.persona} {outcome.slot}".rstrip()),
             highlight=False)
    if outcome.text:
        _say(outcome.text, to=to)
    if outcome.candidates:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(outcome.rejected.items())) or "none"
        _say(f"{outcome.candidates} candidates; rejected: {reasons}", "dim", to)
    if outcome.status in ("dry_run", "no_candidate"):  # what a person tuning the filters needs to see
        for verdict in outcome.verdicts:
            flawed = f" ({', '.join(verdict['flaws'])})" if verdict.get("flaws") else ""
            trimmed = f"  (cut off; left out: {verdict['trimmed']})" if verdict.get("trimmed") else ""
            _say(f"  {verdict['rejected'] or 'passed' + flawed}: {verdict['text']}{trimmed}", "dim" if verdict["rejected"] else "", to)
    _show_sinks(outcome.sinks, to)
    # A failed sink's line is the start of the message too (which --json has whole): under the
    # sinks' lines, what is left to say is what to do next.
    if said := outcome.besides_sinks():
        _say(said, to=to)


def _show_sinks(sinks: dict[str, dict], to: Console = console) -> None:
    """Each sink's outcome on a line of its own: its link, or what went wrong there."""
    from adapters.posting.publishing import sink_said

    for spec, entry in sinks.items():
        _say("  " + sink_said(spec, entry), to=to)


def _refuse_if_unknown(persona: str | None, found: list) -> None:
    """A --persona filter that found nothing and names no persona is refused (UnknownPersona,
    with the name it is likely a misspelling of): `posts history --persona sgae --json` printed
    [] and `posts uncertain --persona sgae` "no post is uncertain", as if sage had none. One
    that found posts is a name all the same (its persona's file may be gone since)."""
    if persona is not None and not found:
        PersonaRegistry.from_settings(get_settings()).get(persona)


def _sink_failures_on_screen() -> None:
    """Leave each sink's failure to the outcome shown: the publisher logs it too (for the scheduler,
    where logs are all there is), and on a terminal that said it a second time on stderr."""
    from adapters.posting import publishing

    publishing.log.setLevel(logging.ERROR)  # a bug's traceback (log.exception) still shows


@friendly_errors
def post(
    persona: str = typer.Argument(..., help="which persona posts"),
    dry_run: bool = typer.Option(False, "--dry-run", help="generate and curate, but post nothing and record nothing (with --slot: first, whether that slot is posted already)"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object: text, candidates, rejected, sinks"),
    sink: list[str] = typer.Option(None, "--sink", help="post here instead of the persona's sinks (repeatable): x, mastodon, bluesky, discord:CHANNEL, telegram:CHAT, file:PATH"),
    slot: str = typer.Option(None, "--slot", help=SLOT_HELP + "; one not begun must be one the scheduler would still post (its time come, within "
                          "posting.grace_s, or the newest with schedule.missed = \"latest\"); a slot already posted is "
                          "skipped (default: a new slot of its own)"),
    n: int = typer.Option(None, "-n", "--candidates", min=1, max=64, help="candidates to generate (default: the persona's schedule.candidates)"),
    approval: bool = typer.Option(None, "--approval/--no-approval", help="hold for approval (default: the persona's schedule.approval)"),
    text: str = typer.Option(None, "--text", help="post these words instead of generating; " + STDIN_TEXT_HELP.format("them")),
) -> None:
    """Make one post now: generate candidates through the queue, keep the best, publish it.

    Needs a worker (`persona up`), unless --text gives the words. A slot already posted is reported and skipped. The best
    candidate ends as a finished sentence (not in "...") with its quotes closed, unless none
    does: then the message says what is wrong with the one chosen. A candidate the model cut
    off at sampling.max_new_tokens is trimmed back to its last finished sentence, or rejected
    (cut_off) where none is worth keeping.

    A post that some sinks took and others turned away is "partly posted: 2 of 3" (in --json:
    status "failed", headline "partly posted: 2 of 3"; exit status 1): `persona post PERSONA --slot SLOT`
    posts it where it failed, never twice.

    Standard input is read only with `--text -`: `echo "Be still." | persona post sage --text -`
    posts those words (no model, no filters: only each platform's limit, and not a text the
    persona posted lately). All of the input is one post, its line breaks kept; for several
    posts, run it once a post.
    """
    settings = get_settings()
    text = _read_text(text)
    publishing = _Publishing(named=slot is not None)
    # A dry run is a look, not a post to see through: with no worker it ends at once.
    poster = _poster(settings, worker_now=dry_run, by_hand=True, on_publish=publishing)
    _sink_failures_on_screen()
    waiting = (contextlib.nullcontext() if json_output or text is not None
               else console.status(f"{persona} is writing candidates..."))
    # SIGTERM and SIGHUP (the terminal closed) stop it as Ctrl-C does: what waits is withdrawn.
    with stop_signals_as_ctrl_c() as stopping:
        try:
            with waiting:
                outcome = poster.post(persona, slot=slot, sinks=sink or None, dry_run=dry_run, n=n, approval=approval,
                                      text=text, by_hand=True)
        except KeyboardInterrupt:
            _say_stopped(persona, poster.candidates.withdrawn, dry_run, json_output, publishing.slot)
            raise typer.Exit(stopping.exit_status()) from None
    if outcome.retry_later:  # the scheduler tries its own slots again; by hand, say how
        # Not "nothing went out": a post that got no answer may be out, and the retry finds or deduplicates it.
        outcome.advise(f"to try again later: `persona post {outcome.persona} --slot {outcome.slot}` (it never posts twice)")
    _show(outcome, json_output)
    if outcome.status in FAILED_STATUSES:
        raise typer.Exit(1)


class _Publishing:
    """The slot `persona post` began to publish, said on stderr as it begins where the person did
    not name it: a stop (Ctrl-C, a kill) leaves it begun, and only its name finishes it."""

    def __init__(self, *, named: bool) -> None:
        self.named = named
        self.slot = ""

    def __call__(self, persona: str, slot: str) -> None:
        self.slot = slot
        if not self.named:
            with contextlib.suppress(OSError):  # the terminal may be gone: the post goes on
                err_console.print(f"posting {persona} slot {slot} (if this stops: `persona post {persona} --slot "
                                  f"{slot}` finishes it, never twice)", style="dim", markup=False, highlight=False,
                                  soft_wrap=True)


def _say_stopped(persona: str, withdrawn: int, dry_run: bool, json_output: bool, slot: str = "") -> None:
    """Say what became of a `persona post` stopped with Ctrl-C: on stderr, and
    under ``--json`` also as the failure a script reads (it read nothing, exit 130)."""
    if withdrawn:  # stopped while the workers wrote its candidates: the slot was let go, untouched
        them = f"the {withdrawn} candidates asked for were" if withdrawn > 1 else "the candidate asked for was"
        said = f"stopped: {them} withdrawn (no worker will write {'them' if withdrawn > 1 else 'it'}); nothing was posted"
    elif dry_run:
        said = "stopped: nothing was posted (a dry run posts nothing)"
    elif slot:  # it was posting: only the ledger knows what went out
        said = (f"stopped while posting slot {slot}: it may be out on some sinks (`persona posts uncertain --persona "
                f"{persona}` lists it); `persona post {persona} --slot {slot}` finishes it (never twice)")
    else:  # stopped before any platform was called
        said = "stopped before posting: nothing was posted"
    with contextlib.suppress(OSError):  # the terminal or the reader of a pipe may be gone
        err_console.print(said, style="yellow", markup=False, highlight=False)
        if json_output:
            print(json.dumps({"ok": False, "error": json_error(said, PostingError.__name__)}, ensure_ascii=False),
                  flush=True)


@posts_app.command("pending")
@friendly_errors
def pending(
    persona: str = typer.Option(None, "--persona", help="only this persona's posts"),
    json_output: bool = typer.Option(False, "--json", help="print a JSON list"),
) -> None:
    """List the posts waiting for approval, oldest first, with how long each has waited and
    when it lapses (left 30 days, it is never posted; piped: one line a post, a line break as \\n)."""
    from persona.approvals import ApprovalQueue

    approvals = ApprovalQueue(connect(get_settings()))
    waiting = [w for w in approvals.pending() if persona is None or w.persona == persona]
    _refuse_if_unknown(persona, waiting)
    now = approvals.now()
    if json_output:  # created and expires in epoch seconds, by Redis's clock
        print(json.dumps([{**w.__dict__, "waiting_s": round(w.waited_s(now), 3)} for w in waiting], ensure_ascii=False))
        return
    if not waiting:
        console.print(f"no posts by {persona} waiting for approval" if persona else "no posts waiting for approval")
        return
    zones = _schedule_zones({w.persona for w in waiting})
    rows = [(w.id, w.persona, _slot_in_zone(w.slot, zones.get(w.persona, "UTC")), _duration(w.waited_s(now)),
             _lapses(w.expires, now), ", ".join(w.sinks), w.text) for w in waiting]
    _print_rows(("id", "persona", "slot", "waiting", "lapses (UTC)", "sinks", "text"), rows)


def _schedule_zones(names: set[str]) -> dict[str, str]:
    """Each persona's schedule.timezone, for those whose file can still be read."""
    registry = PersonaRegistry.from_settings(get_settings())
    zones = {}
    for name in names:
        with contextlib.suppress(PersonaError):  # its file gone or broken since: its slot is shown in UTC
            zones[name] = registry.get(name).schedule.timezone
    return zones


def _slot_in_zone(slot: str, zone: str) -> str:
    """A slot's name (its UTC instant, "Z"), with the time it is in the persona's zone, as
    --slot and the schedule read it: "2026-03-01T08:00:00Z (09:00 Europe/Berlin)"."""
    from zoneinfo import ZoneInfo

    try:
        when = datetime.fromisoformat(slot)
    except ValueError:  # a post made by hand names a slot of its own
        return slot
    if zone == "UTC" or when.tzinfo is None:
        return slot
    local = when.astimezone(ZoneInfo(zone))
    return f"{slot} ({local:%H:%M} {zone})" if local.date() == when.date() else f"{slot} ({local:%Y-%m-%d %H:%M} {zone})"


def _duration(seconds: float) -> str:
    """A span as a person reads it: "40 s", "12 min", "5 h 3 min", "29 d 21 h"."""
    minutes, hours, days = int(seconds // 60), int(seconds // 3600), int(seconds // 86400)
    if days:
        return f"{days} d {hours % 24} h"
    if hours:
        return f"{hours} h {minutes % 60} min"
    return f"{minutes} min" if minutes else f"{int(seconds)} s"


def _lapses(expires: float, now: float) -> str:
    """When a waiting post lapses, in UTC, and how soon."""
    if not expires:
        return "never"
    return f"{datetime.fromtimestamp(expires, UTC):%Y-%m-%d %H:%M} (in {_duration(max(0.0, expires - now))})"


@posts_app.command("approve")
@friendly_errors
def approve(
    approval_id: str = typer.Argument(..., metavar="ID", help="the id `persona posts pending` shows"),
    text: str = typer.Option(None, "--text", help="post this edited text instead; " + STDIN_TEXT_HELP.format("it")),
    json_output: bool = typer.Option(False, "--json", help="print the outcome as JSON"),
) -> None:
    """Approve a waiting post: it goes out now to its sinks (again: retries the sinks that failed)."""
    poster = _poster(get_settings())
    _sink_failures_on_screen()
    outcome = poster.approve(approval_id, _read_text(text))
    _show(outcome, json_output)
    if outcome.status in FAILED_STATUSES:
        raise typer.Exit(1)


@posts_app.command("reject")
@friendly_errors
def reject(
    approval_id: str = typer.Argument(..., metavar="ID", help="the id `persona posts pending` shows"),
    json_output: bool = typer.Option(False, "--json", help="print the outcome as JSON"),
) -> None:
    """Reject a waiting post: it never goes out, and its slot is closed."""
    decided = _poster(get_settings()).reject(approval_id)
    if json_output:  # the post as `posts pending --json` lists it, now rejected
        print(json.dumps({"ok": True, **decided.__dict__}, ensure_ascii=False))
        return
    _say(f"rejected {decided.id} ({decided.persona} {decided.slot})")


@posts_app.command("uncertain")
@friendly_errors
def uncertain(
    persona: str = typer.Option(None, "--persona", help="only this persona's posts"),
    json_output: bool = typer.Option(False, "--json", help="print a JSON list"),
) -> None:
    """List the posts that got no answer from a sink, each with the command that finishes it.

    X and Telegram cannot tell a repeat: only a person can say if the post went out
    (`persona posts settle`). Mastodon, Bluesky, Discord and files make a retry safe: the
    scheduler retries within the missed-slot grace period, and `persona post PERSONA --slot
    SLOT` finishes one left after it. Also listed: a post whose poster stopped mid-post
    (Ctrl-C, a kill) where nothing else will finish it: a `persona post` or an approved
    post (`persona posts approve ID` again), or a scheduled slot whose claim ran out.
    Piped: one line a post, a line break as \\n.
    """
    from persona.ledger import PostLedger

    settings = get_settings()
    items = PostLedger(connect(settings), grace_s=settings.posting.grace_s).unsettled(persona)
    _refuse_if_unknown(persona, items)
    if json_output:
        print(json.dumps(items, ensure_ascii=False))
        return
    if not items:
        console.print("no post is uncertain")
        return
    rows = [(item["persona"], item["slot"], item["sink"], *_unsettled_said(item), item["text"]) for item in items]
    _print_rows(("persona", "slot", "sink", "what happened", "what to do", "text"), rows)


def _unsettled_said(item: dict[str, str]) -> tuple[str, str]:
    """What happened to a post `posts uncertain` lists, and what to do about it."""
    todo = f"`{item['command']}`"
    held_s = int(item.get("held_s") or 0)
    if item["state"] == "uncertain":
        happened, todo = item["error"], f"look on {item['sink']}, then {todo} (or `--not-posted`)"
    elif held_s:  # its poster may have been killed: it holds the slot until its claim runs out
        happened = "no answer yet (safe to retry)" if item["state"] == "intent" else f"{item['state']}, not posted here yet"
        happened += ": its poster is still at work or was stopped mid-post"
    elif item["state"] == "intent":
        happened = f"no answer (safe to retry): {item['error']}"
    else:  # approved or begun: its poster stopped before this sink
        happened = item["error"]
    if held_s:
        happened += f"; its claim runs out in {held_s} s"
        todo = f"after that, {todo}"
    return happened, todo


@posts_app.command("settle")
@friendly_errors
def settle(
    persona: str = typer.Argument(..., help="whose post"),
    slot: str = typer.Argument(..., help=SLOT_HELP),
    posted: str = typer.Option(None, "--posted", metavar="LINK", help="it went out: its link (or its id) on the platform"),
    not_posted: bool = typer.Option(False, "--not-posted", help="it is not on the platform: posting it again is safe"),
    sink: str = typer.Option(None, "--sink", help="which sink (needed only when several got no answer)"),
    json_output: bool = typer.Option(False, "--json", help="print the outcome as JSON"),
) -> None:
    """Say what became of a post that got no answer (`persona posts uncertain` lists them).

    --posted LINK records it in the history and closes the slot once every sink has it;
    --not-posted lets `persona post PERSONA --slot SLOT` post it again. Until then neither
    the scheduler nor a retry posts it there (it might go out twice).
    """
    if (posted is None) == (not not_posted):
        raise typer.BadParameter("give one of --posted LINK or --not-posted")
    outcome = _poster(get_settings()).settle(persona, slot, posted=posted, sink=sink)
    if json_output:
        print(json.dumps(outcome.to_dict(), ensure_ascii=False))
        return
    console.print(_plain("settled", "green"), _plain(f"{outcome.persona} {outcome.slot}"), highlight=False)
    _show_sinks(outcome.sinks)
    _say(outcome.message)


@posts_app.command("history")
@friendly_errors
def history(
    count: int = typer.Option(20, "-n", min=1, help="how many posts to show"),
    persona: str = typer.Option(None, "--persona", help="only this persona's posts"),
    json_output: bool = typer.Option(False, "--json", help="print a JSON list"),
) -> None:
    """What went out, where and when, newest first, with what became of its slot ("partly
    posted: 1 of 2" where another sink turned it away: `persona post PERSONA --slot SLOT` posts it there).

    Piped or redirected: one whole line a post, a line break in its text written as \\n
    (--json has each text exactly).
    """
    from persona.ledger import PostLedger

    items = PostLedger(connect(get_settings())).history(count, persona)
    _refuse_if_unknown(persona, items)
    if json_output:
        print(json.dumps(items, ensure_ascii=False))
        return
    if not items:
        console.print(f"nothing posted by {persona} yet" if persona else "nothing posted yet")
        return
    rows = [
        (datetime.fromtimestamp(float(item["at"]), UTC).strftime("%Y-%m-%d %H:%M"), item["persona"], item["slot"],
         item["sink"], item["url"] or item["id"], item["slot_state"], item["text"])
        for item in items
    ]
    _print_rows(("when (UTC)", "persona", "slot", "sink", "post", "slot state", "text"), rows)


@friendly_errors
def scheduler() -> None:
    """Post every persona's scheduled slots (those whose file sets schedule.enabled).

    Missed slots after downtime follow each persona's schedule.missed policy. Run as
    many as you like: each slot is posted once. Stop with Ctrl-C or SIGTERM.
    """
    from adapters.scheduler import Scheduler, scheduled_personas

    settings = get_settings()
    setup_logging(settings)
    stopping = threading.Event()  # shared, so a stop also ends a wait for candidates
    poster = _poster(settings, source="scheduler", stopping=stopping)
    runner = Scheduler(poster, poster.ledger.redis, stopping=stopping)
    # Said now, not at the first slot (tomorrow at 9, say): the operator is watching.
    for problem in runner.preflight():
        log.error("%s", problem)
    if not scheduled_personas(poster.registry.all()):
        err_console.print(_plain("no persona posts on schedule (a file needs schedule.enabled = true, sinks, "
                                 "and \"scheduler\" in adapters); the scheduler waits for one"))
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.stop()


def register(app: typer.Typer) -> None:
    app.command()(post)
    app.add_typer(posts_app, name="posts")
    app.command()(scheduler)
