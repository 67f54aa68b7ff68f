"""A persona's run folder on disk: where it is, what it holds, and whether a run there is
unfinished (stopped with its state kept for ``--resume``: Ctrl-C, a crash, a closed terminal;
or training now).

Training writes the folder (``training/trainer.py``, ``training/runs.py``); the listings
(`persona personas list`, `persona checkpoints`) read it here, without torch and without
loading the saved state, which may hold a whole model's weights: ``progress.json`` says how
far it is, and the persona's training lock, held, says a process is training it now. `persona train
--resume` reads the run's config here too, so a run that is not there is said before torch loads.
"""

from __future__ import annotations

import fcntl
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from persona.errors import ModelError
from persona.personas import NAME_PATTERN
from persona.settings import Settings
from training.train_config import TrainConfig

__all__ = [
    "PROGRESS_FILE",
    "RUN_FILE",
    "STATE_FILE",
    "UnfinishedRun",
    "lock_path",
    "run_corpus",
    "run_dir",
    "saved_run_config",
    "unfinished_run",
    "unfinished_runs",
]

STATE_FILE = "state.pt"  # everything --resume needs: weights (or a link to the best), optimiser, random states
RUN_FILE = "run.json"  # what the run is made of (its config, its corpus), for --resume
PROGRESS_FILE = "progress.json"  # how far the saved state is, for listings that do not load it


def run_dir(settings: Settings, name: str) -> Path:
    """Where a persona's unfinished run keeps its resumable state."""
    return settings.data_dir / "runs" / name


def lock_path(settings: Settings, name: str) -> Path:
    """The lock a persona's run holds while it trains: beside its run folder, which is removed."""
    return run_dir(settings, name).with_name(f"{name}.lock")


def run_corpus(settings: Settings, name: str) -> Path | None:
    """The corpus file a persona's unfinished run started on, as its ``run.json`` names it."""
    record = run_dir(settings, name) / RUN_FILE
    try:
        corpus = json.loads(record.read_text()).get("corpus")
    except (OSError, ValueError):  # no run, or a record cut short
        return None
    return Path(corpus) if corpus else None


def saved_run_config(settings: Settings, name: str) -> TrainConfig:
    """The config of a persona's unfinished run, for ``--resume``: read here, without torch, so that a
    run that is not there, or a record that cannot be read, is said before the model loads."""
    path = run_dir(settings, name) / RUN_FILE
    if not path.is_file():
        raise ModelError(f"no unfinished training run of {name!r} to resume; start one without --resume")
    try:
        saved = json.loads(path.read_text())["config"]
        if saved.get("steps") is not None:  # saved before steps and epochs were refused together: steps won
            saved["epochs"] = None
        return TrainConfig.model_validate(saved)
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as exc:  # was a traceback
        why = (", ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
               if isinstance(exc, ValidationError) else f"{type(exc).__name__}: {exc}")
        raise ModelError(f"the unfinished run of {name!r} cannot be resumed: its record {path} cannot be read "
                         f"({why}); start the run over with --restart") from None


@dataclass
class UnfinishedRun:
    """A persona's training run that has not registered its checkpoint: stopped (Ctrl-C, a
    crash, a closed terminal) with its state kept for ``--resume``, or training now."""

    persona: str
    folder: Path
    corpus: Path | None  # the corpus it started on, as its run.json names it
    resumable: bool  # a saved state to continue from
    trainer_pid: int | None  # the process training it now (0: one that has not said which); None: none
    step: int | None = None  # the saved state's step, of ``total_steps`` planned
    total_steps: int | None = None
    saved_at: float | None = None  # when the state was saved (seconds since the epoch)

    @property
    def running(self) -> bool:
        return self.trainer_pid is not None


def unfinished_run(settings: Settings, name: str) -> UnfinishedRun | None:
    """NAME's run that has not registered a checkpoint yet, if there is one."""
    folder = run_dir(settings, name)
    pid = _trainer_pid(settings, name)
    if pid is None and not folder.is_dir():
        return None
    try:
        progress = json.loads((folder / PROGRESS_FILE).read_text())
    except (OSError, ValueError):  # none saved yet, or saved before runs kept their progress
        progress = {}
    try:
        saved_at: float | None = (folder / STATE_FILE).stat().st_mtime
    except OSError:
        saved_at = None
    return UnfinishedRun(persona=name, folder=folder, corpus=run_corpus(settings, name),
                         resumable=saved_at is not None, trainer_pid=pid, step=progress.get("step"),
                         total_steps=progress.get("total_steps"), saved_at=saved_at)


def unfinished_runs(settings: Settings) -> list[UnfinishedRun]:
    """Every persona's unfinished run, by name: those stopped and those training now (one whose
    model is still loading has no folder yet, only its lock)."""
    root = settings.data_dir / "runs"
    try:
        entries = list(root.iterdir())
    except OSError:  # no run was ever started here
        return []
    names = {entry.name for entry in entries if entry.is_dir()}
    names |= {entry.stem for entry in entries if entry.suffix == ".lock"}
    found = (unfinished_run(settings, name) for name in sorted(names) if re.fullmatch(NAME_PATTERN, name))
    return [run for run in found if run is not None]


def _trainer_pid(settings: Settings, name: str) -> int | None:
    """The process training NAME now (0: one that has not written its id yet), or None.

    Held, the run's lock says so. Probing it takes a shared lock for an instant: a run that
    starts in that instant is refused as if another held the persona (and says to wait). A
    lock file left by a killed run is held by nobody."""
    try:
        lock = lock_path(settings, name).open()
    except OSError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = lock.read().strip()
            return int(pid) if pid.isdigit() else 0
        return None
