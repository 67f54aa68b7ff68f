"""`persona corpus build`, `train`, `eval`, `generate`, `export`: making a persona from writing."""

from __future__ import annotations

import json
import math
import shlex
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
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

from persona.cli.common import (
    console,
    err_console,
    friendly_errors,
    get_settings,
    local_time,
)
from persona.errors import ConfigError, CorpusError

if TYPE_CHECKING:
    from persona.personas import Persona
    from persona.settings import Settings
    from training.run_folder import UnfinishedRun

__all__ = ["EvalBar", "RichReporter", "corpus_build", "eval_", "export", "generate", "register", "resume_command", "train",
           "unfinished_json", "unfinished_line"]

corpus_app = typer.Typer(help="Turn an author's writing into a clean training corpus.", no_args_is_help=True)

GENERATE_WINDOW = 64  # requests in flight at once, well under the queue's length cap
SAMPLE_SEPARATOR = "=" * 20 + "\n"
PLAIN_STEP_EVERY_S = 10.0  # a step line this often where no progress bar can be drawn
DRAFTS_NAMED = 5  # more drafts than this are summed up in one line
# Said once, before the first samples a command shows: early in a run they begin mid-sentence
# (about the first two minutes of the bundled model on the Wilde fortunes), as its posts would.
SAMPLES_ARE_POSTS = ("samples are written from nothing, as its posts are; one that begins mid-sentence means it "
                     "has not yet learned how its writing starts: train longer")
THREADS_HELP = "CPU threads (default: all cores; 1 is faster on a machine shared with other work)"
STOPPED_EARLY = {"time-limit": "stopped: --max-minutes is up", "early-stopped": "stopped early: no more improvement"}


@corpus_app.command("build")
@friendly_errors
def corpus_build(
    sources: list[Path] = typer.Argument(..., metavar="SOURCE", help="files or folders of the author's writing"),
    output: Path = typer.Option(..., "-o", "--output", help="the corpus file to write (JSONL)"),
    fmt: str = typer.Option("auto", "--format", help="how to read the sources: auto (each file by its name and "
                            "first lines), text, markdown, csv, jsonl, pdf, tweets or fortune"),
    author: str = typer.Option(None, help="fortune files: keep only the entries signed '-- NAME' (the signature is removed)"),
    column: str = typer.Option("text", help="CSV: the column holding the text"),
    field: str = typer.Option("text", help="JSONL: the field holding the text (a.b for nested)"),
    strip_urls: bool = typer.Option(False, "--strip-urls", help="remove web links from the text"),
    strip_handles: bool = typer.Option(False, "--strip-handles", help="remove @handles from the text"),
    keep_replies: bool = typer.Option(False, "--keep-replies", help="tweets: keep replies too"),
    keep_retweets: bool = typer.Option(False, "--keep-retweets", help="tweets: keep retweets too"),
    min_chars: int = typer.Option(1, min=1, help="drop documents shorter than this"),
    base: str = typer.Option("smollm2", help="count tokens with this model's tokenizer ('' for words only)"),
) -> None:
    """Read, clean and de-duplicate an author's writing into one document per line, with a held-out split."""
    from training.cleaning import CleanOptions
    from training.corpus import build_corpus, is_built_corpus, write_corpus
    from training.sources import Draft, ReadOptions

    if output.is_dir():  # found out only after reading everything, as a traceback
        raise CorpusError(f"{output} is a folder; name the corpus file to write, e.g. -o {output / 'corpus.jsonl'}")
    if any(source.is_file() and source.resolve() == output.resolve() for source in sources):
        raise CorpusError(f"{output} is one of the files to read: the corpus would be written over the "
                          "author's writing; choose another -o")
    if output.is_file() and output.stat().st_size and not is_built_corpus(output):
        # A file in a folder being read (the author's notes.txt) is left out of the build: it
        # must not then be written over either.
        raise CorpusError(f"{output} exists and is not a corpus this command wrote; it would be written over. "
                          "Choose another -o, or remove it first if it can go")
    result = build_corpus(
        sources, fmt=fmt,
        read_options=ReadOptions(column=column, field=field, author=author,
                                 keep_replies=keep_replies, keep_retweets=keep_retweets),
        clean_options=CleanOptions(strip_urls=strip_urls, strip_handles=strip_handles, min_chars=min_chars),
        exclude=[output],
    )
    drafts = [problem for problem in result.problems if isinstance(problem, Draft)]
    for problem in result.problems:  # escaped: a path may hold brackets ("my [draft] notes")
        if len(drafts) <= DRAFTS_NAMED or not isinstance(problem, Draft):
            err_console.print(f"[yellow]skipped[/yellow] {escape(str(problem))}", highlight=False)
    if len(drafts) > DRAFTS_NAMED:  # a line each: hundreds of lines hid everything else said
        err_console.print(f"[yellow]left out[/yellow] {escape(_drafts_line(drafts))}", highlight=False)
    if result.left_out:
        err_console.print(f"[yellow]left out[/yellow] {escape(_left_out(result.left_out))}", highlight=False)
    corpus = result.corpus
    if not corpus.documents:
        hint = f" signed by {author!r}" if author else ""
        raise CorpusError(f"no documents{hint} found in {result.files} file(s); nothing written")
    try:
        write_corpus(corpus, output)
    except OSError as exc:
        raise CorpusError(f"cannot write the corpus to {output}: {exc.strerror or exc}; choose another -o") from exc
    formats = ", ".join(f"{n} {f}" for f, n in sorted(result.by_format.items()))
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(result.cleaning.dropped.items())) or "none"
    console.print(f"read {result.files} file(s): {result.found} documents ({formats})")
    console.print(f"kept {result.cleaning.kept}, dropped {dropped}")
    if result.tail_held_out:
        console.print(f"split: one document, so its last {len(corpus.validation[0].split())} words are held out "
                      "for validation (saved in the file)")
    else:
        console.print(f"split: {len(corpus.train)} train, {len(corpus.validation)} validation (saved in the file)")
    if not corpus.validation:
        _warn_nothing_held_out("too few documents to hold any out")
    console.print(escape(_size_line(corpus.train, corpus.validation, base)))
    console.print(f"wrote {escape(str(output))}  (fingerprint {corpus.fingerprint})")


def _drafts_line(drafts: list) -> str:
    """Many drafts in one line: how many, what marks them, the first few."""
    settings = " or ".join(sorted({draft.setting for draft in drafts}))
    undo = " or ".join(sorted({draft.undo for draft in drafts}))
    named = ", ".join(str(draft.path) for draft in drafts[:3])
    return (f"{len(drafts)} drafts, whose front matter sets {settings}: {named} and {len(drafts) - 3} more; "
            f"to read one, set {undo} in its front matter")


def _left_out(paths: list[Path]) -> str:
    """The files in the folders named that were not read, counted by kind."""
    kinds = Counter(path.suffix.lower() for path in paths)
    listing = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common(5)) + (", ..." if len(kinds) > 5 else "")
    return (f"{len(paths)} file(s) in the folders that are no kind of writing it reads ({listing}); "
            "name a file to read it, with --format if its name does not say what it is")


def _quiet_libraries() -> None:
    """Leave out what transformers and peft say about themselves: a "Loading weights" bar
    for each model, and warnings about their own internals (a deprecated attribute peft
    reads, GPT-2's Conv1D layers peft adjusts for), which opened every run with a
    site-packages path the user can do nothing about."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers|peft")
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)


def _use_threads(threads: int | None) -> None:
    """Torch's CPU threads for this command; None leaves its default, every core."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _tokenizer(base: str):
    """The base model's tokenizer (the bundled model's weights are not converted for it)."""
    from transformers import AutoTokenizer

    from persona.models import resolve_base

    return AutoTokenizer.from_pretrained(resolve_base(base, get_settings().model_cache_dir, weights=False))


def _warn_nothing_held_out(why: str) -> None:
    """What a corpus with no held-out documents costs, said by `corpus build` and by `train`."""
    err_console.print(
        f"[yellow]warning:[/yellow] {why}: training cannot measure perplexity or stop early (it keeps its "
        "last weights), and `persona eval` cannot measure it; add writing, or split it into more documents",
        highlight=False,
    )


