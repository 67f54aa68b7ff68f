"""Batched generation with each request's own sampling settings.

``TransformersEngine`` runs one decode loop over a left-padded batch: every row has its
own temperature, top-p, top-k, repetition penalty, token budget, stop strings and seed.
Batching is continuous: a row that has finished leaves the batch at the next step (its
cache rows are dropped), and a row added while the batch decodes joins it at the next
step (where the decoder can join: fused, int8 and llamacpp), so a long request never
holds short ones hostage. Sampling is ours on every path; decoders only give logits.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch

from persona import llama_decoder
from persona.errors import ModelError
from persona.host_copies import to_device
from persona.kernel_cache import keep_compiled_kernels
from persona.models import LoadedModel
from persona.personas import Sampling

__all__ = [
    "ENGINE_MODES",
    "Completion",
    "ContinuousGenerator",
    "Generator",
    "TransformersEngine",
    "Work",
    "llamacpp_available",
    "pick_engine_mode",
]

log = logging.getLogger(__name__)

# eager: Hugging Face's own modules (any causal LM). fused: the lean Llama decode loop
# at full precision (the same logits). int8: that loop with int8 weights (CPU only).
# llamacpp: llama.cpp's CPU kernels on a GGUF of the same weights (the bundled Q4_1 file
# itself, or a checkpoint written as GGUF once). auto: the fastest the model and device allow.
ENGINE_MODES = ("auto", "eager", "fused", "int8", "llamacpp")
INT8_MIN_HIDDEN = 512  # hidden size from which int8 beats full precision on CPU
MAX_TOP_K = 2**31 - 1  # more than any vocabulary: a larger top-k keeps every token, as 0 does


def llamacpp_available() -> bool:
    """Whether llama-cpp-python is installed (the ``fast`` extra)."""
    return importlib.util.find_spec("llama_cpp") is not None


def pick_engine_mode(mode: str, loaded: LoadedModel) -> str:
    """The decode path a model gets: ``mode`` made concrete for this model and device."""
    if mode not in ENGINE_MODES:
        raise ValueError(f"unknown engine mode {mode!r}; choose one of {', '.join(ENGINE_MODES)}")
    fusable = _fusable(loaded)
    on_cpu = torch.device(loaded.device).type == "cpu"
    if mode == "auto":
        if on_cpu and loaded.gguf_ready and llamacpp_available():
            return "llamacpp"  # Llama-family and GPT-2 models
        return _torch_mode(loaded)
    if mode in ("fused", "int8") and not fusable or mode == "llamacpp" and not (fusable or loaded.gguf_ready):
        log.warning("%s is not a Llama-family model; using the eager engine instead of %s", loaded.name, mode)
        return "eager"
    if mode in ("int8", "llamacpp") and not on_cpu:
        fallback = _torch_mode(loaded)  # fused, or eager for a model it cannot fuse
        log.warning("%s is a CPU path; using the %s engine on %s", mode, fallback, loaded.device)
        return fallback
    if mode == "llamacpp" and not llamacpp_available():
        fallback = _torch_mode(loaded)
        log.warning("llama-cpp-python is not installed (`pip install '.[fast]'`); using the %s engine", fallback)
        return fallback
    return mode


def _fusable(loaded: LoadedModel) -> bool:
    """Whether our Llama decoder runs this model (judged from its config until loaded)."""
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
    return "int8" if torch.device(loaded.device).type == "cpu" and wide else "fused"


@dataclass
class Work:
    """One row of a batch: the prompt and how to sample its continuation."""

    token_ids: list[int]
    sampling: Sampling
    stop: list[str] = field(default_factory=list)


@dataclass
class Completion:
    """What one row produced."""

    text: str
    new_tokens: int
    finish_reason: Literal["stop", "length"]
    seconds: float = 0.0


class Generator(Protocol):
    """The seam between the worker and whatever turns prompts into text."""

    def generate(self, batch: list[Work]) -> list[Completion]: ...


class ContinuousGenerator(Generator, Protocol):
    """A generator that rows can join while it decodes (the worker prefers these)."""

    @property
    def active(self) -> int: ...

    def add(self, work: Work, tag: object) -> None: ...

    def step(self) -> list[tuple[object, Completion]]: ...

    def remove(self, unwanted: Callable[[object], bool]) -> int: ...

    def abandon(self) -> list[object]: ...


# The warm-up's second cache length, in new tokens (its first reserves 64 slots, this 128).
WARM_UP_LONGER_TOKENS = 64


class TransformersEngine:
    """A causal LM behind a per-row sampling decode loop with continuous batching.

    ``add`` queues a row; each ``step`` first lets queued rows join the running batch
    (when the decoder can join: at once, or after up to its ``join_every`` steps so they
    are read together; else when the batch is empty), then decodes one token for every
    row and returns the rows that finished. ``generate`` is the
    same loop run to the end for one batch.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        mode: str = "eager",
        *,
        cache_dir: Path | None = None,
        threads: int | None = None,
        gguf_type: str = "q8_0",
        kv_tokens: int | None = None,
        compile: bool = True,
        kernels: str = "auto",
        attention: str = "auto",
        lookahead: bool | None = None,
    ) -> None:
        self.loaded = loaded
        self.device = torch.device(loaded.device)
        self.tokenizer = loaded.tokenizer
        self.stop_ids = set(loaded.stop_token_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.mode = pick_engine_mode(mode, loaded)
        self.decoder = self._decoder(cache_dir, threads, gguf_type, kv_tokens, compile, kernels, attention)
        self._waiting: list[tuple[Work, object]] = []
        self._rows: _Rows | None = None
        self._pending: torch.Tensor | None = None  # each row's last token, not fed yet
        # lookahead (default: on a GPU): each step launches the next before its own tokens
        # are read back, so the host's bookkeeping runs while the GPU decodes; a row that
        # ends on a stop token costs one wasted row-step. Replies are the same either way.
        self.lookahead = self.device.type == "cuda" if lookahead is None else lookahead
        self._ahead: torch.Tensor | None = None  # the launched step's tokens, not read yet
        self._waited = 0  # steps that rows have waited to join the running batch
        self._checking = False  # while warming up: refuse weights whose logits are not finite
        log.info("%s decodes with the %s engine", loaded.name, self.mode)

    def _decoder(
        self, cache_dir: Path | None, threads: int | None, gguf_type: str, kv_tokens: int | None, compile: bool,
        kernels: str, attention: str,
    ):  # fmt: skip
        if self.mode == "eager":
            return _EagerDecoder(self.loaded.model)
        if self.mode == "llamacpp":
            from persona.llamacpp_decoder import (
                CONTEXT_TOKENS,
                LlamaCppDecoder,
                gguf_for,
            )

            try:
                path = gguf_for(self.loaded, cache_dir or Path(tempfile.gettempdir()), gguf_type)
            except ModelError as exc:
                self.mode = _torch_mode(self.loaded)
                log.warning("%s; using the %s engine", exc, self.mode)
                if self.mode == "eager":
                    return _EagerDecoder(self.loaded.model)
            else:
                decoder = LlamaCppDecoder(path, threads=threads, context_tokens=kv_tokens or CONTEXT_TOKENS)
                self.loaded.release_weights()  # llama.cpp holds its own copy
                return decoder
        # On a GPU each decode step replays a CUDA graph of the (compiled) step; what is
        # compiled for it is kept beside the models for the next start.
        on_gpu = self.device.type == "cuda"
        if on_gpu and cache_dir is not None:
            log.info("compiled kernels are kept in %s", ", ".join(keep_compiled_kernels(cache_dir).values()))
        return llama_decoder.LlamaDecoder(
            self.loaded.model,
            int8=self.mode == "int8",
            graphs=on_gpu,
            compile=compile and on_gpu,
            kernels=kernels,  # both act only on a GPU's static step
            attention=attention,
        )

    def warm_up(self) -> float:
        """Short generations, so the first user does not pay for first-call costs (weights
        paged in, kernels picked and compiled, CUDA graphs captured); returns the seconds.

        It is also the weights' smoke test: NaN or infinite logits raise ModelError.
        """
        started = time.perf_counter()
        ids = self.tokenizer.encode("Hello", add_special_tokens=False) or [self.pad_id]
        hello = Work(ids, Sampling(temperature=0.0, max_new_tokens=2))
        self._checking = True
        try:
            # A compiled step is compiled for any batch size once it has seen two rows (and
            # once more for a single row, unless the Triton step takes one row); cache
            # layouts that time candidate steps when first captured (a GPU's small ones,
            # one of each class of large ones) compile and tune what they need.
            # All here, each size once, not on a user's time.
            compiled = getattr(self.decoder, "compiled", False)
            sizes = [2, 1] if compiled else [1]
            sizes += [rows for rows in getattr(self.decoder, "timed_sizes", []) if rows not in sizes]
            for rows in sizes:
                self.generate([hello] * rows)
            self._pieces  # noqa: B018 - the stop-string check's table, made now, not at a user's first stop string
            if compiled:
                # Each size again with a longer cache: torch may specialise a compiled step
                # to the one cache length it saw, and compile it again for the next (the
                # 2026-11-26 H100 bench lost ~60 s at its first batch of 8 rows, likely so).
                longer = Work(ids, Sampling(temperature=0.0, max_new_tokens=WARM_UP_LONGER_TOKENS))
                for rows in sizes:
                    self.generate([longer] * rows)
        finally:
            self._checking = False
        return time.perf_counter() - started

    @property
    def context_tokens(self) -> int:
        """Positions one row may use: the model's, or fewer where the decoder's cache holds
        fewer (llama.cpp: its cache less one batch of prompt tokens). Prompts are trimmed
        to it, so a long chat on a small cache loses old turns instead of failing."""
        room = getattr(self.decoder, "row_tokens", None)
        return min(self.loaded.context_tokens, room) if room else self.loaded.context_tokens

    @property
    def active(self) -> int:
        """Rows decoding or waiting to join."""
        return len(self._waiting) + (self._rows.size if self._rows is not None else 0)

    def add(self, work: Work, tag: object) -> None:
        """Queue one row; it joins the batch at the next step. ``tag`` comes back with it.

        A row never runs past the model's positions: its reply ends there ("length").
        Past them GPT-2's learned position table has no row (transformers raises;
        llama.cpp aborts the whole process) and rotary models leave what they learned.

        A top-k past any vocabulary is none (0), as it samples the same: the contract
        sets no upper bound, and one past int64 failed the whole batch it joined.
        """
        room = self.context_tokens - len(work.token_ids)
        changes: dict[str, int] = {}
        if work.sampling.max_new_tokens > room:
            changes["max_new_tokens"] = max(1, room)
        if work.sampling.top_k > MAX_TOP_K:
            changes["top_k"] = 0
        if changes:
            work = Work(work.token_ids, work.sampling.model_copy(update=changes), work.stop)
        self._waiting.append((work, tag))

    @torch.inference_mode()
    def step(self) -> list[tuple[object, Completion]]:
        """Feed the running rows their last tokens, admit waiting rows, sample one token for
        every row; return the rows that finished.

        With ``lookahead`` the step after this one is launched before this one's tokens are
        read (unless rows wait to join or every row ends now), and the next call starts
        from its tokens. A decode that fails raises before any row of this step is
        settled: every row it held is still there to be answered (``abandon``), and rows
        that finished earlier were returned by earlier steps.
        """
        if self._ahead is not None:
            tokens, self._ahead = self._ahead, None
            rows = self._rows
        else:
            logits = None
            if self._rows is not None:
                logits = self.decoder.step(self._pending, self._rows.position)
            if self._waiting and self._join_due():
                joined = self._admit()
                if joined is not None:
                    logits = joined if logits is None else torch.cat([logits, joined])
            rows = self._rows
            if rows is None:
                return []
            if self._checking and not torch.isfinite(logits).all():
                raise ModelError(f"{self.loaded.name} produces NaN or infinite logits (corrupt weights)")
            tokens = _sample(logits, rows)
            rows.append(tokens)
        read = _reader(tokens)
        self._waited = self._waited + 1 if self._waiting else 0
        if self._worth_looking_ahead(rows):
            self._ahead = _sample(self.decoder.step(tokens, rows.position), rows)
            rows.append(self._ahead)
        finished = self._settle(rows, read())
        done = [(rows.tags[rows.index[pos]], completion) for pos, completion in finished.items()]
        self._keep([i for i in range(rows.size) if i not in finished], tokens)
        return done

    def _join_due(self) -> bool:
        """Whether waiting rows join at this step: at once into an empty batch; into a
        running one (where the decoder can) once they have waited ``join_every`` - 1 steps,
        so a decoder whose every prompt read costs about as much as several decode steps
        (a GPU's) reads them in groups."""
        if self._rows is None:
            return True
        if not getattr(self.decoder, "can_join", False):
            return False
        return self._waited + 1 >= getattr(self.decoder, "join_every", 1)

    def _worth_looking_ahead(self, rows: _Rows) -> bool:
        """Whether to launch the next step now: not when waiting rows join at it (they join
        at a step that decodes), nor when every row has reached its length with this token."""
        if not self.lookahead or self._checking or (self._waiting and self._join_due()):
            return False
        return any(len(rows.generated[i]) + 1 < rows.work[i].sampling.max_new_tokens for i in rows.index)

    def remove(self, unwanted: Callable[[object], bool]) -> int:
        """Drop the rows whose tag is ``unwanted`` (withdrawn requests); return how many."""
        before = self.active
        self._waiting = [(w, t) for w, t in self._waiting if not unwanted(t)]
        self._waited = self._waited if self._waiting else 0
        rows = self._rows
        if rows is not None:
            self._keep([i for i in range(rows.size) if not unwanted(rows.tags[rows.index[i]])], self._pending)
        return before - self.active

    def _keep(self, keep: list[int], tokens: torch.Tensor | None) -> None:
        """Only these rows stay, each with its next token to feed (or, looking ahead, the
        launched step's token to read); none left ends the batch."""
        if not keep:
            self._rows = self._pending = self._ahead = None
            return
        if len(keep) < self._rows.size:
            index = to_device(torch.tensor(keep), self.device)  # no wait for the step ahead
            # The decoder first: should it fail, every row is still here for ``abandon``.
            self.decoder.select(keep)
            self._rows.select(keep, index)
            tokens = tokens.index_select(0, index) if tokens is not None else None
            if self._ahead is not None:
                self._ahead = self._ahead.index_select(0, index)
        # Fed at the next step; looking ahead, this step's tokens are already fed.
        self._pending = tokens if self._ahead is None else None

    def abandon(self) -> list[object]:
        """Drop every row (after a failed step); return their tags so each can be answered."""
        tags = [tag for _, tag in self._waiting]
        if self._rows is not None:
            tags += [self._rows.tags[i] for i in self._rows.index]
        self._waiting, self._rows, self._pending, self._ahead, self._waited = [], None, None, None, 0
        return tags

    def _admit(self) -> torch.Tensor | None:
        """Prefill the waiting rows and add them to the running batch (or start one);
        return their next-token logits (None when none could be admitted).

        A decoder with a fixed cache (llama.cpp) takes only the rows whose whole reply
        fits beside the running ones; the rest wait for rows to leave. With nothing
        running, at least one row is always tried (if it cannot fit, it fails alone).
        """
        count = len(self._waiting)
        fitting = getattr(self.decoder, "fitting", None)
        if fitting is not None:
            room = max(w.sampling.max_new_tokens for w, _ in self._waiting) + 1
            count = fitting([len(w.token_ids) or 1 for w, _ in self._waiting], room)
            if count == 0 and self._rows is None:
                count = 1
        if count == 0:
            return None
        # The rows leave the waiting list only once admitted: if reading their prompts
        # fails, they are still there for ``abandon`` to hand back, to be answered.
        waiting = self._waiting[:count]
        new = _Rows([w for w, _ in waiting], [t for _, t in waiting], self.device, self.pad_id, self.stop_ids)
        room = max(w.sampling.max_new_tokens for w, _ in waiting) + 1
        prompts, new.prompts = new.prompts, None  # the decoder's from here on
        if self._rows is None:
            forget = getattr(self.decoder, "forget_prefixes", None)
            if forget is not None and any(w.sampling.seed is not None for w, _ in waiting):
                # A seed promises a repeatable reply, and llama.cpp's logits for a prompt
                # depend on what its cache holds (a kept prefix it continues, where its cells
                # land): a seeded row that starts a batch starts from an empty cache, as on a
                # fresh worker. (One that joins a running batch cannot: see `persona ask --help`.)
                forget()
            logits = self.decoder.start(*prompts, room)
            self._rows = new
        else:
            logits = self.decoder.join(*prompts, room)
            self._rows.merge(new)
        del self._waiting[:count]
        return logits

    def generate(self, batch: list[Work]) -> list[Completion]:
        """Generate every row of ``batch`` (rows finish independently), in order."""
        if self.active:
            raise RuntimeError("generate() needs an idle engine; this one is serving rows added with add()")
        for i, work in enumerate(batch):
            self.add(work, i)
        results: list[Completion | None] = [None] * len(batch)
        try:
            while self.active:
                for i, completion in self.step():
                    results[i] = completion
        except BaseException:
            self.abandon()  # the next batch starts clean
            raise
        return [r for r in results if r is not None]

    @functools.cached_property
    def _pieces(self) -> list[str]:
        """Each token's text alone, for the stop-string check (made on first use)."""
        return _token_pieces(self.tokenizer)

    def _settle(self, rows: _Rows, tokens: list[int]) -> dict[int, Completion]:
        """Give each row its token; return the rows (by position) that are now done."""
        finished: dict[int, Completion] = {}
        now = time.perf_counter()
        for pos, token in enumerate(tokens):
            index = rows.index[pos]
            work = rows.work[index]
            generated = rows.generated[index]
            reason: Literal["stop", "length"] | None = None
            if token in self.stop_ids:
                reason = "stop"
            else:
                generated.append(token)
                if work.stop and _may_complete(self._pieces, token, work.stop) and _hits_stop(self.tokenizer, generated, work.stop):
                    reason = "stop"
                elif len(generated) >= work.sampling.max_new_tokens:
                    reason = "length"
            if reason:
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if reason == "length":  # cut mid-character: not half an emoji as U+FFFD
                    text = text.rstrip("\ufffd")
                finished[pos] = Completion(
                    text=_cut_at_stop(text, work.stop).rstrip(),  # its leading space: see Worker._reply
                    new_tokens=len(generated),
                    finish_reason=reason,
                    seconds=now - rows.started[index],
                )
        return finished


class _Rows:
    """The live rows of a batch, their masks and the state sampling needs."""

    def __init__(self, batch: list[Work], tags: list[object], device: torch.device, pad_id: int,
                 unpenalised: Collection[int] = ()) -> None:
        self.work = batch
        self.tags = tags
        self.size = len(batch)
        self.index = list(range(self.size))
        self.generated: list[list[int]] = [[] for _ in batch]
        self.started = [time.perf_counter()] * self.size
        width = max(len(w.token_ids) for w in batch) or 1
        ids = torch.full((self.size, width), pad_id, dtype=torch.long)
        mask = torch.zeros((self.size, width), dtype=torch.long)
        for i, w in enumerate(batch):
            if w.token_ids:
                ids[i, width - len(w.token_ids) :] = torch.tensor(w.token_ids)
                mask[i, width - len(w.token_ids) :] = 1
            else:
                mask[i, -1] = 1
        input_ids, position_ids = to_device(ids, device), to_device((mask.cumsum(-1) - 1).clamp(min=0), device)
        # The prompts (ids, mask, positions) until the decoder is handed them at admission;
        # None after, so nothing reads them once rows leave or join.
        self.prompts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = (
            input_ids, to_device(mask, device), position_ids,
        )  # fmt: skip
        self.position = position_ids[:, -1]  # each row's latest position
        # The tokens each row has seen, for the repetition penalty: its padding holds the
        # row's own first token instead (penalised once either way), so a row batched with
        # longer prompts does not penalise the padding token (often end-of-text) unlike alone.
        self.seen = to_device(torch.where(mask.bool(), ids, ids.gather(1, mask.argmax(dim=1, keepdim=True))), device)
        settings = [w.sampling for w in batch]
        self.temperature = to_device(torch.tensor([s.temperature for s in settings]), device)
        self.top_p = to_device(torch.tensor([s.top_p for s in settings]), device)
        self.top_k = to_device(torch.tensor([s.top_k for s in settings]), device)
        self.penalty = to_device(torch.tensor([s.repetition_penalty for s in settings]), device)
        # The tokens that end a reply are never penalised: the prompt holds the end of every
        # turn before it, and a penalty on those made stopping half as likely, so replies
        # rambled on to max_new_tokens and ended mid-sentence.
        self.unpenalised = to_device(torch.tensor(sorted(unpenalised), dtype=torch.long), device) if unpenalised else None
        # Each row's uniform draws, one per token it samples (and one for a step taken past
        # its length), drawn at admission on the host: a seeded row's from its own
        # generator, so its reply depends on its seed alone, never on the rows beside it
        # (and is the same on any device); the others' from torch's global generator.
        # Sampling reads column ``position - start``: no launch per row, seeded or not.
        self.uniforms = to_device(_uniforms([w.sampling for w in batch]), device)
        self.start = self.position.clone()  # where its draws begin (the decoder owns the prompts)
        # Plain copies, so deciding how to sample needs no device sync.
        self.temperatures = [w.sampling.temperature for w in batch]
        self.top_ks = [w.sampling.top_k for w in batch]
        self.penalties = [w.sampling.repetition_penalty for w in batch]

    def append(self, tokens: torch.Tensor) -> None:
        self.position = self.position + 1
        self.seen = torch.cat([self.seen, tokens[:, None]], dim=1)

    def select(self, keep: list[int], index: torch.Tensor) -> None:
        """Keep these rows (by position; ``index``: the same on the rows' device)."""
        self.size = len(keep)
        self.index = [self.index[i] for i in keep]
        for name in ("position", "start", "uniforms", "seen", "temperature", "top_p", "top_k", "penalty"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.temperatures = [self.temperatures[i] for i in keep]
        self.top_ks = [self.top_ks[i] for i in keep]
        self.penalties = [self.penalties[i] for i in keep]

    def merge(self, other: _Rows) -> None:
        """Append ``other``'s rows after these (rows that joined a running batch)."""
        offset = len(self.work)
        self.work = self.work + other.work
        self.tags = self.tags + other.tags
        self.generated += other.generated
        self.started += other.started
        self.index += [offset + i for i in other.index]
        self.size += other.size
        width = max(self.seen.shape[1], other.seen.shape[1])
        self.seen = torch.cat([_widened(self.seen, width), _widened(other.seen, width)])
        draws = max(self.uniforms.shape[1], other.uniforms.shape[1])  # columns past a row's own are never read
        self.uniforms = torch.cat([_padded(self.uniforms, draws), _padded(other.uniforms, draws)])
        for name in ("position", "start", "temperature", "top_p", "top_k", "penalty"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.temperatures += other.temperatures
        self.top_ks += other.top_ks
        self.penalties += other.penalties


def _reader(tokens: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying ``tokens`` to the host; the returned call waits for them.

    On a GPU the copy is queued now, behind only the work that made them, so whatever is
    launched after (the next step) does not delay reading them.
    """
    if tokens.device.type != "cuda":
        values = tokens.tolist()
        return lambda: values
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return read


def _widened(seen: torch.Tensor, width: int) -> torch.Tensor:
    """``seen`` left-padded to ``width`` with each row's own first token (see ``_Rows``)."""
    return torch.cat([seen[:, :1].expand(-1, width - seen.shape[1]), seen], dim=1)


def _padded(uniforms: torch.Tensor, draws: int) -> torch.Tensor:
    """``uniforms`` with columns added up to ``draws`` (a row never reads past its own)."""
    extra = draws - uniforms.shape[1]
    return torch.cat([uniforms, uniforms.new_zeros((uniforms.shape[0], extra))], dim=1) if extra else uniforms


def _uniforms(settings: list[Sampling]) -> torch.Tensor:
    """One row of uniform draws in [0, 1) per row: ``max_new_tokens + 1`` of them (the
    last for a step launched past the row's length, whose token is never used)."""
    draws = torch.rand((len(settings), max(s.max_new_tokens for s in settings) + 1))
    for i, sampling in enumerate(settings):
        if sampling.seed is not None:
            own = torch.Generator().manual_seed(sampling.seed)
            draws[i, : sampling.max_new_tokens + 1] = torch.rand(sampling.max_new_tokens + 1, generator=own)
    return draws


class _EagerDecoder:
    """Hugging Face's own forward pass and dynamic cache, for any causal LM."""

    def __init__(self, model) -> None:
        self.model = model
        # transformers renamed `past_key_values` to `cache` in 5.2x; accept both.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache = None
        self.attention_mask = torch.empty(0)

    def start(self, input_ids, attention_mask, position_ids, room: int) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.attention_mask = attention_mask
        return self._forward(input_ids, position_ids)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        one = torch.ones((tokens.shape[0], 1), dtype=self.attention_mask.dtype, device=tokens.device)
        self.attention_mask = torch.cat([self.attention_mask, one], dim=1)
        return self._forward(tokens[:, None], positions[:, None])

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.attention_mask.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]

    def _forward(self, input_ids, position_ids) -> torch.Tensor:
        return self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_arg: self.cache},
        ).logits[:, -1, :]


def _sample(logits: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """One token per row, each row with its own sampling settings.

    What to do is decided from plain lists (no device sync); greedy rows without a
    penalty read the logits as they come (bf16 on a GPU: the same argmax).
    """
    if any(p != 1.0 for p in rows.penalties):
        logits = logits.float()
        seen_scores = logits.gather(1, rows.seen)
        factor = rows.penalty[:, None]
        seen_scores = torch.where(seen_scores < 0, seen_scores * factor, seen_scores / factor)
        penalised = logits.scatter(1, rows.seen, seen_scores)
        if rows.unpenalised is not None:
            penalised = penalised.index_copy(1, rows.unpenalised, logits.index_select(1, rows.unpenalised))
        logits = penalised
    if all(t <= 0 for t in rows.temperatures):
        return logits.argmax(dim=-1)
    logits = logits.float()
    scaled = logits / rows.temperature.clamp(min=1e-5)[:, None]
    vocab = scaled.shape[-1]
    # Rows with a top-k never look past their k best tokens, so when every row has one
    # a partial top-k replaces sorting the whole vocabulary; probabilities are still
    # normalised over the whole vocabulary, so the top-p cut is the same as a full sort's.
    widest = max(rows.top_ks) if all(k > 0 for k in rows.top_ks) else vocab
    if widest < vocab:
        sorted_logits, sorted_ids = scaled.topk(widest, dim=-1)
    else:
        sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(sorted_logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(rows.top_k > 0, rows.top_k, vocab)[:, None]
    drop = ranks >= k
    probs = (sorted_logits - scaled.logsumexp(dim=-1, keepdim=True)).exp()
    before = probs.cumsum(dim=-1) - probs
    drop |= before > rows.top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # Inverse CDF with each row's own uniform draw for this token (see ``_Rows.uniforms``):
    # the first candidate whose cumulative probability passes it. Candidates past a row's
    # own top-k add nothing, so a seeded row draws the same token whatever the widest
    # top-k of the rows beside it.
    cdf = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drawn = (rows.position - rows.start).clamp(max=rows.uniforms.shape[1] - 1)
    threshold = rows.uniforms.gather(1, drawn[:, None]) * cdf[:, -1:]
    choice = (cdf < threshold).sum(dim=-1, keepdim=True).clamp(max=cdf.shape[-1] - 1)
    sampled = sorted_ids.gather(1, choice).squeeze(1)
    if all(t > 0 for t in rows.temperatures):
        return sampled
    return torch.where(rows.temperature <= 0, logits.argmax(dim=-1), sampled)


def _token_pieces(tokenizer) -> list[str]:
    """Each token's text decoded on its own (the Rust tokenizer: 30 ms for 49,152 tokens)."""
    ids = [[i] for i in range(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(ids, skip_special_tokens=True)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _may_complete(pieces: list[str], token: int, stop: list[str]) -> bool:
    """Whether ``token`` may complete one of the ``stop`` strings, so the reply's tail is
    worth decoding (about 8 us a row a step: 1 ms a step at 128 rows, as long as a GPU's
    whole decode step).

    A stop string the tail did not hold a token ago ends in this token's text, and that
    text decoded alone holds its last character too, unless the token is part of a UTF-8
    character (alone it reads as U+FFFD) or the character is a space (decoders add and
    drop spaces between tokens). Those are always checked. (Special tokens are skipped
    when decoding: they complete nothing.)
    """
    if token >= len(pieces):
        return True
    piece = pieces[token]
    if "\ufffd" in piece:
        return True
    return any(not s or s[-1] in piece or s[-1].isspace() for s in stop)


def _hits_stop(tokenizer, generated: list[int], stop: list[str]) -> bool:
    # Only the tail can hold a stop string that was not there one token ago; a character
    # may take a token per UTF-8 byte (an emoji: up to four).
    longest = max(len(s.encode("utf-8")) for s in stop)
    tail = tokenizer.decode(generated[-(longest + 4) :], skip_special_tokens=True)
    return any(s in tail for s in stop)


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]
