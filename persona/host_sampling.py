"""``persona.sampling``'s rows and sampler in numpy, for llama.cpp, whose logits come to the host.

``_HostRows`` holds a batch's rows as numpy arrays (the plain lists are ``_BatchRows``'s, as
for torch's rows) and ``_sample_host`` takes ``_sample``'s steps on them, so a worker serving
with llama.cpp never imports torch: nothing here does. A seeded row draws the same uniforms,
and so the same tokens, as on torch's path (torch's generator, reproduced).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import numpy as np

from persona.personas import Sampling
from persona.sampling import _BatchRows

if TYPE_CHECKING:
    from persona.engine import Work  # the engine imports this module

__all__ = ["HostArrays"]


class _HostRows(_BatchRows):
    """The live rows of a batch as numpy arrays on the host (``_Rows``'s state, for llama.cpp)."""

    def __init__(self, batch: list[Work], tags: list[object], pad_id: int, unpenalised: Collection[int] = ()) -> None:
        super().__init__(batch, tags)
        width = max(len(w.token_ids) for w in batch) or 1
        ids = np.full((self.size, width), pad_id, dtype=np.int64)
        mask = np.zeros((self.size, width), dtype=np.int64)
        for i, w in enumerate(batch):
            if w.token_ids:
                ids[i, width - len(w.token_ids) :] = w.token_ids
                mask[i, width - len(w.token_ids) :] = 1
            else:
                mask[i, -1] = 1
        position_ids = np.maximum(mask.cumsum(-1) - 1, 0)
        self.prompts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = (ids, mask, position_ids)
        self.position = position_ids[:, -1]
        first = ids[np.arange(self.size), mask.argmax(axis=1)]  # see ``_Rows.seen``
        self.seen = np.where(mask.astype(bool), ids, first[:, None])
        settings = [w.sampling for w in batch]
        self.temperature = np.array([s.temperature for s in settings], dtype=np.float32)
        self.top_p = np.array([s.top_p for s in settings], dtype=np.float32)
        self.top_k = np.array([s.top_k for s in settings], dtype=np.int64)
        self.penalty = np.array([s.repetition_penalty for s in settings], dtype=np.float32)
        self.unpenalised = np.array(sorted(unpenalised), dtype=np.int64) if unpenalised else None
        self.uniforms = _host_uniforms(settings)
        self.start = self.position.copy()

    @staticmethod
    def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
        return values[index]

    @staticmethod
    def _cat(parts: list[np.ndarray], dim: int = 0) -> np.ndarray:
        return np.concatenate(parts, axis=dim)

    @staticmethod
    def _widened(seen: np.ndarray, width: int) -> np.ndarray:
        return np.concatenate([np.repeat(seen[:, :1], width - seen.shape[1], axis=1), seen], axis=1)

    @staticmethod
    def _padded(uniforms: np.ndarray, draws: int) -> np.ndarray:
        extra = draws - uniforms.shape[1]
        return np.pad(uniforms, ((0, 0), (0, extra))) if extra else uniforms


_HOST_RANDOM = np.random.default_rng()  # unseeded rows' draws (torch's global generator's, on that path)


def _host_uniforms(settings: list[Sampling]) -> np.ndarray:
    """``_uniforms`` on the host: a seeded row's draws are the very ones torch draws."""
    draws = _HOST_RANDOM.random((len(settings), max(s.max_new_tokens for s in settings) + 1), dtype=np.float32)
    for i, sampling in enumerate(settings):
        if sampling.seed is not None:
            draws[i, : sampling.max_new_tokens + 1] = _seeded_uniforms(sampling.seed, sampling.max_new_tokens + 1)
    return draws


def _seeded_uniforms(seed: int, count: int) -> np.ndarray:
    """``torch.rand(count, generator=torch.Generator().manual_seed(seed))`` without torch: its
    Mersenne Twister seeded with the seed's low 32 bits, each draw one 32-bit output's low 24
    bits over 2**24 (numpy's legacy seeding is that Twister's)."""
    raw = np.random.RandomState(seed & 0xFFFF_FFFF).randint(0, 2**32, size=count, dtype=np.uint32)
    return (raw & 0xFF_FFFF).astype(np.float32) * np.float32(2.0**-24)


def _cumsum(values: np.ndarray) -> np.ndarray:
    """A float32 running sum as torch's CPU kernel makes it (accumulated in float64)."""
    return values.cumsum(axis=-1, dtype=np.float64).astype(np.float32)


def _sample_host(logits: np.ndarray, rows: _HostRows) -> np.ndarray:
    """``_sample`` in numpy: the same steps, on float32 logits on the host."""
    logits = logits.astype(np.float32, copy=False)
    every = np.arange(len(logits))[:, None]
    if any(p != 1.0 for p in rows.penalties):
        seen_scores = np.take_along_axis(logits, rows.seen, axis=1)
        factor = rows.penalty[:, None]
        penalised = logits.copy()
        penalised[every, rows.seen] = np.where(seen_scores < 0, seen_scores * factor, seen_scores / factor)
        if rows.unpenalised is not None:
            penalised[:, rows.unpenalised] = logits[:, rows.unpenalised]
        logits = penalised
    if all(t <= 0 for t in rows.temperatures):
        return logits.argmax(axis=-1)
    scaled = logits / np.maximum(rows.temperature, np.float32(1e-5))[:, None]
    vocab = scaled.shape[-1]
    widest = max(rows.top_ks) if all(k > 0 for k in rows.top_ks) else vocab
    if widest < vocab:
        best = np.argpartition(-scaled, widest - 1, axis=-1)[:, :widest]
        order = np.argsort(-np.take_along_axis(scaled, best, axis=-1), axis=-1, kind="stable")
        sorted_ids = np.take_along_axis(best, order, axis=-1)
    else:
        sorted_ids = np.argsort(-scaled, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(scaled, sorted_ids, axis=-1)
    ranks = np.arange(sorted_logits.shape[-1])[None, :]
    drop = ranks >= np.where(rows.top_k > 0, rows.top_k, vocab)[:, None]
    probs = np.exp(sorted_logits - _logsumexp(scaled))
    drop |= _cumsum(probs) - probs > rows.top_p[:, None]
    sorted_logits = np.where(drop, np.float32(-np.inf), sorted_logits)
    kept = np.exp(sorted_logits - sorted_logits.max(axis=-1, keepdims=True))  # softmax
    cdf = _cumsum(kept / kept.sum(axis=-1, keepdims=True))
    drawn = np.minimum(rows.position - rows.start, rows.uniforms.shape[1] - 1)
    threshold = rows.uniforms[every[:, 0], drawn][:, None] * cdf[:, -1:]
    choice = np.minimum((cdf < threshold).sum(axis=-1, keepdims=True), cdf.shape[-1] - 1)
    sampled = np.take_along_axis(sorted_ids, choice, axis=1)[:, 0]
    if all(t > 0 for t in rows.temperatures):
        return sampled
    return np.where(rows.temperature <= 0, logits.argmax(axis=-1), sampled)


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """``torch.logsumexp(values, -1, keepdim=True)``: an infinite maximum counts as 0."""
    top = values.max(axis=-1, keepdims=True)
    top = np.where(np.isinf(top), np.float32(0), top)
    return np.log(np.exp(values - top).sum(axis=-1, keepdims=True)) + top


class HostArrays:
    """A batch's rows as numpy arrays on the host (llama.cpp's: no torch)."""

    def rows(self, batch: list[Work], tags: list[object], pad_id: int, unpenalised: Collection[int]) -> _HostRows:
        return _HostRows(batch, tags, pad_id, unpenalised)

    def sample(self, logits: np.ndarray, rows: _HostRows) -> np.ndarray:
        return _sample_host(logits, rows)

    def inference(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def cat(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        return np.concatenate([first, second])

    def finite(self, logits: np.ndarray) -> bool:
        return bool(np.isfinite(logits).all())

    def index(self, keep: list[int]) -> np.ndarray:
        return np.array(keep, dtype=np.int64)

    def take(self, values: np.ndarray, index: np.ndarray) -> np.ndarray:
        return values[index]

    def reader(self, tokens: np.ndarray) -> Callable[[], list[int]]:
        values = tokens.tolist()
        return lambda: values