def _warn_replacing(settings: Settings, name: str, saved_state: Path, corpus: Path) -> None:
    """A new run is about to throw away NAME's unfinished one: how to keep it instead."""
    from training.runs import run_corpus

    saved_at = time.strftime("%Y-%m-%d %H:%M", time.localtime(saved_state.stat().st_mtime))
    began_on = run_corpus(settings, name) or corpus
    err_console.print(
        f"[yellow]warning:[/yellow] persona {name!r} has an unfinished run (last saved {saved_at}); this new "
        f"run replaces it. To continue that one instead, stop now (Ctrl-C) while the model loads, then run "
        f"`{escape(resume_command(name, began_on))}`", highlight=False)


def _size(size_bytes: int) -> str:
    """A size as a person reads it: 1.5 GB, 312 KB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}" if size_bytes < 10 * scale else f"{size_bytes / scale:.0f} {unit}"
    return f"{size_bytes} bytes"


def _kept_run(settings: Settings, name: str, resumable: bool) -> str:
    """What an interrupted run leaves on disk, and how to free it: a --full run of the bundled
    model kept 1.5 GB in the data directory, without a word, until it was resumed."""
    from training.runs import run_dir, run_size_bytes

    folder = run_dir(settings, name)
    if not folder.is_dir():
        return ""
    size = _size(run_size_bytes(folder))
    delete = shlex.join(["rm", "-r", str(folder)])
    if resumable:
        return f"\nthe run's saved state takes {size} in {folder}; if you will not continue it, delete it with `{delete}`"
    return f"\nits folder {folder} ({size}) holds nothing to continue; delete it with `{delete}`"


def _size_line(train: list[str], validation: list[str], base: str | None) -> str:
    words = sum(len(t.split()) for t in train + validation)
    if not base:
        return f"size: {words} words"
    tokenizer = _tokenizer(base)
    # +2: the start and end-of-text tokens every document is trained with.
    count = lambda texts: sum(len(tokenizer.encode(t, add_special_tokens=False)) + 2 for t in texts)  # noqa: E731
    return f"size: {words} words; {count(train)} train tokens, {count(validation)} validation tokens ({base})"


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


class RichReporter:
    """Training progress as a bar: ``[step | seconds] loss avg``, evaluations and samples.

    Written into a pipe or a log file, where Rich draws no bar until the run ends, the
    step line is printed instead: at the first step, then at most every
    ``PLAIN_STEP_EVERY_S`` seconds of training. With ``max_minutes``, the time left
    shown is at most what the budget leaves.
    """

    def __init__(self, progress: Progress, max_minutes: float | None = None) -> None:
        self.progress = progress
        self.task = None
        console = progress.console
        self.plain = not console.is_terminal or console.is_dumb_terminal
        self.printed_at: float | None = None
        self.budget_s = max_minutes * 60 if max_minutes is not None else None
        self.said_nothing_held_out = False
        self.said_what_samples_are = False

    @staticmethod
    def columns() -> list[ProgressColumn]:
        """The bar's columns: the step line, the bar, steps done, the time left."""
        return [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                _TimeLeftColumn()]

    def on_start(self, total_steps: int, resumed_from: int) -> None:
        self.task = self.progress.add_task("starting", total=total_steps, completed=resumed_from)

    def on_step(self, step: int, loss: float, average: float, elapsed_s: float) -> None:
        line = f"[{step} | {elapsed_s:.2f}] loss={loss:.2f} avg={average:.2f}"
        # elapsed_s counts the run's earlier sessions too, as its budget does.
        deadline = None if self.budget_s is None else self.progress.get_time() + self.budget_s - elapsed_s
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
        _print_samples(self.progress.console, texts)

    def on_end(self, status: str) -> None:
        """A run that stopped before its planned steps ends with a full bar saying why: it
        ended at e.g. ``16/35``, as if it had broken off."""
        if self.task is None or status not in STOPPED_EARLY:
            return
        task = next(t for t in self.progress.tasks if t.id == self.task)
        description = f"{task.description} ({STOPPED_EARLY[status]})"
        self.progress.update(self.task, total=task.completed, description=description, deadline=None)

    def on_full_eval(self, best_step: int, documents: int) -> None:
        self.progress.console.print(f"the validations above measured a sample of the held-out writing; measuring "
                                    f"the best weights (step {best_step}) on all {documents} held-out documents...")


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


