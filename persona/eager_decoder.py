"""The eager decoder: Hugging Face's own modules for any causal LM (the engine's ``eager`` mode)."""

from __future__ import annotations

import inspect

import torch

__all__: list[str] = []


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
