"""Checkpoint versions of a persona, on disk under the data directory.

Layout: ``<data_dir>/checkpoints/<persona>/<version>/`` where versions are ``v1``,
``v2``, ... in order of creation. Each folder holds the weights (a LoRA adapter with
``adapter_config.json``, or full weights with ``config.json``), ``checkpoint.json``
(what made it: base, kind, corpus fingerprint, training config, metrics) and a short
``README.md`` model card. A version is written into a staging folder and renamed into
place, so a half-written checkpoint is never listed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from persona.errors import ModelError
from persona.whole_files import write_whole

if TYPE_CHECKING:
    from persona.personas import Persona
    from persona.settings import Settings

__all__ = [
    "BASE_VERSION",
    "CheckpointInfo",
    "checkpoint_candidates",
    "checkpoint_dir",
    "list_checkpoints",
    "next_version",
    "read_checkpoint",
    "register_checkpoint",
    "remove_checkpoint",
    "resolve_checkpoint",
    "scan_checkpoints",
]

log = logging.getLogger(__name__)

# The version name of a persona served by its base model alone.
BASE_VERSION = "base"
METADATA_FILE = "checkpoint.json"
CARD_FILE = "README.md"
DAMAGED_ADVICE = "copy the whole folder again, train again, or remove the folder"
VERSION_PATTERN = re.compile(r"^v(\d+)$")


class CheckpointInfo(BaseModel):
    """What one checkpoint version is and how it was made."""

    persona: str
    version: str
    base: str
    kind: Literal["lora", "full"]
    created_at: float = Field(default_factory=time.time)
    corpus_fingerprint: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)  # what was measured; not measured: absent
    path: Path | None = Field(None, exclude=True)

    @field_validator("metrics", mode="before")
    @classmethod
    def _measured_only(cls, metrics: Any) -> Any:
        """The metrics that hold a number. A run with nothing held out has no perplexity (NaN),
        which JSON cannot hold: it was written as null, and its own checkpoint.json could then not
        be read back (unlisted, refused by swap and eval, while a worker served it). Such files,
        already written, read as their numbers alone."""
        if not isinstance(metrics, dict):
            return metrics  # pydantic says what is wrong with it
        return {key: value for key, value in metrics.items()
                if value is not None and not (isinstance(value, float) and not math.isfinite(value))}


def checkpoint_dir(checkpoints_root: Path, persona: str) -> Path:
    return checkpoints_root / persona


def _version_number(name: str) -> int | None:
    match = VERSION_PATTERN.match(name)
    return int(match.group(1)) if match else None


def scan_checkpoints(checkpoints_root: Path, persona: str) -> tuple[list[CheckpointInfo], list[ModelError]]:
    """Every registered version of a persona, oldest first, and why any other could not be read.

    A version folder whose metadata is damaged (a copy cut short, a hand edit) is left
    out, so it hides neither the other versions nor the dashboard's figures.
    """
    folder = checkpoint_dir(checkpoints_root, persona)
    if not folder.is_dir():
        return [], []
    found, problems = [], []
    for child in sorted(folder.iterdir(), key=lambda c: _version_number(c.name) or 0):
        if _version_number(child.name) is None or not child.is_dir():
            continue
        if not (child / METADATA_FILE).is_file():  # swap took it as a version, and this passed it over in silence
            problems.append(ModelError(_without_metadata(child)))
            continue
        try:
            found.append(read_checkpoint(child))
        except ModelError as exc:
            problems.append(exc)
    return sorted(found, key=lambda c: _version_number(c.version) or 0), problems


def list_checkpoints(checkpoints_root: Path, persona: str) -> list[CheckpointInfo]:
    """Every readable version of a persona, oldest first; unreadable ones are logged and skipped."""
    found, problems = scan_checkpoints(checkpoints_root, persona)
    for problem in problems:
        log.warning("skipping checkpoint: %s", problem)
    return found


def read_checkpoint(path: Path) -> CheckpointInfo:
    """The metadata of one checkpoint folder."""
    try:
        info = CheckpointInfo.model_validate_json((path / METADATA_FILE).read_text())
    except ValidationError as exc:  # pydantic's own report runs to lines, a link to its site among them
        raise ModelError(f"checkpoint {path}: {METADATA_FILE} cannot be read ({_first_problem(exc)}); {DAMAGED_ADVICE}") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"checkpoint {path}: {METADATA_FILE} cannot be read ({exc}); {DAMAGED_ADVICE}") from exc
    return info.model_copy(update={"path": path})


def _without_metadata(folder: Path) -> str:
    """Why a version folder with no ``checkpoint.json`` is not a version (a copy cut short, or by hand)."""
    return (f"checkpoint {folder} has no {METADATA_FILE} (every version has one, saying what made it), "
            f"so it cannot serve: {DAMAGED_ADVICE}")


def _first_problem(exc: ValidationError) -> str:
    """The first thing pydantic found wrong, in one line: which field, what it should be, what it is."""
    error = exc.errors()[0]
    field = ".".join(map(str, error["loc"]))
    said = f"{field}: {error['msg'][:1].lower()}{error['msg'][1:]}" if field else error["msg"]
    if field and error["type"] != "missing" and isinstance(error.get("input"), str | int | float | bool):
        said += f", not {error['input']!r}"
    more = len(exc.errors()) - 1
    return said + (f" (and {more} more)" if more else "")


def next_version(checkpoints_root: Path, persona: str) -> str:
    """The name the next version of this persona gets."""
    folder = checkpoint_dir(checkpoints_root, persona)
    numbers = [_version_number(p.name) or 0 for p in folder.iterdir()] if folder.is_dir() else []
    return f"v{max(numbers, default=0) + 1}"


def register_checkpoint(
    checkpoints_root: Path,
    staging: Path,
    info: CheckpointInfo,
    model_card: Callable[[CheckpointInfo], str] | None = None,
) -> CheckpointInfo:
    """Move a fully written staging folder into place as the next version, with its
    ``checkpoint.json`` and its card (``model_card`` of the version's info), written first:
    a version is never in place without them, nor with either cut short by a full disk."""
    if not ((staging / "adapter_config.json").is_file() or (staging / "config.json").is_file()):
        raise ModelError(f"{staging} holds no weights (no adapter_config.json or config.json)")
    folder = checkpoint_dir(checkpoints_root, info.persona)
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        version = next_version(checkpoints_root, info.persona)
        info = info.model_copy(update={"version": version})
        write_whole(staging / METADATA_FILE, info.model_dump_json(indent=2))
        if model_card is not None:
            write_whole(staging / CARD_FILE, model_card(info))
        target = folder / version
        try:
            os.rename(staging, target)  # atomic; fails if another writer took the name
            break
        except OSError:
            if not target.exists():
                raise
    return info.model_copy(update={"path": target})


def remove_checkpoint(checkpoints_root: Path, persona: str, version: str) -> None:
    """Delete one version's folder."""
    shutil.rmtree(checkpoint_dir(checkpoints_root, persona) / version)


def checkpoint_candidates(persona: Persona, settings: Settings, version: str | None = None) -> list[tuple[str, Path | None]]:
    """Where a persona's weights at ``version`` (None: its file's choice) may be, found
    without reading the disk, each as (version name, checkpoint folder; None for the base
    model): the folder it names as a path, and for a relative name, after it, the version
    of that name among the persona's checkpoints. ``resolve_checkpoint`` picks by what exists."""
    chosen = version if version is not None else persona.model.checkpoint
    if not chosen or chosen == BASE_VERSION:
        return [(BASE_VERSION, None)]
    as_path = Path(chosen).expanduser()
    if as_path.is_absolute():
        return [(as_path.name, as_path)]
    return [(as_path.name, as_path), (chosen, settings.checkpoints_dir / persona.name / chosen)]


def resolve_checkpoint(persona: Persona, settings: Settings, version: str | None = None) -> tuple[str, Path | None]:
    """(version, checkpoint folder) for a persona; version None means its file's choice."""
    (name, as_path), *by_version = checkpoint_candidates(persona, settings, version)
    if as_path is None:
        return name, None
    if not by_version or as_path.exists():
        if not as_path.is_dir():
            raise ModelError(f"persona {persona.name!r}: checkpoint folder {as_path} does not exist")
        return name, as_path
    [(chosen, folder)] = by_version
    if not folder.is_dir():
        if "/" in chosen or chosen.startswith("."):  # written as a path: a folder was meant
            raise ModelError(f"persona {persona.name!r}: checkpoint folder {as_path.resolve()} does not exist")
        meant = f"v{chosen}" if chosen.isdigit() and (folder.parent / f"v{chosen}").is_dir() else ""
        raise ModelError(
            f"persona {persona.name!r}: no checkpoint version {chosen!r} in {folder.parent}; "
            + (f"did you mean {meant}?" if meant else f"see `persona checkpoints {persona.name}`")
        )
    if _version_number(chosen) is not None and not (folder / METADATA_FILE).is_file():
        raise ModelError(f"persona {persona.name!r}: {_without_metadata(folder)}")  # as `persona checkpoints` lists it
    return chosen, folder
