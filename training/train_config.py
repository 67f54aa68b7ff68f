"""What decides a training run: its settings, checked, and saved with the checkpoint it makes;
and whether a persona can be trained with them (its name, its base), checked without torch so
that `persona train` refuses a run before the seconds torch takes to load."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from persona.checkpoint_checks import same_base
from persona.contract import MAX_SEED
from persona.errors import ConfigError
from persona.personas import NAME_PATTERN, NAME_RULE, Persona

__all__ = ["TrainConfig", "check_base_fits", "check_run_name"]

DEFAULT_EPOCHS = 5.0


class TrainConfig(BaseModel):
    """Everything that decides what a run does; saved with its checkpoint."""

    base: str = "smollm2"
    kind: Literal["lora", "full"] = "lora"
    steps: int | None = Field(None, ge=1, description="optimiser steps (default: from epochs)")
    epochs: float | None = Field(None, gt=0, description=f"passes over the data (default {DEFAULT_EPOCHS:g})")
    max_minutes: float | None = Field(None, gt=0, description="stop after this much training time "
                                       "(the learning rate decays to fit it)")
    batch_size: int = Field(8, ge=1)
    learning_rate: float | None = Field(None, gt=0, description="default 2e-4 for LoRA, 5e-5 full")
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_tokens: int = Field(256, ge=8, description="longest example, at most the model's positions; "
                            "longer documents are windowed")
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations (default: ~10 per run)")
    eval_tokens: int = Field(4096, ge=1, description="held-out tokens each evaluation during the run measures "
                             "(a fixed sample); the base and the best weights are measured on them all")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    samples: int = Field(2, ge=0, description="samples printed at each evaluation")
    sample_tokens: int = Field(40, ge=1)
    # Bounded as `ask`'s seed, so `persona train` refuses one before torch loads: one past 64 bits
    # was a traceback from torch.manual_seed once the base had loaded. (The run also seeds with
    # seed + epoch and seed + step, which stay within the 2**64 torch takes.)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        # Both given, steps silently won: a run meant to be 3 epochs stopped after 100 steps.
        if self.steps is not None and self.epochs is not None:
            raise ValueError("--steps and --epochs both set how long the run is; keep --steps for an exact "
                             "number of optimiser steps, or --epochs for passes over the corpus, not both")
        return self

    def lr(self) -> float:
        return self.learning_rate or (2e-4 if self.kind == "lora" else 5e-5)


def check_run_name(name: str) -> None:
    """Refuse a name no persona can have: it names the run's folder, its lock and its checkpoints."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ConfigError(f"{name!r} is not a persona name: {NAME_RULE}")


def check_base_fits(persona: Persona | None, base: str) -> None:
    """Refuse training an existing persona on another base than the one it speaks with."""
    # same_base: "smollm2" and "bundled" name one model, as a folder does however it is written.
    if persona is not None and not same_base(persona.model.base, base):
        raise ConfigError(
            f"persona {persona.name!r} speaks with base {persona.model.base!r}, so a checkpoint trained on "
            f"{base!r} would not fit it; leave out --base or train a new persona"
        )
