"""What the training commands draw while they work: a training run's bar and lines
(``RichReporter``, its measurements of the held-out writing included), an evaluation's
stages (``EvalBar``), and the samples they show."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["EvalBar", "RichReporter", "print_samples"]

PLAIN_STEP_EVERY_S = 10.0  # a step line this often where no progress bar can be drawn
# Said once, before the first samples a command shows: early in a run they begin mid-sentence
# (about the first two minutes of the bundled model on the Wilde fortunes), as its posts would.
SAMPLES_ARE_POSTS = ("samples are written from nothing, as its posts are; one that begins mid-sentence means it "
                     "has not yet learned how its writing starts: train longer")
STOPPED_EARLY = {"time-limit": "stopped: --max-minutes is up", "early-stopped": "stopped early: no more improvement"}


class _TimeLeftColumn(TimeRemainingColumn):
    """Rich's estimate from the steps' pace, but never past the end of the run's time budget:
    a ``--max-minutes 2`` run showed six minutes left, the pace of steps it would never reach."""

    def render(self, task: Task) -> Text:
        left = task.time_remaining
        if (deadline := task.fields.get("deadline")) is not None:
            budget_left = max(0.0, deadline - task.get_time())
            left = budget_left if left is None else min(left, budget_left)
        if left is None:
            return Text("-:--:--", style="progress.remaining")
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours:d}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class _DoneColumn(ProgressColumn):
    """How far a task is: the run's steps done, or the share of a measurement done (it counts
    tokens, so that its pace and the time left hold steady; a count of tokens reads as nothing)."""

    def render(self, task: Task) -> Text:
        if task.fields.get("measuring"):
            return Text(f"{task.percentage:.0f}%")
        return Text(f"{task.completed}/{task.total}")


class RichReporter:
    """Training progress as a bar: ``[step | seconds] loss avg``, evaluations and samples.

    Written into a pipe or a log file, where Rich draws no bar until the run ends, the
    step line is printed instead: at the first step, then at most every
    ``PLAIN_STEP_EVERY_S`` seconds of training. With a time limit, the time left
    shown is at most what it leaves (``on_time_budget``; before it, ``max_minutes``).

    The measurements of every held-out document (the base model's before the first step, the
    best weights' after the last) get a bar of their own, or a line every ``PLAIN_STEP_EVERY_S``
    seconds with the time left: on a thousand documents, each took minutes on a CPU without a word.
    """

    def __init__(self, progress: Progress, max_minutes: float | None = None) -> None:
        self.progress = progress
        self.task = None
        console = progress.console
        self.plain = not console.is_terminal or console.is_dumb_terminal
        self.printed_at: float | None = None
        self.until_s = max_minutes * 60 if max_minutes is not None else None  # the training time it stops at
        self.said_nothing_held_out = False
        self.said_what_samples_are = False
        self.measuring = None  # the task of the measurement under way
        self.measure_stage, self.measure_started, self.measure_said_at = "", 0.0, 0.0

    @staticmethod
    def columns() -> list[ProgressColumn]:
        """The bar's columns: the step line, the bar, steps done, the time left."""
        return [TextColumn("{task.description}"), BarColumn(), _DoneColumn(), _TimeLeftColumn()]

    def on_start(self, total_steps: int, resumed_from: int) -> None:
        self.task = self.progress.add_task("starting", total=total_steps, completed=resumed_from)

    def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None:
        line = f"[{step} | {elapsed_s:.2f}] loss={loss:.2f} avg={average:.2f}"
        # elapsed_s counts the run's earlier sessions too, as until_s does.
        deadline = None if self.until_s is None else self.progress.get_time() + self.until_s - elapsed_s
        self.progress.update(self.task, completed=step, description=line, deadline=deadline)
        if self.plain and (self.printed_at is None or elapsed_s - self.printed_at >= PLAIN_STEP_EVERY_S):
            self.progress.console.print(line, markup=False, highlight=False)
            self.printed_at = elapsed_s

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        if math.isnan(val_loss):  # nothing held out: no number to show (it was "perplexity inf")
            if not self.said_nothing_held_out:  # it was said at every evaluation
                self.progress.console.print(f"step {step}: no held-out documents to validate on; the run keeps "
                                            "its last weights")
                self.said_nothing_held_out = True
            return
        mark = " [green]best so far[/green]" if improved else ""
        ppl = math.exp(val_loss) if val_loss < 700 else math.inf
        self.progress.console.print(f"step {step}: validation loss {val_loss:.3f}, perplexity {ppl:.2f}{mark}")

    def on_samples(self, step: int, texts: list[str]) -> None:
        if not self.said_what_samples_are:
            self.progress.console.print(f"[dim]{SAMPLES_ARE_POSTS}[/dim]", highlight=False)
            self.said_what_samples_are = True
        print_samples(self.progress.console, texts)

    def on_time_budget(self, until_s: float) -> None:
        # A resumed run's --max-minutes limits its session: ``max_minutes`` alone read as the whole
        # run's showed no time left.
        self.until_s = until_s

    def on_end(self, status: str) -> None:
        """A run that stopped before its planned steps ends with a full bar saying why: it
        ended at e.g. ``16/35``, as if it had broken off."""
        if self.task is None or status not in STOPPED_EARLY:
            return
        task = next(t for t in self.progress.tasks if t.id == self.task)
        description = f"{task.description} ({STOPPED_EARLY[status]})"
        self.progress.update(self.task, total=task.completed, description=description, deadline=None)

    def on_full_eval(self, best_step: int, documents: int) -> None:
        self.progress.console.print("the validations above measured a sample of the held-out writing; the final "
                                    "figure measures all of it")

    def on_measure(self, stage: str, total_tokens: int) -> None:
        """A measurement of held-out documents starts ("measuring the base model on 1000 held-out documents")."""
        self.measure_stage = stage
        self.measure_started = self.measure_said_at = self.progress.get_time()
        self.measuring = self.progress.add_task(escape(stage), total=max(total_tokens, 1), measuring=True)
        if self.plain:
            self.progress.console.print(f"{stage}...", markup=False, highlight=False)

    def on_measure_advance(self, done_tokens: int) -> None:
        """How far the measurement is; at its end, its bar gives way to a line saying how long it took."""
        if self.measuring is None:
            return
        self.progress.update(self.measuring, completed=done_tokens)
        task = next(t for t in self.progress.tasks if t.id == self.measuring)
        now = self.progress.get_time()
        if task.finished:
            self.progress.remove_task(self.measuring)
            self.measuring = None
            self.progress.console.print(f"{self.measure_stage}: done in {_duration(now - self.measure_started)}",
                                        markup=False, highlight=False)
        elif self.plain and now - self.measure_said_at >= PLAIN_STEP_EVERY_S:
            left = task.time_remaining
            about = f", about {_duration(left)} left" if left is not None else ""
            self.progress.console.print(f"{self.measure_stage}: {task.percentage:.0f}%{about}", markup=False,
                                        highlight=False)
            self.measure_said_at = now


class EvalBar:
    """An evaluation's progress on stderr: each stage (loading, measuring, sampling) as a bar,
    or, where no bar can be drawn (a pipe, a log file), as a line when it starts and every
    ``PLAIN_STEP_EVERY_S`` seconds while it goes. ``persona eval`` said nothing for a minute."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        console = progress.console
        self.plain = not console.is_terminal or console.is_dumb_terminal
        self.task = progress.add_task("", total=None, visible=False)
        self.stage, self.total, self.said_at = "", 0, 0.0

    @staticmethod
    def columns() -> list[ProgressColumn]:
        """The bar's columns: the stage, the bar, how far it is, the time it has taken."""
        return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]

    def on_stage(self, stage: str, total: int) -> None:
        self.stage, self.total = stage, total
        self.progress.reset(self.task, total=total or None, description=escape(stage), visible=True)
        if self.plain:
            self._say(f"{stage}...")

    def on_advance(self, done: int) -> None:
        self.progress.update(self.task, completed=done)
        if self.plain and time.monotonic() - self.said_at >= PLAIN_STEP_EVERY_S:
            self._say(f"{self.stage}: {done}/{self.total}")

    def _say(self, line: str) -> None:
        self.progress.console.print(line, markup=False, highlight=False)
        self.said_at = time.monotonic()


def _duration(seconds: float) -> str:
    """A span as a person reads it: 40s, 6m32s."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def print_samples(target: Console, texts: list[str]) -> None:
    """Samples as written: a model's text may hold brackets Rich would read as markup."""
    for text in texts:
        target.print(f"  [dim]sample:[/dim] {escape(repr(text))}", highlight=False)
