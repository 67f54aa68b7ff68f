"""What the commands that train and use a persona's weights share: quieter libraries, CPU
threads, and the persona whose weights a command needs."""

from __future__ import annotations

import shlex
import warnings
from typing import TYPE_CHECKING

from persona.cli.common import err_console
from persona.cli.unfinished_runs import continue_command

if TYPE_CHECKING:
    from persona.personas import Persona
    from persona.settings import Settings

__all__ = ["THREADS_HELP", "persona_with_weights", "ready_torch", "warn_nothing_held_out"]

THREADS_HELP = "CPU threads (default: all cores; 1 is faster on a machine shared with other work)"


def ready_torch(threads: int | None) -> None:
    """Ready the libraries for a command that runs a model here: torch's CPU threads
    (None leaves its default, every core), and transformers and peft quieter.

    Quieter: without their "Loading weights" bar for each model, and their warnings about
    their own internals (a deprecated attribute peft reads, GPT-2's Conv1D layers peft
    adjusts for), which opened every run with a site-packages path the user can do
    nothing about."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers|peft")
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)
    if threads:
        import torch

        torch.set_num_threads(threads)


def warn_nothing_held_out(why: str) -> None:
    """What a corpus with no held-out documents costs, said by `corpus build` and by `train`."""
    err_console.print(
        f"[yellow]warning:[/yellow] {why}: training cannot measure perplexity or stop early (it keeps its "
        "last weights), and `persona eval` cannot measure it; add writing, or split it into more documents",
        highlight=False,
    )


def persona_with_weights(settings: Settings, name: str, to: str) -> Persona:
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
                         f"before it registered a checkpoint; finish it with `{continue_command(run)}`") from None
    start = shlex.join(["persona", "train", name, "--corpus", str(corpus) if corpus else "FILE"])
    raise ModelError(f"persona {name!r} has nothing to {to} yet: its first training run stopped before it "
                     f"saved anything; train it with `{start}`") from None
