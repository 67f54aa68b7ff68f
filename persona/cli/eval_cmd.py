"""`persona eval`: how well a persona predicts held-out writing, and how original it is."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import Progress

from persona.cli.common import console, err_console, friendly_errors, get_settings
from persona.cli.training_common import (
    DEVICE_CHOICES,
    SERVED_HELP,
    THREADS_HELP,
    check_device,
    persona_with_weights,
    ready_torch,
    served_version,
)
from persona.cli.training_progress import SAMPLES_ARE_POSTS, EvalBar, print_samples
from persona.contract import MAX_SEED

if TYPE_CHECKING:
    from persona.personas import Persona
    from persona.settings import Settings
    from training.evaluate import EvalReport

__all__ = ["eval_", "register"]


@friendly_errors
def eval_(
    name: str = typer.Argument(..., metavar="NAME", help="the persona to measure"),
    corpus: Path = typer.Option(..., "--corpus", help="the corpus it was trained on (its held-out split is used)"),
    checkpoint: str = typer.Option(
        None, help=f"a version (v2), base or folder; default: {SERVED_HELP}; swapped to base, the base model",
    ),
    samples: int = typer.Option(16, min=1, help="samples drawn for the originality check"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, metavar="N", help="sampling seed"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
    device: str = typer.Option(
        None, help=f"{DEVICE_CHOICES} (default: PERSONA_WORKER__DEVICE, else auto)", show_default=False,
    ),
) -> None:
    """Held-out perplexity of the base model and of the persona, and how original its samples are."""
    from persona.checkpoints import BASE_VERSION
    from training.corpus import read_corpus
    from training.evaluate import evaluate_persona

    settings = get_settings()
    device = device or settings.worker.device
    check_device(device)
    ready_torch(settings, threads)
    persona = persona_with_weights(settings, name, "measure")
    data = read_corpus(corpus)
    version = checkpoint or served_version(settings, persona, "measuring", base_allowed=True)
    _refuse_unfit_checkpoint(settings, persona, version)
    # On stderr: --json's stdout holds the report alone. A bar is drawn only on a terminal, and
    # cleared once done (into a pipe, Rich drew it once at the end, after the lines had said it all).
    progress = Progress(*EvalBar.columns(), console=err_console, transient=True)
    bar = EvalBar(progress)
    if not bar.plain:
        progress.start()
    try:
        report = evaluate_persona(settings, persona, data, version=version, samples=samples, seed=seed,
                                  device=device, progress=bar)
    finally:
        if progress.live.is_started:
            progress.stop()
    if report.trained_on_this_corpus is False:
        err_console.print(
            f"[yellow]warning:[/yellow] {escape(str(corpus))} is not the corpus {escape(report.version)} was "
            "trained on, so some of its held-out documents may have been trained on and the persona's "
            f"perplexity may look better than it is; {escape(_measure_with(name, checkpoint, report))}",
            highlight=False)
    if json_output:
        print(report.as_json())
        return
    console.print(f"[bold]{escape(name)} {escape(report.version)}[/bold] "
                  f"on {report.validation_documents} held-out documents")
    if report.version == BASE_VERSION and checkpoint:
        console.print(f"perplexity: {report.perplexity:.2f}, of the base model (--checkpoint {escape(checkpoint)})")
    elif report.version == BASE_VERSION and version:  # swapped to base
        console.print(f"perplexity: {report.perplexity:.2f}, of the base model, which {escape(name)} serves now")
    elif report.version == BASE_VERSION:  # "base 420.08 → persona 420.08" read as training that did nothing
        console.print(f"perplexity: {report.perplexity:.2f}, of the base model: {escape(name)} has no fine-tuned "
                      f"checkpoint to compare (train one with `persona train {escape(name)} --corpus FILE`)")
    else:
        console.print(f"perplexity: base {report.base_perplexity:.2f} → persona {report.perplexity:.2f}")
    console.print(f"copied {report.copy_words}+ words or a whole entry verbatim: {report.copied_fraction:.0%} of "
                  f"{len(report.samples)} samples ({_longest_run(report)})")
    console.print(f"distinct-1 {report.distinct_1:.2f}, distinct-2 {report.distinct_2:.2f}")
    console.print(f"[dim]{SAMPLES_ARE_POSTS}[/dim]", highlight=False)
    print_samples(console, report.samples[:5])


def _measure_with(name: str, checkpoint: str | None, report: EvalReport) -> str:
    """How to measure with the corpus the checkpoint was trained on: its file, where one is known."""
    if report.trained_on_corpus is None:
        return ("measure with the corpus file it was trained on (neither its checkpoint nor the persona file "
                "names one that still holds it)")
    chosen = ["--checkpoint", checkpoint] if checkpoint else []
    command = shlex.join(["persona", "eval", name, *chosen, "--corpus", report.trained_on_corpus])
    return f"measure with the corpus file it was trained on, {report.trained_on_corpus}: `{command}`"


def _longest_run(report: EvalReport) -> str:
    """The longest copy in words, or that there is none: runs shorter than ``copy_words`` are not
    looked for, and "longest run 0 words" read as no words in common where samples shared runs of four."""
    if report.longest_copied_run == 0:
        return f"no run of {report.copy_words} or more words in common with the corpus"
    return f"longest copied run {report.longest_copied_run} words"


def _refuse_unfit_checkpoint(settings: Settings, persona: Persona, version: str | None) -> None:
    """What the cheap checks find wrong with the checkpoint, said before the base model is loaded
    and measured: it was said after, the seconds that took lost."""
    from persona.checkpoint_checks import static_problem
    from persona.checkpoints import resolve_checkpoint
    from persona.errors import ModelError

    _, folder = resolve_checkpoint(persona, settings, version)
    if folder is not None and (problem := static_problem(persona, folder)):
        raise ModelError(f"{problem}; nothing measured")


def register(app: typer.Typer) -> None:
    """Add `persona eval` to ``app``."""
    app.command("eval")(eval_)
