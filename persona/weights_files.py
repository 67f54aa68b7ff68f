"""A checkpoint's weights files, read without their weights: which files a folder loads
from, and whether each is whole.

A safetensors file begins with its header (every weight's name, shape and place in the
file), so a file cut short by a copy or save that did not finish is told in milliseconds,
however large, and in words that say what to do; found only by loading it, it was said
in safetensors' words by every worker a swap asked. A LoRA folder's adapter file is read
the same way for the names and shapes ``lora`` checks against the base.

Pickled weights (``pytorch_model.bin``, older peft's ``adapter_model.bin``) are torch's zip
archives: the zip's directory sits at the end of the file and names every member's place, so
one cut short is told as quickly, without torch and without unpickling anything.
"""

from __future__ import annotations

import json
import pickletools
import zipfile
from pathlib import Path
from typing import Any

from persona.errors import ModelError

__all__ = [
    "DAMAGED_ADVICE",
    "LORA_CONFIG_FILE",
    "LORA_WEIGHTS_FILE",
    "WEIGHTS_FILE",
    "WEIGHTS_INDEX_FILE",
    "adapter_config",
    "adapter_weight_shapes",
    "adapter_weights_file",
    "check_adapter_weights_file",
    "check_weights_files",
    "is_lora_dir",
]

WEIGHTS_FILE = "model.safetensors"  # or shards named by model.safetensors.index.json
WEIGHTS_INDEX_FILE = f"{WEIGHTS_FILE}.index.json"
PICKLED_WEIGHTS_FILE = "pytorch_model.bin"  # read when there is no safetensors file, nor its index
PICKLED_WEIGHTS_INDEX_FILE = f"{PICKLED_WEIGHTS_FILE}.index.json"
SAFETENSORS_LENGTH_BYTES = 8  # a safetensors file begins with its JSON header's length, then the header
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
LORA_PICKLED_WEIGHTS_FILE = "adapter_model.bin"  # older peft's; read when there is no safetensors file
LORA_CONFIG_FILE = "adapter_config.json"  # its presence makes a folder a LoRA checkpoint
PICKLE_PROTOCOL_OPCODE = b"\x80"  # how a pickle of protocol 2 or later begins: torch's legacy (pre-zip) format
DAMAGED_ADVICE = "copy the whole folder again, or train again"


def is_lora_dir(path: Path) -> bool:
    return (path / LORA_CONFIG_FILE).is_file()


def adapter_config(checkpoint: Path) -> dict[str, Any]:
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
    """Refuse a full-weights checkpoint whose weights files are missing or cut short (a copy or
    save that did not finish), reading their headers alone (milliseconds, however large): found
    only by loading them, it was said in safetensors' or torch's words ("incomplete metadata, file
    not fully covered", "failed finding central directory"), by every worker a swap asked."""
    files, index = _full_weights_files(checkpoint)
    for file in files:
        _check_weights_file(checkpoint, file, named_by=index)


def _full_weights_files(checkpoint: Path) -> tuple[list[Path], str]:
    """The weights files transformers loads a full-weights folder from, in its order: model.safetensors,
    the shards its index names, pytorch_model.bin, the shards its index names; with the index's name."""
    for single, index_name in ((WEIGHTS_FILE, WEIGHTS_INDEX_FILE), (PICKLED_WEIGHTS_FILE, PICKLED_WEIGHTS_INDEX_FILE)):
        if (checkpoint / single).is_file():
            return [checkpoint / single], index_name
        if (checkpoint / index_name).is_file():
            return _index_shards(checkpoint, index_name), index_name
    return [], WEIGHTS_INDEX_FILE


def _index_shards(checkpoint: Path, index_name: str) -> list[Path]:
    """The shard files a sharded checkpoint's index names."""
    try:
        weight_map = json.loads((checkpoint / index_name).read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: JSON, but not an object
        raise _damaged(checkpoint, index_name, str(exc) or "not a JSON object") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise _damaged(checkpoint, index_name, "no weight_map naming its shards")
    return [checkpoint / shard for shard in sorted(set(weight_map.values()))]


def adapter_weights_file(checkpoint: Path) -> Path:
    """The file a LoRA folder's weights load from, as peft picks it: safetensors first."""
    weights = checkpoint / LORA_WEIGHTS_FILE
    pickled = checkpoint / LORA_PICKLED_WEIGHTS_FILE
    return pickled if not weights.is_file() and pickled.is_file() else weights


def adapter_weight_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """The weights a LoRA folder's file holds, each with its shape, read without the weights;
    a file missing or cut short is refused as damaged: peft would report it as a base that
    does not fit."""
    return _weights_file_shapes(checkpoint, adapter_weights_file(checkpoint), named_by=LORA_CONFIG_FILE)


def check_adapter_weights_file(checkpoint: Path) -> dict[str, tuple[int, ...]] | None:
    """Refuse a LoRA folder whose adapter file is missing or cut short, without torch (milliseconds):
    its weights' shapes when it is a safetensors file (from its header), None when it is pickled
    (its zip's directory read, its shapes unknown until torch reads it)."""
    file = adapter_weights_file(checkpoint)
    return _check_weights_file(checkpoint, file, named_by=LORA_CONFIG_FILE)


def _check_weights_file(checkpoint: Path, file: Path, *, named_by: str) -> dict[str, tuple[int, ...]] | None:
    """A weights file refused as missing or damaged, read without torch: a safetensors file's
    shapes (from its header), or None for a pickled file whose container reads whole."""
    if not file.is_file():
        raise _missing(checkpoint, file.name, named_by)
    try:
        if file.suffix == ".bin":
            _check_torch_archive(file)
            return None
        return _safetensors_shapes(file)
    except (OSError, ValueError, TypeError) as exc:  # unreadable, or not whole
        raise _damaged(checkpoint, file.name, str(exc)) from exc


def _weights_file_shapes(checkpoint: Path, file: Path, *, named_by: str) -> dict[str, tuple[int, ...]]:
    """Each weight a checkpoint's weights file holds, with its shape, read without the tensors'
    data; a file missing, or unreadable or cut short (a copy or save that did not finish), is
    refused as damaged."""
    shapes = _check_weights_file(checkpoint, file, named_by=named_by)
    if shapes is not None:
        return shapes
    try:  # torch's pickle, its tensors on the meta device: names and shapes, no data
        import torch

        return {name: tuple(t.shape) for name, t in torch.load(file, map_location="meta", weights_only=True).items()}
    except Exception as exc:  # torch's own error types too: a container whole, its pickle not
        raise _damaged(checkpoint, file.name, str(exc)) from exc


def _check_torch_archive(file: Path) -> None:
    """ValueError unless ``file`` is a whole torch save: a zip whose directory (at its end) reads,
    each member inside the file, and its pickle (kilobytes; the tensors' data is not read) whole
    and complete; or a pickle of torch's legacy format, which has no directory to check."""
    with file.open("rb") as opened:
        if opened.read(1) == PICKLE_PROTOCOL_OPCODE:
            return
    size = file.stat().st_size
    try:
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
            for member in members:
                if member.header_offset + member.compress_size > size:
                    raise ValueError(f"its {member.filename} runs past its end, at {size:,} bytes")
            pickles = [m for m in members if m.filename.endswith("/data.pkl") or m.filename == "data.pkl"]
            if len(pickles) != 1:
                raise ValueError("it is a zip archive, but not a torch save (no data.pkl in it)")
            for _ in pickletools.genops(archive.read(pickles[0])):  # its CRC checked, its pickle read to STOP
                pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise ValueError(f"it is not a whole zip archive at {size:,} bytes: {exc}") from exc


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
