"""Turning documents into training examples that never run into each other.

Every document becomes ``[start] + its tokens + [end-of-text]``, where the start token is
the one the serving side begins a fresh completion with (``persona/prompting.py``). A
document longer than the context is cut into windows, and only its last window carries
the end-of-text token. Examples are padded, never packed, so no example holds two
documents: the model learns where a post ends, and never learns to run on into the next.

The writing is read as text: an author who quotes "<|im_end|>" or "<|endoftext|>" wrote
those characters, and the only start and end tokens an example holds are its own (the
serving side reads what a person wrote the same way).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from persona.tokenizing import encode_as_text

__all__ = ["Example", "batch_tensors", "encode_documents", "evaluate_loss", "perplexity", "start_token_id", "summed_loss"]

IGNORE_INDEX = -100
Example = list[int]


def start_token_id(tokenizer: Any) -> int | None:
    """The token a fresh document starts with: BOS, else end-of-text, as the worker does."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_documents(tokenizer: Any, texts: list[str], max_tokens: int) -> list[Example]:
    """Token ids of each document framed by start and end-of-text, in windows of ``max_tokens``."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-text token; a persona could never stop writing")
    start = start_token_id(tokenizer)
    head = [start] if start is not None else []
    examples: list[Example] = []
    for text in texts:
        # One document at a time: a corpus encoded at once would hold every token's offsets.
        # (Nor is a long document warned about: it is windowed below.)
        [body] = encode_as_text(tokenizer, [text])
        ids = [*head, *body, tokenizer.eos_token_id]
        if len(ids) <= max_tokens:
            examples.append(ids)
            continue
        # Windows overlap by one token so every token is predicted exactly once.
        step = max_tokens - 1
        for begin in range(0, len(ids) - 1, step):
            examples.append(ids[begin : begin + max_tokens])
    return examples


def batch_tensors(examples: list[Example], pad_id: int, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding ignored)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = torch.tensor(example)
        mask[row, : len(example)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def summed_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of per-token losses, number of predicted tokens) for one batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return losses, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_loss(model: Any, examples: list[Example], pad_id: int, device: str, batch_size: int = 8,
                  on_batch: Callable[[int], None] | None = None) -> float:
    """Mean loss per predicted token over the examples (perplexity is its exponent);
    ``on_batch`` is told how many examples are done after each batch."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # Similar lengths together: less padding, same result.
    ordered = sorted(examples, key=len)
    for begin in range(0, len(ordered), batch_size):
        loss, tokens = summed_loss(model, batch_tensors(ordered[begin : begin + batch_size], pad_id, device))
        total += float(loss)
        count += tokens
        if on_batch is not None:
            on_batch(min(begin + batch_size, len(ordered)))
    if was_training:
        model.train()
    return total / count if count else math.nan


def perplexity(loss: float) -> float:
    """exp(loss), infinite for a wrecked model instead of an overflow, NaN for no data."""
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf
