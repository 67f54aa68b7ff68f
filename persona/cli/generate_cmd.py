"""`persona generate`: many samples from a persona, as batch work through the queue."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn

from persona.cli.common import err_console, friendly_errors, get_settings, json_error
from persona.cli.talk import (
    queue_if_no_worker,
    stop_signals_as_ctrl_c,
    timeout_seconds,
    withdraw,
)
from persona.cli.training_common import persona_with_weights
from persona.contract import MAX_NEW_TOKENS, MAX_SEED
from persona.errors import QueueError, ReplyTimeout, RequestFailed, UsageError
from persona.whole_files import write_whole

__all__ = ["generate", "register"]

GENERATE_WINDOW = 64  # requests in flight at once, well under the queue's length cap
SAMPLE_SEPARATOR = "=" * 20 + "\n"
# How `persona generate` gives its samples longer, for a timeout to name (the queue names no command).
GENERATE_LONGER = "`persona generate --timeout SECONDS`"
# Once the deadline has passed, each sample still unanswered gets only a look (a wait of 0 s:
# one round trip); 0.1 s each kept a window of 64 with no worker 6 s and more past --timeout.
LAST_LOOK_S = 0.0


def _finish(text: str, prefix: str, include_prefix: bool, truncate: str | None) -> str:
    """A sample as the user reads it: cut at ``truncate``, after its prefix where asked (a
    continuation keeps its own leading space: "Life is" + " often", "Tomor" + "row")."""
    if truncate and truncate in text:
        text = text[: text.index(truncate)]
    return prefix + text if include_prefix else text.lstrip()


def _out_file(value: str) -> Path:
    """--out's file, not a folder. An empty one is said to be missing: as a path it reads
    ".", so it was refused as "file '' is a directory"."""
    if not value.strip():
        raise typer.BadParameter("an output path is needed: name the file to write the samples to, or leave out "
                                 "--out to print them")
    if (path := Path(value)).is_dir():
        raise typer.BadParameter(f"{value} is a directory: name a file in it to write the samples to")
    return path


@friendly_errors
def generate(
    name: str = typer.Argument(..., metavar="NAME", help="the persona that writes"),
    prefix: str = typer.Option("", help="text every sample starts from (default: nothing)"),
    n: int = typer.Option(8, "-n", "--nsamples", min=1, help="how many samples"),
    out: Path = typer.Option(
        None, "--out", parser=_out_file, metavar="FILE",
        help="write samples to this file (.jsonl: one JSON object per line); default: print them, "
        "each followed by a line of =",
    ),
    include_prefix: bool = typer.Option(True, "--include-prefix/--no-include-prefix", help="start each sample with the prefix"),
    truncate: str = typer.Option(None, help="cut each sample at the first occurrence of this text"),
    temperature: float = typer.Option(None, min=0.0, max=5.0, help="override the persona's temperature"),
    max_new_tokens: int = typer.Option(
        None, min=1, max=MAX_NEW_TOKENS, help="override the sample length limit, in tokens"
    ),
    seed: int = typer.Option(None, min=0, max=MAX_SEED, metavar="N", help="sample i uses seed N+i, for repeatable samples"),
    timeout: float = typer.Option(
        600.0, parser=timeout_seconds, metavar="SECONDS", help="seconds to wait for all samples (1 to 86400), also their deadline"
    ),
    json_output: bool = typer.Option(
        False, "--json", help="print one JSON object: ok, asked, written, and the samples unless --out has them "
        "(samples missing: ok false and an error, exit status 1)",
    ),
) -> None:
    """Many samples from NAME as batch work through the queue, for curation by hand.

    Ctrl-C (or SIGTERM, SIGHUP) withdraws the samples still waiting and keeps those already
    written by the persona: they are printed (or written to --out) before it stops. Exit
    status 1 when any sample is missing (not asked for or answered before --timeout, or failed).
    """
    from persona.connection import connect
    from persona.queue import QueueClient

    settings = get_settings()
    persona_with_weights(settings, name, "sample")
    if out is not None:  # said now, not after minutes of sampling that the traceback then threw away
        _check_writable(out)
    client = QueueClient(connect(settings), settings.queue, longer_wait=GENERATE_LONGER)
    sampling = _Sampling(client, name, prefix, n, temperature, max_new_tokens, seed, timeout=timeout)
    with stop_signals_as_ctrl_c() as stopping:
        try:
            sampling.run()
        except KeyboardInterrupt:
            problem = sampling.withdraw()
            kept = f"kept the {len(sampling.texts)} of {n} samples written so far" if sampling.texts else "no sample was written yet"
            said = f"stopped: {kept}; {problem or 'the rest were withdrawn'}"
            err_console.print(said, style="yellow", markup=False, highlight=False)
            texts = [_finish(t, prefix, include_prefix, truncate) for t in sampling.texts]
            unwritten = _write_samples(texts, out, json_output)
            if json_output:
                _print_summary(name, n, texts, out, json_error(said, QueueError.__name__), unwritten)
            raise typer.Exit(stopping.exit_status()) from None
    texts = [_finish(t, prefix, include_prefix, truncate) for t in sampling.texts]
    unwritten = _write_samples(texts, out, json_output)
    missing = f"{n - len(texts)} of {n} samples not written" if len(texts) < n else ""
    if json_output:
        error = (json_error(unwritten, UsageError.__name__) if unwritten
                 else json_error(f"{missing}: {sampling.shortfall()}", sampling.failure_kind()) if missing else None)
        _print_summary(name, n, texts, out, error, unwritten)
    elif missing:
        err_console.print(f"[yellow]{missing}:[/yellow] {escape(sampling.shortfall())}", highlight=False)
    if missing or unwritten:  # those that came are kept; the status tells a script some did not
        raise typer.Exit(1)


def _print_summary(
    name: str, n: int, texts: list[str], out: Path | None, error: dict[str, str] | None, unwritten: str | None,
) -> None:
    """`generate --json`'s one object: how many samples were asked for and written, and where;
    the samples themselves unless --out has them; ok false, with the error, when any is missing."""
    summary: dict = {"ok": error is None, "persona": name, "asked": n, "written": len(texts),
                     "out": None if out is None or unwritten else str(out)}
    if summary["out"] is None:
        summary["samples"] = texts
    if error is not None:
        summary["error"] = error
    print(json.dumps(summary, ensure_ascii=False), flush=True)


class _Sampling:
    """The samples of one `persona generate`, asked a window at a time; what came back so far."""

    def __init__(self, client, name: str, prefix: str, n: int, temperature: float | None,
                 max_new_tokens: int | None, seed: int | None, *, timeout: float) -> None:
        self.client, self.name, self.prefix, self.n = client, name, prefix, n
        # Timed by the monotonic clock: by the wall clock, one stepped back an hour (NTP, an
        # operator) kept the command waiting an hour past --timeout.
        self.give_up = time.monotonic() + timeout
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.texts: list[str] = []
        self.never_asked = 0  # not sent at all: --timeout ran out first
        self.unanswered: list[str] = []  # sent, and no reply came by the deadline: why (ReplyTimeout)
        self.failures: list[str] = []  # answered with an error: its message
        self.waiting: list = []  # asked (or being asked) and not answered yet: what Ctrl-C withdraws
        self.late: list = []  # those not answered by the deadline: withdrawn once every window is done
        self.withdraw_problem: str | None = None  # why they could not be withdrawn

    def _request(self, i: int):
        from persona.contract import GenerationRequest, Priority, SamplingOverrides

        return GenerationRequest(
            persona=self.name, mode="complete", prefix=self.prefix, priority=Priority.batch, source="cli-generate",
            deadline=time.time() + self.left_s(), sampling=SamplingOverrides(
                temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                seed=None if self.seed is None else (self.seed + i) % (MAX_SEED + 1)))

    def run(self) -> None:
        """Ask for every sample and gather the replies; a sample that fails (or is not
        answered in time) is counted, and the others are still kept."""
        with Progress(TextColumn("sampling"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      console=err_console) as progress:
            task = progress.add_task("sampling", total=self.n)
            for begin in range(0, self.n, GENERATE_WINDOW):
                if self.left_s() <= 0:
                    self.never_asked = self.n - begin
                    break
                for i in range(begin, min(self.n, begin + GENERATE_WINDOW)):
                    request = self._request(i)
                    self.waiting.append(request)  # before it is sent: Ctrl-C while sending withdraws it too
                    # With no worker live, the first is queued, then said to wait: said before it was
                    # sent, "this waits in the queue" came ahead of a full queue's refusal.
                    if i == 0 and queue_if_no_worker(self.client, request, self.left_s()) is not None:
                        continue
                    self.client.submit(request)
                while self.waiting:
                    # Until the deadline, as `ask --timeout` waits: the queue's slack after it (for
                    # the worker's own timeout reply) kept a run with no worker 5 s past --timeout.
                    # Once it has passed, a look at each, not a wait (LAST_LOOK_S).
                    self._gather(self.waiting[0], timeout=max(LAST_LOOK_S, self.left_s()))
                    self.waiting.pop(0)
                    progress.advance(task)
        if self.late:  # withdrawn together, so no worker writes what nobody reads
            self.withdraw_problem = withdraw(self.client, self.late, "the samples not answered in time", "write them")

    def left_s(self) -> float:
        """Seconds left of --timeout."""
        return self.give_up - time.monotonic()

    def _gather(self, request, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for one sample's reply, and keep what came."""
        try:
            reply = self.client.wait(request, timeout=timeout)
        except ReplyTimeout as exc:
            self.unanswered.append(str(exc))
            self.late.append(request)
            return
        if reply.ok:
            self.texts.append(reply.text)
        else:
            self.failures.append(reply.error.message if reply.error else "failed")

    def shortfall(self) -> str:
        """Why samples are missing, counted by cause, each with the first one's reason."""
        parts = []
        if self.never_asked:
            parts.append(f"{self.never_asked} never asked for (--timeout ran out first; give it longer)")
        if self.unanswered:
            parts.append(f"{len(self.unanswered)} not answered in time ({self.unanswered[0]})")
        if self.failures:
            parts.append(f"{len(self.failures)} failed ({self.failures[0]})")
        if self.withdraw_problem:
            parts.append(self.withdraw_problem)
        return "; ".join(parts)

    def failure_kind(self) -> str:
        """The error kind `--json` gives samples missing: ReplyTimeout where any ran out of time,
        else RequestFailed (the worker answered with an error)."""
        return (ReplyTimeout if self.never_asked or self.unanswered else RequestFailed).__name__

    def withdraw(self) -> str | None:
        """Withdraw every sample still waiting, so no worker writes what nobody reads; None
        once done, else why not (quickly: with Redis down this gives up within seconds)."""
        return withdraw(self.client, self.waiting, "the samples still waiting", "write them")


