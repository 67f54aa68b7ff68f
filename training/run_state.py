"""A training run's saved state: what ``resume`` needs, in the run folder, whole or not at all.

``state.pt`` holds the run's counters (``RunState``), its optimiser and random states and
its trainable weights, or, when those are the best ones just saved, a link to their files
in ``weights-STEP/``; ``progress.json`` says how far it is without loading all that, and
``run.json`` is the record a new run writes. Each save writes a ``.tmp`` file and renames it
over the last, so a run killed mid-save (a second Ctrl-C, an OOM kill) keeps the state saved
before; the ``.tmp`` file it leaves is removed by the next save, or the next run.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from persona.errors import ModelError
from training.run_folder import PROGRESS_FILE, RUN_FILE, STATE_FILE
from training.weights import (
    SET_ASIDE_SUFFIX,
    load_weights,
    restore_set_aside,
    saving,
    trainable,
)

if TYPE_CHECKING:
    from training.train_config import TrainConfig

__all__ = ["RunState", "SavedState", "remove_leftovers", "write_record"]

WEIGHTS_PREFIX = "weights-"  # a state saved with the best weights links to their files in weights-STEP/


@dataclass
class RunState:
    """What changes as a run goes; saved for ``resume``."""

    step: int = 0
    elapsed_s: float = 0.0
    average: tuple[float, float] = (0.0, 0.0)
    base_val_loss: float = math.nan
    best_val_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    tokens: int = 0
    step_seconds: float = 0.0
    next_eval_s: float = 0.0  # with a time budget, no evaluation during the run starts before this
    run_minutes: float | None = None  # the time limit the run started with (--max-minutes), for resume
    history: list[dict[str, float]] = field(default_factory=list)


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class SavedState:
    """The state of the run in ``run_dir`` as saved for ``resume``, and the folder of best
    weights it links to (``linked``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.linked: str | None = None  # the folder of best weights the saved state links to
        self.step: int | None = None  # the step of the state saved (None: nothing saved yet)
        self.at_elapsed_s = 0.0  # the run's training time when it was saved
        self.cost_s = 0.0  # how long the last save took

    def save(self, model: Any, optimizer: torch.optim.Optimizer, state: RunState, config: TrainConfig,
             total_steps: int, best_dir: Path) -> None:
        """Everything ``resume`` needs, written atomically.

        When the weights in hand are the best ones, just saved in ``best_dir``, the state links
        to those files instead of holding a second copy (a full fine-tune of the bundled model
        saved 0.5 GB twice at every improvement)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        linked = self._link_best(best_dir, state.step) if state.best_step == state.step else None
        payload = {
            "weights": trainable(model) if linked is None else None,
            "weights_dir": linked,
            "optimizer": optimizer.state_dict(),
            "rng": _rng_states(),
            "state": state.__dict__,
            "config": config.model_dump(),
        }
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        started = time.perf_counter()
        # Cut short after the rename (a second Ctrl-C), the state on disk may link either folder.
        keep = {self.linked, linked}
        try:
            with saving("the run's state", tmp, resumable=self.resumable()):
                torch.save(payload, tmp)
            tmp.replace(self.run_dir / STATE_FILE)
            self.linked, self.step, self.at_elapsed_s = linked, state.step, state.elapsed_s
            keep = {linked}
            self._save_progress(state, total_steps, config.max_minutes)
        finally:  # the weights the saved state links to stay; any others go
            remove_leftovers(self.run_dir, keep=keep)
        self.cost_s = time.perf_counter() - started

    def _save_progress(self, state: RunState, total_steps: int, max_minutes: float | None) -> None:
        """How far the state just saved is, in a file `persona checkpoints` and `personas list`
        read without loading the state (which may hold a whole model's weights)."""
        progress = {"step": state.step, "total_steps": total_steps, "elapsed_s": state.elapsed_s,
                    "max_minutes": max_minutes}
        tmp = self.run_dir / (PROGRESS_FILE + ".tmp")
        with saving("the run's progress", tmp):
            tmp.write_text(json.dumps(progress))
        tmp.replace(self.run_dir / PROGRESS_FILE)

    def _link_best(self, best_dir: Path, step: int) -> str | None:
        """A folder of hard links to the best weights' files, named for this step; None where
        there are none to link or the file system has no hard links (the state holds a copy)."""
        files = sorted(best_dir.glob("*.safetensors")) if best_dir.is_dir() else []
        if not files:
            return None
        folder = self.run_dir / f"{WEIGHTS_PREFIX}{step}"
        if folder.name == self.linked and folder.is_dir():  # saved at this step already: the state on disk links it
            return folder.name
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir()
            for file in files:
                os.link(file, folder / file.name)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return folder.name

    def resumable(self) -> bool:
        """Whether the run has saved a state ``resume`` can continue from."""
        return (self.run_dir / STATE_FILE).is_file()

    def load(self, model: Any, optimizer: torch.optim.Optimizer, kind: str) -> RunState:
        """The saved state, its weights loaded into ``model`` and its optimiser state into
        ``optimizer``, the random states set as they were."""
        path = self.run_dir / STATE_FILE
        if not path.is_file():
            raise ModelError(f"nothing to resume: {path} does not exist; start without --resume")
        # A run killed while it replaced its best weights left them set aside, and no best/: the
        # resumed run took its last weights for the best, and registered those.
        for old in self.run_dir.glob(f"*{SET_ASIDE_SUFFIX}"):
            restore_set_aside(old.with_name(old.name.removesuffix(SET_ASIDE_SUFFIX)))
        try:
            payload = torch.load(path, weights_only=False)
        except Exception as exc:  # cut short, or not a save: torch says so in its own words
            raise ModelError(
                f"the run's saved state {path} cannot be read ({type(exc).__name__}: {exc}); it is damaged "
                "or cut short; start the run over with --restart"
            ) from exc
        self.linked = payload.get("weights_dir")
        if self.linked is not None:
            load_weights(model, kind, self.run_dir / self.linked)
        else:
            model.load_state_dict(payload["weights"], strict=False)
        optimizer.load_state_dict(payload["optimizer"])
        # Saved before runs kept the limit they started with: that of the session that saved it.
        payload["state"].setdefault("run_minutes", payload["config"].get("max_minutes"))
        state = RunState(**payload["state"])
        _set_rng_states(payload["rng"])
        self.step, self.at_elapsed_s = state.step, state.elapsed_s
        return state


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """The run's ``run.json``, whole or not at all."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_FILE + ".tmp")
    with saving("the run's record", tmp, resumable=False):
        tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(run_dir / RUN_FILE)


def remove_leftovers(run_dir: Path, keep: Collection[str | None] = ()) -> None:
    """Remove what no save in progress needs: the partial files of a save cut short by a crash
    (``state.pt.tmp`` is as big as the state), the folders of linked weights not in ``keep``, and
    best weights a save set aside (a resumed run put back any it needed when it loaded its state;
    a new run needs none)."""
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if (path.name.endswith((".tmp", SET_ASIDE_SUFFIX))
                or (path.name.startswith(WEIGHTS_PREFIX) and path.name not in keep)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
