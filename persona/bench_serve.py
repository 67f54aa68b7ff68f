"""`persona bench serve`: a backlog of chat requests of mixed lengths, served three ways.

What a server does with requests that want replies of different lengths: ``requests``
chat prompts, all waiting at the start, at most ``concurrency`` decoding at once, each
wanting its own number of new tokens (mostly short, a few long, as chat replies go;
end-of-text ignored so every side makes exactly the same useful tokens). Served:

- ``ours``: our engine with continuous batching, as the worker runs it: a request joins
  the running batch at the next step as soon as a row is free, and leaves when done.
- ``ours_batches``: the same engine one batch at a time: a row that finishes early is
  answered then, but the next requests wait until the whole batch is done.
- ``baseline``: plain ``generate()`` one batch at a time, each batch as long as its
  longest request (what a server built on ``generate()`` gets).

Each side reports useful tokens per second (each request's own tokens over the time to
serve them all) and when requests were answered (seconds from the start, p50 and p99).
``ours`` against ``ours_batches`` is what continuous batching alone is worth; ``ours``
against ``baseline`` is the whole engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from persona.bench_engine import (
    check_room,
    forget_prefixes,
    prompt_ids,
    sampling_for,
    sync_device,
    time_baseline,
)
from persona.engine import TransformersEngine, Work
from persona.models import LoadedModel

__all__ = ["ServeBenchResult", "Served", "reply_lengths", "run_serve_bench", "serve_backlog"]

log = logging.getLogger(__name__)

# Each request's share of the longest reply, in the order requests arrive: mostly short
# replies, a few long (their mean is about a third of the longest).
REPLY_SHARES = (1, 1 / 8, 1 / 4, 1 / 2, 1 / 8, 1 / 4, 1 / 8, 1 / 2)


def reply_lengths(requests: int, longest: int) -> list[int]:
    """How many new tokens each request wants: REPLY_SHARES of ``longest``, cycled."""
    return [max(1, round(longest * REPLY_SHARES[i % len(REPLY_SHARES)])) for i in range(requests)]


@dataclass
class Served:
    """One way of serving the backlog: useful tokens per second, and when each request
    was answered (seconds from the start, and decode steps from the start where counted)."""

    tokens_per_s: float = 0.0
    seconds: float = 0.0
    answered_s: list[float] = field(default_factory=list)
    answered_step: list[int] = field(default_factory=list)

    def percentile(self, share: float) -> float:
        ordered = sorted(self.answered_s)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0

    def as_dict(self) -> dict:
        return {
            "tokens_per_s": round(self.tokens_per_s, 1), "seconds": round(self.seconds, 3),
            "p50_s": round(self.percentile(0.5), 3), "p99_s": round(self.percentile(0.99), 3),
        }  # fmt: skip


@dataclass
class ServeBenchResult:
    device: str
    model: str
    mode: str
    requests: int
    concurrency: int
    reply_tokens: list[int]
    ours: Served = field(default_factory=Served)
    ours_batches: Served = field(default_factory=Served)
    baseline: Served = field(default_factory=Served)
    layouts: int = 0  # GPU: cache layouts (graph captures) the continuous run needed; 0 elsewhere
    reads: int = 0  # static cache (GPU): prompt reads in the continuous run (rows join in groups)
    warm_up_s: float = 0.0  # our engine's warm-up (on a GPU: compiling, unless its caches hold it)
    compiled: bool = False  # GPU: whether the decode step ran compiled (torch.compile)
    reads_captured: bool = False  # GPU: whether prompt reads replayed captured graphs to the end

    @property
    def ratio(self) -> float:
        base = self.baseline.tokens_per_s
        return self.ours.tokens_per_s / base if base else 0.0

    @property
    def continuous_gain(self) -> float:
        batches = self.ours_batches.tokens_per_s
        return self.ours.tokens_per_s / batches if batches else 0.0

    def as_dict(self) -> dict:
        return {
            "device": self.device, "model": self.model, "mode": self.mode, "requests": self.requests,
            "concurrency": self.concurrency, "useful_tokens": sum(self.reply_tokens),
            "ours": self.ours.as_dict(), "ours_batches": self.ours_batches.as_dict(),
            "baseline": self.baseline.as_dict(), "ratio": round(self.ratio, 2),
            "continuous_gain": round(self.continuous_gain, 2), "layouts": self.layouts, "reads": self.reads,
            "warm_up_s": self.warm_up_s, "compiled": self.compiled, "reads_captured": self.reads_captured,
        }  # fmt: skip


def serve_backlog(engine: TransformersEngine, work: list[Work], concurrency: int, continuous: bool) -> Served:
    """Run the backlog through the engine's step loop: new rows join whenever a row is
    free (``continuous``), or only once the batch is empty."""
    served = Served(answered_s=[0.0] * len(work), answered_step=[0] * len(work))
    waiting = list(enumerate(work))
    forget_prefixes(engine)  # every run reads its prompts in full (llama.cpp keeps recent ones)
    steps = 0
    sync_device(engine.loaded.device)
    started = time.perf_counter()
    while waiting or engine.active:
        if continuous or not engine.active:
            while waiting and engine.active < concurrency:
                index, row = waiting.pop(0)
                engine.add(row, index)
        finished = engine.step()
        steps += 1
        now = time.perf_counter() - started
        for index, completion in finished:
            wanted = _wanted(work[index])
            if completion.new_tokens != wanted:
                raise RuntimeError(f"request {index} made {completion.new_tokens} tokens, wanted {wanted}")
            served.answered_s[index] = now
            served.answered_step[index] = steps
    sync_device(engine.loaded.device)
    served.seconds = time.perf_counter() - started
    served.tokens_per_s = sum(_wanted(w) for w in work) / served.seconds
    return served


def _wanted(work: Work) -> int:
    return work.sampling.max_new_tokens


def _serve_baseline(loaded: LoadedModel, prompts: list[list[int]], lengths: list[int], concurrency: int) -> Served:
    """``generate()`` one batch at a time, each batch as long as its longest request."""
    served = Served(answered_s=[0.0] * len(prompts))
    started = time.perf_counter()
    for first in range(0, len(prompts), concurrency):
        chunk = slice(first, first + concurrency)
        time_baseline(loaded, prompts[chunk], max(lengths[chunk]))
        now = time.perf_counter() - started
        served.answered_s[chunk] = [now] * len(prompts[chunk])
    served.seconds = time.perf_counter() - started
    served.tokens_per_s = sum(lengths) / served.seconds
    return served


def run_serve_bench(
    loaded: LoadedModel,
    requests: int = 24,
    concurrency: int = 8,
    longest: int = 64,
    mode: str = "auto",
    cache_dir: Path | None = None,
    gguf_type: str = "q8_0",
    compile: bool = True,
    kernels: str = "auto",
    attention: str = "auto",
    progress: Callable[[str], None] | None = None,
    repeats: int = 2,
) -> ServeBenchResult:
    """The backlog served by ours (continuous), ours one batch at a time, and ``generate()``:
    each the best of ``repeats`` runs, taking turns (so a neighbour's burst of load slows each
    alike). Ours' first run also pays what a long-running server pays once (on a GPU: capturing
    the graphs of new cache layouts and prompt shapes). ``progress`` is told each run as it starts."""
    prompts = prompt_ids(loaded, requests, numbered=True)  # alike only in the chat template's opening
    check_room(loaded, prompts, longest, "--longest")
    engine = TransformersEngine(
        loaded, mode=mode, cache_dir=cache_dir, threads=torch.get_num_threads(), gguf_type=gguf_type, compile=compile,
        kernels=kernels, attention=attention,
    )  # fmt: skip
    warm_up_s = engine.warm_up()
    log.info("%s engine warmed up in %.1f s", engine.mode, warm_up_s)
    engine.stop_ids = set()  # exactly each request's tokens, like min_new_tokens on the baseline side
    lengths = reply_lengths(requests, longest)
    work = [Work(ids, sampling_for(tokens, sampled=False)) for ids, tokens in zip(prompts, lengths, strict=True)]
    result = ServeBenchResult(
        device=loaded.device, model=loaded.name, mode=engine.mode, requests=requests, concurrency=concurrency,
        reply_tokens=lengths, warm_up_s=round(warm_up_s, 2),
    )
    time_baseline(loaded, prompts[:1], 2)  # its first call's costs, off the clock
    runs = (
        ("ours", lambda: serve_backlog(engine, work, concurrency, continuous=True)),
        ("ours_batches", lambda: serve_backlog(engine, work, concurrency, continuous=False)),
        ("baseline", lambda: _serve_baseline(loaded, prompts, lengths, concurrency)),
    )
    for _ in range(max(1, repeats)):
        for name, run in runs:
            if progress:
                progress(name)
            layouts, reads = (getattr(engine.decoder, counter, 0) for counter in ("layouts", "reads"))
            served = run()
            if served.tokens_per_s > getattr(result, name).tokens_per_s:
                setattr(result, name, served)
                if name == "ours":  # the counts of the run reported
                    result.layouts = getattr(engine.decoder, "layouts", 0) - layouts
                    result.reads = getattr(engine.decoder, "reads", 0) - reads
    for name, _ in runs:
        log.info("%s: %.1f useful tok/s", name, getattr(result, name).tokens_per_s)
    result.compiled = bool(getattr(engine.decoder, "compiled", False))
    result.reads_captured = bool(getattr(engine.decoder, "reads_captured", False))
    return result