def _print_samples(target: Console, texts: list[str]) -> None:
    """Samples as written: a model's text may hold brackets Rich would read as markup."""
    for text in texts:
        target.print(f"  [dim]sample:[/dim] {escape(repr(text))}", highlight=False)


def resume_command(name: str, corpus: Path) -> str:
    """The command that continues NAME's interrupted run, quoted for a shell; it works from any
    directory (a relative corpus is named from here)."""
    return shlex.join(["persona", "train", name, "--corpus", str(corpus.absolute()), "--resume"])


def unfinished_line(run: UnfinishedRun) -> str:
    """A persona's unfinished run in one line: training now, or stopped and how far, and the
    command that goes on with it (a Ctrl-C'd run was listed nowhere)."""
    how_far = f"step {run.step} of {run.total_steps}" if run.step is not None else ""
    if run.running:
        who = f"process {run.trainer_pid}" if run.trainer_pid else "another process"
        saved = f", last saved at {how_far}" if how_far else ""
        return f"{run.persona}: training now ({who}{saved}); it registers a checkpoint when it ends"
    if not run.resumable:
        again = shlex.join(["persona", "train", run.persona, "--corpus", str(run.corpus) if run.corpus else "FILE"])
        return (f"{run.persona}: unfinished training run that saved nothing to continue; start it again with "
                f"`{again}`, or delete it with `{shlex.join(['rm', '-r', str(run.folder)])}`")
    stopped = f"stopped at {how_far}, saved {local_time(run.saved_at or 0)}" if how_far else \
        f"saved {local_time(run.saved_at or 0)}"
    return f"{run.persona}: unfinished training run ({stopped}); continue it with `{_continue_command(run)}`"


def unfinished_json(run: UnfinishedRun) -> dict:
    """A persona's unfinished run as ``--json`` prints it."""
    return {"persona": run.persona, "folder": str(run.folder), "corpus": str(run.corpus) if run.corpus else None,
            "running": run.running, "trainer_pid": run.trainer_pid, "resumable": run.resumable,
            "step": run.step, "total_steps": run.total_steps, "saved_at": run.saved_at,
            "resume_command": _continue_command(run) if run.resumable and not run.running else None}


def _continue_command(run: UnfinishedRun) -> str:
    if run.corpus is None:  # a run saved before run.json named its corpus
        return f"persona train {run.persona} --corpus FILE --resume"
    return resume_command(run.persona, run.corpus)


# --resume continues a run as it started: only these may be given with it (any other
# option, one added later included, would change what the run is made of).
RESUME_OPTIONS = frozenset({"name", "corpus", "resume", "max_minutes", "threads"})


