"""llama.cpp as a decoder: its CPU kernels on GGUF weights, our sampling on top.

The engine hands this decoder token ids (prompts tokenized by the Hugging Face
tokenizer, the same vocabulary as the GGUF) and takes back next-token logits, exactly
as from the torch decoders, so sampling, stop strings and every request's settings
stay the engine's. They are numpy arrays, so serving with llama.cpp needs no torch (a
caller that hands it torch tensors gets tensors back). Each row of the batch is a
llama.cpp sequence in one shared KV cache: a row that joins is prefilled as a new
sequence beside the running ones, and a row that leaves has its sequence dropped, so
batching is continuous.

The last few prompts stay in the cache as sequences of their own (prefixes). A row whose
prompt begins like one of them shares those cache cells (llama.cpp's sequence copy adds
the row to the cells; nothing is recomputed) and reads only its own remainder, so a
persona's system prompt, or a conversation's history, is read once and not per message.

A prompt's logits are not quite the same every way it is read: llama.cpp's sums depend
on where it was cut (a kept prefix, then the rest) and on where its cells sit in the
cache (flash attention sums 64-cell tiles when a micro-batch has 64 tokens or more, and
a one-token step on several threads splits a cache of 512 cells or more between them).
A batch started after ``forget_prefixes`` starts from an empty cache, read exactly as by
a fresh decoder; rows beside it (one that leaves, too) still change its sums slightly.

Prompts are read ``BATCH_TOKENS`` at a time; ``start`` and ``join`` take ``stop``, looked
at between two of those chunks: once it says so (a row's deadline has passed), the read
stops and nothing of the rows being read is kept.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from persona.errors import ModelError
from persona.models import LoadedModel

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["CONTEXT_TOKENS", "SHIPPED_GGUF_TYPE", "LlamaCppDecoder", "gguf_for", "interrupt", "raise_if_interrupted", "route_llama_cpp_logs"]

log = logging.getLogger(__name__)

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
CONTEXT_TOKENS = 8192  # the KV cache shared by every row (23 MB per 1,000 for the bundled model)
BATCH_TOKENS = 512  # tokens per llama_decode call (prompts are fed in chunks)
SHIPPED_GGUF_TYPE = "q4_1"  # the bundled file's own type
# Recent prompts are kept in the cache so a new row that begins like one of them (the
# same persona's system prompt and examples, the same conversation) reads only the rest.
PREFIX_SLOTS = 4
MIN_SHARED_TOKENS = 16  # a shorter common beginning is not worth a slot


def gguf_for(loaded: LoadedModel, cache_dir: Path, kind: str) -> Path:
    """A GGUF file of type ``kind`` llama.cpp can load with these weights, written once.

    The bundled model asked for at its shipped type (Q4_1) is the shipped file itself.
    """
    from persona.gguf_files import (
        cached_gguf_path,
        requantize_gguf,
        unwritable,
        write_gguf,
    )

    shipped = loaded.gguf_file
    if shipped is not None and kind == SHIPPED_GGUF_TYPE:
        return shipped
    identity = f"{shipped}:{shipped.stat().st_size}:{shipped.stat().st_mtime_ns}" if shipped else loaded.identity or loaded.name
    target = cached_gguf_path(cache_dir, identity, kind)
    if target.is_file():  # written before, so its vocabulary was checked then
        return target
    if shipped is not None:  # the bundled weights: llama.cpp re-types its own file (seconds, no torch)
        log.info("writing the bundled model as a %s GGUF for llama.cpp (once)", kind)
        return requantize_gguf(shipped, target, kind)
    why = unwritable(loaded.config, loaded.tokenizer)
    if why is not None:
        raise ModelError(f"llama.cpp cannot serve {loaded.name}: {why}")
    log.info("writing %s as a %s GGUF for llama.cpp (once; a few seconds)", loaded.name, kind)
    return write_gguf(loaded.model, loaded.tokenizer, target, kind)


def route_llama_cpp_logs() -> None:
    """llama.cpp's own chatter goes to our debug log, not straight to stderr."""
    import llama_cpp

    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    _LOG_CALLBACK = llama_cpp.llama_log_callback(_log_line)  # llama.cpp keeps only the pointer: keep it alive
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _log_line(level, text, user_data) -> None:
    try:
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            log.debug("llama.cpp: %s", message)
    except KeyboardInterrupt:  # ctypes would print it and drop it: kept for raise_if_interrupted
        _INTERRUPTED.append(True)


