"""A training run's weights on disk: the trainable ones in memory, the best ones saved as a
folder ``persona.models.load_model`` loads (an adapter or full weights) and read back, and
saves that leave no half-written file behind."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from persona.errors import ModelError

__all__ = ["SET_ASIDE_SUFFIX", "load_weights", "restore_set_aside", "save_weights", "saving", "trainable"]

SET_ASIDE_SUFFIX = ".old"  # the best weights a save replaces wait under this name until the new ones are in place


def trainable(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@contextmanager
def saving(what: str, partial: Path, *, resumable: bool = True) -> Iterator[None]:
    """Remove what a failed save half wrote, and say why it failed (a full disk, mostly:
    torch and safetensors report it in their own words). The last good save stays; a run
    that has none yet (not ``resumable``) is started again, not resumed."""
    try:
        yield
    except BaseException as exc:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        if not isinstance(exc, Exception):  # Ctrl-C: nothing to explain
            raise
        free_mb = shutil.disk_usage(partial.parent).free / 2**20
        then = ("continue the run with --resume" if resumable
                else "start the run again (it had saved nothing to resume from yet)")
        raise ModelError(
            f"could not save {what} in {partial.parent} ({free_mb:.0f} MB free there): {exc}; make room, then {then}"
        ) from exc


def save_weights(model: Any, tokenizer: Any, folder: Path, *, resumable: bool = True) -> None:
    """A folder ``persona.models.load_model`` can load: an adapter or full weights."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with saving("the best weights", staging, resumable=resumable):
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    # The old folder moves aside before the new one takes its place, and goes only then: removed
    # first, a kill between the two left no best weights, and the resumed run registered its last.
    # A kill between the renames leaves only the old folder: ``restore_set_aside`` puts it back.
    old = folder.with_name(folder.name + SET_ASIDE_SUFFIX)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def restore_set_aside(folder: Path) -> None:
    """Finish what a kill inside ``save_weights`` left: the old weights set aside and the new not
    yet in place (put the old back: they are the best the saved state knows), or the new in place
    and the old not yet removed (remove them)."""
    old = folder.with_name(folder.name + SET_ASIDE_SUFFIX)
    if not old.is_dir():
        return
    if folder.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.rename(folder)


def load_weights(model: Any, kind: str, folder: Path) -> None:
    """Put the weights ``save_weights`` wrote in ``folder`` back into ``model`` (``kind``: "lora" or "full")."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        if kind == "lora":
            from peft import set_peft_model_state_dict

            loaded = set_peft_model_state_dict(model, load_file(file))
        else:
            loaded = model.load_state_dict(load_file(file), strict=False)
        if loaded.unexpected_keys:
            raise ModelError(f"the weights in {folder} do not fit the model being trained "
                             f"({loaded.unexpected_keys[0]}...); start the run over")
    if not files:
        raise ModelError(f"{folder} holds no weights; start the run over")
