"""A batch's rows as sampling sees them, and each row's next token drawn by its own settings.

``_Rows`` holds the live rows of a batch: their prompts until the decoder reads them,
the tokens each has seen (for the repetition penalty), its settings as tensors and as
plain lists, and its own uniform draws (a seeded row's from its own generator).
``_sample`` draws one token per row from the decoder's logits.

The torch engines hold them as tensors on the model's device (``TorchArrays``); llama.cpp,
whose logits come to the host, as numpy arrays (``HostArrays``: ``_HostRows`` and
``_sample_host``, the same steps in numpy), so a worker serving with llama.cpp never
imports torch (seconds of its start, a third of its memory). A seeded row draws the same
uniforms either way (torch's generator, reproduced), so its reply does not depend on
which of them sampled it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import numpy as np

from persona.personas import Sampling

if TYPE_CHECKING:
    import torch

    from persona.engine import Work  # the engine imports this module

__all__ = ["HostArrays", "TorchArrays"]


class _Rows:
    """The live rows of a batch, their masks and the state sampling needs."""

    def __init__(self, batch: list[Work], tags: list[object], device: torch.device, pad_id: int,
                 unpenalised: Collection[int] = ()) -> None:
        import torch

        from persona.host_copies import to_device

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
        import torch

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
        import torch

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


def _widened(seen: torch.Tensor, width: int) -> torch.Tensor:
    """``seen`` left-padded to ``width`` with each row's own first token (see ``_Rows``)."""
    import torch

    return torch.cat([seen[:, :1].expand(-1, width - seen.shape[1]), seen], dim=1)


def _padded(uniforms: torch.Tensor, draws: int) -> torch.Tensor:
    """``uniforms`` with columns added up to ``draws`` (a row never reads past its own)."""
    import torch

    extra = draws - uniforms.shape[1]
    return torch.cat([uniforms, uniforms.new_zeros((uniforms.shape[0], extra))], dim=1) if extra else uniforms


def _uniforms(settings: list[Sampling]) -> torch.Tensor:
    """One row of uniform draws in [0, 1) per row: ``max_new_tokens + 1`` of them (the
    last for a step launched past the row's length, whose token is never used)."""
    import torch

    draws = torch.rand((len(settings), max(s.max_new_tokens for s in settings) + 1))
    for i, sampling in enumerate(settings):
        if sampling.seed is not None:
            own = torch.Generator().manual_seed(sampling.seed)
            draws[i, : sampling.max_new_tokens + 1] = torch.rand(sampling.max_new_tokens + 1, generator=own)
    return draws


def _sample(logits: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """One token per row, each row with its own sampling settings.

    What to do is decided from plain lists (no device sync); greedy rows without a
    penalty read the logits as they come (bf16 on a GPU: the same argmax).
    """
    import torch

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


class _HostRows:
    """``_Rows`` as numpy arrays on the host: the same state, for llama.cpp's logits."""

    def __init__(self, batch: list[Work], tags: list[object], pad_id: int, unpenalised: Collection[int] = ()) -> None:
        self.work = batch
        self.tags = tags
        self.size = len(batch)
        self.index = list(range(self.size))
        self.generated: list[list[int]] = [[] for _ in batch]
        self.started = [time.perf_counter()] * self.size
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
        self.temperatures = [s.temperature for s in settings]
        self.top_ks = [s.top_k for s in settings]
        self.penalties = [s.repetition_penalty for s in settings]

    def append(self, tokens: np.ndarray) -> None:
        self.position = self.position + 1
        self.seen = np.concatenate([self.seen, tokens[:, None]], axis=1)

    def select(self, keep: list[int], index: np.ndarray) -> None:
        """Keep these rows (by position; ``index``: the same as an array)."""
        self.size = len(keep)
        self.index = [self.index[i] for i in keep]
        for name in ("position", "start", "uniforms", "seen", "temperature", "top_p", "top_k", "penalty"):
            setattr(self, name, getattr(self, name)[index])
        self.temperatures = [self.temperatures[i] for i in keep]
        self.top_ks = [self.top_ks[i] for i in keep]
        self.penalties = [self.penalties[i] for i in keep]

    def merge(self, other: _HostRows) -> None:
        """Append ``other``'s rows after these (rows that joined a running batch)."""
        offset = len(self.work)
        self.work = self.work + other.work
        self.tags = self.tags + other.tags
        self.generated += other.generated
        self.started += other.started
        self.index += [offset + i for i in other.index]
        self.size += other.size
        width = max(self.seen.shape[1], other.seen.shape[1])
        self.seen = np.concatenate([_host_widened(self.seen, width), _host_widened(other.seen, width)])
        draws = max(self.uniforms.shape[1], other.uniforms.shape[1])
        self.uniforms = np.concatenate([_host_padded(self.uniforms, draws), _host_padded(other.uniforms, draws)])
        for name in ("position", "start", "temperature", "top_p", "top_k", "penalty"):
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))
        self.temperatures += other.temperatures
        self.top_ks += other.top_ks
        self.penalties += other.penalties


def _host_widened(seen: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([np.repeat(seen[:, :1], width - seen.shape[1], axis=1), seen], axis=1)


def _host_padded(uniforms: np.ndarray, draws: int) -> np.ndarray:
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


class TorchArrays:
    """A batch's rows as torch tensors on the model's device (the torch engines')."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def rows(self, batch: list[Work], tags: list[object], pad_id: int, unpenalised: Collection[int]) -> _Rows:
        return _Rows(batch, tags, self.device, pad_id, unpenalised)

    def sample(self, logits: torch.Tensor, rows: _Rows) -> torch.Tensor:
        return _sample(logits, rows)

    def inference(self) -> contextlib.AbstractContextManager:
        return self.torch.inference_mode()

    def cat(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.torch.cat([first, second])

    def finite(self, logits: torch.Tensor) -> bool:
        return bool(self.torch.isfinite(logits).all())

    def index(self, keep: list[int]) -> torch.Tensor:
        from persona.host_copies import to_device

        return to_device(self.torch.tensor(keep), self.device)  # no wait for the step ahead

    def take(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.index_select(0, index)

    def reader(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Start copying ``tokens`` to the host; the returned call waits for them.

        On a GPU the copy is queued now, behind only the work that made them, so whatever is
        launched after (the next step) does not delay reading them.
        """
        if tokens.device.type != "cuda":
            values = tokens.tolist()
            return lambda: values
        host = self.torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = self.torch.cuda.Event()
        copied.record()

        def read() -> list[int]:
            copied.synchronize()
            return host.tolist()

        return read


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


Arrays = TorchArrays | HostArrays