_LOG_CALLBACK = None
_INTERRUPTED: list[bool] = []


def interrupt(frame: FrameType | None) -> None:
    """What a signal handler that stops this process does instead of ``raise KeyboardInterrupt``
    (``frame``: the one it was handed). Where the signal landed in llama.cpp's call back into
    Python, ctypes would print the exception and drop it (a worker told to stop while
    llama.cpp loaded went on to serve, then stopped): it is kept, and raised by
    ``raise_if_interrupted`` once llama.cpp returns."""
    while frame is not None:
        if frame.f_code is _log_line.__code__:
            _INTERRUPTED.append(True)
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt kept while llama.cpp called back into Python."""
    if _INTERRUPTED:
        _INTERRUPTED.clear()
        raise KeyboardInterrupt


class LlamaCppDecoder:
    """Prefill, join, decode and select over llama.cpp sequences (one per row)."""

    can_join = True
    reads_in_chunks = True  # ``start`` and ``join`` take ``stop``

    def __init__(self, path: Path, *, threads: int | None = None, context_tokens: int = CONTEXT_TOKENS) -> None:
        import llama_cpp

        self.lib = llama_cpp
        route_llama_cpp_logs()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if self.model and _INTERRUPTED:
            llama_cpp.llama_model_free(self.model)
            raise_if_interrupted()
        if not self.model:
            raise ModelError(f"llama.cpp cannot load {path}; delete it if it is a cached GGUF and start again")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context_tokens
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True  # rows of any length share one cache
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if self.ctx and _INTERRUPTED:
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            raise_if_interrupted()
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ModelError(f"llama.cpp cannot make a context for {path} ({context_tokens} tokens)")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.sequences: list[int] = []  # row -> llama.cpp sequence id
        self.free: list[int] = []
        # Cache cells each live sequence may fill (prompt + its room): a row is admitted
        # only when its whole reply fits, so a decode step never runs out of cache.
        self.reserved: dict[int, int] = {}
        self.prefixes: OrderedDict[int, list[int]] = OrderedDict()  # sequence -> its tokens, oldest first
        self.reused_tokens = 0  # prompt tokens read from a kept prefix instead of computed
        self._forget_sequences()
        self.context_tokens = context_tokens
        self.row_tokens = context_tokens - BATCH_TOKENS  # the most one row can hold (see ``fitting``)
        self.path = path

    def _forget_sequences(self) -> None:
        """Forget every row's sequence (the kept prefixes stay)."""
        self.sequences = []
        self.reserved = {sequence: len(tokens) for sequence, tokens in self.prefixes.items()}
        self.free = [s for s in range(MAX_SEQUENCES - 1, -1, -1) if s not in self.reserved]

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        try:
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
            lib.llama_model_free(self.model)
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn the library down
            pass

    # -- the decoder interface the engine uses -------------------------------------

    def fitting(self, prompt_lengths: list[int], room: int) -> int:
        """How many of these rows (in order) fit in the cache beside the running ones;
        kept prefixes give their room up to rows that would not fit otherwise."""
        while True:
            left = self.context_tokens - BATCH_TOKENS - sum(self.reserved.values())
            count = 0
            for length in prompt_lengths[: len(self.free)]:
                # A row's whole prompt is reserved even where it shares a prefix's cells:
                # those stay in use for as long as the row, whatever becomes of the prefix.
                left -= length + room
                if left < 0:
                    break
                count += 1
            if count == len(prompt_lengths) or not self.prefixes:
                return count
            self._drop_prefix()

    def start(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, room: int,
        stop: Callable[[], bool] | None = None,
    ) -> Any:
        """A new batch: forget every row's sequence, prefill these rows, return their logits
        (None where ``stop`` stopped the read, as ``join``).

        With no prefix kept, the cache starts as new: these rows' logits are a fresh decoder's."""
        for sequence in set(self.reserved) - set(self.prefixes):
            self.lib.llama_memory_seq_rm(self.memory, sequence, -1, -1)
        if not self.prefixes:  # where new cells go, too, is as in a new cache
            self.lib.llama_memory_clear(self.memory, False)
        self._forget_sequences()
        return self.join(input_ids, attention_mask, position_ids, room, stop)

    def join(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, room: int,
        stop: Callable[[], bool] | None = None,
    ) -> Any:
        """Prefill these rows as new sequences beside the running ones; return their logits,
        or None where ``stop`` said so between two chunks (none of these rows is kept; the
        running ones are untouched).

        A row that begins like an earlier row of the same call (best-of-N candidates, one
        persona's messages arriving together) is read in a second pass, once that row is
        kept as a prefix, so the shared beginning is read once.
        """
        if len(input_ids) > len(self.free):
            raise ModelError(f"llama.cpp holds at most {MAX_SEQUENCES} rows at once")
        prompts = [[t for t, m in zip(ids, mask, strict=True) if m] for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True)]
        first: list[int] = []
        later: list[int] = []
        for i, prompt in enumerate(prompts):
            (later if any(_begin_alike(prompts[j], prompt) for j in first) else first).append(i)
        added: dict[int, int] = {}  # row -> its sequence
        logits: dict[int, np.ndarray] = {}
        try:
            for wave in (first, later):
                if not wave:
                    continue
                read = self._prefill([prompts[i] for i in wave], room, added, wave, stop)
                if read is None:  # stopped
                    self._drop_sequences(added.values())
                    return None
                logits.update(zip(wave, read))
        except ModelError:
            self._drop_sequences(added.values())
            raise
        self.sequences += [added[i] for i in range(len(prompts))]
        return _like(np.stack([logits[i] for i in range(len(prompts))]), input_ids)

    def _drop_sequences(self, sequences: Iterable[int]) -> None:
        """Take these rows' sequences out of the cache (a read that failed or stopped)."""
        for sequence in sequences:
            self.lib.llama_memory_seq_rm(self.memory, sequence, -1, -1)
            self.reserved.pop(sequence, None)
            self.free.append(sequence)

    def _prefill(
        self, prompts: list[list[int]], room: int, added: dict[int, int], rows: list[int], stop: Callable[[], bool] | None
    ) -> np.ndarray | None:
        """Read these prompts (each from its longest kept beginning on) as new sequences,
        recorded in ``added``; keep each that began like no kept prompt; their logits
        (None, nothing kept, where ``stop`` stopped the read)."""
        tokens: list[tuple[int, int, int, bool]] = []
        shares = []
        for row, prompt in zip(rows, prompts, strict=True):
            sequence = self.free.pop()
            added[row] = sequence
            shared = self._share_prefix(prompt, sequence)
            shares.append((sequence, prompt, shared))
            self.reserved[sequence] = len(prompt) + room
            tokens += [(t, p, sequence, p == len(prompt) - 1) for p, t in enumerate(prompt) if p >= shared]
        logits = self._decode(tokens, stop)
        if logits is None:
            return None
        for sequence, prompt, shared in shares:
            if shared < len(prompt) - 1:  # it began like no kept prompt (or only partly): keep it
                self._keep_prefix(sequence, prompt)
        return logits

    def step(self, tokens: Any, positions: Any) -> Any:
        """Feed one token per row at its position; return the next-token logits."""
        fed = zip(tokens.tolist(), positions.tolist(), self.sequences, strict=True)
        return _like(self._decode([(t, p, s, True) for t, p, s in fed]), tokens)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (by position); the others' sequences leave the cache."""
        kept = [self.sequences[i] for i in keep]
        for sequence in set(self.sequences) - set(kept):
            self.lib.llama_memory_seq_rm(self.memory, sequence, -1, -1)
            self.reserved.pop(sequence, None)
            self.free.append(sequence)
        self.sequences = kept

    # -- kept prefixes -------------------------------------------------------------

    def _share_prefix(self, prompt: list[int], sequence: int) -> int:
        """Give ``sequence`` the cells of the longest kept beginning of ``prompt``; its length.

        At least the prompt's last token is always computed: its logits are the row's first.
        """
        best, source = 0, None
        for kept, tokens in self.prefixes.items():
            shared = _common_length(tokens, prompt, len(prompt) - 1)
            if shared > best:
                best, source = shared, kept
        if source is None or best < MIN_SHARED_TOKENS:
            return 0
        self.lib.llama_memory_seq_cp(self.memory, source, sequence, 0, best)
        self.prefixes.move_to_end(source)
        self.reused_tokens += best
        return best

    def _keep_prefix(self, sequence: int, prompt: list[int]) -> None:
        """Keep ``sequence``'s prompt cells as a prefix of its own. It replaces a kept prompt
        it begins like (the same persona: it holds that shared beginning too), else the
        least recently used one once every slot is taken."""
        if len(prompt) < MIN_SHARED_TOKENS or len(self.free) <= 1:
            return
        alike = [kept for kept, tokens in self.prefixes.items() if _begin_alike(tokens, prompt)]
        if alike:
            self._drop_prefix(alike[0])
        elif len(self.prefixes) >= PREFIX_SLOTS:
            self._drop_prefix()
        kept = self.free.pop()
        self.lib.llama_memory_seq_cp(self.memory, sequence, kept, 0, len(prompt))
        self.prefixes[kept] = prompt
        self.reserved[kept] = len(prompt)

    def forget_prefixes(self) -> None:
        """Drop every kept prefix: the next prompts are read in full, and the next ``start``
        reads its rows exactly as a fresh decoder does (the same logits, whatever ran before)."""
        while self.prefixes:
            self._drop_prefix()

    def _drop_prefix(self, sequence: int | None = None) -> None:
        """Forget a kept prefix, by default the least recently used (rows sharing its cells keep them)."""
        if sequence is None:
            sequence = next(iter(self.prefixes))
        del self.prefixes[sequence]
        self.lib.llama_memory_seq_rm(self.memory, sequence, -1, -1)
        self.reserved.pop(sequence, None)
        self.free.append(sequence)

    # -- llama.cpp calls ------------------------------------------------------------

    def _decode(self, tokens: list[tuple[int, int, int, bool]], stop: Callable[[], bool] | None = None) -> np.ndarray | None:
        """Run (token, position, sequence, wants logits) in chunks; the wanted logits in order,
        or None where ``stop``, asked between two chunks, said to stop (the cells written
        stay: the caller drops their sequences)."""
        out: list[np.ndarray] = []
        batch = self.batch
        for start in range(0, len(tokens), BATCH_TOKENS):
            if start and stop is not None and stop():
                return None
            chunk = tokens[start : start + BATCH_TOKENS]
            wanted = 0
            for i, (token, position, sequence, logits) in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = sequence
                batch.logits[i] = logits
                wanted += logits
            batch.n_tokens = len(chunk)
            status = self.lib.llama_decode(self.ctx, batch)
            if status != 0:
                why = "no room left in its cache; raise worker.kv_tokens" if status == 1 else f"error {status}"
                raise ModelError(f"llama.cpp could not decode a batch of {len(chunk)} tokens: {why}")
            if wanted:
                pointer = self.lib.llama_get_logits(self.ctx)
                out.append(np.ctypeslib.as_array(pointer, shape=(wanted, self.vocab)).copy())
        return np.concatenate(out) if len(out) != 1 else out[0]


def _like(logits: np.ndarray, given: Any) -> Any:
    """``logits`` as the kind of array the caller handed in: numpy (the engine's, for
    llama.cpp), or a torch tensor for a caller that works in torch."""
    torch = sys.modules.get("torch")  # a caller that hands in tensors has imported it
    if torch is not None and isinstance(given, torch.Tensor):
        return torch.from_numpy(logits)
    return logits


def _begin_alike(a: list[int], b: list[int]) -> bool:
    """Whether two prompts share a beginning worth keeping (``MIN_SHARED_TOKENS`` or more)."""
    return _common_length(a, b, MIN_SHARED_TOKENS) == MIN_SHARED_TOKENS


def _common_length(a: list[int], b: list[int], most: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``most``."""
    count = 0
    for x, y in zip(a, b):
        if x != y or count == most:
            break
        count += 1
    return count