def _check_writable(out: Path) -> None:
    """UsageError unless ``out`` can be written (its folder made if need be)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot make its folder ({exc.strerror}); name a file in a folder you can write") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"--out {out}: not allowed to write there; name a file in a folder you can write")


def _write_samples(texts: list[str], out: Path | None, json_output: bool = False) -> str | None:
    """Write the samples to --out, or print them (under ``--json`` the summary holds them); why
    --out could not be written, if it could not (the samples are then printed, or in the summary)."""
    if out is None:
        if not json_output:
            for text in texts:
                print(text)
                print(SAMPLE_SEPARATOR, end="")
        return None
    if not texts:  # an earlier file of samples is not replaced by nothing
        err_console.print(f"no samples, so {escape(str(out))} was left as it was")
        return None
    if out.suffix == ".jsonl":
        content = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    else:
        content = "".join(t + "\n" + SAMPLE_SEPARATOR for t in texts)
    try:
        _replace_whole(out, content)
    except OSError as exc:  # the disk filled up, say: the samples are printed rather than lost
        problem = f"cannot write {out} ({exc.strerror or exc})"
        if json_output:
            return f"{problem}; the samples are in this object instead"
        err_console.print(f"[red]error:[/red] {escape(problem)}; the samples follow here instead", highlight=False)
        _write_samples(texts, None)
        return problem
    err_console.print(f"wrote {len(texts)} samples to {escape(str(out))}")
    return None


def _replace_whole(out: Path, content: str) -> None:
    """Put ``content`` in ``out`` whole or not at all (``write_whole``). Written in place, a full
    disk emptied the earlier samples and left a cut-off part of the new ones."""
    target = out.resolve() if out.is_symlink() else out  # written where the link points
    if target.exists() and not stat.S_ISREG(target.stat().st_mode):  # a pipe, /dev/null, a terminal
        target.write_text(content)  # written into, as ever: moving a file over one would replace it
        return
    write_whole(target, content)


def register(app: typer.Typer) -> None:
    """Add `persona generate` to ``app``."""
    app.command()(generate)
