"""`persona export`: a persona's weights as a standalone model folder (and GGUF file)."""

from __future__ import annotations

from pathlib import Path

import redis
import typer
from rich.markup import escape

from persona.checkpoints import BASE_VERSION
from persona.cli.common import (
    console,
    err_console,
    explain_redis_error,
    friendly_errors,
    get_settings,
)
from persona.cli.training_common import (
    THREADS_HELP,
    persona_with_weights,
    ready_torch,
)
from persona.connection import connect
from persona.errors import ModelError, PersonaError
from persona.personas import Persona
from persona.settings import Settings
from persona.swap import active_versions

__all__ = ["export", "register"]


@friendly_errors
def export(
    name: str = typer.Argument(..., metavar="NAME", help="the persona to export"),
    output: Path = typer.Option(..., "-o", "--output", help="a new folder for the model"),
    checkpoint: str = typer.Option(
        None, help="a version (v2) or folder; default: the one the persona serves now (`persona swap` changes it), "
        "else the persona file's",
    ),
    gguf: str = typer.Option(
        None, help="also write one GGUF file of this type (q8_0, q4_1, f16, f32) for llama.cpp; "
        "Llama-family or GPT-2 models with a byte-level BPE vocabulary (the bundled model's, GPT-2's)",
    ),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
) -> None:
    """Write a standalone Hugging Face model folder, any LoRA merged into its base."""
    from training.export import export_persona

    settings = get_settings()
    persona = persona_with_weights(settings, name, "export")
    version = checkpoint or _serving(settings, persona)  # refused (swapped to base) before torch loads
    ready_torch(threads)
    with console.status(f"exporting {escape(name)}..."):
        folder = export_persona(settings, persona, output, version=version, gguf=gguf)
    console.print(f"wrote {folder}; load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})",
                  markup=False)
    for written in sorted(Path(folder).glob("*.gguf")):
        console.print(f"and {written} for llama.cpp or Ollama", markup=False)


def _serving(settings: Settings, persona: Persona) -> str | None:
    """The version ``persona`` serves now, if an operator swapped it (Redis keeps that; None:
    its file's choice, as without Redis, which is said). Export read only the persona file:
    swapped to v1, a persona trained no further said it had "no fine-tuned checkpoint to export"."""
    try:
        swapped = active_versions(connect(settings)).get(persona.name)
    except (PersonaError, redis.exceptions.RedisError) as exc:  # export needs no Redis: said, not refused
        why = str(exc) if isinstance(exc, PersonaError) else explain_redis_error(exc)
        if not persona.model.checkpoint:
            raise ModelError(f"cannot tell which version {persona.name!r} serves now, and its persona file names no "
                             f"checkpoint; name one with --checkpoint (`persona checkpoints {persona.name}` lists them). "
                             f"Redis: {why}") from None
        err_console.print(f"cannot tell which version {persona.name} serves now, so exporting its persona file's "
                          f"checkpoint, {persona.model.checkpoint} (name another with --checkpoint). Redis: {why}",
                          style="yellow", markup=False, highlight=False)
        return None
    if swapped == BASE_VERSION:
        raise ModelError(f"{persona.name!r} serves its base model now (swapped to base): nothing fine-tuned to export; "
                         f"name a version with --checkpoint (`persona checkpoints {persona.name}` lists them)")
    if swapped is not None:
        console.print(f"{persona.name} serves {swapped} now (swapped to it): exporting {swapped}", markup=False)
    return swapped


def register(app: typer.Typer) -> None:
    """Add `persona export` to ``app``."""
    app.command()(export)
