"""A LoRA adapter put on its base and folded into the weights (so it runs at full speed),
refusing one that does not fit in a sentence: peft loads an adapter whose file lacks the
weights its config names, and only warns; for one trained on a base of another size it
lists every weight, a line each.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from persona.errors import ModelError
from persona.weights_files import (
    DAMAGED_ADVICE,
    LORA_CONFIG_FILE,
    adapter_config,
    adapter_weight_shapes,
    adapter_weights_file,
)

__all__ = ["merge_lora"]

# peft's warning listing the weights an adapter's file lacks (kilobytes long): the check after
# its load refuses such an adapter in a sentence, so this only keeps the list off the terminal.
PEFT_MISSING_KEYS_WARNING = r".*Found missing adapter keys"
MISSING_KEYS_SHOWN = 3
SHAPE_MISMATCHES_SHOWN = 2  # peft listed every one, a line each


def merge_lora(model: Any, checkpoint: Path) -> Any:
    """Apply a LoRA adapter and fold it into the weights, refusing a mismatched one."""
    from peft import PeftModel

    config = adapter_config(checkpoint)
    held = adapter_weight_shapes(checkpoint)
    # Filters, never catch_warnings: a swap merges in a background thread while the worker
    # serves, and catch_warnings swaps out the warning state of every thread in the process.
    # peft reads an attribute transformers deprecated: a warning no user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message=PEFT_MISSING_KEYS_WARNING, category=UserWarning)
    try:
        adapted = PeftModel.from_pretrained(model, checkpoint)
    except Exception as exc:
        raise _misfit(checkpoint, config, model.config, held, exc) from exc
    _refuse_missing_adapter_weights(checkpoint, adapted, held)
    return adapted.merge_and_unload()


def _misfit(checkpoint: Path, config: dict[str, Any], base_config: Any, held: dict[str, tuple[int, ...]],
            exc: Exception) -> ModelError:
    """A LoRA adapter that peft cannot put on this base, said in a sentence: for weights of
    other shapes (trained on a base of another size) peft listed every one, a line each."""
    differ = _adapter_shape_differences(checkpoint, base_config, held)
    if differ:
        shown = "; ".join(f"{name}: {list(got)} in the file, {list(want)} in this model"
                          for name, got, want in differ[:SHAPE_MISMATCHES_SHOWN])
        more = "; ..." if len(differ) > SHAPE_MISMATCHES_SHOWN else ""
        count = f"all {len(held)} of its" if len(differ) == len(held) else f"{len(differ)} of its {len(held)}"
        said = f"{count} weights have other shapes than this model's ({shown}{more})"
    else:
        said = str(exc)
    return ModelError(
        f"LoRA checkpoint {checkpoint} does not fit this base model "
        f"(it was trained on {config.get('base_model_name_or_path') or 'another base'}): {said}; "
        "serve it on the base it was trained on, or train it again on this one"
    )


def _adapter_shape_differences(
    checkpoint: Path, base_config: Any, held: dict[str, tuple[int, ...]]
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Each adapter weight whose shape in the file differs from the one this base gives it:
    (name, the file's shape, the model's), compared on an empty (meta) copy of the base."""
    import torch
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):  # the layout alone, no memory behind it
            skeleton = get_peft_model(AutoModelForCausalLM.from_config(base_config), PeftConfig.from_pretrained(checkpoint))
    except Exception:  # noqa: BLE001 - peft refuses the base itself (no module it targets): its own words say why
        return []
    want = {_short_key(k): tuple(t.shape) for k, t in get_peft_model_state_dict(skeleton, save_embedding_layers=False).items()}
    got = {_short_key(k): shape for k, shape in held.items()}
    return [(name, got[name], want[name]) for name in want if name in got and got[name] != want[name]]


def _refuse_missing_adapter_weights(checkpoint: Path, adapted: Any, held: dict[str, tuple[int, ...]]) -> None:
    """Refuse an adapter whose file lacks weights its config names (peft loads it all the
    same, and only warns): merged, the missing ones change nothing, and an adapter whose
    file fits nothing was served as its version while the base model answered."""
    from peft.utils import get_peft_model_state_dict

    # The names peft saves an adapter's weights under, and would have loaded them by.
    named = [_short_key(k) for k in get_peft_model_state_dict(adapted, save_embedding_layers=False)]
    found = {_short_key(k) for k in held}
    missing = [k for k in named if k not in found]
    if not missing:
        return
    shown = ", ".join(missing[:MISSING_KEYS_SHOWN])
    what = f"none of the {len(named)}" if len(missing) == len(named) else f"only {len(named) - len(missing)} of the {len(named)}"
    raise ModelError(
        f"LoRA checkpoint {checkpoint}: its {adapter_weights_file(checkpoint).name} holds {what} weights its "
        f"{LORA_CONFIG_FILE} names (missing: {shown}{', ...' if len(missing) > MISSING_KEYS_SHOWN else ''}); "
        f"it is not this adapter's file: {DAMAGED_ADVICE}"
    )


def _short_key(key: str) -> str:
    """An adapter weight's name as a user reads it in the model: peft's prefix and adapter name
    off, as peft's own load takes them off (or puts them back) to match a file's names."""
    return key.removeprefix("base_model.model.").replace(".default.", ".")
