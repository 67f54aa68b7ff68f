"""`persona train`: fine-tune a persona on a corpus and register its next checkpoint.

The other commands that make and use a persona's weights live beside it (``corpus_cmd``,
``eval_cmd``, ``generate_cmd``, ``export_cmd``); the names they had here are still
importable from here.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import Progress

from persona.cli.common import console, err_console, friendly_errors, get_settings
from persona.cli.corpus_cmd import corpus_build
from persona.cli.eval_cmd import eval_
from persona.cli.export_cmd import export
from persona.cli.generate_cmd import generate
from persona.cli.training_common import (
    DEVICE_CHOICES,
    THREADS_HELP,
    check_device,
    ready_torch,
    warn_nothing_held_out,
)
from persona.cli.training_progress import EvalBar, RichReporter
from persona.cli.unfinished_runs import (
    resume_command,
    unfinished_json,
    unfinished_line,
    unfinished_refusal,
)
from persona.errors import ConfigError, CorpusError

if TYPE_CHECKING:
    from persona.settings import Settings
    from training.run_folder import UnfinishedRun

__all__ = ["EvalBar", "RichReporter", "corpus_build", "eval_", "export", "generate", "register", "resume_command", "train",
           "unfinished_json", "unfinished_line"]


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
    max_minutes: float = typer.Option(None, min=0.01, help="stop after this many minutes of training (the learning rate decays to fit). On top come loading the model, the first measurement of the base model on every held-out document, the step in hand, and the final measurement of the best weights on every held-out document: each of those two takes minutes on a CPU for a thousand documents. With --resume, the minutes of this session"),
    batch_size: int = typer.Option(8, min=1, help="documents per step"),
    learning_rate: float = typer.Option(None, min=0.0, help="peak rate (default 2e-4 LoRA, 5e-5 full)"),
    eval_every: int = typer.Option(None, min=1, help="steps between validations (default ~10 per run)"),
    patience: int = typer.Option(3, min=1, help="validations without improvement before stopping"),
    seed: int = typer.Option(0, help="the run's seed: same seed, same corpus, same weights"),
    device: str = typer.Option("auto", help=DEVICE_CHOICES),
    resume: bool = typer.Option(False, "--resume", help="continue the persona's interrupted run exactly as it started (only --max-minutes, --threads and --corpus may be given with it)"),
    restart: bool = typer.Option(False, "--restart", help="start over, discarding the unfinished run"),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
) -> None:
    """Fine-tune NAME on a corpus and register the best weights as its next checkpoint version."""
    from pydantic import ValidationError

    from persona.models import BUNDLED_ALIASES, resolve_base
    from training.corpus import check_corpus_path, check_trainable, read_corpus
    from training.run_folder import STATE_FILE, run_corpus, run_dir, saved_run_config
    from training.runs import existing_persona
    from training.train_config import TrainConfig, check_base_fits, check_run_name

    # The name, the options, the run to resume, the base and the corpus are checked before torch loads
    # (seconds, tens on a cold disk): a mistyped or empty corpus, a run or base not there, a name no
    # persona can have, a base the persona does not speak with, was said only after that.
    settings = get_settings()
    check_run_name(name)  # before the run folder it names is read
    existing = existing_persona(settings, name)
    if resume and restart:
        raise ConfigError("--resume continues the unfinished run and --restart discards it: give one of them")
    unfinished = None if resume else _unfinished_to_keep(settings, name)
    if unfinished is not None and not restart:  # forgetting --resume threw it away with only a warning
        raise ConfigError(unfinished_refusal(unfinished))
    if resume:
        changed = ["/".join([*p.opts, *p.secondary_opts]) for p in ctx.command.params
                   if p.name not in RESUME_OPTIONS
                   and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"]
        if changed:
            raise ConfigError(
                f"--resume continues the run exactly as it started, so it cannot change {', '.join(changed)}; "
                "leave them out, or start the run over with --restart"
            )
    else:
        if corpus is None:
            raise ConfigError("--corpus is required: name the corpus to train on, written by "
                              "`persona corpus build SRC... -o corpus.jsonl`")
        if base is None:
            base = existing.model.base if existing is not None else "smollm2"
        check_device(device)  # in `persona worker`'s words; pydantic's named the Literal's quoted values
        try:
            config = TrainConfig(base=base, kind="lora" if lora else "full", steps=steps, epochs=epochs,
                                 max_minutes=max_minutes, batch_size=batch_size, learning_rate=learning_rate,
                                 eval_every=eval_every, patience=patience, seed=seed, device=device)
        except ValidationError as exc:  # was a pydantic traceback (--learning-rate 0)
            raise ConfigError("; ".join(_option_problem(e) for e in exc.errors())) from None
    if corpus is not None:
        check_corpus_path(corpus)
    if resume:
        config = saved_run_config(settings, name)  # its --max-minutes counts the whole run; one given now, this session
        if corpus is None:
            corpus = _resumed_corpus(name, run_corpus(settings, name))
    check_base_fits(existing, config.base)
    if config.base not in BUNDLED_ALIASES:  # a folder, only looked at (the bundled one is written when needed)
        resolve_base(config.base, settings.model_cache_dir)
    data = read_corpus(corpus)  # read once: big ones take a while
    check_trainable(data, corpus)
    from training.runs import corpus_file, train_persona

    ready_torch(settings, threads)
    from_pipe = not corpus.is_file()
    corpus = corpus_file(settings, name, corpus, data)  # absolute, for --resume from anywhere
    if from_pipe:  # read once, kept for later
        console.print(f"the corpus came from a pipe; kept a copy at {escape(str(corpus))} for --resume, "
                      "`persona eval` and the persona's originality filter")

    def ready() -> None:
        # Said once the run holds the persona and its checks passed: a second run of a persona,
        # or a data directory it cannot write, was refused after "loading the base model...".
        if unfinished is not None:
            console.print(escape(f"--restart: this run replaces {name}'s unfinished one once the model has "
                                 "loaded (stopped before then, that one stays as it was)"), highlight=False)
        if not data.validation:
            warn_nothing_held_out(f"{escape(str(corpus))} holds no held-out documents (too few documents to "
                                   "spare one)")
        # Loading takes a while: said, so a silent terminal does not look stuck. Measuring the base
        # on a thousand held-out documents (minutes on a CPU) then shows its own bar (RichReporter).
        if resume:
            console.print("loading the model and the run's saved state...")
        else:
            console.print("loading the base model...")
        progress.start()

    # Started by ready(): a refusal before it left an empty line where the bar would have been.
    progress = Progress(*RichReporter.columns(), console=console, transient=False)
    reporter = _PlanKeepingReporter(progress, max_minutes=max_minutes if max_minutes is not None else config.max_minutes)
    try:
        try:
            done = train_persona(settings, name, corpus, config, resume=resume,
                                 session_minutes=max_minutes if resume else None, reporter=reporter, corpus=data,
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
        raise typer.Exit(_stopped_status(done.result.stopped_by))
    info = done.checkpoint
    ran = _steps_run(done.result.status, int(metrics["steps"]), reporter.planned_steps)
    if math.isnan(metrics["base_perplexity"]):  # nothing held out: the last weights, no perplexity
        console.print(f"{ran}; no held-out perplexity (the corpus holds no held-out documents); "
                      f"{metrics['tokens_per_s']:.0f} tokens/s")
    else:
        console.print(f"{ran}; best at step {metrics['best_step']:.0f}; held-out perplexity "
                      f"{metrics['base_perplexity']:.2f} (base) → {metrics['perplexity']:.2f}; "
                      f"{metrics['tokens_per_s']:.0f} tokens/s")
        if not metrics["perplexity"] <= metrics["base_perplexity"]:  # the best weights are still worse
            err_console.print("[yellow]warning:[/yellow] the trained weights predict the held-out writing worse "
                              "than the base model; train again with a lower --learning-rate or fewer --epochs",
                              highlight=False)
    console.print(f"registered [bold]{name} {info.version}[/bold] at {escape(str(info.path))}")
    if done.persona_file_created:
        # `persona ask` needs the service: without it, the hint failed with "no Redis is running".
        console.print(f"persona file {escape(str(done.persona_file))} now uses {info.version}; with `persona up` "
                      f"running (start it if it is not), try `persona ask {name} hello`")
    else:  # what the persona serves changes only by a swap (training/runs.py says why)
        console.print(f"it is not served yet: `persona swap {name} {info.version}` serves it "
                      f"(and `persona rollback {name}` returns to what is served now)")


class _PlanKeepingReporter(RichReporter):
    """The progress bar, keeping the steps the run planned: its metrics hold the steps it ran,
    so a run stopped by its time budget said "best at step 23 of 23" of 255 planned."""

    planned_steps: int | None = None

    def on_start(self, total_steps: int, resumed_from: int) -> None:
        self.planned_steps = total_steps
        super().on_start(total_steps, resumed_from)


def _steps_run(status: str, steps: int, planned: int | None) -> str:
    """How a run ended and how far it got: "finished after 40 steps", "time-limit after 23 of 255 planned steps"."""
    if planned is None or planned == steps:
        return f"{status} after {steps} steps"
    return f"{status} after {steps} of {planned} planned steps"


def _stopped_status(signum: int | None) -> int:
    """The exit status of a run that a stop signal ended: `persona ask`'s, 143 for SIGTERM, 129 for
    SIGHUP, 130 for Ctrl-C (and for output lost, no signal). A run stopped by `kill` exited 130."""
    from persona.cli.talk import Stopping

    stopped = Stopping()
    stopped.signum = signum
    return stopped.exit_status()


def _unfinished_to_keep(settings: Settings, name: str) -> UnfinishedRun | None:
    """NAME's stopped run with a saved state, which a new run would replace. One training now is
    left to the training lock, which refuses a second run of it."""
    from training.run_folder import unfinished_run

    run = unfinished_run(settings, name)
    return run if run is not None and run.resumable and not run.running else None


def _resumed_corpus(name: str, recorded: Path | None) -> Path:
    """The corpus ``--resume`` continues on when none is named: the one the run started on."""
    if recorded is None:  # a run saved before run.json named its corpus
        raise ConfigError(f"the unfinished run of {name!r} does not say which corpus it started on; "
                          f"name it: `persona train {name} --corpus FILE --resume`")
    if not recorded.is_file():  # moved, or named relative to where that run started
        raise CorpusError(f"the run of {name!r} started on the corpus {recorded}, which is not there now; "
                          f"name where it is: `persona train {name} --corpus FILE --resume`")
    return recorded


def _option_problem(error: dict) -> str:
    """One pydantic complaint about TrainConfig in the words of the option that caused it."""
    message = error["msg"].removeprefix("Value error, ")  # TrainConfig's own checks name their options
    if not error["loc"]:
        return message
    option = "--" + str(error["loc"][0]).replace("_", "-")
    return f"{option}: {message[:1].lower()}{message[1:]}"


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


def register(app: typer.Typer) -> None:
    """Add `persona train` to ``app``."""
    app.command()(train)
