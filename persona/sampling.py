"""A batch's rows as sampling sees them, and each row's next token drawn by its own settings.

A batch's live rows keep two kinds of state. Plain lists (which request each row is, what
it has generated, its settings, so deciding how to sample needs no device sync) are kept by
``_BatchRows`` for every engine. Arrays (its prompt until the decoder reads it, the tokens it
has seen for the repetition penalty, its settings, its own uniform draws: a seeded row's from
its own generator) are a subclass's, which supplies the few operations on them: ``_Rows``
holds torch tensors on the model's device and ``_sample`` draws each row's next token from
them (``TorchArrays``, the torch engines').

llama.cpp, whose logits come to the host, holds them as numpy arrays instead
(``persona.host_sampling``), so a worker serving with llama.cpp never imports torch (seconds
of its start, a third of its memory). A seeded row draws the same uniforms either way
(torch's generator, reproduced), so its reply does not depend on which of them sampled it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, TypeAlias

from persona.personas import Sampling

if TYPE_CHECKING:
    import torch

    from persona.engine import Work  # the engine imports this module
    from persona.host_sampling import HostArrays

__all__ = ["TorchArrays"]

# A row's arrays, one entry per row along their first axis: these join another batch's as
# they are; ``seen`` and ``uniforms`` first widen to the wider of the two.
_SAME_WIDTH = ("position", "start", "temperature", "top_p", "top_k", "penalty")
_PER_ROW = (*_SAME_WIDTH, "seen", "uniforms")


class _BatchRows:
    """The live rows of a batch: their plain lists here, their arrays in the subclass's kind.

    A subclass makes the arrays (``_PER_ROW``, ``prompts``, ``unpenalised``) and says how to
    take rows of them, join them, and widen ``seen`` and pad ``uniforms`` to a wider batch's.
    """

    def __init__(self, batch: list[Work], tags: list[object]) -> None:
        self.work = batch
        self.tags = tags
        self.size = len(batch)
        self.index = list(range(self.size))
        self.generated: list[list[int]] = [[] for _ in batch]
        self.started = [time.perf_counter()] * self.size
        # Plain copies of the settings, so deciding how to sample needs no device sync.
        self.temperatures = [w.sampling.temperature for w in batch]
        self.top_ks = [w.sampling.top_k for w in batch]
        self.penalties = [w.sampling.repetition_penalty for w in batch]

    def append(self, tokens: Any) -> None:
        """Each row's token of this step: seen, and one position on."""
        self.position = self.position + 1
        self.seen = self._cat([self.seen, tokens[:, None]], dim=1)

    def select(self, keep: list[int], index: Any) -> None:
        """Keep these rows (by position; ``index``: the same as an array of the rows' kind)."""
        self.size = len(keep)
        self.index = [self.index[i] for i in keep]
        for name in _PER_ROW:
            setattr(self, name, self._take(getattr(self, name), index))
        self.temperatures = [self.temperatures[i] for i in keep]
        self.top_ks = [self.top_ks[i] for i in keep]
        self.penalties = [self.penalties[i] for i in keep]

    def merge(self, other: _BatchRows) -> None:
        """Append ``other``'s rows after these (rows that joined a running batch)."""
        offset = len(self.work)
        self.work = self.work + other.work
        self.tags = self.tags + other.tags
        self.generated += other.generated
        self.started += other.started
        self.index += [offset + i for i in other.index]
        self.size += other.size
        width = max(self.seen.shape[1], other.seen.shape[1])
        self.seen = self._cat([self._widened(self.seen, width), self._widened(other.seen, width)])
        draws = max(self.uniforms.shape[1], other.uniforms.shape[1])  # columns past a row's own are never read
        self.uniforms = self._cat([self._padded(self.uniforms, draws), self._padded(other.uniforms, draws)])
        for name in _SAME_WIDTH:
            setattr(self, name, self._cat([getattr(self, name), getattr(other, name)]))
        self.temperatures += other.temperatures
        self.top_ks += other.top_ks
        self.penalties += other.penalties

    @staticmethod
    def _take(values: Any, index: Any) -> Any:
        """The rows of ``values`` at ``index``."""
        raise NotImplementedError

    @staticmethod
    def _cat(parts: list[Any], dim: int = 0) -> Any:
        """``parts`` joined along ``dim``."""
        raise NotImplementedError

    @staticmethod
    def _widened(seen: Any, width: int) -> Any:
        """``seen`` left-padded to ``width`` with each row's own first token (see ``_Rows``)."""
        raise NotImplementedError

    @staticmethod
    def _padded(uniforms: Any, draws: int) -> Any:
        """``uniforms`` with columns added up to ``draws`` (a row never reads past its own)."""
        raise NotImplementedError


class _Rows(_BatchRows):
    """The live rows of a batch as torch tensors on the model's device."""

    def __init__(self, batch: list[Work], tags: list[object], device: torch.device, pad_id: int,
                 unpenalised: Collection[int] = ()) -> None:
        import torch

        from persona.host_copies import to_device

        super().__init__(batch, tags)
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
        self.uniforms = to_device(_uniforms(settings), device)
        self.start = self.position.clone()  # where its draws begin (the decoder owns the prompts)

    @staticmethod
    def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.index_select(0, index)

    @staticmethod
    def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        import torch

        return torch.cat(parts, dim=dim)

    @staticmethod
    def _widened(seen: torch.Tensor, width: int) -> torch.Tensor:
        import torch

        return torch.cat([seen[:, :1].expand(-1, width - seen.shape[1]), seen], dim=1)

    @staticmethod
    def _padded(uniforms: torch.Tensor, draws: int) -> torch.Tensor:
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


# How the engine holds a batch's rows: torch's tensors, or numpy's arrays for llama.cpp.
Arrays: TypeAlias = "TorchArrays | HostArrays"
