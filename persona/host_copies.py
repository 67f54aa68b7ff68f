"""Copies from the host to a GPU that do not wait for the GPU.

A plain copy from pageable host memory makes the host wait until the GPU has finished
everything queued before it. The engine queues the next decode step before doing its
bookkeeping (lookahead), so such a wait on a row leaving or joining would leave the GPU
idle while the host catches up. Pinned memory can be copied in the queue instead.
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, queued behind the work there, not waited for."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
