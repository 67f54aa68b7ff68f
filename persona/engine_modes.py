"""Which decode path a model gets: ``pick_engine_mode`` makes an engine mode concrete.

A mode asked for may not fit the model or the device (int8 and llama.cpp are CPU paths;
the fused paths run Llama-family models only; llama.cpp needs the ``fast`` extra): the
nearest one that does is used instead, and the log says why.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

from persona.models import LoadedModel

__all__ = ["ENGINE_MODES", "llamacpp_available", "pick_engine_mode"]

log = logging.getLogger(__name__)

# eager: Hugging Face's own modules (any causal LM). fused: the lean Llama decode loop
# at full precision (the same logits). int8: that loop with int8 weights (CPU only).
# llamacpp: llama.cpp's CPU kernels on a GGUF of the same weights (the bundled Q4_1 file
# itself, or a checkpoint written as GGUF once). auto: the fastest the model and device allow.
ENGINE_MODES = ("auto", "eager", "fused", "int8", "llamacpp")
INT8_MIN_HIDDEN = 512  # hidden size from which int8 beats full precision on CPU
# How to add llama.cpp: an installed package names its extra; a checkout (`make install`) has it.
FAST_INSTALL = "pip install 'persona[fast]', or in a checkout pip install -e '.[fast]'"


def llamacpp_available() -> bool:
    """Whether llama-cpp-python is installed (the ``fast`` extra)."""
    return importlib.util.find_spec("llama_cpp") is not None


def pick_engine_mode(mode: str, loaded: LoadedModel) -> str:
    """The decode path a model gets: ``mode`` made concrete for this model and device."""
    if mode not in ENGINE_MODES:
        raise ValueError(f"unknown engine mode {mode!r}; choose one of {', '.join(ENGINE_MODES)}")
    # Whether our Llama decoder runs the model is asked only where it matters: it imports
    # torch, which a model llama.cpp serves from its GGUF never needs.
    on_cpu = _device_type(loaded.device) == "cpu"
    if mode == "auto":
        if on_cpu and loaded.gguf_ready and llamacpp_available():
            return "llamacpp"  # Llama-family and GPT-2 models
        if on_cpu and not llamacpp_available() and loaded.gguf_ready:
            _say_fast_missing()
        return _torch_mode(loaded)
    if mode in ("fused", "int8") and not _fusable(loaded) or mode == "llamacpp" and not (loaded.gguf_ready or _fusable(loaded)):
        log.warning("%s is not a Llama-family model; using the eager engine instead of %s", loaded.name, mode)
        return "eager"
    if mode in ("int8", "llamacpp") and not on_cpu:
        fallback = _torch_mode(loaded)  # fused, or eager for a model it cannot fuse
        log.warning("%s is a CPU path; using the %s engine on %s", mode, fallback, loaded.device)
        return fallback
    if mode == "llamacpp" and not llamacpp_available():
        fallback = _torch_mode(loaded)
        log.warning("llama-cpp-python is not installed (%s); using the %s engine", FAST_INSTALL, fallback)
        return fallback
    return mode


@functools.cache
def _say_fast_missing() -> None:
    """Say, once a process (as the worker loads its first model), that llama.cpp would serve
    on the CPU faster: under `auto` an install without it (a wheel, `persona[all]`) quietly got
    the slower int8 engine, and nothing named the `fast` extra."""
    log.warning("llama.cpp would decode faster here, but llama-cpp-python (the fast extra) is not installed, so "
                "the slower torch engine serves; to add it (it compiles with a C++ compiler, about 5 minutes): %s",
                FAST_INSTALL)


def _device_type(device: str) -> str:
    """``torch.device(device).type`` without torch: ``cuda:1`` is ``cuda``."""
    return str(device).split(":", 1)[0]


def _fusable(loaded: LoadedModel) -> bool:
    """Whether our Llama decoder runs this model (judged from its config until loaded)."""
    from persona import llama_decoder

    if loaded.weights_loaded:
        return llama_decoder.supports(loaded.model)
    return llama_decoder.supports_config(loaded.config)


def _torch_mode(loaded: LoadedModel) -> str:
    """The fastest torch path for this model: where llama.cpp is not installed, cannot
    serve it, or could not write its GGUF."""
    if not _fusable(loaded):
        return "eager"
    # int8 kernels cost a fixed few microseconds per call; only on wide layers do the
    # bytes they save pay for that (measured: slower than fused on a 32-wide model).
    wide = getattr(loaded.config, "hidden_size", 0) >= INT8_MIN_HIDDEN
    return "int8" if _device_type(loaded.device) == "cpu" and wide else "fused"
