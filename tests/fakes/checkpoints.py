"""Checkpoints for tests: perturbed or broken copies of the tiny base, registered as versions."""

from __future__ import annotations

import time
from pathlib import Path

from persona.checkpoints import CheckpointInfo, register_checkpoint


def make_checkpoint(settings, base_dir: Path, persona: str, *, seed: int, hidden: int | None = None,
                    base: str | None = None, corrupt: bool = False, nan: bool = False) -> CheckpointInfo:
    """Register a full-weight copy of the tiny base with perturbed weights (or a broken one)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if hidden is None:
        model = LlamaForCausalLM.from_pretrained(base_dir)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    else:  # the same architecture at another width: wrong shapes for this base
        config = LlamaForCausalLM.from_pretrained(base_dir).config
        config.hidden_size, config.intermediate_size = hidden, hidden * 2
        model = LlamaForCausalLM(config)
    if nan:  # loads fine, but its logits are garbage
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
    staging = settings.data_dir / f"staging-{seed}-{time.monotonic_ns()}"
    model.save_pretrained(staging)
    if corrupt:
        weights = staging / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    info = CheckpointInfo(persona=persona, version="", base=base or str(base_dir), kind="full",
                          metrics={"eval_loss": 1.0 + seed / 10})
    return register_checkpoint(settings.checkpoints_dir, staging, info)
