"""How a training run is paced: its learning rate from step to step, and the held-out
sample its evaluations measure on the way."""

from __future__ import annotations

import math

import torch

from training.batching import Example

__all__ = ["eval_sample", "lr_factor"]


def lr_factor(step: int, total_steps: int, warmup_fraction: float, time_used: float | None = None) -> float:
    """The learning rate of ``step`` as a fraction of the peak: a linear warm-up over the first
    ``warmup_fraction`` of the run, then cosine decay to a tenth of the peak at its end.

    A run ends after ``total_steps`` or when its time budget is spent, whichever comes first,
    so its progress is read off whichever of the two clocks is further along: ``time_used`` is
    the fraction of ``max_minutes`` spent (None without a budget). A run cut short by time then
    ends with the rate at its floor, as one that runs all its steps does; with only a budget,
    the five-epoch plan had a run cut by time end with the rate still near its peak. Time
    is used as it is rather than turned into a guess of the steps it allows, which would be
    wrong whenever the machine's speed or the cost of evaluations changed. A run with a
    budget is therefore not repeatable step for step (one stopped by time never was); without
    one the rate depends on the step alone, so ``resume`` stays exact.
    """
    warmup = max(1, int(total_steps * warmup_fraction))
    warm = (step + 1) / warmup
    decay = (step - warmup) / max(1, total_steps - warmup)
    if time_used is not None:
        if warmup_fraction > 0:
            warm = max(warm, time_used / warmup_fraction)
        decay = max(decay, (time_used - warmup_fraction) / (1 - warmup_fraction))
    if warm < 1:
        return warm
    progress = min(1.0, max(0.0, decay))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def eval_sample(examples: list[Example], budget_tokens: int, seed: int) -> list[Example]:
    """The held-out examples the evaluations during a run measure: all of them when they
    hold at most ``budget_tokens`` tokens, else a seeded sample of about that many.

    Ten evaluations over a thousand held-out documents took minutes each on a small CPU,
    out of a ``max_minutes`` budget. The sample is the same at every evaluation (and again
    on ``resume``), so evaluations compare like with like; choosing the best weights needs
    no more. The figures a run reports, base and best, are measured on every example.
    """
    if sum(len(e) for e in examples) <= budget_tokens:
        return examples
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: list[Example] = []
    tokens = 0
    for index in order:
        if chosen and tokens + len(examples[index]) > budget_tokens:
            break
        chosen.append(examples[index])
        tokens += len(examples[index])
    return chosen
