"""Llama-family models as GGUF files, so llama.cpp can serve fine-tuned checkpoints too.

The bundled base model already is a GGUF (Q4_1). A checkpoint made from it (a LoRA
merged into the base, or full weights) is a Hugging Face model in memory; ``write_gguf``
writes it with the bundled file's tokenizer (a checkpoint of the bundled base keeps its
vocabulary) and the model's own shape, then has llama.cpp quantize it. Only what
llama.cpp's ``llama`` architecture reads is written; Q and K are permuted back into
the interleaved rotary layout GGUF uses (transformers un-permutes them on load).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from persona.errors import ModelError

__all__ = ["GGUF_TYPES", "cached_gguf_path", "requantize_gguf", "tokenizer_matches", "write_gguf"]


# The types a written model may be quantized to, with llama.cpp's file-type numbers.
# q8_0 keeps a fine-tune's small weight changes (a 4-bit step can round them away).
GGUF_TYPES = {"f32": 0, "f16": 1, "q4_1": 3, "q8_0": 7}
_COPIED_PREFIXES = ("tokenizer.",)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotary layout (halves) back to GGUF's (interleaved pairs)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tensors(model: Any) -> list[tuple[str, np.ndarray]]:
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
    import gguf

    reader = gguf.GGUFReader(reference)
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return False
    tokens = field.contents()
    vocab = tokenizer.get_vocab()
    return len(vocab) == len(tokens) and all(vocab.get(token) == i for i, token in enumerate(tokens))


def _copy_fields(writer: Any, reader: Any) -> None:
    """Copy the tokenizer's metadata (vocabulary, merges, special ids, chat template)."""
    import gguf

    for key, field in reader.fields.items():
        if not key.startswith(_COPIED_PREFIXES):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def write_gguf(model: Any, tokenizer_from: Path, target: Path, kind: str = "q8_0") -> Path:
    """Write a Llama-family ``model`` as a GGUF file of type ``kind`` at ``target``."""
    import gguf

    from persona.llamacpp_decoder import route_llama_cpp_logs

    route_llama_cpp_logs()
    if kind not in GGUF_TYPES:
        raise ModelError(f"unknown GGUF type {kind!r}; choose one of {', '.join(GGUF_TYPES)}")
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise ModelError(f"only Llama-family models can be written as GGUF here, not {config.model_type!r}")
    heads = config.num_attention_heads
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as tmp:
        plain = Path(tmp) / "f32.gguf"
        writer = gguf.GGUFWriter(plain, "llama")
        writer.add_name(getattr(config, "_name_or_path", "") or "persona")
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
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(GGUF_TYPES["f32"])
        _copy_fields(writer, gguf.GGUFReader(tokenizer_from))
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

    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as tmp:
        staged = Path(tmp) / "out.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = GGUF_TYPES[kind]
        params.nthread = os.cpu_count() or 1
        params.allow_requantize = requantize
        if llama_cpp.llama_model_quantize(str(source).encode(), str(staged).encode(), params) != 0:
            raise ModelError(f"llama.cpp could not quantize {target.name} to {kind}")
        os.replace(staged, target)


def cached_gguf_path(cache_dir: Path, identity: str, kind: str) -> Path:
    """Where the GGUF of the weights named ``identity`` is kept under ``cache_dir``."""
    digest = hashlib.sha256(f"{identity}|{kind}".encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{digest}.{kind}.gguf"
