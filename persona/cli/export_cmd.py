"""`persona export`: a persona's weights as a standalone model folder (and GGUF file)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from persona.cli.common import console, friendly_errors, get_settings
from persona.cli.training_common import (
    SERVED_HELP,
    THREADS_HELP,
    persona_with_weights,
    ready_torch,
    served_version,
)

__all__ = ["export", "register"]


@friendly_errors
def export(
    name: str = typer.Argument(..., metavar="NAME", help="the persona to export"),
    output: Path = typer.Option(..., "-o", "--output", help="a new folder for the model"),
    checkpoint: str = typer.Option(
        None, help=f"a version (v2) or folder; default: {SERVED_HELP}",
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
    # Refused (swapped to base) before torch loads.
    version = checkpoint or served_version(settings, persona, "exporting", base_allowed=False)
    ready_torch(settings, threads)
    with console.status(f"exporting {escape(name)}..."):
        folder = export_persona(settings, persona, output, version=version, gguf=gguf)
    console.print(f"wrote {folder}; load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})",
                  markup=False)
    for written in sorted(Path(folder).glob("*.gguf")):
        console.print(f"and {written} for llama.cpp or Ollama", markup=False)


def register(app: typer.Typer) -> None:
    """Add `persona export` to ``app``."""
    app.command()(export)
