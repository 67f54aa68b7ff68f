"""A LoRA adapter put on its base and folded into the weights (so it runs at full speed),
refusing one that does not fit in a sentence: peft loads an adapter whose file lacks the
weights its config names, and only warns; for one trained on a base of another size it
lists every weight, a line each.

Whether an adapter's weights have the shapes the base gives them is decided from the base's
config, before its weights load (seconds; 11-16 s for the bundled model): ``refuse_misfit``
compares them on an empty (meta) copy of the base, and ``config_misfit`` on its config.json
alone for the families whose layers it knows (no torch: `persona swap` and `personas validate`).
"""

from __future__ import annotations

import re
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

__all__ = ["config_misfit", "merge_lora", "refuse_misfit"]

# peft's warning listing the weights an adapter's file lacks (kilobytes long): the check after
# its load refuses such an adapter in a sentence, so this only keeps the list off the terminal.
PEFT_MISSING_KEYS_WARNING = r".*Found missing adapter keys"
MISSING_KEYS_SHOWN = 3
SHAPE_MISMATCHES_SHOWN = 2  # peft listed every one, a line each
LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")  # a decoder layer's number in a weight's name (Llama family, GPT-2)
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # q/k/v/o_proj and gate/up/down_proj, as Llama names them


def merge_lora(model: Any, checkpoint: Path) -> Any:
    """Apply a LoRA adapter and fold it into the weights, refusing a mismatched one."""
    from peft import PeftModel

    config = adapter_config(checkpoint)
    held = adapter_weight_shapes(checkpoint)
    _quiet_peft()
    try:
        adapted = PeftModel.from_pretrained(model, checkpoint)
    except Exception as exc:
        raise _misfit(checkpoint, config, model.config, held, exc) from exc
    _refuse_missing_adapter_weights(checkpoint, adapted, held)
    return adapted.merge_and_unload()


def _quiet_peft() -> None:
    """Keep peft's warnings that no user can act on off the terminal and the worker's log."""
    # Filters, never catch_warnings: a swap merges in a background thread while the worker
    # serves, and catch_warnings swaps out the warning state of every thread in the process.
    # peft reads an attribute transformers deprecated: a warning no user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message=PEFT_MISSING_KEYS_WARNING, category=UserWarning)


def refuse_misfit(checkpoint: Path, base_config: Any) -> None:
    """Refuse a LoRA adapter whose weights have other shapes than this base gives them, or are
    for layers it lacks, decided from the base's config before its weights load: peft found
    it only once the base had loaded (11-16 s for the bundled model)."""
    held = adapter_weight_shapes(checkpoint)
    differ = _adapter_shape_differences(checkpoint, base_config, held)
    said = _differences_said(held, differ) if differ else _layers_beyond(held, getattr(base_config, "num_hidden_layers", None))
    if said:
        raise ModelError(_misfit_sentence(checkpoint, adapter_config(checkpoint), said))


def config_misfit(checkpoint: Path, base_config: dict[str, Any], held: dict[str, tuple[int, ...]]) -> str | None:
    """``refuse_misfit``'s sentence, decided from a base's config.json alone (no torch) where its
    family's layers are known and every weight in the adapter's file (``held``) is one of them;
    None when it fits, or where that cannot be told so."""
    dims = _module_features(base_config)
    if dims is None:
        return None
    want = {name: _lora_shape(name, shape, dims) for name, shape in held.items()}
    if any(shape is None for shape in want.values()):  # a weight not known here: loading tells
        return None
    differ = [(_short_key(k), held[k], want[k]) for k in held if held[k] != want[k]]
    said = (_differences_said(held, differ) if differ
            else _layers_beyond(held, base_config.get("num_hidden_layers", base_config.get("n_layer"))))
    return _misfit_sentence(checkpoint, _config_or_empty(checkpoint), said) if said else None


def _config_or_empty(checkpoint: Path) -> dict[str, Any]:
    try:
        return adapter_config(checkpoint)
    except ModelError:
        return {}


