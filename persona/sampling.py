"""A batch's rows as sampling sees them, and each row's next token drawn by its own settings.

``_Rows`` holds the live rows of a batch: their prompts until the decoder reads them,
the tokens each has seen (for the repetition penalty), its settings as tensors and as
plain lists, and its own uniform draws (a seeded row's from its own generator).
``_sample`` draws one token per row from the decoder's logits.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch

from persona.host_copies import to_device
from persona.personas import Sampling

if TYPE_CHECKING:
    from persona.engine import Work  # the engine imports this module

__all__: list[str] = []


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
