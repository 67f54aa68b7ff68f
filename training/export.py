"""A persona's checkpoint as a standalone Hugging Face model folder.

A LoRA adapter is merged into its base, so the folder loads with plain
``AutoModelForCausalLM.from_pretrained(folder)``: no peft, no persona. Full-weight
checkpoints are written the same way. With ``gguf``, a Llama-family or GPT-2
checkpoint with a byte-level BPE vocabulary (the bundled base's, GPT-2's) is also
written as one GGUF file (for llama.cpp, Ollama, LM Studio...).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from persona.engine import llamacpp_available
from persona.errors import ConfigError, ModelError
from persona.gguf_files import GGUF_TYPES, unwritable, write_gguf
from persona.models import load_model
from persona.personas import Persona
from persona.pool import resolve_checkpoint
from persona.settings import Settings

__all__ = ["export_persona"]

log = logging.getLogger(__name__)


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
    # Absolute: the folder is staged beside it, and "." (an empty folder the user is in) has
    # no name to stage beside.
    out_dir = out_dir.expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} already exists and is not empty; choose a new folder")
    version_name, checkpoint = resolve_checkpoint(persona, settings, version)
    if checkpoint is None:
        raise ModelError(
            f"persona {persona.name!r} has no fine-tuned checkpoint to export; "
            f"train one with `persona train {persona.name} --corpus FILE` or name one with --checkpoint"
        )
    if gguf and gguf not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {gguf!r}; choose one of {', '.join(GGUF_TYPES)}")
    loaded = load_model(persona.model.base, checkpoint, cache_dir=settings.model_cache_dir, device="cpu", dtype="float32")
    if gguf:
        why = unwritable(loaded.config, loaded.tokenizer)
        if why is None and not llamacpp_available():
            why = "llama-cpp-python is not installed"
        if why is not None:
            raise ModelError(
                f"no GGUF can be written for this checkpoint: {why} "
                "(a Llama-family or GPT-2 model with a byte-level BPE vocabulary, and `pip install '.[fast]'`); "
                "export without --gguf"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        loaded.model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        if gguf:
            write_gguf(loaded.model, loaded.tokenizer, staging / f"{persona.name}-{version_name}.{gguf}.gguf", gguf)
        (staging / "README.md").write_text(
            f"# {persona.speaker} ({persona.name} {version_name})\n\n"
            f"Exported by `persona export` from `{checkpoint}` on base `{persona.model.base}`; "
            "any LoRA adapter is merged in.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(FOLDER)\n"
            "tokenizer = AutoTokenizer.from_pretrained(FOLDER)\n```\n"
        )
        _as_made_by_hand(staging)
        if out_dir.exists():  # an empty folder made for it (a shell may be in it): filled, not replaced
            for item in staging.iterdir():
                item.rename(out_dir / item.name)
        else:
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s %s to %s", persona.name, version_name, out_dir)
    return out_dir
