"""Batched generation with each request's own sampling settings.

``TransformersEngine`` runs one decode loop over a left-padded batch: every row has its
own temperature, top-p, top-k, repetition penalty, token budget, stop strings and seed.
Batching is continuous: a row that has finished leaves the batch at the next step (its
cache rows are dropped), and a row added while the batch decodes joins it at the next
step (where the decoder can join: fused, int8 and llamacpp), so a long request never
holds short ones hostage. Sampling is ours on every path; decoders only give logits.

Its parts: ``engine_modes`` (which decode path a model gets), ``sampling`` (the
batch's rows and each row's next token), ``stop_strings`` (where a reply ends) and
``eager_decoder`` (Hugging Face's own modules for any causal LM).

torch is imported only by an engine that decodes with it: with llama.cpp the rows are
numpy arrays (``host_sampling.HostArrays``), so a worker serving that way never loads torch.

A row's deadline (``Work.deadline``) is looked at before its prompt is read and, where
the decoder reads prompts in chunks (eager, llamacpp, and fused and int8 on a CPU: ``reads_in_chunks``), between
chunks: a row whose caller stopped waiting is not read on, and comes back finished for
"deadline" with no text. A prompt of thousands of tokens used to be read whole, holding
the worker (and every request behind it) for seconds after its deadline.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from persona.engine_modes import _device_type, _torch_mode, pick_engine_mode
from persona.errors import ModelError
from persona.host_sampling import HostArrays, _HostRows
from persona.models import LoadedModel
from persona.personas import Sampling
from persona.sampling import Arrays, TorchArrays, _Rows
from persona.stop_strings import _cut_at_stop, _hits_stop, _may_complete, _token_pieces

__all__ = ["Completion", "ContinuousGenerator", "Generator", "TransformersEngine", "Work"]

log = logging.getLogger(__name__)

MAX_TOP_K = 2**31 - 1  # more than any vocabulary: a larger top-k keeps every token, as 0 does


@dataclass
class Work:
    """One row of a batch: the prompt and how to sample its continuation."""

    token_ids: list[int]
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    # When its caller stops waiting, by this machine's clock (time.time()); 0.0: never.
    # A row past it is not read further (see the module's docstring).
    deadline: float = 0.0


@dataclass
class Completion:
    """What one row produced."""

    text: str
    new_tokens: int
    # "deadline": its deadline passed before its prompt was read (no text)
    finish_reason: Literal["stop", "length", "deadline"]
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


def _torch_threads(threads: int | None) -> None:
    """Give torch ``threads`` (``worker.threads``) where a torch engine decodes; llama.cpp
    takes its own, and a worker serving only through it never imports torch."""
    if threads:
        import torch

        torch.set_num_threads(threads)


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
        self.on_gpu = _device_type(loaded.device) == "cuda"
        self.tokenizer = loaded.tokenizer
        self.stop_ids = set(loaded.stop_token_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.mode = pick_engine_mode(mode, loaded)
        self.decoder = self._decoder(cache_dir, threads, gguf_type, kv_tokens, compile, kernels, attention)
        # How rows are held and sampled: numpy on the host for llama.cpp, else torch
        # tensors on the model's device (the mode is final here: llama.cpp may have fallen back).
        self.arrays: Arrays = HostArrays() if self.mode == "llamacpp" else TorchArrays(loaded.device)
        self._waiting: list[tuple[Work, object]] = []
        self._rows: _Rows | _HostRows | None = None
        # Token arrays below are the rows' kind: torch tensors, or numpy arrays (llama.cpp).
        self._pending: Any = None  # each row's last token, not fed yet
        # lookahead (default: on a GPU): each step launches the next before its own tokens
        # are read back, so the host's bookkeeping runs while the GPU decodes; a row that
        # ends on a stop token costs one wasted row-step. Replies are the same either way.
        self.lookahead = self.on_gpu if lookahead is None else lookahead
        self._ahead: Any = None  # the launched step's tokens, not read yet
        self._waited = 0  # steps that rows have waited to join the running batch
        self._late: list[tuple[object, Completion]] = []  # rows not read: their deadline passed
        self._checking = False  # while warming up: refuse weights whose logits are not finite
        log.info("%s decodes with the %s engine", loaded.name, self.mode)

    def _decoder(
        self, cache_dir: Path | None, threads: int | None, gguf_type: str, kv_tokens: int | None, compile: bool,
        kernels: str, attention: str,
    ):  # fmt: skip
        if self.mode != "llamacpp":
            _torch_threads(threads)
        if self.mode == "eager":
            from persona.eager_decoder import _EagerDecoder

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
                _torch_threads(threads)
                if self.mode == "eager":
                    from persona.eager_decoder import _EagerDecoder

                    return _EagerDecoder(self.loaded.model)
            else:
                decoder = LlamaCppDecoder(path, threads=threads, context_tokens=kv_tokens or CONTEXT_TOKENS)
                self.loaded.release_weights()  # llama.cpp holds its own copy
                return decoder
        from persona import llama_decoder
        from persona.kernel_cache import keep_compiled_kernels

        # On a GPU each decode step replays a CUDA graph of the (compiled) step; what is
        # compiled for it is kept beside the models for the next start.
        if self.on_gpu and cache_dir is not None:
            log.info("compiled kernels are kept in %s", ", ".join(keep_compiled_kernels(cache_dir).values()))
        return llama_decoder.LlamaDecoder(
            self.loaded.model,
            int8=self.mode == "int8",
            graphs=self.on_gpu,
            compile=compile and self.on_gpu,
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

    def step(self) -> list[tuple[object, Completion]]:
        """Feed the running rows their last tokens, admit waiting rows, sample one token for
        every row; return the rows that finished (those left unread at their deadline
        first, finished for "deadline").

        With ``lookahead`` the step after this one is launched before this one's tokens are
        read (unless rows wait to join or every row ends now), and the next call starts
        from its tokens. A decode that fails raises before any row of this step is
        settled: every row it held is still there to be answered (``abandon``), and rows
        that finished earlier were returned by earlier steps.
        """
        with self.arrays.inference():
            return self._step()

    def _step(self) -> list[tuple[object, Completion]]:
        arrays = self.arrays
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
                    logits = joined if logits is None else arrays.cat(logits, joined)
            rows = self._rows
            if rows is None:
                return self._given_up()
            if self._checking and not arrays.finite(logits):
                raise ModelError(f"{self.loaded.name} produces NaN or infinite logits (corrupt weights)")
            tokens = arrays.sample(logits, rows)
            rows.append(tokens)
        read = arrays.reader(tokens)
        self._waited = self._waited + 1 if self._waiting else 0
        if self._worth_looking_ahead(rows):
            self._ahead = arrays.sample(self.decoder.step(tokens, rows.position), rows)
            rows.append(self._ahead)
        finished = self._settle(rows, read())
        done = [(rows.tags[rows.index[pos]], completion) for pos, completion in finished.items()]
        self._keep([i for i in range(rows.size) if i not in finished], tokens)
        return self._given_up() + done

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

    def _worth_looking_ahead(self, rows: _Rows | _HostRows) -> bool:
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

    def _keep(self, keep: list[int], tokens: Any) -> None:
        """Only these rows stay, each with its next token to feed (or, looking ahead, the
        launched step's token to read); none left ends the batch."""
        if not keep:
            self._rows = self._pending = self._ahead = None
            return
        if len(keep) < self._rows.size:
            index = self.arrays.index(keep)
            # The decoder first: should it fail, every row is still here for ``abandon``.
            self.decoder.select(keep)
            self._rows.select(keep, index)
            tokens = self.arrays.take(tokens, index) if tokens is not None else None
            if self._ahead is not None:
                self._ahead = self.arrays.take(self._ahead, index)
        # Fed at the next step; looking ahead, this step's tokens are already fed.
        self._pending = tokens if self._ahead is None else None

    def abandon(self) -> list[object]:
        """Drop every row (after a failed step); return their tags so each can be answered."""
        tags = [tag for _, tag in self._waiting] + [tag for tag, _ in self._late]
        if self._rows is not None:
            tags += [self._rows.tags[i] for i in self._rows.index]
        self._waiting, self._rows, self._pending, self._ahead, self._waited = [], None, None, None, 0
        self._late = []
        return tags

    def _admit(self) -> Any:
        """Prefill the waiting rows and add them to the running batch (or start one);
        return their next-token logits (None when none could be admitted).

        A decoder with a fixed cache (llama.cpp) takes only the rows whose whole reply
        fits beside the running ones; the rest wait for rows to leave. With nothing
        running, at least one row is always tried (if it cannot fit, it fails alone).

        Rows past their deadline are not read (``_drop_late``); where the decoder reads in
        chunks, a read that reaches a row's deadline stops, nothing of it is kept, and the
        rows still in time wait to be read again at the next step.
        """
        self._drop_late()
        if not self._waiting:  # every row waiting was late: nothing to read (nor to fit)
            return None
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
        new = self.arrays.rows([w for w, _ in waiting], [t for _, t in waiting], self.pad_id, self.stop_ids)
        room = max(w.sampling.max_new_tokens for w, _ in waiting) + 1
        prompts, new.prompts = new.prompts, None  # the decoder's from here on
        reading = self._reading(waiting)
        if self._rows is None:
            forget = getattr(self.decoder, "forget_prefixes", None)
            if forget is not None and any(w.sampling.seed is not None for w, _ in waiting):
                # A seed promises a repeatable reply, and llama.cpp's logits for a prompt
                # depend on what its cache holds (a kept prefix it continues, where its cells
                # land): a seeded row that starts a batch starts from an empty cache, as on a
                # fresh worker. (One that joins a running batch cannot: see `persona ask --help`.)
                forget()
            logits = self.decoder.start(*prompts, room, **reading)
            if logits is None:  # stopped at a deadline
                self._drop_late()
                return None
            self._rows = new
        else:
            logits = self.decoder.join(*prompts, room, **reading)
            if logits is None:
                self._drop_late()
                return None
            self._rows.merge(new)
        del self._waiting[:count]
        return logits

    def _reading(self, waiting: list[tuple[Work, object]]) -> dict[str, Callable[[], bool]]:
        """How a read of these rows is stopped: the decoder's ``stop``, true once the first of
        their deadlines has passed, where the decoder reads in chunks and a row has one."""
        deadlines = [w.deadline for w, _ in waiting if w.deadline]
        if not deadlines or not getattr(self.decoder, "reads_in_chunks", False):
            return {}
        first = min(deadlines)
        return {"stop": lambda: time.time() > first}

    def _drop_late(self) -> None:
        """Waiting rows past their deadline leave unread, to be returned by this step."""
        now = time.time()
        late = [(w, t) for w, t in self._waiting if w.deadline and now > w.deadline]
        if late:
            self._waiting = [(w, t) for w, t in self._waiting if not (w.deadline and now > w.deadline)]
            self._late += [(t, Completion(text="", new_tokens=0, finish_reason="deadline")) for _, t in late]

    def _given_up(self) -> list[tuple[object, Completion]]:
        """The rows dropped unread at their deadline since the last step (taken once)."""
        late, self._late = self._late, []
        return late

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

    def _settle(self, rows: _Rows | _HostRows, tokens: list[int]) -> dict[int, Completion]:
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

