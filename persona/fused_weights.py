"""The decoder's weights: each layer's projections fused into a few matrices.

``LlamaDecoder`` reads a Llama-family model's weights into a ``_Layer`` per layer: q/k/v
as one matrix, gate/up as one, each a ``_Linear`` held in full precision (views of the
model's own weights, so no second copy) or, on CPU, as fbgemm's dynamic int8 linear (a
quarter of the bytes per weight).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__: list[str] = []

# The overload itself: calling the packet resolves it in Python on every call.
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


class _Linear:
    """y = x W^T (+ b), in full precision or as fbgemm dynamic int8."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, int8: bool) -> None:
        self.int8 = int8
        if int8:
            weight = weight.float()
            scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).double()
            zeros = torch.zeros(weight.shape[0], dtype=torch.long)
            # torch marks its quantized tensors deprecated (in favour of torchao, which
            # is not installed); the fbgemm kernels themselves are what we want.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantized = torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)
                self.packed = torch.ops.quantized.linear_prepack(quantized, bias.float() if bias is not None else None)
        else:
            self.weight = weight
            self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            # reduce_range: fbgemm's AVX2 path saturates 16-bit sums with the full range.
            return _LINEAR_DYNAMIC(x, self.packed, True)
        return F.linear(x, self.weight, self.bias)


def _fuse(linears, share: bool) -> torch.Tensor:
    """The linears' weights stacked; with ``share`` they become views of the result,
    so the model keeps working and holds no second copy of its weights."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    if share:
        start = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = fused[start : start + rows]
            start += rows
    return fused


def _cat_bias(*linears) -> torch.Tensor | None:
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(lin.out_features) for b, lin in zip(biases, linears)])


@dataclass
class _Layer:
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear
    norm1: torch.Tensor
    norm2: torch.Tensor
