"""A persona's checkpoint as a standalone Hugging Face model folder.

A LoRA adapter is merged into its base, so the folder loads with plain
``AutoModelForCausalLM.from_pretrained(folder)``: no peft, no persona. Full-weight
checkpoints are written the same way. With ``gguf``, a Llama-family or GPT-2
checkpoint with a byte-level BPE vocabulary (the bundled base's, GPT-2's) is also
written as one GGUF file (for llama.cpp, Ollama, LM Studio...).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

from persona.engine_modes import FAST_INSTALL, llamacpp_available
from persona.errors import ConfigError, ModelError
from persona.gguf_files import GGUF_TYPES, unwritable, write_gguf
from persona.models import LoadedModel, load_model
from persona.personas import Persona
from persona.pool import resolve_checkpoint
from persona.settings import Settings

__all__ = ["export_persona"]

log = logging.getLogger(__name__)

_STAGING_PREFIX = ".persona-export-"  # a staging folder inside the folder given with -o
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # what "make room" can fix


def _as_made_by_hand(folder: Path) -> None:
    """The permissions ``mkdir`` and a plain write give under the user's umask: ``mkdtemp``
    makes the folder private and safetensors writes its weights 0600, so a model exported
    for another account (an Ollama or llama.cpp service) could not be read by it."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for item in folder.iterdir():
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def export_persona(
    settings: Settings, persona: Persona, out_dir: Path, *, version: str | None = None, gguf: str | None = None
) -> Path:
    """Write the persona's weights (its file's checkpoint, or ``version``) into ``out_dir``."""
    # Absolute: a new folder is staged beside it, and "." (an empty folder the user is in) has
    # no name to stage beside.
    out_dir = out_dir.expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; name a new folder for the model with -o")
    if out_dir.exists() and _contents(out_dir):
        raise ConfigError(f"{out_dir} already exists and is not empty; choose a new folder")
    version_name, checkpoint = resolve_checkpoint(persona, settings, version)
    if checkpoint is None and version:
        raise ModelError(f"--checkpoint {version} names the base model, not a fine-tuned checkpoint; name a "
                         f"version (`persona checkpoints {persona.name}` lists them)")
    if checkpoint is None:
        raise ModelError(
            f"persona {persona.name!r} has no fine-tuned checkpoint to export; "
            f"train one with `persona train {persona.name} --corpus FILE` or name one with --checkpoint"
        )
    if gguf and gguf not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {gguf!r}; choose one of {', '.join(GGUF_TYPES)}")
    # Made before the model loads (minutes for a big one): a place it cannot write was a
    # traceback after the wait.
    staging = _staging_in(out_dir) if out_dir.exists() else _staging_beside(out_dir)
    try:
        loaded = load_model(persona.model.base, checkpoint, cache_dir=settings.model_cache_dir,
                            device="cpu", dtype="float32")
        if gguf:
            why = unwritable(loaded.config, loaded.tokenizer)
            if why is None and not llamacpp_available():
                why = "llama-cpp-python is not installed"
            if why is not None:
                raise ModelError(
                    f"no GGUF can be written for this checkpoint: {why} "
                    f"(a Llama-family or GPT-2 model with a byte-level BPE vocabulary, and llama.cpp: {FAST_INSTALL}); "
                    "export without --gguf"
                )
        try:
            _write(staging, loaded, persona, version_name, checkpoint, gguf)
            _move_into_place(staging, out_dir)
        except OSError as exc:  # nothing half written is left
            raise _not_written(out_dir, staging.parent, exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s %s to %s", persona.name, version_name, out_dir)
    return out_dir


def _not_written(out_dir: Path, written_in: Path, exc: OSError) -> ConfigError:
    """What stopped the model being written, and what to do: room is the advice only for a
    full disk or quota (a refused move across filesystems had said "make room", with 40 GB free)."""
    if exc.errno in _NO_ROOM:
        free_mb = shutil.disk_usage(written_in).free / 2**20
        return ConfigError(f"could not write the model to {out_dir} ({free_mb:.0f} MB free there): "
                           f"{exc.strerror or exc}; make room or choose another -o")
    where = f" ({exc.filename})" if exc.filename else ""
    return ConfigError(f"could not write the model to {out_dir}: {exc.strerror or exc}{where}; "
                       "nothing was left there; choose another -o")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """The written folder as ``out_dir``, in one step that refuses a folder filled meanwhile.

    Emptiness was checked before the model loaded (minutes before): two exports to one new
    folder both passed it, and the later one moved its files in over the other's."""
    filled = ConfigError(f"{out_dir} was filled while this export ran (by another `persona export` to it?); "
                         "nothing was written there; choose a new folder")
    if out_dir.exists():
        _fill(staging, out_dir, filled)
        return
    try:
        staging.rename(out_dir)  # atomic; refused if the folder is by now there and not empty
        return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise filled from None
        if exc.errno != errno.EXDEV:  # a folder overlayfs will not rename (a Docker image's layer)
            raise
    try:
        out_dir.mkdir()
    except FileExistsError:
        raise filled from None
    try:
        _fill(staging, out_dir, filled)
    except BaseException:
        with contextlib.suppress(OSError):  # ours, and emptied by _fill unless another filled it
            out_dir.rmdir()
        raise


def _fill(staging: Path, out_dir: Path, filled: ConfigError) -> None:
    """``staging``'s files moved into the empty folder ``out_dir``; on any failure, none left there.

    A folder made for it (a shell may be in it; a mount point, a Docker volume) is filled, not
    replaced. Its README is claimed first, made only if absent, so of two exports here one goes
    on and one stops."""
    readme = staging / "README.md"
    claimed = out_dir / readme.name
    try:
        claimed.touch(exist_ok=False)  # O_EXCL: made only if absent
    except (FileExistsError, NotADirectoryError):
        raise filled from None
    moved = [claimed]
    try:
        claimed.write_bytes(readme.read_bytes())
        if _contents(out_dir) != [readme.name]:  # something else came in meanwhile
            raise filled
        readme.unlink()
        for item in staging.iterdir():
            _move(item, out_dir / item.name)
            moved.append(out_dir / item.name)
    except BaseException:
        for item in moved:
            _remove(item)
        raise


def _move(item: Path, to: Path) -> None:
    """``item`` renamed to ``to``; copied and then deleted where the two are on different
    filesystems, the copy removed again if it fails."""
    try:
        item.rename(to)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    try:
        if item.is_dir():
            shutil.copytree(item, to)
        else:
            shutil.copy2(item, to)
    except BaseException:
        _remove(to)
        raise
    _remove(item)


def _remove(item: Path) -> None:
    if item.is_dir() and not item.is_symlink():
        shutil.rmtree(item, ignore_errors=True)
    else:
        item.unlink(missing_ok=True)


def _contents(folder: Path) -> list[str]:
    """What is in ``folder``, leaving out the staging folders of exports into it (this one's, or
    another's still writing: which of them fills it is settled by the README it claims)."""
    return sorted(item.name for item in folder.iterdir() if not item.name.startswith(_STAGING_PREFIX))


def _staging_in(out_dir: Path) -> Path:
    """A new private folder inside the empty folder ``out_dir``: on its filesystem, so a mount
    point (a Docker volume, a USB disk) is filled by renames, and its free space is what counts."""
    try:
        return Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out_dir))
    except OSError as exc:
        raise ConfigError(f"cannot write in {out_dir}: {exc.strerror or exc}; choose another -o") from None


