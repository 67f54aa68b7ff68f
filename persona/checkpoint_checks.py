"""Is this checkpoint fit to serve a persona? Checks before and after loading it.

``static_problem`` looks at the folder only (cheap, runs in the CLI): weights files
present, readable config, a ``checkpoint.json`` that ``persona checkpoints`` can list
(refused in the same words), trained on the persona's base, its weights files (full weights'
or an adapter's, safetensors or pickled) all there and whole (their headers or zip directories
read; in the words loading refuses them with), and an adapter's shapes those its base's
config.json gives it.
``loaded_problem`` compares a loaded candidate with the weights serving now (same
parameter names and shapes); the pool's warm-up of its engine has already run it once
(finite logits). Each returns a sentence naming the problem, or None when it is fine.
"""

from __future__ import annotations

import json
from pathlib import Path

from persona.checkpoints import METADATA_FILE, read_checkpoint
from persona.errors import ModelError
from persona.lora import config_misfit
from persona.models import BUNDLED_ALIASES, LoadedModel
from persona.personas import Persona
from persona.weights_files import DAMAGED_ADVICE as REDO_ADVICE
from persona.weights_files import (
    check_adapter_weights_file,
    check_weights_files,
    is_lora_dir,
)

__all__ = ["loaded_problem", "same_base", "static_problem"]

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
MAX_SHAPE_DIFFERENCES_SHOWN = 3
DAMAGED_ADVICE = f"it is cut short or damaged: {REDO_ADVICE}"


def same_base(a: str, b: str) -> bool:
    """Whether two base model names mean the same weights (aliases and paths normalised)."""
    if a in BUNDLED_ALIASES or b in BUNDLED_ALIASES:
        return a in BUNDLED_ALIASES and b in BUNDLED_ALIASES
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _json_object(folder: Path, name: str) -> tuple[dict, str | None]:
    """A checkpoint file's JSON object, or what is wrong with it."""
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError) as exc:
        return {}, f"checkpoint {folder}: {name} is not valid JSON ({exc}); {DAMAGED_ADVICE}"
    if not isinstance(data, dict):
        return {}, f"checkpoint {folder}: {name} holds a JSON {type(data).__name__}, not an object; {DAMAGED_ADVICE}"
    return data, None


def static_problem(persona: Persona, folder: Path) -> str | None:
    """What is wrong with a checkpoint folder before any weights are loaded, or None."""
    if not folder.is_dir():
        return f"checkpoint folder {folder} does not exist"
    lora = is_lora_dir(folder)
    config_name = "adapter_config.json" if lora else "config.json"
    if not (folder / config_name).is_file():
        return f"checkpoint {folder} has neither adapter_config.json (LoRA) nor config.json (full weights)"
    _, problem = _json_object(folder, config_name)
    if problem:
        return problem
    if not lora and not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):  # an adapter's: its own check names it
        return f"checkpoint {folder} holds no weights files (*.safetensors or *.bin)"
    if (folder / METADATA_FILE).is_file():
        try:
            trained_on = read_checkpoint(folder).base
        except ModelError as exc:  # in the words `persona checkpoints` lists it with
            return str(exc)
        if trained_on and not same_base(trained_on, persona.model.base):
            return (
                f"checkpoint {folder.name} was trained on base {trained_on!r}, but persona "
                f"{persona.name!r} runs on {persona.model.base!r} (wrong base)"
            )
    try:  # headers only: every worker a swap asked loaded them to find this; in the words loading refuses them with
        if not lora:
            check_weights_files(folder)
        elif (held := check_adapter_weights_file(folder)) is not None:
            return _lora_misfit(persona, folder, held)
    except ModelError as exc:
        return str(exc)
    return None


def _lora_misfit(persona: Persona, folder: Path, held: dict[str, tuple[int, ...]]) -> str | None:
    """A LoRA adapter of other shapes than the persona's base (a local folder) gives it, told from
    the base's config.json, in the words loading it refuses it with; None where that cannot be told."""
    if persona.model.base in BUNDLED_ALIASES:  # its config is written only once it is converted
        return None
    try:
        base_config = json.loads((Path(persona.model.base).expanduser() / "config.json").read_text())
    except (OSError, ValueError):  # no base there: its own check says so
        return None
    return config_misfit(folder, base_config, held) if isinstance(base_config, dict) else None


def loaded_problem(candidate: LoadedModel, reference: LoadedModel | None, label: str) -> str | None:
    """What is wrong with loaded weights compared with those serving now, or None.

    Whether they generate at all (finite logits) was checked when the pool warmed their
    engine up; this compares their layout with the serving weights'.
    """
    if reference is not None:
        want, got = reference.parameter_shapes(), candidate.parameter_shapes()
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        differ = [n for n in sorted(set(want) & set(got)) if want[n] != got[n]]
        if missing or extra or differ:
            parts = [f"{n}: {list(got[n])} here, {list(want[n])} now" for n in differ[:MAX_SHAPE_DIFFERENCES_SHOWN]]
            parts += [f"missing {n}" for n in missing[:MAX_SHAPE_DIFFERENCES_SHOWN]]
            parts += [f"unexpected {n}" for n in extra[:MAX_SHAPE_DIFFERENCES_SHOWN]]
            count = len(missing) + len(extra) + len(differ)
            return f"checkpoint {label} has wrong shapes for this persona's model ({count} tensors differ: {'; '.join(parts)})"
    return None
