"""Batched generation with each request's own sampling settings.

``TransformersEngine`` runs one decode loop over a left-padded batch: every row has its
own temperature, top-p, top-k, repetition penalty, token budget, stop strings and seed,
and a row that has finished leaves the batch at the next step (its cache rows are
dropped), so a long request does not make short ones pay for its length.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from persona import llama_decoder
from persona.models import LoadedModel
from persona.personas import Sampling

__all__ = ["ENGINE_MODES", "Completion", "Generator", "TransformersEngine", "Work", "pick_engine_mode"]

log = logging.getLogger(__name__)

# eager: Hugging Face's own modules (any causal LM). fused: the lean Llama decode loop
# at full precision (the same logits). int8: that loop with int8 weights (CPU only).
# auto: the fastest of these the model and device allow.
ENGINE_MODES = ("auto", "eager", "fused", "int8")
INT8_MIN_HIDDEN = 512  # hidden size from which int8 beats full precision on CPU


def pick_engine_mode(mode: str, loaded: LoadedModel) -> str:
    """The decode path a model gets: ``mode`` made concrete for this model and device."""
    if mode not in ENGINE_MODES:
        raise ValueError(f"unknown engine mode {mode!r}; choose one of {', '.join(ENGINE_MODES)}")
    fusable = llama_decoder.supports(loaded.model)
    on_cpu = torch.device(loaded.device).type == "cpu"
    if mode == "auto":
        if not fusable:
            return "eager"
        # int8 kernels cost a fixed few microseconds per call; only on wide layers do the
        # bytes they save pay for that (measured: slower than fused on a 32-wide model).
        wide = getattr(loaded.model.config, "hidden_size", 0) >= INT8_MIN_HIDDEN
        return "int8" if on_cpu and wide else "fused"
    if mode in ("fused", "int8") and not fusable:
        log.warning("%s is not a Llama-family model; using the eager engine instead of %s", loaded.name, mode)
        return "eager"
    if mode == "int8" and not on_cpu:
        log.warning("int8 weights are a CPU path; using the fused engine on %s", loaded.device)
        return "fused"
    return mode


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


class TransformersEngine:
    """A Hugging Face causal LM behind a per-row sampling decode loop."""

    def __init__(self, loaded: LoadedModel, mode: str = "eager") -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.stop_ids = set(loaded.stop_token_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.mode = pick_engine_mode(mode, loaded)
        if self.mode == "eager":
            self.decoder: _EagerDecoder | llama_decoder.LlamaDecoder = _EagerDecoder(self.model)
        else:
            # On a GPU each decode step replays a CUDA graph (untested here: no GPU).
            on_gpu = torch.device(loaded.device).type == "cuda"
            self.decoder = llama_decoder.LlamaDecoder(self.model, int8=self.mode == "int8", graphs=on_gpu)
        log.info("%s decodes with the %s engine", loaded.name, self.mode)

    @torch.inference_mode()
    def generate(self, batch: list[Work]) -> list[Completion]:
        """Generate every row of ``batch``; rows finish independently."""
        if not batch:
            return []
        started = time.perf_counter()
        rows = _Rows(batch, self.model.device, self.pad_id)
        room = max(w.sampling.max_new_tokens for w in batch) + 1
        logits = self.decoder.start(rows.input_ids, rows.attention_mask, rows.position_ids, room)
        results: list[Completion | None] = [None] * len(batch)
        while True:
            tokens = _sample(logits.float(), rows)
            finished = self._advance(rows, tokens, results, started)
            if finished:
                keep = [i for i in range(rows.size) if i not in finished]
                if not keep:
                    break
                rows.select(keep)
                self.decoder.select(torch.tensor(keep, device=self.model.device))
                tokens = tokens[keep]
            logits = self.decoder.step(tokens, rows.position_ids[:, -1])
        return [r for r in results if r is not None]

    def _advance(self, rows: _Rows, tokens: torch.Tensor, results: list, started: float) -> set[int]:
        """Append each row's token; return the positions of rows that are now done."""
        finished: set[int] = set()
        rows.append(tokens)
        for pos, token in enumerate(tokens.tolist()):
            index = rows.index[pos]
            work = rows.work[index]
            generated = rows.generated[index]
            reason: Literal["stop", "length"] | None = None
            if token in self.stop_ids:
                reason = "stop"
            else:
                generated.append(token)
                if work.stop and _hits_stop(self.tokenizer, generated, work.stop):
                    reason = "stop"
                elif len(generated) >= work.sampling.max_new_tokens:
                    reason = "length"
            if reason:
                finished.add(pos)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                results[index] = Completion(
                    text=_cut_at_stop(text, work.stop).strip(),
                    new_tokens=len(generated),
                    finish_reason=reason,
                    seconds=time.perf_counter() - started,
                )
        return finished


