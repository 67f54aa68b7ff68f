"""What the commands that train and use a persona's weights share: quieter libraries, CPU
threads, the persona whose weights a command needs, and the version it serves."""

from __future__ import annotations

import shlex
import warnings
from typing import TYPE_CHECKING

from persona.cli.common import err_console
from persona.cli.unfinished_runs import continue_command

if TYPE_CHECKING:
    from persona.personas import Persona
    from persona.settings import Settings

__all__ = ["DEVICE_CHOICES", "SERVED_HELP", "THREADS_HELP", "check_device", "persona_with_weights", "ready_torch",
           "served_version", "warn_nothing_held_out"]

# --checkpoint's default, for the commands that use ``served_version``.
SERVED_HELP = "the one the persona serves now (`persona swap` changes it), else the persona file's"
# --threads of every command that runs a model here (`bench` too), in one wording.
THREADS_HELP = "CPU threads (default: PERSONA_WORKER__THREADS, else all cores; 1 on a machine shared with other work)"
# --device's choices, for `train` and `eval` (their defaults differ: each says its own).
DEVICE_CHOICES = "auto (cuda if torch sees a GPU), cpu or cuda"


def check_device(device: str) -> None:
    """Refuse a --device that is none of the choices, as `persona worker` does ("unknown device
    'gpu'; choose one of auto, cpu, cuda"), before torch loads (seconds)."""
    from persona.models import DEVICES, pick_device

    if device not in DEVICES:
        pick_device(device)  # refuses it without importing torch


def ready_torch(settings: Settings, threads: int | None) -> None:
    """Ready the libraries for a command that runs a model here: torch's CPU threads (--threads,
    else PERSONA_WORKER__THREADS, as `worker` and `bench` take them; with neither, torch's default,
    every core), and transformers and peft quieter.

    Quieter: without their "Loading weights" bar for each model, and their warnings about
    their own internals (a deprecated attribute peft reads, GPT-2's Conv1D layers peft
    adjusts for), which opened every run with a site-packages path the user can do
    nothing about."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers|peft")
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)
    threads = threads or settings.worker.threads  # the README's advice for a busy machine was lost on these
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


def served_version(settings: Settings, persona: Persona, doing: str, *, base_allowed: bool) -> str | None:
    """The version ``persona`` serves now, if an operator swapped it (Redis keeps that; None: its
    file's choice, as without Redis, which is said), for a command ``doing`` something with it
    ("exporting"); ``base_allowed``: whether it can use the base model, when swapped to base.
    Said on stderr: a command's --json stdout holds its report alone. Read only the persona
    file, `persona export` refused a persona swapped to v1 that was trained no further, and
    `persona eval` measured another version than the one served."""
    import redis

    from persona.checkpoints import BASE_VERSION
    from persona.cli.common import explain_redis_error
    from persona.connection import connect
    from persona.errors import ModelError, PersonaError
    from persona.swap import active_versions

    name, chosen = persona.name, persona.model.checkpoint
    try:
        swapped = active_versions(connect(settings)).get(name)
    except (PersonaError, redis.exceptions.RedisError) as exc:  # these commands need no Redis: said, not refused
        why = str(exc) if isinstance(exc, PersonaError) else explain_redis_error(exc)
        if not chosen and not base_allowed:
            raise ModelError(f"cannot tell which version {name!r} serves now, and its persona file names no "
                             f"checkpoint; name one with --checkpoint (`persona checkpoints {name}` lists them). "
                             f"Redis: {why}") from None
        files = f"checkpoint, {chosen}" if chosen else "choice, the base model"
        err_console.print(f"cannot tell which version {name} serves now, so {doing} its persona file's {files} "
                          f"(name another with --checkpoint). Redis: {why}",
                          style="yellow", markup=False, highlight=False)
        return None
    if swapped == BASE_VERSION and not base_allowed:
        raise ModelError(f"{name!r} serves its base model now (swapped to base): no fine-tuned weights for {doing}; "
                         f"name a version with --checkpoint (`persona checkpoints {name}` lists them)")
    if swapped == BASE_VERSION:
        err_console.print(f"{name} serves its base model now (swapped to base): {doing} the base model",
                          markup=False, highlight=False)
    elif swapped is not None:
        err_console.print(f"{name} serves {swapped} now (swapped to it): {doing} {swapped}",
                          markup=False, highlight=False)
    return swapped