def _staging_beside(out_dir: Path) -> Path:
    """A new private folder beside ``out_dir``, its parents made; where that cannot be, why."""
    if (blocking := next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)) is not None:
        raise ConfigError(f"{blocking} is a file, so {out_dir} cannot be made under it; choose another -o")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, not allowed: was a traceback after the model loaded
        raise ConfigError(f"cannot make the folder {exc.filename or out_dir.parent}: {exc.strerror or exc}; "
                          "choose another -o") from None
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    except OSError as exc:
        raise ConfigError(f"cannot write in {out_dir.parent}: {exc.strerror or exc}; choose another -o") from None


def _write(staging: Path, loaded: LoadedModel, persona: Persona, version_name: str, checkpoint: Path, gguf: str | None) -> None:
    """The model folder's files: weights, tokenizer, any GGUF, a README saying what it is."""
    loaded.model.save_pretrained(staging)
    loaded.tokenizer.save_pretrained(staging)
    gguf_line = ""
    if gguf:
        gguf_name = f"{persona.name}-{version_name}.{gguf}.gguf"
        write_gguf(loaded.model, loaded.tokenizer, staging / gguf_name, gguf)
        gguf_line = f"`{gguf_name}` is the same model as one GGUF file ({gguf}) for llama.cpp or Ollama.\n\n"
    (staging / "README.md").write_text(
        f"# {persona.speaker} ({persona.name} {version_name})\n\n"
        f"Exported by `persona export` from `{checkpoint}` on base `{persona.model.base}`; "
        "any LoRA adapter is merged in.\n\n"
        f"{gguf_line}"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(FOLDER)\n"
        "tokenizer = AutoTokenizer.from_pretrained(FOLDER)\n```\n"
    )
    _as_made_by_hand(staging)