def _module_features(config: dict[str, Any]) -> dict[str, tuple[int, int]] | None:
    """(in, out) features of each module an adapter may target, by its name's last parts, from a
    base's config.json (an embedding's: vocabulary, width); None for a family not known here."""
    try:
        vocab = int(config["vocab_size"])
        if config.get("model_type") == "gpt2":
            width = int(config["n_embd"])
            inner = int(config.get("n_inner") or 4 * width)
            return {"attn.c_attn": (width, 3 * width), "attn.c_proj": (width, width), "mlp.c_fc": (width, inner),
                    "mlp.c_proj": (inner, width), "lm_head": (width, vocab), "wte": (vocab, width)}
        if config.get("model_type") in LLAMA_FAMILY:
            width, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            kv_heads, inner = int(config.get("num_key_value_heads") or heads), int(config["intermediate_size"])
            head = int(config.get("head_dim") or width // heads)
            return {"self_attn.q_proj": (width, heads * head), "self_attn.k_proj": (width, kv_heads * head),
                    "self_attn.v_proj": (width, kv_heads * head), "self_attn.o_proj": (heads * head, width),
                    "mlp.gate_proj": (width, inner), "mlp.up_proj": (width, inner), "mlp.down_proj": (inner, width),
                    "lm_head": (width, vocab), "embed_tokens": (vocab, width)}
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a config.json lacking what its family has
        return None
    return None


def _lora_shape(name: str, shape: tuple[int, ...], dims: dict[str, tuple[int, int]]) -> tuple[int, ...] | None:
    """The shape this base gives an adapter weight of the file's rank, or None for one not known here."""
    module, _, part = _short_key(name).rpartition(".lora_")
    features = dims.get(".".join(module.split(".")[-2:])) or dims.get(module.split(".")[-1])
    if features is None or len(shape) != 2:
        return None
    fan_in, fan_out = features
    if part in ("A.weight", "embedding_A"):
        return (shape[0], fan_in)
    if part in ("B.weight", "embedding_B"):
        return (fan_out, shape[1])
    return None


def _layers_beyond(held: dict[str, tuple[int, ...]], layers: Any) -> str | None:
    """What is wrong with an adapter holding weights for layers past this base's last (peft
    loads it, and those weights change nothing), or None."""
    numbers = [int(m.group(1)) for name in held if (m := LAYER_INDEX.search(name))]
    if not isinstance(layers, int) or not numbers or max(numbers) < layers:
        return None
    return f"its weights are for a model of at least {max(numbers) + 1} layers, this one has {layers}"


def _differences_said(held: dict[str, tuple[int, ...]], differ: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> str:
    """How many of an adapter's weights have other shapes than this model's, the first few shown."""
    differ = sorted(differ, key=lambda item: _natural(item[0]))
    shown = "; ".join(f"{name}: {list(got)} in the file, {list(want)} in this model"
                      for name, got, want in differ[:SHAPE_MISMATCHES_SHOWN])
    more = "; ..." if len(differ) > SHAPE_MISMATCHES_SHOWN else ""
    count = f"all {len(held)} of its" if len(differ) == len(held) else f"{len(differ)} of its {len(held)}"
    return f"{count} weights have other shapes than this model's ({shown}{more})"


def _natural(name: str) -> list[Any]:
    """A weight's name ordered as the model lays its layers out (layer 10 after layer 9)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _misfit(checkpoint: Path, config: dict[str, Any], base_config: Any, held: dict[str, tuple[int, ...]],
            exc: Exception) -> ModelError:
    """A LoRA adapter that peft cannot put on this base, said in a sentence: for weights of
    other shapes (trained on a base of another size) peft listed every one, a line each."""
    differ = _adapter_shape_differences(checkpoint, base_config, held)
    return ModelError(_misfit_sentence(checkpoint, config, _differences_said(held, differ) if differ else str(exc)))


def _misfit_sentence(checkpoint: Path, config: dict[str, Any], said: str) -> str:
    return (
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

    _quiet_peft()
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