class _Rows:
    """The live rows of a batch, their masks and the state sampling needs."""

    def __init__(self, batch: list[Work], device: torch.device, pad_id: int) -> None:
        self.work = batch
        self.size = len(batch)
        self.index = list(range(self.size))
        self.generated: list[list[int]] = [[] for _ in batch]
        width = max(len(w.token_ids) for w in batch) or 1
        ids = torch.full((self.size, width), pad_id, dtype=torch.long)
        mask = torch.zeros((self.size, width), dtype=torch.long)
        for i, w in enumerate(batch):
            if w.token_ids:
                ids[i, width - len(w.token_ids) :] = torch.tensor(w.token_ids)
                mask[i, width - len(w.token_ids) :] = 1
            else:
                mask[i, -1] = 1
        self.input_ids = ids.to(device)
        self.attention_mask = mask.to(device)
        self.position_ids = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        self.seen = self.input_ids.clone()  # for the repetition penalty
        self.temperature = torch.tensor([w.sampling.temperature for w in batch], device=device)
        self.top_p = torch.tensor([w.sampling.top_p for w in batch], device=device)
        self.top_k = torch.tensor([w.sampling.top_k for w in batch], device=device)
        self.penalty = torch.tensor([w.sampling.repetition_penalty for w in batch], device=device)
        self.generators = [_generator(w.sampling.seed, device) for w in batch]
        # Plain copies, so deciding how to sample needs no device sync.
        self.temperatures = [w.sampling.temperature for w in batch]
        self.top_ks = [w.sampling.top_k for w in batch]

    def append(self, tokens: torch.Tensor) -> None:
        self.position_ids = torch.cat([self.position_ids, self.position_ids[:, -1:] + 1], dim=1)
        self.seen = torch.cat([self.seen, tokens[:, None]], dim=1)

    def select(self, keep: list[int]) -> None:
        self.size = len(keep)
        self.index = [self.index[i] for i in keep]
        for name in ("position_ids", "seen", "temperature", "top_p", "top_k", "penalty"):
            setattr(self, name, getattr(self, name)[keep])
        self.generators = [self.generators[i] for i in keep]
        self.temperatures = [self.temperatures[i] for i in keep]
        self.top_ks = [self.top_ks[i] for i in keep]


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


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

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.attention_mask = self.attention_mask[keep]

    def _forward(self, input_ids, position_ids) -> torch.Tensor:
        return self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_arg: self.cache},
        ).logits[:, -1, :]


def _sample(logits: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """One token per row, each row with its own sampling settings."""
    penalised = rows.penalty != 1.0
    if bool(penalised.any()):
        seen_scores = logits.gather(1, rows.seen)
        factor = rows.penalty[:, None]
        seen_scores = torch.where(seen_scores < 0, seen_scores * factor, seen_scores / factor)
        logits = logits.scatter(1, rows.seen, seen_scores)
    greedy = rows.temperature <= 0
    if all(t <= 0 for t in rows.temperatures):
        return logits.argmax(dim=-1)
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
    probs = sorted_logits.softmax(dim=-1)
    choice = torch.empty(rows.size, dtype=torch.long, device=logits.device)
    if all(g is None for g in rows.generators):
        choice[:] = torch.multinomial(probs, 1).squeeze(1)
    else:
        for i, generator in enumerate(rows.generators):
            choice[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    sampled = sorted_ids.gather(1, choice[:, None]).squeeze(1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _hits_stop(tokenizer, generated: list[int], stop: list[str]) -> bool:
    # Only the tail can hold a stop string that was not there one token ago.
    longest = max(len(s) for s in stop)
    tail = tokenizer.decode(generated[-(longest + 4) :], skip_special_tokens=True)
    return any(s in tail for s in stop)


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]
