"""Models as GGUF files, so llama.cpp can serve fine-tuned checkpoints and other bases too.

The bundled base model already is a GGUF (Q4_1). A checkpoint made from it (a LoRA
merged into the base, or full weights) is a Hugging Face model in memory; ``write_gguf``
writes it with the model's own shape, then has llama.cpp quantize it. Two architectures
are written: Llama-family models (what llama.cpp's ``llama`` graph reads; Q and K are
permuted back into the interleaved rotary layout GGUF uses, since transformers
un-permutes them on load) and GPT-2 (its ``gpt2`` graph). The vocabulary: a model with
the bundled model's gets the bundled file's tokenizer fields (chat template and
all); any other byte-level BPE vocabulary (GPT-2's, most Llama-3-style ones) is written
from the model's own tokenizer. llama.cpp only ever gets token ids from us, but it
needs a vocabulary of the model's size to load the file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from persona.errors import ModelError

__all__ = ["GGUF_TYPES", "cached_gguf_path", "requantize_gguf", "tokenizer_matches", "unwritable", "write_gguf"]


# The types a written model may be quantized to, with llama.cpp's file-type numbers.
# q8_0 keeps a fine-tune's small weight changes (a 4-bit step can round them away).
GGUF_TYPES = {"f32": 0, "f16": 1, "q4_1": 3, "q8_0": 7}
BITS_PER_WEIGHT = {"f32": 32, "f16": 16, "q4_1": 5, "q8_0": 8.5}  # q4_1: 32 weights in 20 bytes; q8_0: in 34
_COPIED_PREFIXES = ("tokenizer.",)
ARCHITECTURES = ("llama", "gpt2")  # the model types written


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotary layout (halves) back to GGUF's (interleaved pairs)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unwritable(config: Any, tokenizer: Any) -> str | None:
    """Why a model of this config and tokenizer cannot be written as GGUF here (None: it can)."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"llama.cpp serves Llama-family and GPT-2 models here, not {kind!r}"
    if kind == "llama":
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            return "llama.cpp's llama graph has no projection biases"
        heads = config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default" or getattr(config, "hidden_act", "silu") != "silu":
            return "only plain rotary embeddings and SiLU are written as GGUF here"
        if (getattr(config, "head_dim", None) or config.hidden_size // heads) * heads != config.hidden_size:
            return "its attention heads do not split its hidden size evenly"
    elif getattr(config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        return "llama.cpp's gpt2 graph computes only the tanh GELU"
    if not _byte_level_bpe(tokenizer):
        return "its tokenizer is not a byte-level BPE (only those are written as GGUF here)"
    if len(tokenizer) > config.vocab_size:
        return f"its tokenizer has {len(tokenizer)} tokens, more than the model's {config.vocab_size}"
    return None


def _byte_level_bpe(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is a fast tokenizer with a byte-level BPE model."""
    from tokenizers import decoders, models

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (
        backend is not None and isinstance(backend.model, models.BPE) and isinstance(backend.decoder, decoders.ByteLevel)
    )


def _merges(tokenizer: Any) -> list[str]:
    """The BPE's merges as GGUF writes them ("a b"), read from the tokenizer's JSON."""
    import json

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight llama.cpp's graph for this model reads."""
    if model.config.model_type == "gpt2":
        return _gpt2_tensors(model)
    return _llama_tensors(model)


def _gpt2_tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """GPT-2's weights as llama.cpp's gpt2 graph reads them (its Conv1D weights are stored
    input-major: transposed to the output-major layout of every other GGUF matrix)."""
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", state["transformer.wte.weight"]), ("position_embd.weight", state["transformer.wpe.weight"])]
    names = {
        "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
    }
    for i in range(model.config.n_layer):
        for hf, gg in names.items():
            weight = state[f"transformer.h.{i}.{hf}.weight"]
            out.append((f"blk.{i}.{gg}.weight", weight if hf.startswith("ln_") else weight.T))
            out.append((f"blk.{i}.{gg}.bias", state[f"transformer.h.{i}.{hf}.bias"]))
    out += [("output_norm.weight", state["transformer.ln_f.weight"]), ("output_norm.bias", state["transformer.ln_f.bias"])]
    if not getattr(model.config, "tie_word_embeddings", True):
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _llama_tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight llama.cpp's llama graph reads."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config.num_hidden_layers):
        for hf, gg in names.items():
            weight = state[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                weight = _permute(weight, heads)
            elif hf == "self_attn.k_proj":
                weight = _permute(weight, kv_heads)
            out.append((f"blk.{i}.{gg}.weight", weight))
            if f"model.layers.{i}.{hf}.bias" in state:
                raise ModelError("llama.cpp's llama graph has no projection biases; this model needs the torch engine")
    out.append(("output_norm.weight", state["model.norm.weight"]))
    if not getattr(config, "tie_word_embeddings", False):
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def tokenizer_matches(tokenizer: Any, reference: Path) -> bool:
    """Whether ``tokenizer`` has exactly the vocabulary of the GGUF at ``reference``."""
    tokens = _tokenizer_fields(reference).get("tokenizer.ggml.tokens")
    if tokens is None:
        return False
    vocab = tokenizer.get_vocab()
    return len(vocab) == len(tokens.value) and all(vocab.get(token) == i for i, token in enumerate(tokens.value))


class _Field(NamedTuple):
    """One GGUF metadata value as ``GGUFWriter.add_key_value`` takes it."""

    value: Any  # an array as a tuple: the value is shared by every conversion
    kind: Any  # gguf.GGUFValueType
    sub: Any  # an array's item type, else None


def _tokenizer_fields(reference: Path) -> Mapping[str, _Field]:
    """The tokenizer's metadata (vocabulary, merges, special ids, chat template) of the GGUF
    at ``reference``, read once per file and process: gguf's reader takes seconds over a
    vocabulary of 49,152 tokens, and every conversion (a swap, each test's tiny model)
    needs it, first to compare vocabularies, then to copy them."""
    stat = reference.stat()
    return _read_tokenizer_fields(reference, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_tokenizer_fields(reference: Path, size: int, mtime_ns: int) -> Mapping[str, _Field]:
    """``_tokenizer_fields`` for the file as it is at this size and time (a changed file is read again)."""
    import gguf

    fields = {}
    for key, field in gguf.GGUFReader(reference).fields.items():
        if key.startswith(_COPIED_PREFIXES):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            fields[key] = _Field(tuple(value) if isinstance(value, list) else value, kind, sub)
    return MappingProxyType(fields)


def _copy_fields(writer: Any, reference: Path) -> None:
    """Copy the tokenizer's metadata (vocabulary, merges, special ids, chat template)."""
    for key, field in _tokenizer_fields(reference).items():
        writer.add_key_value(key, field.value, field.kind, sub_type=field.sub)


def _llama_header(writer: Any, config: Any) -> None:
    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _gpt2_header(writer: Any, config: Any) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _write_vocabulary(writer: Any, tokenizer: Any, size: int, pre: str) -> None:
    """The tokenizer's byte-level BPE as GGUF fields, padded to the model's ``size`` with
    unused tokens (a model's embedding table is often rounded up past its vocabulary)."""
    import gguf

    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, i in tokenizer.get_vocab().items():
        if i < size:
            tokens[i] = token
    special = {str(t) for t in tokenizer.all_special_tokens}
    named = set(tokenizer.get_vocab())
    types = [
        gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL if t in named else gguf.TokenType.UNUSED
        for t in tokens
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)


def write_gguf(model: Any, tokenizer: Any, target: Path, kind: str = "q8_0") -> Path:
    """Write ``model`` (Llama-family or GPT-2) and its vocabulary as a GGUF file of type
    ``kind`` at ``target``."""
    import gguf

    from persona.llamacpp_decoder import route_llama_cpp_logs
    from persona.models import bundled_gguf_path

    route_llama_cpp_logs()
    if kind not in GGUF_TYPES:
        raise ModelError(f"unknown GGUF type {kind!r}; choose one of {', '.join(GGUF_TYPES)}")
    config = model.config
    why = unwritable(config, tokenizer)
    if why is not None:
        raise ModelError(f"{why}; this model needs the torch engine")
    architecture = config.model_type
    target.parent.mkdir(parents=True, exist_ok=True)
    with _no_room_said(target), tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as tmp:
        plain = Path(tmp) / "f32.gguf"
        writer = gguf.GGUFWriter(plain, architecture)
        writer.add_name(getattr(config, "_name_or_path", "") or "persona")
        (_gpt2_header if architecture == "gpt2" else _llama_header)(writer, config)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(GGUF_TYPES["f32"])
        try:
            reference = bundled_gguf_path()
        except ModelError:  # not installed: every vocabulary is written from its tokenizer
            reference = None
        if architecture == "llama" and reference is not None and tokenizer_matches(tokenizer, reference):
            _copy_fields(writer, reference)
        else:
            _write_vocabulary(writer, tokenizer, config.vocab_size, "gpt-2" if architecture == "gpt2" else "default")
        for name, array in _tensors(model):
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _quantize(plain, target, kind)
    return target


def requantize_gguf(source: Path, target: Path, kind: str) -> Path:
    """Write the GGUF at ``source`` again as type ``kind`` at ``target`` (llama.cpp reads
    its quantized weights back to f32 first): the bundled model at another type, no torch."""
    from persona.llamacpp_decoder import route_llama_cpp_logs

    route_llama_cpp_logs()
    if kind not in GGUF_TYPES:
        raise ModelError(f"unknown GGUF type {kind!r}; choose one of {', '.join(GGUF_TYPES)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _quantize(source, target, kind, requantize=True)
    return target


def _quantize(source: Path, target: Path, kind: str, *, requantize: bool = False) -> None:
    """llama.cpp's quantizer from ``source`` to ``target`` (written beside it, then moved)."""
    import llama_cpp

    from persona.llamacpp_decoder import raise_if_interrupted

    with _no_room_said(target), tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as tmp:
        staged = Path(tmp) / "out.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = GGUF_TYPES[kind]
        params.nthread = os.cpu_count() or 1
        params.allow_requantize = requantize
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(staged).encode(), params) != 0
        raise_if_interrupted()  # told to stop while it wrote: the half-written file goes with tmp
        if not failed:
            os.replace(staged, target)
            return
    # llama.cpp says only that it failed: a full disk, mostly, was blamed on llama.cpp. Its part-written
    # file is gone now, so the room there is the room it had.
    needed_bytes = _weights_in(source) * BITS_PER_WEIGHT[kind] / 8
    room_bytes, where = _room_for(target)
    if room_bytes < needed_bytes:
        raise ModelError(f"llama.cpp could not write {target.name} ({kind}, about {needed_bytes / 2**20:.0f} MB): "
                         f"{where}")
    raise ModelError(f"llama.cpp could not quantize {target.name} to {kind}")


@contextlib.contextmanager
def _no_room_said(target: Path) -> Iterator[None]:
    """A write refused for want of room (a full disk) as a ModelError that names the disk: the
    worker then serves with torch instead, and says why."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise ModelError(f"could not write {target.name} for llama.cpp ({exc.strerror}): {_room_for(target)[1]}") from exc


def _room_for(target: Path) -> tuple[float, str]:
    """The bytes a file written as ``target`` may hold, and where that is said, with what to do."""
    free = shutil.disk_usage(target.parent).free
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and limit < free:
        return limit, f"this process may write files of {limit / 2**20:.0f} MB at most (ulimit -f); raise that limit"
    return free, (f"the disk of {target.parent} has no room for it ({free / 2**20:.0f} MB free); free some space "
                  "on it (or set PERSONA_DATA_DIR to a folder on another disk)")


def _weights_in(model: Path) -> int:
    """How many weights the GGUF at ``model`` holds (read from its header: a fraction of a second); 0 if it cannot be read."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    loaded = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    if not loaded:
        return 0
    try:
        return int(llama_cpp.llama_model_n_params(loaded))
    finally:
        llama_cpp.llama_model_free(loaded)


def cached_gguf_path(cache_dir: Path, identity: str, kind: str) -> Path:
    """Where the GGUF of the weights named ``identity`` is kept under ``cache_dir``."""
    digest = hashlib.sha256(f"{identity}|{kind}".encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{digest}.{kind}.gguf"
