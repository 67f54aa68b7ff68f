"""The eager decoder: Hugging Face's own modules for any causal LM (the engine's ``eager`` mode)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

__all__: list[str] = []

# A prompt longer than this is read in chunks of it, so a read can stop between two (the
# engine's ``stop``, at a deadline); a shorter one is read in one pass, as before.
PROMPT_CHUNK_TOKENS = 512


class _EagerDecoder:
    """Hugging Face's own forward pass and dynamic cache, for any causal LM."""

    reads_in_chunks = True  # ``start`` takes ``stop``

    def __init__(self, model) -> None:
        self.model = model
        # transformers renamed `past_key_values` to `cache` in 5.2x; accept both.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # A chunked read asks only for the last position's logits, where the model can skip
        # the others' (8,000 prompt tokens' worth of a 49,152-token vocabulary was 1.5 GB and
        # most of the read's time). A read in one pass asks for all, as before: skipping them
        # moves its logits by ~1e-7, and a greedy reply could change.
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = None
        self.attention_mask = torch.empty(0)

    def start(
        self, input_ids, attention_mask, position_ids, room: int, stop: Callable[[], bool] | None = None
    ) -> torch.Tensor | None:
        """Read the prompts (left-padded) into a new cache; their next-token logits, or None
        where ``stop`` said so between two chunks (nothing of them is kept)."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        width = input_ids.shape[1]
        if width <= PROMPT_CHUNK_TOKENS:
            self.attention_mask = attention_mask
            return self._forward(input_ids, position_ids)
        for begin in range(0, width, PROMPT_CHUNK_TOKENS):
            if begin and stop is not None and stop():
                self.cache, self.attention_mask = None, torch.empty(0)
                return None
            end = begin + PROMPT_CHUNK_TOKENS
            self.attention_mask = attention_mask[:, :end]
            positions = None if position_ids is None else position_ids[:, begin:end]
            logits = self._forward(input_ids[:, begin:end], positions, **self.last_only)
        return logits

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        one = torch.ones((tokens.shape[0], 1), dtype=self.attention_mask.dtype, device=tokens.device)
        self.attention_mask = torch.cat([self.attention_mask, one], dim=1)
        return self._forward(tokens[:, None], positions[:, None])

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.attention_mask.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]

    def _forward(self, input_ids, position_ids, **options) -> torch.Tensor:
        return self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_arg: self.cache},
            **options,
        ).logits[:, -1, :]
