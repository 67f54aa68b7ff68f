"""Samples as the served persona writes them, drawn from a model being trained or measured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from persona.personas import Sampling
from training.batching import start_token_id

__all__ = ["max_positions", "sample_texts"]

_TORCH_SEEDS = 2**64  # torch.manual_seed takes 0 .. 2**64 - 1


def max_positions(model: Any) -> int | None:
    """The longest sequence the model has positions for; None when its config names no limit."""
    value = getattr(model.config, "max_position_embeddings", None)  # GPT-2's n_positions too
    return value if isinstance(value, int) and value > 0 else None


class _Ticker:
    """A stopping criterion that stops nothing: it tells ``on_token`` how many tokens each
    row has so far, so a caller can show progress through one batched ``generate``."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self.made = 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.made += 1
        self.on_token(self.made)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def sample_texts(model: Any, tokenizer: Any, count: int, max_new_tokens: int, seed: int, device: str, *,
                 sampling: Sampling | None = None, on_token: Callable[[int], None] | None = None) -> list[str]:
    """Samples as the served persona writes a post (``persona generate`` without ``--prefix``):
    from the start token alone, which every training document follows, with its sampling
    settings (``sampling``: the persona's; default the defaults a trained persona gets).
    Drawn without disturbing the training's random state.

    Early in a run these may begin mid-sentence: the base model has not yet learned how the
    writing starts (on the bundled model, for about the first two minutes of the Wilde
    fortunes), and the persona's posts would begin the same way. ``on_token`` is told each
    token's number as the batch is written (``max_new_tokens`` at most)."""
    if count == 0:
        return []
    sampling = sampling or Sampling()
    if (positions := max_positions(model)) is not None:  # the start token takes one
        max_new_tokens = max(1, min(max_new_tokens, positions - 1))
    start = start_token_id(tokenizer)
    ids = torch.full((count, 1), start, dtype=torch.long, device=device)
    criteria = [_Ticker(on_token)] if on_token is not None else []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        # Torch takes a seed of at most 64 bits; past that it raised, after the model had loaded.
        # A sample's seed need only repeat, so any other wraps into that range (0 .. 2**64 - 1 stay as they are).
        torch.manual_seed(seed % _TORCH_SEEDS)
        greedy = sampling.temperature == 0  # as the worker reads a temperature of 0
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=not greedy,
                             temperature=None if greedy else sampling.temperature,
                             top_p=None if greedy else sampling.top_p, top_k=None if greedy else sampling.top_k,
                             repetition_penalty=sampling.repetition_penalty, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             stopping_criteria=criteria)
    if on_token is not None:  # every row ended early (at its end-of-text): done all the same
        on_token(max_new_tokens)
    if was_training:
        model.train()
    texts = [tokenizer.decode(row[1:], skip_special_tokens=True) for row in out]
    return [_cut_at(text, sampling.stop).strip() for text in texts]


def _cut_at(text: str, stops: list[str]) -> str:
    """The text up to its first stop string, where the served persona stops writing."""
    ends = [text.index(stop) for stop in stops if stop and stop in text]
    return text[: min(ends)] if ends else text