@friendly_errors
def train(
    ctx: typer.Context,
    name: str = typer.Argument(..., metavar="NAME", help="the persona to train (created if it does not exist)"),
    corpus: Path = typer.Option(None, "--corpus", help="a corpus from `persona corpus build` (required; with "
                                "--resume, the one the run started on unless named)"),
    base: str = typer.Option(None, help="base model: 'smollm2' (bundled) or a local HF model folder"),
    lora: bool = typer.Option(True, "--lora/--full", help="train a LoRA adapter (default) or all weights"),
    steps: int = typer.Option(None, min=1, help="optimiser steps to run"),
    epochs: float = typer.Option(None, min=0.01, help="passes over the corpus (default 5)"),
    max_minutes: float = typer.Option(None, min=0.01, help="stop after this many minutes of training (the learning rate decays to fit; the step in hand and the final evaluation of the best weights come on top)"),
    batch_size: int = typer.Option(8, min=1, help="documents per step"),
    learning_rate: float = typer.Option(None, min=0.0, help="peak rate (default 2e-4 LoRA, 5e-5 full)"),
    eval_every: int = typer.Option(None, min=1, help="steps between validations (default ~10 per run)"),
    patience: int = typer.Option(3, min=1, help="validations without improvement before stopping"),
    seed: int = typer.Option(0, help="the run's seed: same seed, same corpus, same weights"),
    device: str = typer.Option("auto", help="auto|cpu|cuda"),
    resume: bool = typer.Option(False, "--resume", help="continue the persona's interrupted run exactly as it started (only --max-minutes may change)"),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
) -> None:
    """Fine-tune NAME on a corpus and register the best weights as its next checkpoint version."""
    from pydantic import ValidationError

    from training.corpus import read_corpus
    from training.runs import (
        corpus_file,
        run_corpus,
        run_dir,
        saved_run_config,
        train_persona,
    )
    from training.trainer import STATE_FILE, TrainConfig

    settings = get_settings()
    _quiet_libraries()
    _use_threads(threads)
    if resume:
        changed = ["/".join([*p.opts, *p.secondary_opts]) for p in ctx.command.params
                   if p.name not in RESUME_OPTIONS
                   and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"]
        if changed:
            raise ConfigError(
                f"--resume continues the run exactly as it started, so it cannot change {', '.join(changed)}; "
                "leave them out, or start the run over without --resume"
            )
        config = saved_run_config(settings, name)
        if max_minutes is not None:
            config = config.model_copy(update={"max_minutes": max_minutes})
        if corpus is None:
            corpus = _resumed_corpus(name, run_corpus(settings, name))
    else:
        if corpus is None:
            raise ConfigError("--corpus is required: name the corpus to train on, written by "
                              "`persona corpus build SRC... -o corpus.jsonl`")
        from persona.errors import UnknownPersona
        from persona.personas import PersonaRegistry

        if base is None:
            try:
                base = PersonaRegistry.from_settings(settings).get(name).model.base
            except UnknownPersona:
                base = "smollm2"
        try:
            config = TrainConfig(base=base, kind="lora" if lora else "full", steps=steps, epochs=epochs,
                                 max_minutes=max_minutes, batch_size=batch_size, learning_rate=learning_rate,
                                 eval_every=eval_every, patience=patience, seed=seed, device=device)
        except ValidationError as exc:  # was a pydantic traceback (--learning-rate 0, --device gpu)
            raise ConfigError("; ".join(_option_problem(e) for e in exc.errors())) from None
    data = read_corpus(corpus)  # read once: big ones take a while
    from_pipe = not corpus.is_file()
    corpus = corpus_file(settings, name, corpus, data)  # absolute, for --resume from anywhere
    if from_pipe:  # read once, kept for later
        console.print(f"the corpus came from a pipe; kept a copy at {escape(str(corpus))} for --resume, "
                      "`persona eval` and the persona's originality filter")
    saved_state = run_dir(settings, name) / STATE_FILE

    def ready() -> None:
        # Said once the run holds the persona and its checks passed: a second run of a persona,
        # or a data directory it cannot write, was refused after "loading the base model...".
        if not resume and saved_state.is_file():  # it was thrown away without a word
            _warn_replacing(settings, name, saved_state, corpus)
        if not data.validation:
            _warn_nothing_held_out(f"{escape(str(corpus))} holds no held-out documents (too few documents to "
                                   "spare one)")
        # Loading, and measuring the base on a thousand held-out documents, takes minutes on a
        # CPU: said, so a silent terminal does not look stuck.
        if resume:
            console.print("loading the model and the run's saved state...")
        elif data.validation:
            console.print(f"loading the base model and measuring it on {len(data.validation)} held-out documents...")
        progress.start()

    # Started by ready(): a refusal before it left an empty line where the bar would have been.
    progress = Progress(*RichReporter.columns(), console=console, transient=False)
    reporter = RichReporter(progress, max_minutes=config.max_minutes)
    try:
        try:
            done = train_persona(settings, name, corpus, config, resume=resume, reporter=reporter, corpus=data,
                                 on_ready=ready)
            reporter.on_end(done.result.status)
        finally:
            if progress.live.is_started:  # stopping one never started prints an empty line
                progress.stop()
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once (typer would exit 130 without a word)
        # The saved state may be an earlier run's (stopped while this one loaded): its own corpus.
        began_on = run_corpus(settings, name) or corpus
        if resumable := (run_dir(settings, name) / STATE_FILE).is_file():
            said = f"stopped at once; continue from the run's last save with `{resume_command(name, began_on)}`"
        else:
            said = "stopped at once, before the run saved anything; start it again without --resume"
        console.print(escape(said + _kept_run(settings, name, resumable)), highlight=False)
        raise typer.Exit(130) from None
    metrics = done.result.metrics
    if done.checkpoint is None:
        console.print(escape(f"interrupted at step {metrics['steps']:.0f}; continue with "
                             f"`{resume_command(name, corpus)}`" + _kept_run(settings, name, True)),
                      highlight=False)
        raise typer.Exit(130)
    info = done.checkpoint
    if math.isnan(metrics["base_perplexity"]):  # nothing held out: the last weights, no perplexity
        console.print(f"{done.result.status} after {metrics['steps']:.0f} steps; no held-out perplexity "
                      f"(the corpus holds no held-out documents); {metrics['tokens_per_s']:.0f} tokens/s")
    else:
        console.print(f"{done.result.status}: best at step {metrics['best_step']:.0f} of {metrics['steps']:.0f}; "
                      f"held-out perplexity {metrics['base_perplexity']:.2f} (base) → {metrics['perplexity']:.2f}; "
                      f"{metrics['tokens_per_s']:.0f} tokens/s")
        if not metrics["perplexity"] <= metrics["base_perplexity"]:  # the best weights are still worse
            err_console.print("[yellow]warning:[/yellow] the trained weights predict the held-out writing worse "
                              "than the base model; train again with a lower --learning-rate or fewer --epochs",
                              highlight=False)
    console.print(f"registered [bold]{name} {info.version}[/bold] at {escape(str(info.path))}")
    if done.persona_file_updated:
        console.print(f"persona file {escape(str(done.persona_file))} now uses {info.version}; "
                      f"try `persona ask {name} hello`")
    else:
        console.print(f"{escape(str(done.persona_file))} was left as it is; "
                      f"serve the new weights with `persona swap {name} {info.version}`")


def _resumed_corpus(name: str, recorded: Path | None) -> Path:
    """The corpus ``--resume`` continues on when none is named: the one the run started on."""
    if recorded is None:  # a run saved before run.json named its corpus
        raise ConfigError(f"the unfinished run of {name!r} does not say which corpus it started on; "
                          f"name it: `persona train {name} --corpus FILE --resume`")
    if not recorded.is_file():  # moved, or named relative to where that run started
        raise CorpusError(f"the run of {name!r} started on the corpus {recorded}, which is not there now; "
                          f"name where it is: `persona train {name} --corpus FILE --resume`")
    return recorded


def _persona(settings: Settings, name: str, to: str) -> Persona:
    """NAME's persona, for a command that needs its weights (``to``: what it does with them). A
    persona whose first run was interrupted has no persona file yet: it was "unknown persona"."""
    from persona.errors import ModelError, UnknownPersona
    from persona.personas import PersonaRegistry
    from training.run_folder import unfinished_run

    try:
        return PersonaRegistry.from_settings(settings).get(name)
    except UnknownPersona:
        if (run := unfinished_run(settings, name)) is None:
            raise
    if run.running:  # it was said to have been interrupted
        who = f"process {run.trainer_pid}" if run.trainer_pid else "another process"
        raise ModelError(f"persona {name!r} has nothing to {to} yet: its first training run is still going "
                         f"({who}); it registers a checkpoint when it ends") from None
    corpus = run.corpus
    if run.resumable:
        raise ModelError(f"persona {name!r} has nothing to {to} yet: its first training run was interrupted "
                         f"before it registered a checkpoint; finish it with `{_continue_command(run)}`") from None
    start = shlex.join(["persona", "train", name, "--corpus", str(corpus) if corpus else "FILE"])
    raise ModelError(f"persona {name!r} has nothing to {to} yet: its first training run stopped before it "
                     f"saved anything; train it with `{start}`") from None


def _option_problem(error: dict) -> str:
    """One pydantic complaint about TrainConfig in the words of the option that caused it."""
    message = error["msg"].removeprefix("Value error, ")  # TrainConfig's own checks name their options
    if not error["loc"]:
        return message
    option = "--" + str(error["loc"][0]).replace("_", "-")
    return f"{option}: {message[:1].lower()}{message[1:]}"


@friendly_errors
def eval_(
    name: str = typer.Argument(..., metavar="NAME", help="the persona to measure"),
    corpus: Path = typer.Option(..., "--corpus", help="the corpus it was trained on (its held-out split is used)"),
    checkpoint: str = typer.Option(None, help="a version (v2) or folder; default: the persona file's"),
    samples: int = typer.Option(16, min=1, help="samples drawn for the originality check"),
    seed: int = typer.Option(0, help="sampling seed"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
) -> None:
    """Held-out perplexity of the base model and of the persona, and how original its samples are."""
    from persona.checkpoints import BASE_VERSION
    from training.corpus import read_corpus
    from training.evaluate import evaluate_persona

    settings = get_settings()
    _quiet_libraries()
    _use_threads(threads)
    persona = _persona(settings, name, "measure")
    data = read_corpus(corpus)
    # On stderr: --json's stdout holds the report alone. A bar is drawn only on a terminal, and
    # cleared once done (into a pipe, Rich drew it once at the end, after the lines had said it all).
    progress = Progress(*EvalBar.columns(), console=err_console, transient=True)
    bar = EvalBar(progress)
    if not bar.plain:
        progress.start()
    try:
        report = evaluate_persona(settings, persona, data, version=checkpoint, samples=samples, seed=seed,
                                  progress=bar)
    finally:
        if progress.live.is_started:
            progress.stop()
    if report.trained_on_this_corpus is False:
        err_console.print(
            f"[yellow]warning:[/yellow] {escape(str(corpus))} is not the corpus {escape(report.version)} was "
            "trained on, so some of its held-out documents may have been trained on and the persona's "
            "perplexity may look better than it is; measure with the corpus file it was trained on",
            highlight=False)
    if json_output:
        print(report.as_json())
        return
    console.print(f"[bold]{escape(name)} {escape(report.version)}[/bold] "
                  f"on {report.validation_documents} held-out documents")
    if report.version == BASE_VERSION and checkpoint:
        console.print(f"perplexity: {report.perplexity:.2f}, of the base model (--checkpoint {escape(checkpoint)})")
    elif report.version == BASE_VERSION:  # "base 420.08 → persona 420.08" read as training that did nothing
        console.print(f"perplexity: {report.perplexity:.2f}, of the base model: {escape(name)} has no fine-tuned "
                      f"checkpoint to compare (train one with `persona train {escape(name)} --corpus FILE`)")
    else:
        console.print(f"perplexity: base {report.base_perplexity:.2f} → persona {report.perplexity:.2f}")
    console.print(f"copied 8+ words or a whole entry verbatim: {report.copied_fraction:.0%} of {samples} samples "
                  f"(longest run {report.longest_copied_run} words)")
    console.print(f"distinct-1 {report.distinct_1:.2f}, distinct-2 {report.distinct_2:.2f}")
    console.print(f"[dim]{SAMPLES_ARE_POSTS}[/dim]", highlight=False)
    _print_samples(console, report.samples[:5])


def _finish(text: str, prefix: str, include_prefix: bool, truncate: str | None) -> str:
    """A sample as the user reads it: cut at ``truncate``, after its prefix where asked (a
    continuation keeps its own leading space: "Life is" + " often", "Tomor" + "row")."""
    if truncate and truncate in text:
        text = text[: text.index(truncate)]
    return prefix + text if include_prefix else text.lstrip()


@friendly_errors
def generate(
    name: str = typer.Argument(..., metavar="NAME", help="the persona that writes"),
    prefix: str = typer.Option("", help="text every sample starts from (default: nothing)"),
    n: int = typer.Option(8, "-n", "--nsamples", min=1, help="how many samples"),
    out: Path = typer.Option(None, "--out", help="write samples here (.jsonl: one JSON per line)"),
    include_prefix: bool = typer.Option(True, "--include-prefix/--no-include-prefix", help="start each sample with the prefix"),
    truncate: str = typer.Option(None, help="cut each sample at the first occurrence of this text"),
    temperature: float = typer.Option(None, min=0.0, max=5.0, help="override the persona's temperature"),
    max_new_tokens: int = typer.Option(None, min=1, help="override the sample length limit"),
    seed: int = typer.Option(None, help="sample i uses seed+i, for repeatable samples"),
    timeout: float = typer.Option(600.0, min=1.0, help="seconds to wait for all samples"),
) -> None:
    """Many samples from NAME as batch work through the queue, for curation by hand."""
    from persona.connection import connect
    from persona.contract import GenerationRequest, Priority, SamplingOverrides
    from persona.queue import QueueClient

    settings = get_settings()
    _persona(settings, name, "sample")
    client = QueueClient(connect(settings), settings.queue)
    deadline = time.time() + timeout
    texts: list[str] = []
    failures: list[str] = []
    with Progress(TextColumn("sampling"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=err_console) as progress:
        task = progress.add_task("sampling", total=n)
        for begin in range(0, n, GENERATE_WINDOW):
            waiting = [
                client.submit(GenerationRequest(
                    persona=name, mode="complete", prefix=prefix, priority=Priority.batch, source="cli-generate",
                    deadline=deadline, sampling=SamplingOverrides(
                        temperature=temperature, max_new_tokens=max_new_tokens,
                        seed=None if seed is None else seed + i)))
                for i in range(begin, min(n, begin + GENERATE_WINDOW))
            ]
            for request in waiting:
                reply = client.wait(request)
                if reply.ok:
                    texts.append(_finish(reply.text, prefix, include_prefix, truncate))
                else:
                    failures.append(reply.error.message if reply.error else "failed")
                progress.advance(task)
    _write_samples(texts, out)
    if failures:
        err_console.print(f"[yellow]{len(failures)} of {n} samples failed:[/yellow] {escape(failures[0])}")
        if not texts:
            raise typer.Exit(1)


def _write_samples(texts: list[str], out: Path | None) -> None:
    if out is None:
        for text in texts:
            print(text)
            print(SAMPLE_SEPARATOR, end="")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    else:
        out.write_text("".join(t + "\n" + SAMPLE_SEPARATOR for t in texts))
    err_console.print(f"wrote {len(texts)} samples to {escape(str(out))}")


@friendly_errors
def export(
    name: str = typer.Argument(..., metavar="NAME", help="the persona to export"),
    output: Path = typer.Option(..., "-o", "--output", help="a new folder for the model"),
    checkpoint: str = typer.Option(None, help="a version (v2) or folder; default: the persona file's"),
    gguf: str = typer.Option(
        None, help="also write one GGUF file of this type (q8_0, q4_1, f16, f32) for llama.cpp; "
        "Llama-family or GPT-2 models with a byte-level BPE vocabulary (the bundled model's, GPT-2's)",
    ),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
) -> None:
    """Write a standalone Hugging Face model folder, any LoRA merged into its base."""
    from training.export import export_persona

    settings = get_settings()
    _quiet_libraries()
    _use_threads(threads)
    persona = _persona(settings, name, "export")
    with console.status(f"exporting {escape(name)}..."):
        folder = export_persona(settings, persona, output, version=checkpoint, gguf=gguf)
    console.print(f"wrote {folder}; load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})",
                  markup=False)
    for written in sorted(Path(folder).glob("*.gguf")):
        console.print(f"and {written} for llama.cpp or Ollama", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(corpus_app, name="corpus")
    app.command()(train)
    app.command("eval")(eval_)
    app.command()(generate)
    app.command()(export)
